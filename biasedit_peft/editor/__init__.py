"""The BiasEdit editor: MALMEN hyper-networks, ridge solve, losses, caching, meta-training."""

from .editor import BiasEditor, BiasEditorConfig, DebiasReport
from .nets import EditorNet
from .presets import PRESETS, Preset, preset_for_model, preset_name_for
from .solve import RidgeDelta, RidgeSolution, solve_ridge
from .trainer import BiasEditTrainer, BiasEditTrainingArguments

__all__ = [
    "PRESETS",
    "BiasEditTrainer",
    "BiasEditTrainingArguments",
    "BiasEditor",
    "BiasEditorConfig",
    "DebiasReport",
    "EditorNet",
    "Preset",
    "RidgeDelta",
    "RidgeSolution",
    "preset_for_model",
    "preset_name_for",
    "solve_ridge",
]

"""BiasEdit as a peft tuner: config, adapter layers, tuner model, registration, delta API."""

from .config import BiasEditConfig
from .deltas import delta_nbytes, edit_targets, get_deltas, override_deltas, set_deltas
from .layer import BiasEditLayer, Linear
from .model import MLP_OUTPUT_PROJECTION, BiasEditModel, default_target_suffix
from .registration import RegistrationError, register

__all__ = [
    "BiasEditConfig",
    "BiasEditLayer",
    "BiasEditModel",
    "Linear",
    "MLP_OUTPUT_PROJECTION",
    "RegistrationError",
    "default_target_suffix",
    "delta_nbytes",
    "edit_targets",
    "get_deltas",
    "override_deltas",
    "register",
    "set_deltas",
]

register()

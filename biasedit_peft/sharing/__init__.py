"""Sharing and shipping BiasEdit artifacts: Hub upload with our model cards, merged checkpoints, LoRA export."""

from .hub import push_adapter_to_hub, push_folder_to_hub
from .lora_export import LoraExportReport, ModuleExport, export_lora, export_lora_from_peft_model
from .merge import (
    MergeReport,
    TensorChange,
    load_adapters,
    merge_adapters,
    merge_adapters_with_report,
    merge_deltas_into,
    merge_to_folder,
    save_merged,
)
from .model_card import adapter_model_card, editor_model_card, flatten_metrics, metrics_table

__all__ = [
    "LoraExportReport",
    "MergeReport",
    "ModuleExport",
    "TensorChange",
    "adapter_model_card",
    "editor_model_card",
    "export_lora",
    "export_lora_from_peft_model",
    "flatten_metrics",
    "load_adapters",
    "merge_adapters",
    "merge_adapters_with_report",
    "merge_deltas_into",
    "merge_to_folder",
    "metrics_table",
    "push_adapter_to_hub",
    "push_folder_to_hub",
    "save_merged",
]

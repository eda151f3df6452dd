"""Adapter families. Importing this package registers every family with the bank."""

from adaptkit.core.errors import AdapterError
from adaptkit.core.registry import METHODS, adapter_class_for, register_method
from adaptkit.methods.adalora import AdaLoRA
from adaptkit.methods.base import Adapter, AdapterConfig
from adaptkit.methods.bottleneck import Bottleneck
from adaptkit.methods.fusion import Fusion
from adaptkit.methods.lora import LoRA
from adaptkit.methods.merging import MERGE_METHODS, merge_adapters
from adaptkit.methods.prefix import Prefix

__all__ = [
    "MERGE_METHODS", "METHODS", "AdaLoRA", "Adapter", "AdapterConfig", "AdapterError", "Bottleneck", "Fusion", "LoRA",
    "Prefix", "adapter_class_for", "merge_adapters", "register_method",
]

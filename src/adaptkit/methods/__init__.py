"""Adapter families. Importing this package registers every family with the bank."""

from .adalora import AdaLoRA
from .base import METHODS, Adapter, AdapterConfig, AdapterError, adapter_class_for, register_method
from .bottleneck import Bottleneck
from .lora import LoRA
from .prefix import Prefix

__all__ = [
    "METHODS", "AdaLoRA", "Adapter", "AdapterConfig", "AdapterError", "Bottleneck", "LoRA", "Prefix",
    "adapter_class_for", "register_method",
]

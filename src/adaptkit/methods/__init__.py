"""Adapter families. Importing this package registers every family with the bank."""

from .base import METHODS, Adapter, AdapterConfig, AdapterError, adapter_class_for, register_method
from .lora import LoRA

__all__ = ["METHODS", "Adapter", "AdapterConfig", "AdapterError", "LoRA", "adapter_class_for", "register_method"]

"""adaptkit: one frozen pretrained backbone, many small adapters of any family, hot-swapped per call and per row."""

from .adapterfile import AdapterStore, read_adapter_info
from .bank import AdaptedModel, load
from .methods import METHODS, Adapter, AdapterConfig, AdapterError, LoRA, register_method
from .routing import current_routing

__version__ = "0.1.0"

__all__ = [
    "METHODS", "AdaptedModel", "Adapter", "AdapterConfig", "AdapterError", "AdapterStore", "LoRA",
    "current_routing", "load", "read_adapter_info", "register_method",
]

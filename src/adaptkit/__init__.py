"""adaptkit: one frozen pretrained backbone, many small adapters of any family, hot-swapped per call and per row."""

from .adapterfile import AdapterStore, read_adapter_info
from .bank import AdaptedModel, load
from .methods import METHODS, AdaLoRA, Adapter, AdapterConfig, AdapterError, Bottleneck, LoRA, Prefix, register_method
from .metrics import evaluate
from .peft_interop import export_peft
from .peft_interop import import_peft_dir as import_peft
from .routing import current_routing
from .train import TrainConfig, train  # ak.train is the function; import the rest from adaptkit.train

__version__ = "0.1.0"

__all__ = [
    "METHODS", "AdaLoRA", "AdaptedModel", "Adapter", "AdapterConfig", "AdapterError", "AdapterStore", "Bottleneck",
    "LoRA", "Prefix",
    "TrainConfig", "current_routing", "evaluate", "export_peft", "import_peft", "load", "read_adapter_info",
    "register_method", "train",
]

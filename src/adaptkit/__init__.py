"""adaptkit: one frozen pretrained backbone, many small adapters of any family, hot-swapped per call and per row."""

from adaptkit.core.adapterfile import AdapterStore, read_adapter_info
from adaptkit.core.bank import AdaptedModel, load
from adaptkit.core.routing import current_routing
from adaptkit.evaluation import evaluate
from adaptkit.interop.peft import export_peft
from adaptkit.interop.peft import import_peft_dir as import_peft
from adaptkit.methods import (
    METHODS,
    AdaLoRA,
    Adapter,
    AdapterConfig,
    AdapterError,
    Bottleneck,
    Fusion,
    LoRA,
    Prefix,
    merge_adapters,
    register_method,
)
from adaptkit.tasks.classify import Classifier
from adaptkit.tasks.generate import Generator
from adaptkit.tasks.translate import Translator
from adaptkit.training.trainer import (  # ak.train is the function; import the rest from adaptkit.training
    TrainConfig,
    train,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS", "AdaLoRA", "AdaptedModel", "Adapter", "AdapterConfig", "AdapterError", "AdapterStore", "Bottleneck",
    "Classifier", "Fusion", "Generator", "LoRA", "Prefix",
    "TrainConfig", "Translator", "current_routing", "evaluate", "export_peft", "import_peft", "load",
    "merge_adapters", "read_adapter_info", "register_method", "train",
]

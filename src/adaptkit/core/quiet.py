"""Two import-time messages of optional dependencies that say nothing about adaptkit, dropped.

transformers imports torchao whenever it is installed (the `quant` extra). On every import on a
machine without CUDA, torchao then logs its CUDA-only kernels as "Failed to load ..." and torch logs
that torchao registers its enums the old way. int8 on CPU works regardless; only those two messages
are filtered, every other record of both loggers still shows. Imported by `adaptkit.core` before
anything imports transformers.
"""

import logging


def _drop_torchao_cuda_kernels(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to load")


def _drop_enum_registration(record: logging.LogRecord) -> bool:
    return "is an Enum subclass and is now natively supported" not in record.getMessage()


logging.getLogger("torchao").addFilter(_drop_torchao_cuda_kernels)
logging.getLogger("torch.utils._pytree").addFilter(_drop_enum_registration)

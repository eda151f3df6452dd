"""Import-time messages of optional dependencies that say nothing about adaptkit, dropped.

transformers imports torchao whenever it is installed (the `quant` extra). On every import on a
machine without CUDA, torchao then logs its CUDA-only kernels as "Failed to load ..." and torch logs
that torchao registers its enums the old way. int8 on CPU works regardless; only those two messages
are filtered, every other record of both loggers still shows. Imported by `adaptkit.core` before
anything imports transformers.

bitsandbytes (quantize="nf4" on CPU) warns at import, on CPUs with AVX512-BF16, that the `kernels`
package for its repacked 4-bit kernel is missing; adaptkit never uses that kernel (core/quantize.py
says why), so that one message is dropped too.
"""

import logging


def _drop_torchao_cuda_kernels(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to load")


def _drop_enum_registration(record: logging.LogRecord) -> bool:
    return "is an Enum subclass and is now natively supported" not in record.getMessage()


def _drop_unused_bitsandbytes_kernel(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("torchao").addFilter(_drop_torchao_cuda_kernels)
logging.getLogger("torch.utils._pytree").addFilter(_drop_enum_registration)
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_unused_bitsandbytes_kernel)

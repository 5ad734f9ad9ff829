"""ringflash: FlashAttention-2 kernels in Triton, and context-parallel attention built on them."""

from .pytorch_fa2 import FlashAttentionPyTorchFunc
from .reference import attention_ref, attention_varlen_ref

__version__ = "0.1.0"

__all__ = [
    "FlashAttentionPyTorchFunc",
    "attention_ref",
    "attention_varlen_ref",
]

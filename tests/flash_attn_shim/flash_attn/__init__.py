"""A test-only stand-in for the ``flash_attn`` package that resolves to ringflash.

Put ``tests/flash_attn_shim`` first on ``PYTHONPATH`` and ``import flash_attn`` gives
ringflash's functions under flash-attn 2's names, so flash-attn's own test file runs
against ringflash (``scripts/flash_attn_tests.py``). It holds only what that file imports;
it is not an installable replacement for flash-attn.
"""

from .flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]

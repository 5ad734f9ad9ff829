"""``flash_attn.flash_attn_interface``: ringflash's attention functions, and the two helpers
flash-attn's tests import from here (``_get_block_size_n``, ``USE_TRITON_ROCM``).

``flash_attn_with_kvcache`` is ``ringflash.flash_attn_with_kvcache`` itself. The six
dense/varlen/packed functions are ringflash's, wrapped only to restate ``S_dmask`` (returned
with ``return_attn_probs=True`` and dropout) in flash-attn's form; see ``_get_block_size_n``.
"""

from __future__ import annotations

import functools

import torch

import ringflash
from ringflash import flash_attn_with_kvcache

__all__ = [
    "USE_TRITON_ROCM",
    "_get_block_size_n",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
]

#: flash-attn's switch for its ROCm Triton backend; ringflash is not that backend.
USE_TRITON_ROCM = False

#: The key-block size this shim reports: larger than any key count, so one block holds every
#: key of a row.
_ONE_BLOCK = 1 << 62


def _get_block_size_n(device=None, head_dim=None, is_dropout=None, is_causal=None) -> int:
    """The key-block size in which ``S_dmask`` is stated: one block covering all keys.

    flash-attn's ``S_dmask`` holds ``exp(s - m_j)``, the scores of key block j exponentiated
    against the running row max ``m_j`` the kernel had when it reached that block (its
    blocks go last to first), with dropped entries negated. Its tests undo that per block:
    ``attn = S * exp(m_j - lse)``, with ``m_j`` the max of the scores of blocks j.. end, in
    blocks of ``_get_block_size_n(...)`` keys.

    ringflash's ``S_dmask`` is already in the natural (batch, nheads, seqlen_q_rounded,
    seqlen_k_rounded) layout but holds the normalized probabilities ``exp(s - lse)``. No
    block size turns those back into probabilities through ``S * exp(m_j - lse)`` (that
    factor is below 1 whenever a row has two keys), so the wrapped functions restate
    ringflash's ``S_dmask`` as flash-attn's for a single key block: ``exp(s - m)`` with
    ``m`` the row max, which is ``P / max_j P`` per row (signs kept). Reporting one block
    here makes the tests' conversion multiply by ``exp(m - lse)`` and recover ``P``.
    """
    return _ONE_BLOCK


def _as_one_block_s_dmask(s_dmask: torch.Tensor) -> torch.Tensor:
    """ringflash's signed probabilities -> flash-attn's ``exp(s - rowmax)`` for one key block:
    each row divided by its largest magnitude (rows that see no key stay zero)."""
    row_max = s_dmask.abs().amax(dim=-1, keepdim=True)
    return torch.where(row_max > 0, s_dmask / torch.where(row_max > 0, row_max, 1.0), s_dmask)


def _flash_attn_s_dmask(fn):
    """``fn`` with its ``S_dmask`` (when there is one) restated for ``_get_block_size_n``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        result = fn(*args, **kwargs)
        if isinstance(result, tuple) and len(result) == 3 and result[2] is not None:
            out, lse, s_dmask = result
            return out, lse, _as_one_block_s_dmask(s_dmask)
        return result

    return wrapper


flash_attn_func = _flash_attn_s_dmask(ringflash.flash_attn_func)
flash_attn_kvpacked_func = _flash_attn_s_dmask(ringflash.flash_attn_kvpacked_func)
flash_attn_qkvpacked_func = _flash_attn_s_dmask(ringflash.flash_attn_qkvpacked_func)
flash_attn_varlen_func = _flash_attn_s_dmask(ringflash.flash_attn_varlen_func)
flash_attn_varlen_kvpacked_func = _flash_attn_s_dmask(ringflash.flash_attn_varlen_kvpacked_func)
flash_attn_varlen_qkvpacked_func = _flash_attn_s_dmask(ringflash.flash_attn_varlen_qkvpacked_func)

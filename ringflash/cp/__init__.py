"""Context-parallel attention over torch.distributed: strategies zigzag_llama3, llama3,
ring, zigzag_ring, stripe, ulysses and hybrid (Ulysses x zigzag_llama3), forward and
backward, built on ringflash's kernels.

``Plan`` is the entry point for new code; the ring-flash-attn-compatible functions live in
``ringflash.cp.api`` and are re-exported at the package top level.
"""

from .layout import STRATEGIES
from .plan import Plan

__all__ = ["Plan", "STRATEGIES"]

"""The one local-attention call of every context-parallel strategy: attention of the local
queries against a buffer of keys (gathered, or visiting on the ring), described by a
``SeqMeta`` whose entries carry explicit diagonals in global positions. Forward and
backward go straight to the kernels' launchers, writing into the caller's buffers."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from ..kernels.bwd import attention_backward
from ..kernels.fwd import attention_forward
from ..kernels.problem import AttnProblem, SeqMeta, make_problem

#: Execution modes of the local step with several query groups (zigzag_llama3).
MODES = ("grouped", "two_kernels")


@dataclass(frozen=True)
class LocalParams:
    softmax_scale: float
    causal: bool
    window_left: int
    window_right: int
    softcap: float

    def problem(self, q: torch.Tensor, k: torch.Tensor, meta: SeqMeta, max_q: int, max_k: int) -> AttnProblem:
        return make_problem(q, k, meta, max_q, max_k, self.softmax_scale, self.causal,
                            self.window_left, self.window_right, self.softcap)


def _group(meta: SeqMeta, g: int) -> SeqMeta:
    pick = lambda t: None if t is None else t[g:g + 1]  # noqa: E731
    return replace(meta, q_starts=meta.q_starts[g:g + 1], q_ends=meta.q_ends[g:g + 1],
                   seqused_k=pick(meta.seqused_k), diag=pick(meta.diag))


def local_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: SeqMeta, params: LocalParams,
    max_q: int, max_k: int, out: torch.Tensor, lse: torch.Tensor, mode: str = "grouped",
) -> None:
    """Writes the rows the entries cover into ``out`` (n, h, d) and ``lse`` (h, n)."""
    if mode == "two_kernels" and meta.num_groups > 1:
        for g in range(meta.num_groups):
            sub = _group(meta, g)
            attention_forward(q, k, v, params.problem(q, k, sub, max_q, max_k), sub, out=out, lse=lse)
        return
    attention_forward(q, k, v, params.problem(q, k, meta, max_q, max_k), meta, out=out, lse=lse)


def local_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    meta: SeqMeta, params: LocalParams, max_q: int, max_k: int,
    dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
    prepared: Optional[tuple[torch.Tensor, torch.Tensor]] = None, mode: str = "grouped",
    after_dkdv: Optional[Callable[[], None]] = None, dkv_rows: Optional[torch.Tensor] = None,
) -> None:
    """Writes dq for the covered rows and dk/dv for every key of the buffer's sequences
    (key i to row ``dkv_rows[i]`` of dk/dv when given); ``after_dkdv`` runs once dk/dv are
    complete on the stream (before dq, when one call)."""
    if mode == "two_kernels" and meta.num_groups > 1:
        # With dkv_rows the kernels write only those rows; the rest of a part must add
        # nothing (the local-first split keeps this rank's own dK/dV in the other rows).
        part = torch.empty_like if dkv_rows is None else torch.zeros_like
        dk_part, dv_part = part(dk), part(dv)
        for g in range(meta.num_groups):
            sub = _group(meta, g)
            prob = params.problem(q, k, sub, max_q, max_k)
            first = g == 0
            attention_backward(dout, q, k, v, out, lse, prob, sub, dq=dq, dk=dk if first else dk_part,
                               dv=dv if first else dv_part, prepared=prepared, dkv_rows=dkv_rows)
            if not first:
                dk.add_(dk_part)
                dv.add_(dv_part)
        if after_dkdv is not None:
            after_dkdv()
        return
    prob = params.problem(q, k, meta, max_q, max_k)
    attention_backward(dout, q, k, v, out, lse, prob, meta, dq=dq, dk=dk, dv=dv, prepared=prepared,
                       after_dkdv=after_dkdv, dkv_rows=dkv_rows)

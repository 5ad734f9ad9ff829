"""Thin autograd Functions over the ``ringflash::attn_fwd`` / ``attn_bwd`` custom ops."""

from __future__ import annotations

from typing import Optional

import torch

from . import ops
from . import validation as V
from .kernels.problem import SeqMeta


class FlashAttnFunc(torch.autograd.Function):
    """Dense (meta is None), varlen or grouped attention. Returns (out, lse); lse is not
    differentiable. ``meta`` is a ``SeqMeta`` (see ringflash.kernels.problem); ``guard``
    asks for the device-side check of plain varlen metadata (see ringflash.ops);
    ``alibi_slopes`` are float32 (1 or batch, nheads), not differentiated (as in flash-attn);
    ``dropout_seed`` (CPU int64, one element) seeds the dropout mask, which the backward
    regenerates from it."""

    @staticmethod
    def forward(
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: Optional[SeqMeta],
        max_seqlen_q: int,
        max_seqlen_k: int,
        softmax_scale: float,
        causal: bool,
        window_left: int,
        window_right: int,
        softcap: float,
        guard: bool = False,
        alibi_slopes: Optional[torch.Tensor] = None,
        dropout_p: float = 0.0,
        dropout_seed: Optional[torch.Tensor] = None,
        deterministic: bool = False,
    ):
        seq = _seq_args(meta)
        args = (max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right, softcap)
        out, lse = ops.fwd(q, k, v, *seq, *args, guard, alibi_slopes, dropout_p, dropout_seed)
        ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, dropout_seed, *seq)
        ctx.args = args
        ctx.dropout_p = dropout_p
        ctx.deterministic = deterministic
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: torch.Tensor, _dlse: Optional[torch.Tensor]):
        q, k, v, out, lse, alibi_slopes, dropout_seed, *seq = ctx.saved_tensors
        refuse_double_backward(q, k, v, dout)
        dq, dk, dv = ops.bwd(dout, q, k, v, out, lse, *seq, *ctx.args, alibi_slopes, ctx.dropout_p, dropout_seed,
                             ctx.deterministic)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None, None, None


def refuse_double_backward(*tensors: Optional[torch.Tensor]) -> None:
    """The kernels' gradients carry no graph of their own: a backward asked to build one
    (``create_graph=True``, grad mode on inside it) through inputs that require grad would
    give second-order gradients without this attention's term, silently. Raise instead.
    ``tensors``: the backward's saved inputs and incoming gradient (None entries skipped);
    none given: autograd calls this backward only for inputs that require grad (the
    context-parallel engines save copies that do not)."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling() and (not tensors or any(
            t is not None and t.requires_grad for t in tensors)):
        raise RuntimeError("ringflash attention: double backward (torch.autograd.grad(..., create_graph=True) "
                           "through q, k or v) is not supported; its gradients have no graph of their own. Expected "
                           "create_graph=False, or attention_ref for higher-order gradients")


def _seq_args(meta: Optional[SeqMeta]) -> tuple:
    """The op's five metadata arguments (all None for a dense call)."""
    return (None,) * 5 if meta is None else (meta.q_starts, meta.q_ends, meta.cu_seqlens_k, meta.seqused_k, meta.diag)


def tracks_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd would record a call on these tensors (None entries ignored): the
    calls that skip the autograd Functions, and the memos of validated calls, need it
    false."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # a plain loop (torch.compile traces it)
        if t is not None and t.requires_grad:
            return True
    return False


def apply_flash_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: Optional[SeqMeta], max_seqlen_q: int,
    max_seqlen_k: int, softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
    guard: bool = False, alibi_slopes: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
    dropout_seed: Optional[torch.Tensor] = None, deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``FlashAttnFunc.apply`` (same arguments), or the forward op alone when no gradient can
    flow (inference, decoding): the autograd Function's bookkeeping is a fixed host cost
    per call (about 25 us on a CPU), which a call with nothing to differentiate skips."""
    if tracks_grad(q, k, v):
        return FlashAttnFunc.apply(q, k, v, meta, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
                                   window_right, softcap, guard, alibi_slopes, dropout_p, dropout_seed, deterministic)
    return ops.fwd(q, k, v, *_seq_args(meta), max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
                   window_right, softcap, guard, alibi_slopes, dropout_p, dropout_seed)


def apply_paged_kv(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """``PagedKVAttnFunc.apply`` (same arguments), or the op alone when no gradient can flow,
    as ``apply_flash_attn`` does: serving calls run without autograd, and the Function's
    bookkeeping is a fixed host cost per call."""
    if tracks_grad(q, k_cache, v_cache):
        return PagedKVAttnFunc.apply(q, k_cache, v_cache, *args)
    return ops.paged_fwd(q, k_cache, v_cache, *args)


#: Validated calls of ``FlashAttentionTritonFunc`` (``V.call_key``) -> the op's arguments.
_SEED_CALLS: dict[tuple, tuple] = {}


class FlashAttentionTritonFunc(torch.autograd.Function):
    """The Triton kernels behind the seed's 3-D interface: ``.apply(Q, K, V, is_causal)``.

    Q: (batch, n_queries, d); K, V: (batch, n_keys, d); scale 1/sqrt(d); causal aligned to
    the bottom right. Returns O (batch, n_queries, d). Saves Q, K, V, O and L, the
    natural-log logsumexp, as (batch, n_queries).
    """

    @staticmethod
    def forward(ctx, Q: torch.Tensor, K: torch.Tensor, Vt: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        # A repeated call's checks are remembered, as flash_attn_func's are (its host time
        # decides a small call's speed: run 39 timed seed 004's one-head case at 0.41x FA2).
        key = None if torch.compiler.is_compiling() else V.call_key((Q, K, Vt), (is_causal,))
        args = _SEED_CALLS.get(key) if key is not None else None
        if args is None:
            is_causal = V.as_bool("is_causal", is_causal)
            V.check_rank("Q", Q, 3, "(batch, n_queries, d)")
            V.check_rank("K", K, 3, "(batch, n_keys, d)")
            V.check_rank("V", Vt, 3, "(batch, n_keys, d)")
            shape = V.check_dense_qkv(Q.unsqueeze(2), K.unsqueeze(2), Vt.unsqueeze(2))
            args = (shape.seqlen_q, shape.seqlen_k, shape.headdim ** -0.5, is_causal, -1, -1, 0.0)
            if key is not None:
                V.remember(_SEED_CALLS, key, args)
        out, lse = ops.fwd(Q.unsqueeze(2), K.unsqueeze(2), Vt.unsqueeze(2), None, None, None, None, None, *args)
        O, L = out.squeeze(2), lse.squeeze(1)
        ctx.save_for_backward(Q, K, Vt, O, L)
        ctx.args = args
        return O

    @staticmethod
    def backward(ctx, dO: torch.Tensor):
        Q, K, Vt, O, L = ctx.saved_tensors
        refuse_double_backward(Q, K, Vt, dO)
        dq, dk, dv = ops.bwd(
            dO.unsqueeze(2), Q.unsqueeze(2), K.unsqueeze(2), Vt.unsqueeze(2), O.unsqueeze(2), L.unsqueeze(1),
            None, None, None, None, None, *ctx.args,
        )
        return dq.squeeze(2), dk.squeeze(2), dv.squeeze(2), None


class PagedKVAttnFunc(torch.autograd.Function):
    """Varlen attention against a paged KV cache (``ops.paged_fwd``): forward only, as in
    flash-attn. Inputs may require grad (the forward runs, as flash-attn's tests do), but a
    backward through it raises rather than return gradients that were never computed."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, seqused_k: Optional[torch.Tensor], *args):
        out, lse = ops.paged_fwd(q, k_cache, v_cache, block_table, cu_seqlens_q, cu_seqlens_k, seqused_k, *args)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: torch.Tensor, _dlse: Optional[torch.Tensor]):
        raise NotImplementedError(
            "flash_attn_varlen_func: block_table (a paged KV cache) is forward-only, as in flash-attn; expected "
            "no backward through it (run it under torch.no_grad(), or pass contiguous k/v without block_table)"
        )

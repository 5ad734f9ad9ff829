"""Varlen attention whose layout comes from a padding mask or from packed ``position_ids``,
as one pair of custom ops (``ringflash::layout_attn_fwd`` / ``ringflash::layout_attn_bwd``).

Reading the layout needs the host (how many tokens each row keeps, where documents start,
the longest one), which ``torch.compile`` can only trace by breaking the graph. Inside a
custom op that work is opaque to Dynamo: a compiled model keeps one graph, and the op
computes the layout when it runs, with real tensors.

The layout is cached against the tensor it comes from (``LastLayout``): every layer of a
forward, and its backward, pass the same mask or position_ids tensor, so the host reads
it once per forward rather than once per layer.

Layouts:

* ``"mask"``: a (batch, width) padding mask: 1 (or any nonzero but ``UNFILLED``) keeps a
  token, 0 pads it. Keys are the kept tokens of each row; queries are the kept tokens
  among the row's last q_len positions (q_len < kv_len during generation with a KV cache).
  Padded query rows get out = 0, lse = -inf. A mask wider than kv_len is aligned right
  (its last kv_len columns: a sliding-window layer's keys). ``UNFILLED`` (2) marks key
  slots of a static cache past the tokens seen so far, always at the row's end: the row's
  positions end at the first of them, so the queries are the q_len positions before it
  (transformers' flash path slices the keys to the mask's width instead; a mask narrower
  than kv_len is read so, its missing columns unfilled). With ``every_query`` (attention
  that is not causal and whose queries are not the keys: cross-attention) the mask is
  the keys' only and every query is kept. With ``positions`` (batch 1, q_len == kv_len) a
  mask that keeps every token gives way to the ``"positions"`` layout of those
  position_ids: transformers drops an all-ones mask before attention sees it, except
  under ``torch.compile``, where the mask builder cannot test its values.
* ``"positions"``: (1, n) position_ids of one packed row: a document starts wherever the
  position is 0 (or the row is one document when it never restarts). A row that is one
  document runs the dense kernels.

Shapes: q (batch, q_len, nheads, d), k/v (batch, kv_len, nheads_k, d); out like q; lse
(batch, nheads, q_len) float32, natural log. Causal masks and windows are aligned to the
bottom right of each sequence, as everywhere in ringflash.
"""

from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch

from ..autograd import refuse_double_backward
from ..kernels import dispatch
from ..kernels.problem import SeqMeta, make_problem
from ..validation import tensor_version

LAYOUT_KINDS = ("mask", "positions")


class LastLayout:
    """The layout of the most recent source tensor: every layer of a forward passes the same
    tensor object, so the host reads its lengths once. The tensor is held by a weak
    reference (a new tensor at a recycled address is a miss) with its version counter and
    storage address (an in-place change is a miss). An inference tensor has no version
    counter and is never reused."""

    def __init__(self) -> None:
        self.refs: Optional[tuple] = None
        self.key: Optional[tuple] = None
        self.value: Optional[tuple] = None

    def get(self, tensor: torch.Tensor, build: Callable[..., tuple], extra: object = None,
            also: Optional[torch.Tensor] = None):
        """``build(tensor)``, or ``build(tensor, also)`` when a second tensor is given (both
        are then held as the key)."""
        tensors = (tensor,) if also is None else (tensor, also)
        versions = tuple(tensor_version(t) for t in tensors)
        if None in versions:
            return build(*tensors)
        key = (versions, tuple(t.data_ptr() for t in tensors), extra)
        if self.refs is None or len(self.refs) != len(tensors) or any(
                ref() is not t for ref, t in zip(self.refs, tensors)) or key != self.key:
            self.refs, self.key, self.value = tuple(weakref.ref(t) for t in tensors), key, build(*tensors)
        return self.value


_mask_layouts = LastLayout()
_position_layouts = LastLayout()


def one_document_row(position_ids: torch.Tensor) -> bool:
    """Whether (1, n) ``position_ids`` make one document (its layout read on the host once
    per tensor, shared with the custom ops' cache). Eager callers use it to call the dense
    kernels directly, past the custom ops' dispatch (about 100 us of host time per
    forward+backward on a CPU, which a batch-1 step at 4k tokens waits on)."""
    return _layout(position_ids, "positions", 0, 0)[1].numel() == 2


def _cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def unpad_layout(mask: torch.Tensor) -> tuple:
    """(token indices, cu_seqlens, max_seqlen) of the kept tokens of a (batch, n) bool mask."""
    lengths = mask.sum(1, dtype=torch.int32)
    indices = mask.flatten().nonzero().flatten()
    return indices, _cu_seqlens(lengths), int(lengths.max().item()) if lengths.numel() else 0


def packed_layout(position_ids: torch.Tensor) -> tuple:
    """(cu_seqlens, max_seqlen) of the documents of one packed row (position 0 starts one)."""
    pos = position_ids.reshape(-1)
    starts = (pos == 0).nonzero().flatten().tolist()  # the one host read, cached per tensor
    if not starts or starts[0] != 0:
        # A row that never restarts (or continues a document) is one sequence.
        starts = [0] + [s for s in starts if s != 0]
    bounds = starts + [pos.numel()]
    max_len = max(b - a for a, b in zip(bounds, bounds[1:]))
    return torch.tensor(bounds, dtype=torch.int32, device=pos.device), max_len


#: A padding mask's value for the key slots of a static cache past the tokens seen so far.
UNFILLED = 2


def _positions_layout(pos: torch.Tensor) -> tuple:
    cu, max_len = packed_layout(pos)
    return None, cu, max_len, None, cu, max_len


def _mask_layout(mask: torch.Tensor, positions: Optional[torch.Tensor], q_len: int, kv_len: int,
                 every_query: bool) -> tuple:
    """The "mask" layout (module doc), read on the host."""
    batch, width = mask.shape
    if mask.dtype == torch.bool:  # room for UNFILLED
        mask = mask.to(torch.int8)
    if width >= kv_len:
        mask = mask[:, width - kv_len:]
    else:  # the missing key slots are unfilled
        mask = torch.cat([mask, mask.new_full((batch, kv_len - width), UNFILLED)], 1)
    unfilled = mask == UNFILLED
    end = kv_len  # where the rows' positions end
    if bool(unfilled.any()):
        end = int(unfilled.to(torch.int8).argmax(1).min())
        if not bool(unfilled[:, end:].all()):
            raise ValueError(f"attention_mask: unfilled key slots ({UNFILLED}) must end every row, from one column "
                             "on for the whole batch")
        if not every_query and end < q_len:
            raise ValueError(f"attention_mask: {end} filled key slots for {q_len} queries; expected at least one "
                             "slot per query")
    keep = (mask != 0) & ~unfilled
    if positions is not None and end == kv_len and bool(keep.all()):
        return _positions_layout(positions)
    keys = unpad_layout(keep)
    if every_query:
        queries = (None, torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device=mask.device), q_len)
    elif q_len == kv_len:
        queries = keys
    else:
        queries = unpad_layout(keep[:, end - q_len:end].contiguous())
    return (*queries, *keys)


def _layout(source: torch.Tensor, kind: str, q_len: int, kv_len: int, positions: Optional[torch.Tensor] = None,
            every_query: bool = False) -> tuple:
    """(q_index, cu_q, max_q, k_index, cu_k, max_k); indices are None where every row is kept."""
    if kind == "mask":
        def build(mask: torch.Tensor, pos: Optional[torch.Tensor] = None) -> tuple:
            return _mask_layout(mask, pos, q_len, kv_len, every_query)

        return _mask_layouts.get(source, build, (q_len, kv_len, every_query), also=positions)
    if kind == "positions":
        return _position_layouts.get(source, _positions_layout)
    raise ValueError(f"layout_kind: got {kind!r}; expected one of {LAYOUT_KINDS}")


def _rows(x: torch.Tensor, index: Optional[torch.Tensor]) -> torch.Tensor:
    """(batch, n, heads, d) -> the kept rows (total, heads, d)."""
    flat = x.reshape(-1, *x.shape[2:])
    return flat if index is None else flat.index_select(0, index)


def _unrows(rows: torch.Tensor, index: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_rows``: rows back into a zero (batch, n, heads, d) tensor shaped like
    ``like``; contiguous, as the custom ops' fakes say (a gradient of rows viewed from a
    heads-major ``like`` comes back in that layout)."""
    if index is None:
        return rows.reshape(like.shape).contiguous()
    full = rows.new_zeros((like.shape[0] * like.shape[1],) + tuple(rows.shape[1:]))
    return full.index_copy_(0, index, rows).view(like.shape)


def _problem(q_rows, k_rows, lay, softmax_scale, causal, window_left, window_right, softcap):
    _, cu_q, max_q, _, cu_k, max_k = lay
    meta = SeqMeta.from_cu_seqlens(cu_q, cu_k)
    prob = make_problem(q_rows, k_rows, meta, max_q, max_k, softmax_scale, causal, window_left, window_right, softcap)
    return meta, prob


def _dropout(dropout_p: float, dropout_seed: Optional[torch.Tensor]) -> Optional[tuple[float, int]]:
    return None if dropout_p == 0.0 else (dropout_p, int(dropout_seed.item()))  # a CPU tensor: no sync


def _one_sequence(q: torch.Tensor, lay: tuple) -> bool:
    """Whether the layout is the whole of one row (batch 1, nothing unpadded, one document):
    a plain dense call, which the dense kernels take (the Gluon sm_90 ones on Hopper, which
    the varlen path does not default to). transformers passes position_ids to every
    attention call, so an ordinary unpacked batch-1 row arrives here (a shape test, no sync)."""
    q_index, cu_q, _, k_index, cu_k, _ = lay
    return q.shape[0] == 1 and q_index is None and k_index is None and cu_q.numel() == 2 and cu_k.numel() == 2


def _dense_problem(q, k, softmax_scale, causal, window_left, window_right, softcap):
    return make_problem(q, k, None, q.shape[1], k.shape[1], softmax_scale, causal, window_left, window_right, softcap)


@torch.library.custom_op("ringflash::layout_attn_fwd", mutates_args=())
def layout_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: torch.Tensor, layout_kind: str,
    positions: Optional[torch.Tensor], every_query: bool,
    softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
    dropout_p: float, dropout_seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    b, q_len, h, _ = q.shape
    lay = _layout(layout, layout_kind, q_len, k.shape[1], positions, every_query)
    if _one_sequence(q, lay):
        prob = _dense_problem(q, k, softmax_scale, causal, window_left, window_right, softcap)
        out, lse = dispatch.forward(q, k, v, prob, None, dropout=_dropout(dropout_p, dropout_seed))
        return out.contiguous(), lse  # as the fake says (the kernels allocate them so)
    q_index, k_index = lay[0], lay[3]
    q_rows, k_rows, v_rows = _rows(q, q_index), _rows(k, k_index), _rows(v, k_index)
    meta, prob = _problem(q_rows, k_rows, lay, softmax_scale, causal, window_left, window_right, softcap)
    out_rows, lse_rows = dispatch.forward(q_rows, k_rows, v_rows, prob, meta, dropout=_dropout(dropout_p, dropout_seed))
    out = _unrows(out_rows, q_index, q)
    lse = lse_rows.new_full((h, b * q_len), float("-inf"))
    lse = (lse.index_copy_(1, q_index, lse_rows) if q_index is not None else lse_rows).view(h, b, q_len)
    return out, lse.transpose(0, 1).contiguous()


@layout_attn_fwd.register_fake
def _(q, k, v, layout, layout_kind, positions, every_query, softmax_scale, causal, window_left, window_right, softcap,
      dropout_p, dropout_seed):
    # Contiguous, as every real path returns them (Inductor checks the strides).
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("ringflash::layout_attn_bwd", mutates_args=())
def layout_attn_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    layout: torch.Tensor, layout_kind: str, positions: Optional[torch.Tensor], every_query: bool,
    softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float, dropout_p: float,
    dropout_seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, q_len, h, _ = q.shape
    lay = _layout(layout, layout_kind, q_len, k.shape[1], positions, every_query)
    if _one_sequence(q, lay):
        prob = _dense_problem(q, k, softmax_scale, causal, window_left, window_right, softcap)
        grads = dispatch.backward(dout, q, k, v, out, lse, prob, None, dropout=_dropout(dropout_p, dropout_seed))
        # The dense backward lays gradients out as the inputs; the unpadded path's are
        # contiguous, and the fake (which cannot tell the paths apart) says so for both.
        return tuple(g.contiguous() for g in grads)
    q_index, k_index = lay[0], lay[3]
    q_rows, k_rows, v_rows = _rows(q, q_index), _rows(k, k_index), _rows(v, k_index)
    lse_rows = lse.transpose(0, 1).reshape(h, b * q_len)
    if q_index is not None:
        lse_rows = lse_rows.index_select(1, q_index)
    meta, prob = _problem(q_rows, k_rows, lay, softmax_scale, causal, window_left, window_right, softcap)
    dq, dk, dv = dispatch.backward(_rows(dout, q_index), q_rows, k_rows, v_rows, _rows(out, q_index),
                                   lse_rows.contiguous(), prob, meta, dropout=_dropout(dropout_p, dropout_seed))
    return _unrows(dq, q_index, q), _unrows(dk, k_index, k), _unrows(dv, k_index, v)


@layout_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, layout, layout_kind, positions, every_query, softmax_scale, causal, window_left,
      window_right, softcap, dropout_p, dropout_seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, as the real ones


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, layout, layout_kind, positions, every_query, *options, dropout_seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, layout, positions, dropout_seed)
    ctx.layout_kind, ctx.every_query, ctx.options = layout_kind, every_query, options
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, layout, positions, dropout_seed = ctx.saved_tensors
    refuse_double_backward(q, k, v, dout)
    dq, dk, dv = torch.ops.ringflash.layout_attn_bwd(dout.contiguous(), q, k, v, out, lse, layout,
                                                     ctx.layout_kind, positions, ctx.every_query, *ctx.options,
                                                     dropout_seed)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


layout_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def layout_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: torch.Tensor, layout_kind: str,
    softmax_scale: float, causal: bool, window_left: int, window_right: int, softcap: float,
    dropout_p: float = 0.0, positions: Optional[torch.Tensor] = None, every_query: bool = False,
) -> torch.Tensor:
    """Attention of q (batch, q_len, nheads, d) against k/v (batch, kv_len, nheads_k, d) over
    the sequences that ``layout`` describes (see the module doc; ``positions`` and
    ``every_query`` qualify a "mask" layout there). Returns out like q. ``dropout_p`` drops
    attention probabilities as ``flash_attn_varlen_func`` does, with a seed drawn from
    PyTorch's generator."""
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64) if dropout_p > 0 else None
    out, _ = torch.ops.ringflash.layout_attn_fwd(q, k, v, layout, layout_kind, positions, every_query, softmax_scale,
                                                 causal, window_left, window_right, softcap, dropout_p, seed)
    return out

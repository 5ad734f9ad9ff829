"""The public attention API. Names and arguments follow flash-attn 2, so switching is an
import change (``from ringflash import flash_attn_func``).

Layouts:
* dense: q (batch, seqlen_q, nheads, headdim); k, v (batch, seqlen_k, nheads_k, headdim);
  lse (batch, nheads, seqlen_q).
* varlen: q (total_q, nheads, headdim); k, v (total_k, nheads_k, headdim); int32
  cu_seqlens (batch + 1,); lse (nheads, total_q).
* packed: qkv (..., 3, nheads, headdim), kv (..., 2, nheads_k, headdim), sliced (no copy)
  into the same implementation.

Semantics (see ``ringflash.reference``): nheads % nheads_k == 0 (GQA/MQA); causal and
``window_size=(left, right)`` are aligned to the bottom right; ``softcap > 0`` caps the
scaled scores with ``softcap * tanh(s / softcap)``; ``alibi_slopes`` (float32, (nheads,)
or (batch, nheads)) then add ``-slope * |i + seqlen_k - seqlen_q - j|``; lse is float32 natural-log
logsumexp, -inf (with out = 0) for rows that see no key. Head dims 1..256 (the kernels pad
to the next power of two, so 64/128/256 are fastest); fp16, bf16 and fp32 (fp32 matmuls follow
``torch.get_float32_matmul_precision()``: exact by default, tf32 under "high"/"medium";
``RINGFLASH_FP32_PRECISION`` overrides). ``deterministic=True`` keeps the
backward free of atomics (separate dK/dV and dQ kernels); otherwise the backward follows
``configs.BACKWARD_DEFAULT`` / ``RINGFLASH_BACKWARD`` (the 5-GEMM backward accumulates dQ by
atomics, whose order varies from run to run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import validation as V
from .autograd import FlashAttnFunc, apply_flash_attn, apply_paged_kv, tracks_grad
from .kernels import dispatch
from .kernels.problem import AttnProblem, SeqMeta, make_problem

AttnOutput = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]


@dataclass(frozen=True)
class _Options:
    """The validated options of one call."""

    scale: float
    causal: bool
    left: int
    right: int
    softcap: float
    alibi: Optional[torch.Tensor]  # (1 or batch, nheads) float32
    dropout_p: float
    dropout_seed: Optional[torch.Tensor]  # CPU int64 (1,), drawn from PyTorch's generator
    return_attn_probs: bool
    deterministic: bool


def _options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
             batch, nheads, headdim, seqlen_k, device) -> _Options:
    left, right = V.window_within(*V.check_window(window_size), seqlen_k)
    dropout_p = V.check_dropout_p(dropout_p)
    return _Options(
        scale=V.resolve_softmax_scale(softmax_scale, headdim), causal=V.as_bool("causal", causal), left=left,
        right=right, softcap=V.check_softcap(softcap),
        alibi=None if alibi_slopes is None else V.check_alibi_slopes(alibi_slopes, batch, nheads, device),
        dropout_p=dropout_p,
        # Drawn from PyTorch's default generator, so torch.manual_seed reproduces the masks;
        # the backward regenerates the forward's mask from the same seed.
        dropout_seed=torch.randint(0, 2**62, (1,), dtype=torch.int64) if dropout_p > 0 else None,
        return_attn_probs=V.as_bool("return_attn_probs", return_attn_probs),
        deterministic=V.as_bool("deterministic", deterministic),
    )


def _result(out: torch.Tensor, lse: torch.Tensor, opts: _Options, probs) -> AttnOutput:
    """out, or (out, lse, S_dmask) with return_attn_probs: S_dmask only with dropout, as in
    flash-attn (a testing aid; ``probs()`` computes it)."""
    if not opts.return_attn_probs:
        return out
    return out, lse, probs() if opts.dropout_p > 0 else None


#: Validated calls of ``flash_attn_func`` (``V.call_key``) -> (options, problem). A decode
#: loop calls with the same shapes at every step, and on a GPU host its checks, options and
#: problem took about 22 us a call (``bench tune --only-overhead``, run 35), a fifth of a
#: decode step's host time, which decides an eager step's speed when the kernels take less;
#: a training step at batch 1 and 4k tokens was bound by host time as well (run 39).
_CHECKED_CALLS: dict[tuple, tuple[_Options, AttnProblem]] = {}


def _memo_key(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
              return_attn_probs) -> Optional[tuple]:
    """The memo key of a ``flash_attn_func`` call that needs no dropout (whose seed is drawn
    at every call), ALiBi or tracing, or None for any other call (which then takes the whole
    path). The checks read only the tensors' metadata and the options, so a call with
    autograd and one without share the entry."""
    if torch.compiler.is_compiling() or alibi_slopes is not None or type(window_size) is not tuple or \
            len(window_size) != 2:
        return None
    key = V.call_key((q, k, v), (dropout_p, softmax_scale, causal, window_size[0], window_size[1], softcap,
                                 deterministic, return_attn_probs))
    return None if key is None or dropout_p != 0 else key


def _round128(n: int) -> int:
    return (n + 127) // 128 * 128


def _s_dmask(q, k, opts: _Options, sequences, window_keys: int) -> torch.Tensor:
    """flash-attn's S_dmask: (batch, nheads, seqlen_q rounded up to 128, seqlen_k rounded up),
    the attention probabilities (float32) with the entries dropout dropped negated, so
    ``S_dmask >= 0`` is the keep mask (zero beyond each sequence). ``sequences`` gives, per
    batch entry, (q rows (sq, h, d), k rows (sk, hk, d), its ALiBi row or None).
    ``window_keys``: the key count the call's window sides were bounded against (seqlen_k,
    or a varlen call's max_seqlen_k), as the kernels' were."""
    from .kernels.dropout_mask import dropout_keep_mask
    from .reference import attention_probs_ref

    sequences = list(sequences)
    nheads = q.shape[-2]
    max_q = max([s[0].shape[0] for s in sequences] + [0])
    max_k = max([s[1].shape[0] for s in sequences] + [0])
    out = torch.zeros((len(sequences), nheads, _round128(max_q), _round128(max_k)), dtype=torch.float32,
                      device=q.device)
    with torch.no_grad():
        for i, (q_i, k_i, slopes) in enumerate(sequences):
            # Bounded against the call's key count, not this sequence's: a varlen sequence with
            # fewer keys than a window side would otherwise see every key (the kernels' rows
            # see none where queries outnumber keys).
            probs = attention_probs_ref(q_i[None].float(), k_i[None].float(), opts.causal, opts.scale,
                                        (opts.left, opts.right), opts.softcap, slopes, window_keys=window_keys)[0]
            keep = dropout_keep_mask(1, nheads, q_i.shape[0], k_i.shape[0], opts.dropout_p,
                                     int(opts.dropout_seed.item()), q.device, first_sequence=i)[0]
            out[i, :, :q_i.shape[0], :k_i.shape[0]] = torch.where(keep, probs, -probs)
    return out


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> AttnOutput:
    """Dense attention. q (batch, seqlen_q, nheads, d), k/v (batch, seqlen_k, nheads_k, d).

    Returns out (batch, seqlen_q, nheads, d), or (out, lse, None) with return_attn_probs,
    lse (batch, nheads, seqlen_q) float32.
    """
    memo_key = _memo_key(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                         deterministic, return_attn_probs)
    known = _CHECKED_CALLS.get(memo_key) if memo_key is not None else None
    if known is not None:
        opts, prob = known
        if tracks_grad(q, k, v):
            out, lse = FlashAttnFunc.apply(q, k, v, None, prob.max_seqlen_q, prob.max_seqlen_k, opts.scale,
                                           opts.causal, opts.left, opts.right, opts.softcap, False, None, 0.0, None,
                                           opts.deterministic)
        else:
            out, lse = dispatch.forward(q, k, v, prob)
        return _result(out, lse, opts, None)
    shape = V.check_dense_qkv(q, k, v)
    opts = _options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                    return_attn_probs, shape.batch, shape.nheads, shape.headdim, shape.seqlen_k, q.device)
    out, lse = apply_flash_attn(
        q, k, v, None, shape.seqlen_q, shape.seqlen_k, opts.scale, opts.causal, opts.left, opts.right, opts.softcap,
        False, opts.alibi, opts.dropout_p, opts.dropout_seed, opts.deterministic,
    )
    if memo_key is not None:  # the problem apply_flash_attn's op builds (ops._attn_fwd_impl)
        V.remember(_CHECKED_CALLS, memo_key, (opts, make_problem(
            q, k, None, shape.seqlen_q, shape.seqlen_k, opts.scale, opts.causal, opts.left, opts.right, opts.softcap)))

    def probs():
        rows = lambda b: opts.alibi[b if opts.alibi.shape[0] > 1 else 0] if opts.alibi is not None else None  # noqa: E731
        return _s_dmask(q, k, opts, ((q[b], k[b], rows(b)) for b in range(shape.batch)), shape.seqlen_k)

    return _result(out, lse, opts, probs)


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Optional[torch.Tensor] = None,
    seqused_k: Optional[torch.Tensor] = None,
) -> AttnOutput:
    """Packed variable-length attention. q (total_q, nheads, d), k/v (total_k, nheads_k, d).

    Sequence i is q[cu_seqlens_q[i]:cu_seqlens_q[i+1]] against k/v[cu_seqlens_k[i]:...];
    with ``seqused_k`` it uses only its first seqused_k[i] keys (and aligns causal masks
    to that length). Returns out (total_q, nheads, d), or (out, lse, None), lse
    (nheads, total_q) float32.

    With ``block_table`` (int32 (batch, max_blocks), flash-attn's paged KV cache), k and v
    are caches (num_blocks, page_size, nheads_k, d) of any page size: sequence i's keys are
    slots 0 .. n_i - 1 of pages block_table[i], n_i = cu_seqlens_k[i+1] - cu_seqlens_k[i]
    (or seqused_k[i]). Forward only, without dropout, as in flash-attn; rows of a sequence
    whose keys leave its pages or meet an entry outside the cache are NaN.
    """
    if max_seqlen_q is None or max_seqlen_k is None:
        raise TypeError("max_seqlen_q, max_seqlen_k: expected ints, got None")
    if block_table is not None:
        return _paged_varlen(q, k, v, block_table, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                             softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                             return_attn_probs, seqused_k)
    shape = V.check_varlen_qkv(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k)
    opts = _options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                    return_attn_probs, shape.batch, shape.nheads, shape.headdim, shape.max_seqlen_k, q.device)
    out, lse = apply_flash_attn(
        q, k, v, SeqMeta.from_cu_seqlens(cu_seqlens_q, cu_seqlens_k, seqused_k), shape.max_seqlen_q,
        shape.max_seqlen_k, opts.scale, opts.causal, opts.left, opts.right, opts.softcap, not shape.values_checked,
        opts.alibi, opts.dropout_p, opts.dropout_seed, opts.deterministic,
    )

    def probs():
        cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()  # a testing aid: host reads are fine
        used = seqused_k.tolist() if seqused_k is not None else [b - a for a, b in zip(cu_k, cu_k[1:])]
        rows = lambda b: opts.alibi[b if opts.alibi.shape[0] > 1 else 0] if opts.alibi is not None else None  # noqa: E731
        return _s_dmask(q, k, opts, ((q[cu_q[b]:cu_q[b + 1]], k[cu_k[b]:cu_k[b] + used[b]], rows(b))
                                     for b in range(shape.batch)), shape.max_seqlen_k)

    return _result(out, lse, opts, probs)


def _paged_varlen(q, k_cache, v_cache, block_table, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                  return_attn_probs, seqused_k) -> AttnOutput:
    """flash_attn_varlen_func with a block table (see its docstring)."""
    shape = V.check_paged_varlen_qkv(q, k_cache, v_cache, block_table, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, seqused_k)
    if V.check_dropout_p(dropout_p) > 0:
        raise ValueError(f"dropout_p: got {dropout_p} with block_table; expected 0.0 (a paged KV cache is for "
                         "inference: its kernels have no dropout)")
    opts = _options(0.0, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                    return_attn_probs, shape.batch, shape.nheads, shape.headdim, shape.max_seqlen_k, q.device)
    out, lse = apply_paged_kv(
        q, k_cache, v_cache, block_table, cu_seqlens_q, cu_seqlens_k, seqused_k, shape.max_seqlen_q,
        shape.max_seqlen_k, opts.scale, opts.causal, opts.left, opts.right, opts.softcap, not shape.values_checked,
        opts.alibi,
    )
    return _result(out, lse, opts, None)


def _packed_call(pack: str, parts: tuple[str, ...], call):
    """``call()``, with an error about one of the slices it took from ``pack`` (named
    ``parts``, e.g. k and v of kv) also naming the argument the caller passed."""
    try:
        return call()
    except (ValueError, TypeError) as exc:
        named = str(exc).split(":", 1)[0].split(",")[0].strip()
        if named not in parts:
            raise
        raise type(exc)(f"{pack} (unpacked into {', '.join(parts)}): {exc}") from None


def _unpack(packed: torch.Tensor, name: str, count: int, layout: str, axis: int) -> tuple[torch.Tensor, ...]:
    V.check_tensor(name, packed)
    if packed.dim() <= axis or packed.shape[axis] != count:
        raise ValueError(f"{name}: expected shape {layout}, got {tuple(packed.shape)}")
    return packed.unbind(axis)


def flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> AttnOutput:
    """qkv (batch, seqlen, 3, nheads, d). Same as flash_attn_func on the three slices."""
    V.check_rank("qkv", qkv, 5, "(batch, seqlen, 3, nheads, headdim)")
    q, k, v = _unpack(qkv, "qkv", 3, "(batch, seqlen, 3, nheads, headdim)", 2)
    return _packed_call("qkv", ("q", "k", "v"), lambda: flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs))


def flash_attn_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> AttnOutput:
    """q (batch, seqlen_q, nheads, d), kv (batch, seqlen_k, 2, nheads_k, d)."""
    V.check_rank("kv", kv, 5, "(batch, seqlen_k, 2, nheads_k, headdim)")
    k, v = _unpack(kv, "kv", 2, "(batch, seqlen_k, 2, nheads_k, headdim)", 2)
    return _packed_call("kv", ("k", "v"), lambda: flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs))


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> AttnOutput:
    """qkv (total, 3, nheads, d) with one cu_seqlens for queries and keys."""
    V.check_rank("qkv", qkv, 4, "(total, 3, nheads, headdim)")
    q, k, v = _unpack(qkv, "qkv", 3, "(total, 3, nheads, headdim)", 1)
    return _packed_call("qkv", ("q", "k", "v"), lambda: flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal, window_size,
        softcap, alibi_slopes, deterministic, return_attn_probs))


def flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> AttnOutput:
    """q (total_q, nheads, d), kv (total_k, 2, nheads_k, d)."""
    V.check_rank("kv", kv, 4, "(total_k, 2, nheads_k, headdim)")
    k, v = _unpack(kv, "kv", 2, "(total_k, 2, nheads_k, headdim)", 1)
    return _packed_call("kv", ("k", "v"), lambda: flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
        window_size, softcap, alibi_slopes, deterministic, return_attn_probs))

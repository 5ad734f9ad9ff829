"""``flash_attn_with_kvcache``: flash-attn 2.8's attention against a KV cache, for generation,
serving and RL rollouts (forward only).

The call optionally appends new keys/values to the cache *in place* (rotating the new keys
first when rotary tables are given), then runs the decode kernels
(``ringflash.kernels.decode``): GQA heads packed into the rows, split-KV across SMs, a
contiguous or paged cache. Every index is computed on the device from ``cache_seqlens``;
nothing is read back to the host.

Positions: sequence ``b`` keeps its keys in cache slots ``cache_leftpad[b] ..
cache_seqlens[b] + seqlen_new - 1`` of its cache row (``cache_batch_idx[b]``, or ``b``; with
a ``block_table``, slot ``s`` lives in block ``block_table[b, s // page_size]`` at offset
``s % page_size``). New keys go to slots ``cache_seqlens[b] ..``. The rotary position of a
slot is the slot itself, left padding included; queries take the positions of the new
tokens (``cache_seqlens[b] + i``) when causal or windowed, else all sit at
``cache_seqlens[b]``, as in flash-attn (its kernel and its tests' reference). Causal masks and windows are
aligned to the bottom right of each sequence's keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import ops
from .autograd import tracks_grad
from . import validation as V
from .kernels.decode import cache_capacity


def _lengths_arg(name: str, value, batch: int, device: torch.device,
                 default: int) -> tuple[Optional[torch.Tensor], int]:
    """An int, None (``default``) or an int32 (batch,) tensor, as (tensor, 0) or (None, int):
    a number stays a number, which the kernels add, rather than a filled tensor (one more
    launch per call)."""
    if value is None or V.integer_value(value) is not None and not isinstance(value, torch.Tensor):
        n = default if value is None else V.integer_value(value)
        if n < 0:
            raise ValueError(f"{name}: got {n}; expected >= 0")
        return None, n
    return _as_lengths(name, value, batch, device), 0


def _as_lengths(name: str, value, batch: int, device: torch.device) -> torch.Tensor:
    """An int32 (batch,) tensor on ``device``, else a clear error."""
    V.check_rank(name, value, 1, "(batch,)")
    if value.dtype != torch.int32:
        raise TypeError(f"{name}: dtype {value.dtype} is not supported; expected int32")
    if value.shape[0] != batch:
        raise ValueError(f"{name}: has {value.shape[0]} entries; expected batch={batch}")
    if value.device != device:
        raise ValueError(f"{name}: is on device {value.device} but q is on {device}; expected {device}")
    return value


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    rotary_cos: Optional[torch.Tensor] = None,
    rotary_sin: Optional[torch.Tensor] = None,
    cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Optional[torch.Tensor] = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Attention of q (batch, seqlen_q, nheads, d) against a KV cache, after appending k/v.

    Args:
        k_cache, v_cache: (batch_cache, seqlen_cache, nheads_k, d), or with ``block_table``
            (num_blocks, page_size, nheads_k, d). Updated in place when k/v are given.
        k, v: optional new keys/values (batch, seqlen_new, nheads_k, d).
        rotary_cos, rotary_sin: optional (seqlen_ro, rotary_dim / 2); seqlen_ro must cover
            the cache's slots.
        cache_seqlens: int or int32 (batch,): keys already in the cache (None: all of it).
        cache_batch_idx: optional int32 (batch,): the cache row of each sequence.
        cache_leftpad: optional int32 (batch,): the first used slot of each sequence.
        block_table: optional int32 (batch, max_blocks): a paged cache.
        num_splits: split-KV fan-out; 0 chooses.
    Returns:
        out (batch, seqlen_q, nheads, d), and with ``return_softmax_lse`` also lse (batch,
        nheads, seqlen_q) float32 (natural log; -inf for rows that see no key).
    """
    key = _step_key(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                    block_table, softmax_scale, causal, window_size, softcap, rotary_interleaved, alibi_slopes,
                    num_splits, return_softmax_lse)
    step = _CHECKED_STEPS.get(key) if key is not None else None
    if step is None:
        step = _check_step(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                           cache_leftpad, block_table, softmax_scale, causal, window_size, softcap, rotary_interleaved,
                           alibi_slopes, num_splits, return_softmax_lse)
        if key is not None:
            V.remember(_CHECKED_STEPS, key, step)
    lengths_int, leftpad_int = _int_lengths(cache_seqlens, cache_leftpad, step)
    lengths = cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else None
    leftpad = cache_leftpad
    if leftpad_int:  # flash-attn takes a tensor only; a number is kept for convenience
        leftpad = torch.full((q.shape[0],), leftpad_int, dtype=torch.int32, device=q.device)
    elif not isinstance(leftpad, torch.Tensor):
        leftpad = None
    slopes = None if alibi_slopes is None else V.alibi_rows(alibi_slopes, q.shape[2])
    out, lse = ops.kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, lengths, lengths_int, leftpad,
                           cache_batch_idx, block_table, slopes, step.scale, step.causal, step.left, step.right,
                           step.softcap, step.rotary_interleaved, step.num_splits)
    return (out, lse) if step.return_lse else out


@dataclass(frozen=True)
class _Step:
    """The checked options of a call: everything ``ops.kvcache`` takes but the tensors and
    the numbers given for ``cache_seqlens`` / ``cache_leftpad`` (``_int_lengths``)."""
    capacity: int  # slots per sequence
    seqlen_new: int  # new keys appended
    scale: float
    causal: bool
    left: int
    right: int
    softcap: float
    rotary_interleaved: bool
    num_splits: int
    return_lse: bool
    rotary_positions: int  # rows of the rotary tables (0: no rotary)
    query_span: int  # positions the queries take from cache_seqlens on (seqlen_q if causal or windowed, else 1)


#: Checked calls by ``_step_key`` -> their ``_Step``: a generation loop calls with the same
#: shapes at every step, and the checks' host time per call is what an eager decode step pays
#: over the kernels' (``bench tune --only-overhead``).
_CHECKED_STEPS: dict[tuple, _Step] = {}


def _step_key(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
              block_table, softmax_scale, causal, window_size, softcap, rotary_interleaved, alibi_slopes, num_splits,
              return_softmax_lse) -> Optional[tuple]:
    """``V.call_key`` of a call whose checks read only metadata and option values, or None:
    while tracing, or with an input that requires grad (refused, each time, by the checks).
    An int ``cache_seqlens`` or ``cache_leftpad`` goes in by its type alone (as 0): its value
    changes from step to step and is checked at every call (``_int_lengths``)."""
    if torch.compiler.is_compiling() or type(window_size) is not tuple or len(window_size) != 2:
        return None
    lengths = (cache_seqlens, cache_leftpad)
    key = V.call_key(
        (q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_batch_idx, block_table, alibi_slopes,
         *(t if isinstance(t, torch.Tensor) else None for t in lengths)),
        (*(None if isinstance(t, torch.Tensor) else 0 if type(t) is int else t for t in lengths), softmax_scale,
         causal, window_size[0], window_size[1], softcap, rotary_interleaved, num_splits, return_softmax_lse))
    return None if key is None or tracks_grad(q, k_cache, v_cache, k, v) else key


def _check_step(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                block_table, softmax_scale, causal, window_size, softcap, rotary_interleaved, alibi_slopes, num_splits,
                return_softmax_lse) -> _Step:
    """Every check of ``flash_attn_with_kvcache``'s arguments; a clear error, or its ``_Step``."""
    V.check_rank("q", q, 4, "(batch, seqlen_q, nheads, headdim)")
    V.check_rank("k_cache", k_cache, 4, "(batch_cache, seqlen_cache, nheads_k, headdim) or (num_blocks, page_size, "
                 "nheads_k, headdim)")
    V.check_rank("v_cache", v_cache, 4, "like k_cache")
    V.check_dtype("q", q, V.KERNEL_DTYPES)
    V.check_same_dtype(("q", "k_cache", "v_cache"), (q, k_cache, v_cache))
    V.check_same_device(("q", "k_cache", "v_cache"), (q, k_cache, v_cache))
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: shape {tuple(v_cache.shape)} differs from k_cache's {tuple(k_cache.shape)}")
    batch, seqlen_q, nheads, d = q.shape
    nheads_k = k_cache.shape[2]
    if k_cache.shape[3] != d:
        raise ValueError(f"k_cache: head dim {k_cache.shape[3]} differs from q's head dim {d}; expected {d}")
    V.check_headdim("q", d, V.MAX_HEADDIM)
    V.check_heads(nheads, nheads_k)
    if (k is None) != (v is None):
        raise ValueError("k, v: give both new keys and values, or neither")
    if tracks_grad(q, k_cache, v_cache, k, v):
        raise ValueError("q, k_cache, v_cache, k, v: flash_attn_with_kvcache has no backward, but an input "
                         "requires grad; expected a call under torch.no_grad() or torch.inference_mode()")
    device = q.device
    paged = block_table is not None
    if paged:
        V.check_block_table(block_table, batch, k_cache)
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx: not supported with a paged cache (block_table); expected None")
        V.check_same_device(("q", "block_table"), (q, block_table))
    else:
        if cache_batch_idx is not None:
            V.check_tensor("cache_batch_idx", cache_batch_idx)
            cache_batch_idx = _as_lengths("cache_batch_idx", cache_batch_idx, batch, device)
            if k_cache.shape[0] == 0:  # the kernels clamp a row into the cache: it needs one
                raise ValueError(f"k_cache: shape {tuple(k_cache.shape)} has no row; expected at least one with "
                                 "cache_batch_idx")
        elif k_cache.shape[0] != batch:
            raise ValueError(f"k_cache: has {k_cache.shape[0]} rows but q has batch {batch}; expected {batch} "
                             "(or cache_batch_idx)")
    capacity = cache_capacity(k_cache, block_table)
    lengths, lengths_int = _lengths_arg("cache_seqlens", cache_seqlens, batch, device, capacity)
    _lengths_arg("cache_leftpad", cache_leftpad, batch, device, 0)
    if k is not None:
        V.check_rank("k", k, 4, "(batch, seqlen_new, nheads_k, headdim)")
        V.check_same_dtype(("q", "k", "v"), (q, k, v))
        V.check_same_device(("q", "k", "v"), (q, k, v))
        if k.shape[0] != batch or k.shape[2:] != (nheads_k, d) or v.shape != k.shape:
            raise ValueError(f"k, v: shapes {tuple(k.shape)}, {tuple(v.shape)}; expected (batch={batch}, seqlen_new, "
                             f"nheads_k={nheads_k}, headdim={d}) both")
    seqlen_new = 0 if k is None else k.shape[1]
    if seqlen_new > capacity:  # too many for any cache_seqlens: say so here, not NaN for every sequence later
        raise ValueError(f"k: {seqlen_new} new keys exceed the cache's {capacity} slots per sequence; expected at "
                         f"most {capacity}")
    if lengths is None:
        _check_room(lengths_int, seqlen_new, capacity)
    # As flash-attn: a side at least as wide as the cache is no window (the queries'
    # rotary positions depend on it).
    left, right = V.window_within(*V.check_window(window_size), capacity)
    causal = V.as_bool("causal", causal)
    if causal:
        right = 0
    rotary = rotary_cos is not None or rotary_sin is not None
    query_span = seqlen_q if causal or left >= 0 or right >= 0 else 1
    if rotary:
        _check_rotary(rotary_cos, rotary_sin, d, capacity, q)
        if lengths is None:
            _check_query_positions(lengths_int, query_span, rotary_cos.shape[0])
    splits = V.integer_value(num_splits)
    if splits is None or splits < 0:
        raise ValueError(f"num_splits: got {num_splits!r}; expected 0 (choose) or a positive int")
    if alibi_slopes is not None:
        V.check_alibi_slopes(alibi_slopes, batch, nheads, device)
    scale, cap = V.resolve_softmax_scale(softmax_scale, d), V.check_softcap(softcap)
    interleaved = V.as_bool("rotary_interleaved", rotary_interleaved)
    return_lse = V.as_bool("return_softmax_lse", return_softmax_lse)
    return _Step(capacity, seqlen_new, scale, causal, left, right, cap, interleaved, splits, return_lse,
                 rotary_cos.shape[0] if rotary else 0, query_span)


def _check_room(lengths_int: int, seqlen_new: int, capacity: int) -> None:
    if lengths_int + seqlen_new > capacity:  # a host number: say so here, not NaN later
        raise ValueError(f"cache_seqlens: {lengths_int} cached keys plus {seqlen_new} new ones exceed the cache's "
                         f"{capacity} slots; expected at most {capacity - seqlen_new}")


def _check_query_positions(lengths_int: int, query_span: int, rotary_positions: int) -> None:
    """The queries' last rotary position, from a host ``cache_seqlens``, must be in the
    tables (flash-attn asks only for one row per cache slot, and a query after a full
    cache sits past them; a device-side length there gives NaN)."""
    last = lengths_int + query_span - 1
    if last >= rotary_positions:
        raise ValueError(f"rotary_cos: the queries reach rotary position {last} ({lengths_int} cached keys, "
                         f"{query_span} query positions) but the tables have {rotary_positions} rows; expected "
                         f"more than {last}")


def _int_lengths(cache_seqlens, cache_leftpad, step: "_Step") -> tuple[int, int]:
    """(cached keys, left padding) given as numbers (0 for a tensor; None: the whole cache,
    no padding), checked at every call: a generation loop passing an int ``cache_seqlens``
    changes it at every step, so the memo keys on its type and this checks its value.
    Only called after ``_check_step`` passed a call of the same key, which settled that
    each is an int, None or a tensor."""
    lengths_int = leftpad_int = 0
    if not isinstance(cache_seqlens, torch.Tensor):
        _, lengths_int = _lengths_arg("cache_seqlens", cache_seqlens, 0, None, step.capacity)
        _check_room(lengths_int, step.seqlen_new, step.capacity)
        if step.rotary_positions:
            _check_query_positions(lengths_int, step.query_span, step.rotary_positions)
    if not isinstance(cache_leftpad, torch.Tensor):
        _, leftpad_int = _lengths_arg("cache_leftpad", cache_leftpad, 0, None, 0)
        # The keys are slots cache_leftpad .. cache_seqlens + seqlen_new - 1: a pad past the
        # cached keys (or, with a tensor cache_seqlens, past the room the cache leaves them)
        # gives every sequence NaN in the kernels; a host number can say so here.
        if isinstance(cache_seqlens, torch.Tensor):
            most, why = step.capacity - step.seqlen_new, (f"the cache's {step.capacity} slots less "
                                                          f"{step.seqlen_new} new keys")
        else:
            most, why = lengths_int, f"cache_seqlens={lengths_int}"
        if leftpad_int > most:
            raise ValueError(f"cache_leftpad: got {leftpad_int}; expected at most {most} ({why})")
    return lengths_int, leftpad_int


def _check_rotary(cos, sin, d: int, capacity: int, q: torch.Tensor) -> None:
    if cos is None or sin is None:
        raise ValueError("rotary_cos, rotary_sin: give both or neither")
    for name, t in (("rotary_cos", cos), ("rotary_sin", sin)):
        V.check_rank(name, t, 2, "(seqlen_ro, rotary_dim / 2)")
        V.check_same_device(("q", name), (q, t))
    if cos.shape != sin.shape:
        raise ValueError(f"rotary_sin: shape {tuple(sin.shape)} differs from rotary_cos's {tuple(cos.shape)}")
    for name, t in (("rotary_cos", cos), ("rotary_sin", sin)):
        if not t.is_floating_point():
            raise TypeError(f"{name}: got dtype {t.dtype}; expected a floating-point table")
    if 2 * cos.shape[1] > d:
        raise ValueError(f"rotary_cos: rotary_dim {2 * cos.shape[1]} exceeds the head dim {d}; expected <= {d}")
    if cos.shape[0] < capacity:
        raise ValueError(f"rotary_cos: has {cos.shape[0]} positions but the cache has {capacity} slots; expected "
                         f">= {capacity}")

"""Input validation shared by every public entry point.

Every failure raises ``ValueError`` (shape or value) or ``TypeError`` (dtype or
type) with a message that names the argument, what was received and what was
expected.

Checking the *values* of ``cu_seqlens`` (starts at 0, non-decreasing, ends at the
token count, longest sequence <= max_seqlen) needs to look at device memory. On a
CPU tensor that is free, so it happens at every call. On a GPU tensor it costs one
host-device sync, so it is done on the host once per tensor object (remembered
against its identity, storage address and version counter). A data loader can
still refill a tensor behind the version counter (``.data``, a numpy view,
``dist.broadcast``), so every call that does not check on the host (a remembered
tensor, ``torch.compile``, CUDA-graph capture, ``RINGFLASH_CHECK_CU_SEQLENS=0``)
checks the same facts on the device instead, without a sync
(``ringflash.kernels.guard``): invalid values turn every output of that call into
NaN, never into a plausible wrong answer. The kernels also clamp every index they
derive from ``cu_seqlens``, so no value can make them access memory out of bounds.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

#: dtypes the Triton kernels accept.
KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
#: dtypes the float reference accepts.
REFERENCE_DTYPES: tuple[torch.dtype, ...] = KERNEL_DTYPES + (torch.float64,)
#: largest head dim the kernels support.
MAX_HEADDIM = 256


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    # A sparse, mkldnn or jagged nested tensor has a float dtype and a shape, so it passed
    # every other check and failed deep in the launchers ("unsupported memory format
    # option Contiguous", "ge: relation is indeterminate").
    if x.layout is not torch.strided:
        raise TypeError(f"{name}: layout {x.layout} is not supported; expected a dense tensor (torch.strided)")
    return x


def check_rank(name: str, x: torch.Tensor, ndim: int, layout: str) -> None:
    check_tensor(name, x)
    if x.dim() != ndim:
        raise ValueError(
            f"{name}: expected a {ndim}-D tensor {layout}, got a {x.dim()}-D tensor of shape {tuple(x.shape)}"
        )


def check_dtype(name: str, x: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if x.dtype not in allowed:
        raise TypeError(f"{name}: dtype {x.dtype} is not supported; expected one of {_dtype_names(allowed)}")


def check_same_dtype(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    first = tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != first.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from {names[0]}'s dtype {first.dtype}; expected {first.dtype}")


def check_same_device(names: Sequence[str], tensors: Sequence[Optional[torch.Tensor]]) -> None:
    """The given tensors (None: absent) share one device; each is checked to be a dense tensor
    first (a non-tensor raised AttributeError on ``.device`` here)."""
    ref_name, ref = None, None
    for name, t in zip(names, tensors):
        if t is None:
            continue
        check_tensor(name, t)
        if ref is None:
            ref_name, ref = name, t
        elif t.device != ref.device:
            raise ValueError(f"{name}: is on device {t.device} but {ref_name} is on {ref.device}; expected all on {ref.device}")


def check_headdim(name: str, headdim: int, max_headdim: Optional[int]) -> None:
    if headdim < 1 or (max_headdim is not None and headdim > max_headdim):
        hi = f"1..{max_headdim}" if max_headdim is not None else ">= 1"
        raise ValueError(f"{name}: head dim {headdim} is not supported; expected {hi}")


def check_heads(nheads: int, nheads_k: int) -> None:
    if nheads_k < 1 or nheads % nheads_k != 0:
        raise ValueError(
            f"k: nheads_k={nheads_k} must divide q's nheads={nheads} (GQA/MQA); "
            f"expected a divisor of {nheads}"
        )


def integer_value(value: object) -> Optional[int]:
    """``value`` as a Python int if it is an integer (int, numpy or 0-d torch integer), not a bool."""
    if isinstance(value, (bool, float, np.bool_)):
        return None
    if isinstance(value, torch.Tensor) and (value.dim() != 0 or value.is_floating_point() or value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)  # int, numpy integers, 0-d integer tensors
    except TypeError:
        return None


def as_int(name: str, value: object) -> int:
    """An integer argument: Python and numpy integers (and 0-d integer tensors) as flash-attn takes them."""
    out = integer_value(value)
    if out is None:
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    return out


def as_bool(name: str, value: object) -> bool:
    """A flag: bool, numpy bool, or the integers 0 and 1 (flash-attn passes ``causal=1`` through).
    Anything else (a string, None, 2) is refused rather than read by its truthiness."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    as_integer = integer_value(value)
    if as_integer in (0, 1):
        return bool(as_integer)
    raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")


def is_finite(value: float) -> bool:
    """``math.isfinite`` by comparisons, which torch.compile also traces on the symbolic
    floats it makes of float arguments under ``dynamic=True`` (``math.isfinite`` on one
    broke the graph)."""
    return value == value and abs(value) != math.inf


def as_finite_float(name: str, value: object) -> float:
    """A real scalar that must be finite: NaN and infinities would silently poison the scores."""
    if isinstance(value, bool) or not isinstance(value, (int, float, numbers.Real)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    out = float(value)
    if not is_finite(out):
        raise ValueError(f"{name}: got {out}; expected a finite number")
    return out


_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def check_window(window_size: object) -> tuple[int, int]:
    """(left, right) from a pair of ints: a tuple or list, or, as flash-attn takes it, a
    2-element integer tensor or array (read on the host)."""
    if type(window_size) is tuple and len(window_size) == 2 and type(window_size[0]) is int \
            and type(window_size[1]) is int and window_size[0] >= -1 and window_size[1] >= -1:
        return window_size  # the common case, without the general path's conversions (host time per call)
    sides = None
    if isinstance(window_size, torch.Tensor) and window_size.shape == (2,) and window_size.dtype in _INT_DTYPES:
        window_size = window_size.tolist()
    elif isinstance(window_size, np.ndarray) and window_size.shape == (2,) and window_size.dtype.kind in "iu":
        window_size = window_size.tolist()
    if isinstance(window_size, (tuple, list)) and len(window_size) == 2:
        sides = [integer_value(w) for w in window_size]
    if sides is None or None in sides:
        raise TypeError(f"window_size: expected a pair of ints (left, right), got {window_size!r}")
    left, right = sides
    for side, w in (("left", left), ("right", right)):
        if w < -1:
            raise ValueError(f"window_size: {side}={w} is invalid; expected -1 (unbounded) or >= 0")
    return left, right


def window_within(left: int, right: int, seqlen_k: int) -> tuple[int, int]:
    """flash-attn's reading of a window side at least as wide as the keys (``seqlen_k``: the
    keys of a dense call, ``max_seqlen_k`` of a varlen one, a KV cache's slots): no window
    on that side (-1). It changes which keys a row sees only where queries outnumber keys
    (the right side), and, for ``flash_attn_with_kvcache``, where queries sit for rotary."""
    return -1 if left >= seqlen_k else left, -1 if right >= seqlen_k else right


def check_softcap(softcap: object) -> float:
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float, numbers.Real)):
        raise TypeError(f"softcap: expected a float, got {type(softcap).__name__}")
    value = float(softcap)
    # NaN fails every comparison, so it would pass a plain ``< 0`` test and turn capping off.
    if not (is_finite(value) and value >= 0):
        raise ValueError(f"softcap: got {value}; expected 0 (off) or a finite number > 0")
    return value


def resolve_softmax_scale(softmax_scale: object, headdim: int) -> float:
    if softmax_scale is None:
        return headdim ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float, numbers.Real)):
        raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
    return as_finite_float("softmax_scale", softmax_scale)


def check_unsupported(dropout_p: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None) -> None:
    """Options of flash-attn's interface that a caller (context parallelism, grouped
    attention) does not implement: refuse, never ignore."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float, numbers.Real)):
        raise TypeError(f"dropout_p: expected a float, got {type(dropout_p).__name__}")
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p: got {dropout_p}; ringflash supports only dropout_p=0.0 for now")
    if alibi_slopes is not None:
        raise NotImplementedError("alibi_slopes: ALiBi is not supported here; expected None "
                                  "(flash_attn_func and flash_attn_varlen_func take it)")


def check_dropout_p(dropout_p: object) -> float:
    """A dropout probability in [0, 1)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float, numbers.Real)):
        raise TypeError(f"dropout_p: expected a float, got {type(dropout_p).__name__}")
    value = float(dropout_p)
    if not 0.0 <= value < 1.0:  # NaN fails too
        raise ValueError(f"dropout_p: got {value}; expected 0 <= dropout_p < 1")
    return value


def check_alibi_slopes(alibi_slopes: object, batch: int, nheads: int, device: torch.device) -> torch.Tensor:
    """flash-attn's ALiBi slopes: float32 (nheads,) or (batch, nheads), on q's device.
    Returns them as a contiguous (1 or batch, nheads) tensor."""
    check_tensor("alibi_slopes", alibi_slopes)
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes: dtype {alibi_slopes.dtype} is not supported; expected float32")
    shape = tuple(alibi_slopes.shape)
    # Compared with ==, which torch.compile traces on symbolic sizes (a tuple's `in` did not).
    if not (shape == (nheads,) or shape == (batch, nheads)):
        raise ValueError(f"alibi_slopes: got shape {tuple(alibi_slopes.shape)}; expected (nheads,) = ({nheads},) "
                         f"or (batch, nheads) = ({batch}, {nheads})")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes: is on device {alibi_slopes.device} but q is on {device}; expected {device}")
    return alibi_rows(alibi_slopes, nheads)


def alibi_rows(alibi_slopes: torch.Tensor, nheads: int) -> torch.Tensor:
    """Checked ALiBi slopes as the kernels read them: contiguous (1 or batch, nheads)."""
    return alibi_slopes.reshape(-1, nheads).contiguous()


#: Option types that a memo of validated calls keys on by value, along with the type
#: (``softcap=True`` equals ``softcap=1.0`` but is refused).
_PLAIN_TYPES = frozenset((bool, int, float, type(None)))
_SUBCLASS = object()
#: Entries a memo of validated calls keeps before it is dropped and refilled (a key names
#: a shape, so a stream of new shapes must not grow it forever).
MEMO_ENTRIES = 256


def call_key(tensors: Sequence[Optional[torch.Tensor]], scalars: tuple) -> Optional[tuple]:
    """The key under which a memo may remember that a call passed its checks, for calls
    whose checks read nothing but the metadata of their tensors (presence, shape, strides,
    dtype, device) and the values of their options. None (do not remember) when an option
    is not a plain bool, int, float or None, or a tensor is a subclass."""
    types = tuple(map(type, scalars))
    if not _PLAIN_TYPES.issuperset(types):
        return None
    # One comprehension (host time per call); a subclass leaves the marker in the list.
    try:
        meta = [t if t is None else (t.shape, t.stride(), t.dtype, t.device) if type(t) is torch.Tensor else _SUBCLASS
                for t in tensors]
    except RuntimeError:  # a tensor without strides (sparse CSR): not remembered, and the checks refuse it
        return None
    if _SUBCLASS in meta:
        return None
    return scalars, types, *meta


def remember(memo: dict, key: tuple, value: object) -> None:
    """memo[key] = value, dropping the whole memo first when it holds ``MEMO_ENTRIES``."""
    if len(memo) >= MEMO_ENTRIES:
        memo.clear()
    memo[key] = value


@dataclass(frozen=True)
class DenseShape:
    batch: int
    seqlen_q: int
    seqlen_k: int
    nheads: int
    nheads_k: int
    headdim: int
    headdim_v: int


def check_dense_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    dtypes: Sequence[torch.dtype] = KERNEL_DTYPES,
    max_headdim: Optional[int] = MAX_HEADDIM,
) -> DenseShape:
    """q (batch, seqlen_q, nheads, d); k, v (batch, seqlen_k, nheads_k, d)."""
    _check_qkv(q, k, v, ("(batch, seqlen_q, nheads, headdim)", "(batch, seqlen_k, nheads_k, headdim)"),
               "(batch, seqlen_k, nheads_k)", dtypes, max_headdim)
    b, sq, h, d = q.shape
    if k.shape[0] != b:
        raise ValueError(f"k: batch {k.shape[0]} differs from q's batch {b}; expected {b}")
    return DenseShape(b, sq, k.shape[1], h, k.shape[2], d, v.shape[3])


def _check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layouts: tuple[str, str], kv_axes: str,
    dtypes: Sequence[torch.dtype], max_headdim: Optional[int], ranks: Optional[tuple[int, int]] = None,
) -> None:
    """What dense and packed inputs share: ranks, dtype, device, k/v agreement, head dim, GQA.
    ``ranks`` (q's, k's and v's) default to the number of axes of ``layouts[0]``."""
    ndim = layouts[0].count(",") + 1
    q_rank, kv_rank = ranks if ranks is not None else (ndim, ndim)
    check_rank("q", q, q_rank, layouts[0])
    check_rank("k", k, kv_rank, layouts[1])
    check_rank("v", v, kv_rank, layouts[1])
    check_dtype("q", q, dtypes)
    check_same_dtype(("q", "k", "v"), (q, k, v))
    check_same_device(("q", "k", "v"), (q, k, v))
    d = q.shape[-1]
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"v: shape {tuple(v.shape)} does not match k's {kv_axes} {tuple(k.shape[:-1])}")
    for name, t in (("k", k), ("v", v)):
        if t.shape[-1] != d:
            raise ValueError(f"{name}: head dim {t.shape[-1]} differs from q's head dim {d}; expected {d}")
    check_headdim("q", d, max_headdim)
    check_heads(q.shape[-2], k.shape[-2])


@dataclass(frozen=True)
class VarlenShape:
    batch: int
    total_q: int
    total_k: int
    nheads: int
    nheads_k: int
    headdim: int
    max_seqlen_q: Optional[int] = None
    max_seqlen_k: Optional[int] = None
    values_checked: bool = True  # cu_seqlens / seqused_k values checked on the host at this call


def check_varlen_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: Optional[int],
    max_seqlen_k: Optional[int],
    seqused_k: Optional[torch.Tensor] = None,
    *,
    dtypes: Sequence[torch.dtype] = KERNEL_DTYPES,
    max_headdim: Optional[int] = MAX_HEADDIM,
) -> VarlenShape:
    """q (total_q, nheads, d); k, v (total_k, nheads_k, d); cu_seqlens int32 (batch + 1,).

    ``values_checked`` of the result says whether the cu_seqlens / seqused_k values were
    checked on the host at this call; when not, the launchers check them on the device."""
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_cu_seqlens_type(name, t)
    if seqused_k is not None:
        check_tensor("seqused_k", seqused_k)
    check_same_device(
        ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "seqused_k"),
        (q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k),
    )
    total_q, h, d = check_packed_qkv(q, k, v, dtypes=dtypes, max_headdim=max_headdim)
    batch, max_seqlen_q, max_seqlen_k, checked = _check_varlen_metadata(
        total_q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, k.shape[0])
    return VarlenShape(batch, total_q, k.shape[0], h, k.shape[1], d, max_seqlen_q, max_seqlen_k, checked)


def _check_varlen_metadata(
    total_q: int, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: object,
    max_seqlen_k: object, seqused_k: Optional[torch.Tensor], total_k: Optional[int],
    capacity: Optional[int] = None,
) -> tuple[int, Optional[int], Optional[int], bool]:
    """The cu_seqlens / max_seqlen / seqused_k checks that varlen calls share. ``total_k`` None: keys in a paged cache of ``capacity`` slots per sequence.
    Returns (batch, max_seqlen_q, max_seqlen_k, values checked on the host at this call)."""
    batch = check_cu_seqlens_shape("cu_seqlens_q", cu_seqlens_q)
    batch_k = check_cu_seqlens_shape("cu_seqlens_k", cu_seqlens_k)
    if batch_k != batch:
        raise ValueError(
            f"cu_seqlens_k: has {batch_k + 1} entries but cu_seqlens_q has {batch + 1}; expected the same batch"
        )
    max_seqlen_q = check_max_seqlen("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = check_max_seqlen("max_seqlen_k", max_seqlen_k)
    if seqused_k is not None:
        check_rank("seqused_k", seqused_k, 1, "(batch,)")
        if seqused_k.dtype != torch.int32:
            raise TypeError(f"seqused_k: dtype {seqused_k.dtype} is not supported; expected int32")
        if seqused_k.shape[0] != batch:
            raise ValueError(f"seqused_k: has {seqused_k.shape[0]} entries; expected batch={batch}")
    checked = check_cu_seqlens_values("cu_seqlens_q", cu_seqlens_q, total_q, "max_seqlen_q", max_seqlen_q)
    checked &= check_cu_seqlens_values("cu_seqlens_k", cu_seqlens_k, total_k, "max_seqlen_k", max_seqlen_k, capacity)
    if seqused_k is not None:
        checked &= check_seqused_values(seqused_k, cu_seqlens_k)
    return batch, max_seqlen_q, max_seqlen_k, checked


def check_block_table(block_table: torch.Tensor, batch: int, k_cache: torch.Tensor) -> None:
    """int32 (batch, max_blocks) over a paged cache (num_blocks, page_size, ...) with at least
    one page of at least one slot (the kernels clamp entries into the pages)."""
    check_rank("block_table", block_table, 2, "(batch, max_blocks)")
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table: dtype {block_table.dtype} is not supported; expected int32")
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table: has {block_table.shape[0]} rows; expected batch={batch} (one per sequence)")
    if k_cache.shape[0] == 0 or k_cache.shape[1] == 0:
        raise ValueError(f"k_cache: shape {tuple(k_cache.shape)} has no page or no slot per page; expected "
                         "(num_blocks >= 1, page_size >= 1, nheads_k, headdim) with block_table")
    if block_table.shape[1] * k_cache.shape[1] >= 2**31:  # the kernels index a sequence's slots in int32
        raise ValueError(f"block_table: {block_table.shape[1]} blocks of {k_cache.shape[1]} slots per sequence; "
                         f"expected fewer than 2**31 slots")


def check_paged_varlen_qkv(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: Optional[int],
    max_seqlen_k: Optional[int],
    seqused_k: Optional[torch.Tensor] = None,
) -> VarlenShape:
    """q (total_q, nheads, d); k_cache, v_cache (num_blocks, page_size, nheads_k, d); block_table
    int32 (batch, max_blocks); cu_seqlens int32 (batch + 1,), those of k counting each
    sequence's keys (slots 0.. of its pages; the last entry is not a buffer size).
    ``total_k`` of the result is the slots per sequence (max_blocks x page_size)."""
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_cu_seqlens_type(name, t)
    check_tensor("block_table", block_table)
    if seqused_k is not None:
        check_tensor("seqused_k", seqused_k)
    check_same_device(
        ("q", "k", "v", "block_table", "cu_seqlens_q", "cu_seqlens_k", "seqused_k"),
        (q, k_cache, v_cache, block_table, cu_seqlens_q, cu_seqlens_k, seqused_k),
    )
    _check_qkv(q, k_cache, v_cache, ("(total_q, nheads, headdim)", "(num_blocks, page_size, nheads_k, headdim) with "
               "block_table"), "(num_blocks, page_size, nheads_k)", KERNEL_DTYPES, MAX_HEADDIM, ranks=(3, 4))
    batch = check_cu_seqlens_shape("cu_seqlens_q", cu_seqlens_q)
    check_block_table(block_table, batch, k_cache)
    capacity = block_table.shape[1] * k_cache.shape[1]
    batch, max_seqlen_q, max_seqlen_k, checked = _check_varlen_metadata(
        q.shape[0], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, None, capacity)
    return VarlenShape(batch, q.shape[0], capacity, q.shape[1], k_cache.shape[2], q.shape[2], max_seqlen_q,
                       max_seqlen_k, checked)


def check_packed_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    dtypes: Sequence[torch.dtype] = KERNEL_DTYPES,
    max_headdim: Optional[int] = MAX_HEADDIM,
) -> tuple[int, int, int]:
    """q (tokens_q, nheads, d); k, v (tokens_k, nheads_k, d). Returns (tokens_q, nheads, d)."""
    _check_qkv(q, k, v, ("(total_q, nheads, headdim)", "(total_k, nheads_k, headdim)"), "(total_k, nheads_k)",
               dtypes, max_headdim)
    return q.shape[0], q.shape[1], q.shape[2]


def check_max_seqlen(name: str, value: object) -> Optional[int]:
    """None, or a non-negative integer (numpy integers accepted, as flash-attn does); returns it as an int."""
    if value is None:
        return None
    out = integer_value(value)
    if out is None:
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if out < 0:
        raise ValueError(f"{name}: got {out}; expected >= 0")
    return out


def check_cu_seqlens_type(name: str, cu: object) -> torch.Tensor:
    if isinstance(cu, (list, tuple)):
        raise TypeError(f"{name}: expected an int32 torch.Tensor (batch + 1,), got a {type(cu).__name__}; "
                        f"convert it with torch.tensor(..., dtype=torch.int32, device=q.device)")
    return check_tensor(name, cu)


def check_cu_seqlens_shape(name: str, cu: torch.Tensor) -> int:
    """Returns the batch size."""
    check_cu_seqlens_type(name, cu)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name}: dtype {cu.dtype} is not supported; expected int32")
    if cu.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor (batch + 1,), got shape {tuple(cu.shape)}")
    if cu.shape[0] < 2:
        raise ValueError(f"{name}: has {cu.shape[0]} entries; expected at least 2 (batch + 1 with batch >= 1)")
    return cu.shape[0] - 1


def value_checks_enabled(t: torch.Tensor) -> bool:
    if os.environ.get("RINGFLASH_CHECK_CU_SEQLENS", "1") == "0":
        return False
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor):
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def tensor_version(t: torch.Tensor) -> Optional[int]:
    """The version counter of ``t``, or None for an inference tensor, which has none
    (reading ``_version`` there raises)."""
    return None if t.is_inference() else t._version


# id(tensor) -> (weakref to it, version counter, storage address, facts checked). A dead
# weakref, a bumped version or another address invalidates the entry, so a freed tensor's
# address reused by a new one is never mistaken for it. Writes that bypass the version
# counter are caught by the device-side check that runs whenever this one is skipped.
_checked: dict[int, tuple[weakref.ref, Optional[int], int, tuple]] = {}


def already_checked(t: torch.Tensor, facts: tuple) -> bool:
    """Whether the host already checked ``facts`` about this very tensor. CPU tensors are
    never remembered: reading them is free, so they are checked at every call."""
    if t.device.type == "cpu":
        return False
    entry = _checked.get(id(t))
    return (entry is not None and entry[0]() is t and entry[1] == tensor_version(t)
            and entry[2] == t.data_ptr() and entry[3] == facts)


def remember_checked(t: torch.Tensor, facts: tuple) -> None:
    if t.device.type == "cpu":
        return
    if len(_checked) > 4096:
        for key in [key for key, entry in _checked.items() if entry[0]() is None]:
            del _checked[key]
    _checked[id(t)] = (weakref.ref(t), tensor_version(t), t.data_ptr(), facts)


def check_cu_seqlens_values(
    name: str, cu: torch.Tensor, total: Optional[int], max_name: str, max_seqlen: Optional[int],
    capacity: Optional[int] = None,
) -> bool:
    """cu[0] == 0, non-decreasing, cu[-1] == total (unless None) and max(diff) <= max_seqlen
    (and <= ``capacity``, a paged cache's slots per sequence, unless None). One sync per GPU
    tensor object. Returns whether the values were checked on the host at this call."""
    if not value_checks_enabled(cu):
        return False
    facts = ("cu", total, max_seqlen, capacity)
    if already_checked(cu, facts):
        return False
    diffs = cu[1:] - cu[:-1]
    stats = torch.stack([cu[0], cu[-1], diffs.min(), diffs.max()]).tolist()  # the one sync
    first, last, min_len, max_len = stats
    if first != 0:
        raise ValueError(f"{name}: starts at {first}; expected 0")
    if min_len < 0:
        raise ValueError(f"{name}: is not non-decreasing (a step of {min_len}); expected cumulative sequence lengths")
    if total is not None and last != total:
        raise ValueError(f"{name}: last entry is {last}; expected the token count {total}")
    if max_seqlen is not None and max_len > max_seqlen:
        raise ValueError(f"{max_name}: got {max_seqlen} but the longest sequence in {name} has {max_len} tokens; expected >= {max_len}")
    if capacity is not None and max_len > capacity:
        raise ValueError(f"{name}: a sequence has {max_len} keys but block_table holds {capacity} per sequence "
                         f"(max_blocks x page_size); expected <= {capacity}")
    remember_checked(cu, facts)
    return True


def check_seqused_values(seqused_k: torch.Tensor, cu_seqlens_k: torch.Tensor) -> bool:
    """0 <= seqused_k[i] <= cu_seqlens_k[i+1] - cu_seqlens_k[i]. Returns whether checked on the host now."""
    if not value_checks_enabled(seqused_k):
        return False
    facts = ("seqused", id(cu_seqlens_k), tensor_version(cu_seqlens_k), cu_seqlens_k.data_ptr())
    if already_checked(seqused_k, facts):
        return False
    lens = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    lo, over = torch.stack([seqused_k.min(), (seqused_k - lens).max()]).tolist()
    if lo < 0:
        raise ValueError(f"seqused_k: has a negative entry ({lo}); expected 0 <= seqused_k[i]")
    if over > 0:
        raise ValueError(
            f"seqused_k: an entry exceeds its sequence's key count by {over}; "
            "expected seqused_k[i] <= cu_seqlens_k[i+1] - cu_seqlens_k[i]"
        )
    remember_checked(seqused_k, facts)
    return True


def check_divisible_lengths(name: str, cu: torch.Tensor, divisor: int) -> None:
    """Every sequence length of ``cu`` is a multiple of ``divisor``. One sync per tensor object."""
    if not value_checks_enabled(cu):
        return
    facts = ("divisible", divisor)
    if already_checked(cu, facts):
        return
    lens = cu[1:] - cu[:-1]
    bad = int((lens % divisor != 0).sum().item())
    if bad:
        first = int(lens[lens % divisor != 0][0].item())
        raise ValueError(
            f"{name}: {bad} sequence length(s) are not multiples of {divisor} (e.g. {first}); "
            f"expected every length divisible by {divisor}"
        )
    remember_checked(cu, facts)

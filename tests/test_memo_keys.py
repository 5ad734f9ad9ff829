"""The memos of validated calls (``flash_attn_func``'s inference calls and
``flash_attn_with_kvcache``'s steps) must be sound: two calls under one key must get the
same verdict from the checks, the same options and problem, or the same error. Hypothesis
draws pairs of calls from argument variants that the checks treat differently (option
values of other types, bad values, other layouts, dtypes and shapes) and holds every pair
whose keys agree to that. Only the checks run here, never a kernel (fast on any machine)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringflash import interface as I
from ringflash import kvcache as KV
from ringflash import validation as V
from ringflash.kernels.problem import make_problem

SETTINGS = settings(max_examples=300, deadline=None, database=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow])

#: Option values the checks accept, refuse, or read differently, with their look-alikes.
FLAGS = [True, False, 1, 0, 2, np.bool_(True), "yes", None, 1.0]
FLOATS = [0.0, 0, 1.0, 1, 0.5, True, False, None, -1.0, float("nan"), float("inf"), "1", np.float64(1.0)]
WINDOWS = [(-1, -1), (2, 0), (-2, 0), (2.0, 0), [2, 0], (np.int64(2), 0), (3, 1), (-1, -1, 0)]
#: Numbers for cache_seqlens / cache_leftpad: in the caches (6 or 12 slots), past them, negative.
LENGTHS = [0, 3, 5, 6, 7, 11, 12, 13, -1, None, 2.0, True]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32]


def pick(draw, usual: list, rare: list):
    """Mostly one of the ``usual`` values (calls the checks accept), sometimes a ``rare`` one."""
    return draw(st.sampled_from(usual if draw(st.integers(0, 19)) < 18 else rare))


@st.composite
def tensors(draw, shape, dtype):
    """A CPU tensor of ``shape`` (values unused: only its metadata matters to the checks),
    mostly of ``dtype``, maybe strided or expanded, maybe a 3-D one."""
    dtype = pick(draw, [dtype], DTYPES)
    layout = pick(draw, ["contiguous", "transposed", "expanded", "sliced"], ["rank3"])
    if layout == "transposed":
        return torch.zeros(shape[0], shape[2], shape[1], shape[3], dtype=dtype).transpose(1, 2)
    if layout == "expanded":
        return torch.zeros(shape[0], shape[1], 1, shape[3], dtype=dtype).expand(shape)
    if layout == "sliced":
        return torch.zeros(*shape[:3], shape[3] + 3, dtype=dtype)[..., :shape[3]]
    if layout == "rank3":
        return torch.zeros(*shape[:3], dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


@st.composite
def dense_calls(draw):
    b, sq, sk = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 5])), draw(st.sampled_from([1, 7]))
    h, hk, d = draw(st.sampled_from([(4, 2), (4, 4), (4, 3)])) + (draw(st.sampled_from([8, 16, 300])),)
    dtype = pick(draw, DTYPES[:3], DTYPES)
    q = draw(tensors((b, sq, h, d), dtype))
    k = draw(tensors((pick(draw, [b], [b + 1]), sk, hk, d), dtype))
    v = draw(tensors((b, sk, hk, pick(draw, [d], [4])), dtype))
    opts = dict(dropout_p=pick(draw, [0.0, 0], [False]), softmax_scale=pick(draw, [None, 0.5, 1], FLOATS),
                causal=pick(draw, [True, False, 1], FLAGS), window_size=pick(draw, WINDOWS[:2], WINDOWS),
                softcap=pick(draw, [0.0, 1.0, 0], FLOATS), deterministic=pick(draw, [False, True], FLAGS),
                return_attn_probs=pick(draw, [False, True], FLAGS))
    return (q, k, v), opts


def _dense_verdict(tensors_, opts):
    """What flash_attn_func's checks make of a call: its options (seed aside) and problem,
    or its error."""
    q, k, v = tensors_
    try:
        shape = V.check_dense_qkv(q, k, v)
        o = I._options(opts["dropout_p"], opts["softmax_scale"], opts["causal"], opts["window_size"],
                       opts["softcap"], None, opts["deterministic"], opts["return_attn_probs"], shape.batch,
                       shape.nheads, shape.headdim, shape.seqlen_k, q.device)
        return "ok", o, make_problem(q, k, None, shape.seqlen_q, shape.seqlen_k, o.scale, o.causal, o.left, o.right,
                                     o.softcap)
    except Exception as exc:  # noqa: BLE001 - the verdict is the error
        return "error", type(exc), str(exc)


def _dense_key(tensors_, opts):
    try:
        return I._memo_key(*tensors_, alibi_slopes=None, **opts)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"the key itself raised {type(exc).__name__}: {exc} for {opts}")


def _same_metadata(t):
    """A new tensor with ``t``'s metadata (shape, strides, dtype, device) and other values."""
    if t is None:
        return None
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype)
    return out.fill_(1)


@st.composite
def look_alikes(draw, calls):
    """A call and a second one that the key may not tell apart: the same metadata in new
    tensors, and one option redrawn (often a value equal to the first's, of another type)."""
    tensors_, opts = draw(calls)
    twin = dict(opts)
    # The step-to-step numbers (cache_seqlens, cache_leftpad) are redrawn more often: the memo
    # keys them by type and checks their values at every call.
    name = draw(st.sampled_from(sorted(opts) + [n for n in sorted(opts) if n.startswith("cache_")] * 4))
    if (name.startswith("cache_") or draw(st.booleans())) and not isinstance(opts[name], torch.Tensor):
        pool = WINDOWS if name == "window_size" else LENGTHS if name.startswith("cache_") else \
            FLAGS if isinstance(opts[name], (bool, np.bool_)) else FLOATS
        twin[name] = draw(st.sampled_from(pool + [opts[name]]))
    return (tensors_, opts), (tuple(_same_metadata(t) for t in tensors_), twin)


@SETTINGS
@given(pair=look_alikes(dense_calls()))
def test_flash_attn_func_calls_under_one_key_get_one_verdict(pair):
    a, b = pair
    key_a, key_b = _dense_key(*a), _dense_key(*b)
    if key_a is None or key_a != key_b:
        return
    assert _dense_verdict(*a) == _dense_verdict(*b)


def test_remembered_problem_is_the_checked_one():
    """The memo's entry holds exactly what the checks made of the call."""
    I._CHECKED_CALLS.clear()
    # On the GPU where there is one (CPU tensors run only in the interpreter, off on a GPU machine).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (torch.randn(s, device=device) for s in ((2, 3, 4, 16), (2, 300, 2, 16), (2, 300, 2, 16)))
    opts = dict(dropout_p=0.0, softmax_scale=0.3, causal=True, window_size=(5, 0), softcap=2.0, deterministic=False,
                return_attn_probs=False)
    with torch.no_grad():
        I.flash_attn_func(q, k, v, **opts)
    (entry,) = I._CHECKED_CALLS.values()
    _, o, prob = _dense_verdict((q, k, v), opts)
    assert entry == (o, prob)


# --- flash_attn_with_kvcache --------------------------------------------------------------


@st.composite
def kvcache_calls(draw):
    b, sq, d = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 3])), draw(st.sampled_from([8, 16]))
    cap = draw(st.sampled_from([6, 12]))
    dtype = pick(draw, DTYPES[:3], DTYPES)
    q = draw(tensors((b, sq, 4, d), dtype))
    k_cache = draw(tensors((pick(draw, [b], [b + 1]), cap, 2, d), dtype))
    v_cache = draw(tensors((k_cache.shape[0], cap, 2, d), dtype)) if k_cache.dim() == 4 else \
        torch.zeros(b, cap, 2, d, dtype=dtype)
    new = draw(st.sampled_from([0, 1, 2]))
    k = draw(tensors((b, new, 2, d), dtype)) if new else None
    v = k if pick(draw, [True], [False]) else (None if k is not None else draw(tensors((b, 1, 2, d), dtype)))
    lengths = pick(draw, ["int", "int", "tensor", "none"], ["int64", "short"])
    seqlens = {"int": pick(draw, [0, 3], [cap, cap + 1, -1]), "none": None,
               "tensor": torch.full((b,), 2, dtype=torch.int32), "int64": torch.full((b,), 2),
               "short": torch.full((b + 1,), 2, dtype=torch.int32)}[lengths]
    leftpad = pick(draw, [None, 0, 1, "tensor"], [-1])
    if leftpad == "tensor":
        leftpad = torch.zeros(b, dtype=torch.int32)
    if seqlens is None and new:  # a full cache has no room for new keys: mostly leave room
        seqlens = pick(draw, [0], [None])
    opts = dict(cache_seqlens=seqlens, cache_leftpad=leftpad, softmax_scale=pick(draw, [None, 0.5], FLOATS),
                causal=pick(draw, [True, False], FLAGS), window_size=pick(draw, WINDOWS[:2], WINDOWS),
                softcap=pick(draw, [0.0, 1.0], FLOATS), rotary_interleaved=pick(draw, [True, False], FLAGS),
                num_splits=pick(draw, [0, 1], [-1, 2.0, True]),
                return_softmax_lse=pick(draw, [False, True], FLAGS))
    return (q, k_cache, v_cache, k, v), opts


def _kv_args(tensors_, opts):
    q, k_cache, v_cache, k, v = tensors_
    return (q, k_cache, v_cache, k, v, None, None, opts["cache_seqlens"], None, opts["cache_leftpad"], None,
            opts["softmax_scale"], opts["causal"], opts["window_size"], opts["softcap"], opts["rotary_interleaved"],
            None, opts["num_splits"], opts["return_softmax_lse"])


def _kv_verdict(tensors_, opts, step=None):
    """What the checks make of a call: every check (``step`` None), or the remembered
    ``step`` of another call with its key and this call's own int checks (the memo's path).
    The step and the int lengths the kernels get, or the error."""
    try:
        if step is None:
            step = KV._check_step(*_kv_args(tensors_, opts))
        return "ok", step, KV._int_lengths(opts["cache_seqlens"], opts["cache_leftpad"], step)
    except Exception as exc:  # noqa: BLE001
        return "error", type(exc), str(exc)


@SETTINGS
@given(pair=look_alikes(kvcache_calls()))
def test_kvcache_calls_under_one_key_get_one_verdict(pair):
    a, b = pair
    key_a, key_b = KV._step_key(*_kv_args(*a)), KV._step_key(*_kv_args(*b))
    if key_a is None or key_a != key_b:
        return
    verdict_a = _kv_verdict(*a)
    if verdict_a[0] == "ok":  # b through the memo (a's step) must get what b's own checks give
        assert _kv_verdict(*b, step=verdict_a[1]) == _kv_verdict(*b)


def test_the_property_can_fail():
    """A key without the option types would let ``softcap=True`` through after
    ``softcap=1.0``: the pair test sees two keys agree and two verdicts differ."""
    q, k = torch.zeros(1, 1, 2, 8, dtype=torch.float16), torch.zeros(1, 1, 2, 8, dtype=torch.float16)
    base = dict(dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), deterministic=False,
                return_attn_probs=False)
    a, b = ((q, k, k), dict(base, softcap=1.0)), ((q, k, k), dict(base, softcap=True))
    assert _dense_key(*a) != _dense_key(*b)
    untyped = lambda call: _dense_key(*call)[0]  # noqa: E731  (the values alone)
    assert untyped(a) == untyped(b) and _dense_verdict(*a) != _dense_verdict(*b)
    assert dataclasses.is_dataclass(_dense_verdict(*a)[1])


def test_look_alikes_share_keys_often():
    """The pair tests are not vacuous: many drawn pairs share a key (and pass the checks)."""
    shared = {"dense": 0, "kvcache": 0, "dense ok": 0, "kvcache ok": 0}

    @settings(max_examples=200, deadline=None, database=None)
    @given(pair=look_alikes(dense_calls()), kv=look_alikes(kvcache_calls()))
    def count(pair, kv):
        for name, (a, b), key_of, verdict in (("dense", pair, lambda c: _dense_key(*c), _dense_verdict),
                                              ("kvcache", kv, lambda c: KV._step_key(*_kv_args(*c)), _kv_verdict)):
            key = key_of(a)
            if key is not None and key == key_of(b):
                shared[name] += 1
                shared[name + " ok"] += verdict(*a)[0] == "ok"
    count()
    assert min(shared.values()) >= 10, shared


# --- the seed's 3-D interface (FlashAttentionTritonFunc) -----------------------------------


def test_seed_interface_remembers_only_checked_calls():
    """``FlashAttentionTritonFunc`` remembers a call's checks under its inputs' metadata and
    ``is_causal`` (type and value): a remembered call gets the op's arguments the checks
    made, and a call that differs in any of them is checked again."""
    from ringflash import autograd as A

    A._SEED_CALLS.clear()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, 5, 16, device=device)
    with torch.no_grad():
        A.FlashAttentionTritonFunc.apply(x, x, x, True)
        A.FlashAttentionTritonFunc.apply(x, x, x, True)
    assert list(A._SEED_CALLS.values()) == [(5, 5, 0.25, True, -1, -1, 0.0)]
    with pytest.raises(TypeError, match="is_causal: expected a bool, got int 2"):
        A.FlashAttentionTritonFunc.apply(x, x, x, 2)
    with pytest.raises(ValueError, match="v: head dim 8 differs from q.s head dim 16"):
        A.FlashAttentionTritonFunc.apply(x, x, x[..., :8].contiguous(), True)
    with pytest.raises(ValueError, match=r"Q: expected a 3-D tensor"):
        A.FlashAttentionTritonFunc.apply(x[0], x, x, True)

"""The custom ops' registrations, checked with ``torch.library.opcheck`` (schema, autograd
registration, fake tensors, AOT dispatch with dynamic shapes) on tiny CPU cases, and the
public functions under ``torch.compile(fullgraph=True, dynamic=True)``.

Sections marked "regression" failed when they were written (see each docstring): the
fake implementations of ``attn_bwd``, ``layout_attn_fwd`` and ``layout_attn_bwd`` promise
other strides than the real ones for q/k/v viewed from (batch, heads, tokens, d) tensors,
which is how transformers hands them over (Inductor's ``assert_size_stride`` then raises
in a compiled model), and ``dynamic=True`` breaks the graph on a default float option.
The rest are cheap checks that passed. Sizes are tiny (well under a minute interpreted).
"""

import pytest
import torch

from conftest import HAS_CUDA
from ringflash import flash_attn_func
from ringflash import ops  # noqa: F401  (registers ringflash::attn_fwd ... kvcache_fwd)
from ringflash.integrations import hf_layout  # noqa: F401  (registers ringflash::layout_attn_*)
from ringflash.kernels.problem import SeqMeta

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
OPS = torch.ops.ringflash
NO_META = (None,) * 5
D = 16
SCALE = D ** -0.5


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE)


def _heads_major(batch, seqlen, heads, dtype=torch.float32):
    """(batch, seqlen, heads, d) viewed from a (batch, heads, seqlen, d) tensor, as
    transformers' attention interface passes q/k/v (``query.transpose(1, 2)``)."""
    return _randn(batch, heads, seqlen, D, dtype=dtype).transpose(1, 2)


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def _cu(lengths):
    return _i32(0, *torch.tensor(lengths).cumsum(0).tolist())


def _opcheck(op, args, kwargs=None):
    torch.library.opcheck(op, args, kwargs or {})  # raises OpCheckError naming the failing test


# ------------------------------------------------------------------ opcheck: cases that pass


def _dense(hk=2, sq=9, sk=9, dtype=torch.float32):
    return _randn(2, sq, 2, D, dtype=dtype), _randn(2, sk, hk, D, dtype=dtype), _randn(2, sk, hk, D, dtype=dtype)


def _varlen_meta(seqused=None):
    lq, lk = [5, 0, 9], [7, 3, 11]
    q, k, v = _randn(sum(lq), 2, D), _randn(sum(lk), 1, D), _randn(sum(lk), 1, D)
    meta = SeqMeta.from_cu_seqlens(_cu(lq), _cu(lk), seqused)
    return (q, k, v), (meta.q_starts, meta.q_ends, meta.cu_seqlens_k, meta.seqused_k, None), (9, 11)


def _attn_cases():
    yield "dense", _dense(), NO_META, (9, 9, SCALE, False, -1, -1, 0.0), {}
    yield "gqa causal fp16", _dense(hk=1, dtype=torch.float16), NO_META, (9, 9, SCALE, True, -1, -1, 0.0), {}
    yield "window softcap sq<sk", _dense(sq=4, sk=11), NO_META, (4, 11, SCALE, False, 3, 2, 5.0), {}
    alibi_dropout = dict(alibi_slopes=torch.rand(2, 2, device=DEVICE), dropout_p=0.25,
                         dropout_seed=torch.tensor([123]))
    yield "alibi dropout", _dense(), NO_META, (9, 9, SCALE, True, -1, -1, 0.0), alibi_dropout
    qkv, seq, maxes = _varlen_meta()
    yield "varlen empty sequence", qkv, seq, (*maxes, SCALE, True, -1, -1, 0.0), {}
    qkv, seq, maxes = _varlen_meta(_i32(4, 0, 11))
    yield "varlen seqused_k", qkv, seq, (*maxes, SCALE, True, -1, -1, 0.0), {}


@pytest.mark.parametrize("case", list(_attn_cases()), ids=lambda c: c[0])
def test_opcheck_attn_fwd_and_bwd(case):
    _, (q, k, v), seq, options, extra = case
    _opcheck(OPS.attn_fwd.default, (q, k, v, *seq, *options), extra)
    out, lse = ops._attn_fwd_impl(q, k, v, *seq, *options, **extra)
    _opcheck(OPS.attn_bwd.default, (torch.randn_like(out), q, k, v, out, lse, *seq, *options), extra)


def _kv_args(seqlen_q=1, new=0, rows=2, cache_seqlens=None, cache_seqlens_int=0, leftpad=None, batch_idx=None,
             block_table=None, alibi=None, causal=False, window=(-1, -1), softcap=0.0, rotary=False, splits=0,
             dtype=torch.float32):
    batch, heads, heads_k = 2, 4, 2
    if block_table is not None:
        k_cache, v_cache = _randn(6, 8, heads_k, D, dtype=dtype), _randn(6, 8, heads_k, D, dtype=dtype)
        slots = block_table.shape[1] * 8
    else:
        k_cache, v_cache = _randn(rows, 24, heads_k, D, dtype=dtype), _randn(rows, 24, heads_k, D, dtype=dtype)
        slots = 24
    k = v = cos = sin = None
    if new:
        k, v = _randn(batch, new, heads_k, D, dtype=dtype), _randn(batch, new, heads_k, D, dtype=dtype)
    if rotary:
        angles = torch.rand(slots + 8, D // 4, device=DEVICE)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    return (_randn(batch, seqlen_q, heads, D, dtype=dtype), k_cache, v_cache, k, v, cos, sin, cache_seqlens,
            cache_seqlens_int, leftpad, batch_idx, block_table, alibi, SCALE, causal, *window, softcap, False, splits)


def _kvcache_cases():
    table = _i32(0, 3, 1, 5, 2, 4).view(2, 3)
    yield "int lengths, no new", _kv_args(cache_seqlens_int=10)
    yield "tensor lengths, no new", _kv_args(cache_seqlens=_i32(5, 17))
    yield "append causal", _kv_args(seqlen_q=3, new=3, cache_seqlens=_i32(4, 9), causal=True)
    yield "append int lengths window softcap", _kv_args(seqlen_q=2, new=2, cache_seqlens_int=7, window=(4, 0),
                                                         softcap=3.0)
    yield "rotary fp16", _kv_args(seqlen_q=2, new=2, cache_seqlens=_i32(3, 8), causal=True, rotary=True,
                                  dtype=torch.float16)
    yield "cache_batch_idx", _kv_args(new=1, rows=4, cache_seqlens=_i32(2, 6), batch_idx=_i32(3, 1))
    yield "leftpad alibi splits", _kv_args(new=1, cache_seqlens=_i32(6, 9), leftpad=_i32(2, 0),
                                           alibi=torch.rand(2, 4, device=DEVICE), splits=3)
    yield "paged append", _kv_args(seqlen_q=2, new=2, cache_seqlens=_i32(3, 12), block_table=table, causal=True)
    yield "paged int lengths", _kv_args(cache_seqlens_int=10, block_table=table)


@pytest.mark.parametrize("case", list(_kvcache_cases()), ids=lambda c: c[0])
def test_opcheck_kvcache_fwd(case):
    _opcheck(OPS.kvcache_fwd.default, case[1])


def test_opcheck_paged_fwd():
    table = _i32(0, 3, 1, 5, 2, 4).view(2, 3)
    q, k_cache, v_cache = _randn(3, 4, D), _randn(6, 8, 2, D), _randn(6, 8, 2, D)
    _opcheck(OPS.paged_fwd.default, (q, k_cache, v_cache, table, _cu([3, 0]), _cu([10, 5]), None, 3, 10, SCALE,
                                     True, -1, -1, 0.0))
    _opcheck(OPS.paged_fwd.default, (q, k_cache, v_cache, table, _cu([3, 0]), _cu([10, 5]), _i32(7, 2), 3, 10,
                                     SCALE, False, 2, 1, 2.0, True, torch.rand(1, 4, device=DEVICE)))


def _layout_args(q, k, v, layout, kind, positions=None, every_query=False, causal=True, dropout_p=0.0):
    seed = torch.tensor([9]) if dropout_p > 0 else None
    return (q, k, v, layout, kind, positions, every_query, SCALE, causal, -1, -1, 0.0, dropout_p, seed)


def _padding_mask():
    mask = torch.ones(2, 10, dtype=torch.int64, device=DEVICE)
    mask[0, :3] = 0
    return mask


def _layout_cases(make):
    packed = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]], device=DEVICE)
    yield "mask", (*make(2, 10), _padding_mask(), "mask")
    yield "mask dropout", (*make(2, 10), _padding_mask(), "mask", None, False, True, 0.2)
    yield "mask every_query", (*make(2, 10, 4), _padding_mask(), "mask", None, True, False)
    yield "positions packed", (*make(1, 10), packed, "positions")
    yield "positions one document", (*make(1, 10), torch.arange(10, device=DEVICE)[None], "positions")


def _tokens_major(batch, seqlen, seqlen_q=None):
    return _randn(batch, seqlen_q or seqlen, 2, D), _randn(batch, seqlen, 1, D), _randn(batch, seqlen, 1, D)


def _check_layout_ops(args):
    layout_args = _layout_args(*args)
    _opcheck(OPS.layout_attn_fwd.default, layout_args)
    out, lse = hf_layout.layout_attn_fwd(*layout_args)
    q, k, v, *rest = layout_args
    _opcheck(OPS.layout_attn_bwd.default, (torch.randn_like(out), q, k, v, out, lse, *rest))


@pytest.mark.parametrize("case", list(_layout_cases(_tokens_major)), ids=lambda c: c[0])
def test_opcheck_layout_ops(case):
    _check_layout_ops(case[1])


def test_opcheck_layout_fwd_autograd():
    """With inputs that require grad: opcheck's AOT check also compares the gradients that
    ``register_autograd`` gives (through ``layout_attn_bwd``) with eager ones."""
    q, k, v = (t.requires_grad_() for t in _tokens_major(2, 10))
    _opcheck(OPS.layout_attn_fwd.default, _layout_args(q, k, v, _padding_mask(), "mask"))


# ------------------------------------------------------------------ fake strides (regression)


def test_attn_bwd_fake_strides_match_real_for_heads_major_inputs():
    """Regression: ``attn_bwd``'s fake returns contiguous dq/dk/dv, but the real backward
    lays them out as q/k/v (``kernels.common.grad_buffer``: ``empty_like`` for a dense
    permutation). q/k/v viewed from (batch, heads, tokens, d), the transformers layout,
    then compile against strides the op does not return: opcheck's fake-tensor test
    reports "Stride mismatch! Strides are (384, 16, 192, 1) and (384, 32, 16, 1)", and a
    model compiled with Inductor raises in ``assert_size_stride`` on its backward."""
    q, k, v = (_heads_major(2, 12, 2) for _ in range(3))
    options = (12, 12, SCALE, False, -1, -1, 0.0)
    out, lse = ops._attn_fwd_impl(q, k, v, *NO_META, *options)
    _opcheck(OPS.attn_bwd.default, (torch.randn_like(out), q, k, v, out, lse, *NO_META, *options))


def _heads_major_qkv(batch, seqlen, seqlen_q=None):
    return _heads_major(batch, seqlen_q or seqlen, 2), _heads_major(batch, seqlen, 1), _heads_major(batch, seqlen, 1)


@pytest.mark.parametrize("case", [c for c in _layout_cases(_heads_major_qkv) if c[0] in ("mask", "positions packed",
                                                                                        "positions one document")],
                         ids=lambda c: c[0])
def test_layout_ops_fake_strides_match_real_for_heads_major_inputs(case):
    """Regression: ``layout_attn_fwd``'s fake returns ``empty_like(q)`` (q's permuted
    strides for the (batch, heads, tokens, d) views that ``integrations.hf`` passes) while
    the real out is contiguous (``attention_forward``'s ``torch.empty``, ``_unrows``'s
    ``new_zeros``/``reshape``); ``layout_attn_bwd``'s fake gives ``empty_like(q/k/v)``
    while the unpadded path's ``_unrows`` returns contiguous gradients. opcheck: "Stride
    mismatch! Strides are (320, 32, 16, 1) and (320, 16, 160, 1)"; a transformers model
    with a padding mask compiled with Inductor raises in ``assert_size_stride``."""
    _check_layout_ops(case[1])


# ------------------------------------------------------------------ torch.compile(dynamic=True)


def test_compile_dynamic_true_with_default_float_options():
    """Regression: under ``dynamic=True`` Dynamo reads the float defaults of
    ``flash_attn_func`` (``softcap=0.0``, ``dropout_p=0.0``) as symbolic floats, and
    ``validation.check_softcap``'s ``math.isfinite`` on one breaks the graph ("torch.* op
    returned non-Tensor ... isfinite"): the plainest call fails ``fullgraph=True``. (Passing
    ``softcap=0.0`` as a literal in the compiled code traces.)"""
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: flash_attn_func(q, k, v, causal=True), backend="aot_eager",
                             fullgraph=True, dynamic=True)
    for seqlen in (8, 13):
        q, k, v = _randn(1, seqlen, 2, D), _randn(1, seqlen, 1, D), _randn(1, seqlen, 1, D)
        torch.testing.assert_close(compiled(q, k, v), flash_attn_func(q, k, v, causal=True))


def test_compile_dynamic_true_dense_keeps_one_graph():
    """Passed: with the float options written out, dense calls at three sequence lengths
    share one graph under ``dynamic=True``, and forward and gradients match eager."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    fn = lambda q, k, v: flash_attn_func(q, k, v, 0.0, causal=True, softcap=0.0)  # noqa: E731
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=True)
    for seqlen in (8, 13, 21):
        q, k, v = (_randn(2, seqlen + (3 if i else 0), 2 if i == 0 else 1, D).requires_grad_() for i in range(3))
        got = compiled(q, k, v)
        want = fn(q, k, v)
        torch.testing.assert_close(got, want)
        dout = torch.randn_like(got)
        torch.testing.assert_close(torch.autograd.grad(got, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout))
    assert len(graphs) == 1


def test_compile_dynamic_true_with_alibi_made_in_the_graph():
    """ALiBi slopes whose shape comes from a symbolic size under ``dynamic=True``: the shape
    check once used a tuple ``in``, which Dynamo does not compare by value (a false
    "alibi_slopes: got shape (2,); expected (nheads,) = (2,)")."""
    from ringflash import flash_attn_varlen_func

    def call(q, k, v, cu):
        return flash_attn_varlen_func(q, k, v, cu, cu, 16, 16, causal=True, alibi_slopes=torch.ones(q.shape[1], device=q.device),
                                      softcap=0.0, dropout_p=0.0)

    torch._dynamo.reset()
    compiled = torch.compile(call, backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (8, 13):
        q, k, v = (_randn(n, 2, D) for _ in range(3))
        cu = torch.tensor([0, 3, n], dtype=torch.int32, device=q.device)
        torch.testing.assert_close(compiled(q, k, v, cu), call(q, k, v, cu))

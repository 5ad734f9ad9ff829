"""ringflash.reference and the PyTorch FlashAttention-2 against the independent naive attention."""

import pytest
import torch

from naive import naive_attention
from conftest import AWKWARD_SEQLENS, AWKWARD_VARLEN_BATCHES, cu_seqlens_from_lengths
from ringflash import FlashAttentionPyTorchFunc, attention_ref, attention_varlen_ref
from ringflash.testing import assert_close

REL = 1e-5  # float32 inputs against float64 naive attention

SEQLEN_PAIRS = [(s, s) for s in AWKWARD_SEQLENS] + [(17, 129), (129, 17), (1, 129)]


def _inputs(gen, b, sq, sk, h, hk, d, dtype=torch.float32):
    mk = lambda s, n: torch.randn(b, s, n, d, generator=gen).to(dtype)  # noqa: E731
    return mk(sq, h), mk(sk, hk), mk(sk, hk), mk(sq, h)


def _naive_with_grads(q, k, v, do, **kw):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = naive_attention(q64, k64, v64, **kw)
    grads = torch.autograd.grad(out, (q64, k64, v64), do.double())
    return out, lse, grads


@pytest.mark.parametrize("sq,sk", SEQLEN_PAIRS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(2, 2), (4, 1)], ids=["mha", "mqa"])
@pytest.mark.parametrize("window,softcap", [((-1, -1), 0.0), ((7, 3), 0.0), ((-1, -1), 4.0)], ids=["plain", "window", "softcap"])
def test_reference_matches_naive(gen, sq, sk, causal, heads, window, softcap):
    h, hk = heads
    q, k, v, do = _inputs(gen, 2, sq, sk, h, hk, 24)
    want_out, want_lse, want_grads = _naive_with_grads(q, k, v, do, causal=causal, window=window, softcap=softcap)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = attention_ref(qg, kg, vg, causal=causal, window_size=window, softcap=softcap)
    assert out.dtype == torch.float32 and lse.shape == (2, h, sq)
    assert_close("out", out, want_out, rel_tol=REL)
    assert_close("lse", lse, want_lse, rel_tol=REL)
    grads = torch.autograd.grad(out, (qg, kg, vg), do)
    for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
        assert_close(name, g, w, rel_tol=REL)


def test_reference_row_that_sees_no_key_gives_zero_and_minus_inf(gen):
    # seqlen_q > seqlen_k with causal: the first sq - sk rows see nothing (bottom-right alignment).
    q, k, v, _ = _inputs(gen, 1, 9, 4, 2, 2, 16)
    out, lse = attention_ref(q, k, v, causal=True)
    assert torch.all(out[:, :5] == 0)
    assert torch.all(lse[:, :, :5] == float("-inf"))
    assert torch.isfinite(lse[:, :, 5:]).all()


@pytest.mark.parametrize("sq,sk", [(17, 5), (5, 17), (9, 9)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("per_batch", [False, True], ids=["heads", "batch-heads"])
@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_reference_alibi_matches_naive(gen, sq, sk, causal, per_batch, softcap):
    # flash-attn's order: cap the scaled score, then add -slope * |i + sk - sq - j|.
    h, hk = 4, 2
    q, k, v, do = _inputs(gen, 2, sq, sk, h, hk, 8)
    slopes = torch.rand((2, h) if per_batch else (h,), generator=gen)
    want_out, want_lse, want_grads = _naive_with_grads(q, k, v, do, causal=causal, softcap=softcap,
                                                       alibi_slopes=slopes)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = attention_ref(qg, kg, vg, causal=causal, softcap=softcap, alibi_slopes=slopes)
    assert_close("out", out, want_out, rel_tol=REL)
    assert_close("lse", lse, want_lse, rel_tol=REL)
    grads = torch.autograd.grad(out, (qg, kg, vg), do)
    for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
        assert_close(name, g, w, rel_tol=REL)


@pytest.mark.parametrize("window,literal", [((4, 4), (-1, -1)), ((3, 4), (3, -1)), ((4, 2), (-1, 2)), ((9, 0), (-1, 0))])
def test_reference_window_side_as_wide_as_the_keys_is_unbounded(gen, window, literal):
    # Queries outnumber keys (9 > 4): a side >= seqlen_k is no window (flash-attn), which
    # differs from the literal bound (row 0 of window (4, 4) would see no key).
    q, k, v, _ = _inputs(gen, 1, 9, 4, 2, 1, 8)
    want_out, want_lse = naive_attention(q, k, v, window=literal)
    out, lse = attention_ref(q, k, v, window_size=window)
    assert_close("out", out, want_out, rel_tol=REL)
    assert_close("lse", lse, want_lse, rel_tol=REL)


def test_reference_gradients_match_finite_differences():
    # Autograd through the masked softmax (rows that see no key, softcap, ALiBi, GQA),
    # against finite differences; the lse of an empty row is -inf, so it is zeroed here.
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 5, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 3, 1, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    slopes = torch.tensor([0.3, 0.7])

    def f(q, k, v):
        out, lse = attention_ref(q, k, v, causal=True, window_size=(1, -1), softcap=1.5, alibi_slopes=slopes)
        return out, torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)

    assert torch.isinf(attention_ref(q, k, v, causal=True)[1]).any()  # an empty row is covered
    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("lengths", AWKWARD_VARLEN_BATCHES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("use_seqused", [False, True])
def test_varlen_reference_matches_naive_per_sequence(gen, lengths, causal, use_seqused):
    h, hk, d = 4, 2, 16
    k_lengths = [n + 3 if i % 2 else n for i, n in enumerate(lengths)]  # sk != sq for some sequences
    total_q, total_k = sum(lengths), sum(k_lengths)
    q = torch.randn(total_q, h, d, generator=gen)
    k = torch.randn(total_k, hk, d, generator=gen)
    v = torch.randn(total_k, hk, d, generator=gen)
    cu_q, cu_k = cu_seqlens_from_lengths(lengths), cu_seqlens_from_lengths(k_lengths)
    used = [max(0, n - 2) for n in k_lengths] if use_seqused else k_lengths
    seqused = torch.tensor(used, dtype=torch.int32) if use_seqused else None
    out, lse = attention_varlen_ref(q, k, v, cu_q, cu_k, max(lengths), max(k_lengths), causal=causal, seqused_k=seqused)
    assert out.shape == q.shape and lse.shape == (h, total_q)
    for i in range(len(lengths)):
        q0, q1, k0 = cu_q[i].item(), cu_q[i + 1].item(), cu_k[i].item()
        want_out, want_lse = naive_attention(
            q[q0:q1].unsqueeze(0), k[k0:k0 + used[i]].unsqueeze(0), v[k0:k0 + used[i]].unsqueeze(0), causal=causal
        )
        assert_close(f"out[seq {i}]", out[q0:q1], want_out[0], rel_tol=REL)
        assert_close(f"lse[seq {i}]", lse[:, q0:q1], want_lse[0], rel_tol=REL)


@pytest.mark.parametrize("sq,sk", SEQLEN_PAIRS)
@pytest.mark.parametrize("causal", [False, True])
def test_pytorch_fa2_matches_naive(gen, sq, sk, causal):
    b, d = 3, 32
    q, k, v, do = _inputs(gen, b, sq, sk, 1, 1, d)
    q, k, v, do = (t[:, :, 0] for t in (q, k, v, do))  # the seed's 3-D interface: (batch, n, d)
    want_out, want_lse, want_grads = _naive_with_grads(
        q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), do.unsqueeze(2), causal=causal
    )
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out = FlashAttentionPyTorchFunc.apply(qg, kg, vg, causal)
    assert_close("out", out, want_out[:, :, 0], rel_tol=REL)
    # The saved logsumexp: shape (batch, n_queries), and only Q, K, V, O, L are saved.
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 5
    L = saved[4]
    assert L.shape == (b, sq)
    assert_close("L", L, want_lse[:, 0], rel_tol=REL)
    grads = torch.autograd.grad(out, (qg, kg, vg), do)
    for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
        assert_close(name, g, w[:, :, 0], rel_tol=REL)


def test_pytorch_fa2_uses_tiles_of_at_least_16():
    from ringflash import pytorch_fa2

    assert pytorch_fa2.Q_TILE >= 16 and pytorch_fa2.K_TILE >= 16


# -- the error bound itself (ringflash.testing, attn_check.check_attention)


def test_assert_close_refuses_a_baseline_with_infinite_error():
    # An infinite baseline error (PyTorch's own run overflowed) once made the bound
    # 2 * inf + atol, which passed any finite result, zeros included.
    want = torch.linspace(1, 2, 10, dtype=torch.float64)
    base = want.clone()
    base[0] = float("inf")
    for b in (base, torch.where(torch.arange(10) == 0, float("nan"), want)):
        with pytest.raises(AssertionError, match="sets no bound"):
            assert_close("x", torch.zeros(10), want, baseline=b)


def test_check_attention_fails_a_wrong_lse_where_pytorchs_fp16_lse_overflows(gen):
    from attn_check import check_attention

    # fp16 scores past 65504: PyTorch's own fp16 lse is inf in every row, so the bound must
    # come from the input-rounding floor, not from that infinite error.
    q, k = (100 + torch.randn(1, 4, 1, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    v, dout = (0.1 * torch.randn(1, 4, 1, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    assert torch.isinf(attention_ref(q.half(), k.half(), v.half())[1]).all()

    def impl(q, k, v, lse_factor):  # exact on the fp16 inputs; lse_factor=0 breaks its lse
        out, lse = attention_ref(q.double(), k.double(), v.double())
        return out.to(q.dtype), (lse * lse_factor).float()

    def ref(q, k, v, lse_factor):
        return attention_ref(q, k, v)

    check_attention(impl, ref, (q, k, v), torch.float16, extra=(1.0,), dout64=dout)
    with pytest.raises(AssertionError, match="lse"):
        check_attention(impl, ref, (q, k, v), torch.float16, extra=(0.0,), dout64=dout)


@pytest.mark.parametrize("sq,sk", [(1, 1), (33, 5), (5, 33), (40, 40)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pytorch_fa2_low_precision_meets_the_bar(gen, sq, sk, causal, dtype):
    from attn_check import check_attention

    def impl(q, k, v, causal):  # the seed's 3-D interface; L (batch, n_queries) as lse
        out = FlashAttentionPyTorchFunc.apply(q[:, :, 0], k[:, :, 0], v[:, :, 0], causal)
        assert out.grad_fn.saved_tensors[4].dtype == torch.float32
        return out[:, :, None], out.grad_fn.saved_tensors[4][:, None]

    def ref(q, k, v, causal):
        return attention_ref(q, k, v, causal=causal)

    inputs = [torch.randn(2, s, 1, 16, generator=gen, dtype=torch.float64) for s in (sq, sk, sk)]
    check_attention(impl, ref, inputs, dtype, extra=(causal,))

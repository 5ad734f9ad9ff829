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

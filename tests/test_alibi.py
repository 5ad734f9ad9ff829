"""ALiBi (flash-attn's ``alibi_slopes``) against the float64 reference: dense and varlen,
(nheads,) and (batch, nheads) slopes, causal and not, seqlen_q != seqlen_k (the bias is
aligned like the causal mask), with softcap and windows, forward and backward."""

import pytest
import torch

from attn_check import check_attention, dense64
from conftest import HAS_CUDA, cu_seqlens_from_lengths
from ringflash import attention_ref, attention_varlen_ref, flash_attn_func, flash_attn_varlen_func

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if HAS_CUDA else [])


def _slopes(gen, shape):
    """Geometric slopes as in the ALiBi paper, jittered per entry so a swapped index shows."""
    n = shape[-1]
    base = torch.tensor([2 ** (-8 * (i + 1) / n) for i in range(n)], dtype=torch.float32)
    return (base * (0.5 + torch.rand(shape, generator=gen))).to(DEVICE)


def _dense(slopes, causal, window=(-1, -1), softcap=0.0):
    def impl(q, k, v):
        out, lse, _ = flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap,
                                      alibi_slopes=slopes, return_attn_probs=True)
        return out, lse

    def ref(q, k, v):
        return attention_ref(q, k, v, causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes)

    return impl, ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_batch", [False, True], ids=["heads", "batch-heads"])
@pytest.mark.parametrize("sq,sk", [(37, 37), (17, 45), (45, 17)])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_alibi(gen, dtype, per_batch, sq, sk, causal):
    b, h, hk = 2, 4, 2
    slopes = _slopes(gen, (b, h) if per_batch else (h,))
    check_attention(*_dense(slopes, causal), dense64(gen, DEVICE, b, sq, sk, h, hk, 16), dtype)


@pytest.mark.parametrize("window,softcap", [((6, 3), 0.0), ((-1, -1), 2.0)], ids=["window", "softcap"])
def test_dense_alibi_with_window_or_softcap(gen, window, softcap):
    slopes = _slopes(gen, (2,))
    # Tripled inputs make a softcap bite; without one they would only make the scores large.
    inputs = [t * (3 if softcap else 1) for t in dense64(gen, DEVICE, 1, 40, 40, 2, 1, 32)]
    check_attention(*_dense(slopes, True, window, softcap), inputs, torch.float32)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_alibi_per_sequence(gen, causal):
    lengths, k_lengths = [9, 0, 30, 17], [14, 3, 30, 17]
    total_q, total_k = sum(lengths), sum(k_lengths)
    mk = lambda n, h: torch.randn(n, h, 16, generator=gen, dtype=torch.float64).to(DEVICE)  # noqa: E731
    inputs = (mk(total_q, 4), mk(total_k, 2), mk(total_k, 2))
    cu_q, cu_k = cu_seqlens_from_lengths(lengths, DEVICE), cu_seqlens_from_lengths(k_lengths, DEVICE)
    slopes = _slopes(gen, (4, 4))  # (batch, nheads): each sequence its own row

    def impl(q, k, v):
        out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 30, 30, causal=causal, alibi_slopes=slopes,
                                             return_attn_probs=True)
        return out, lse

    def ref(q, k, v):
        return attention_varlen_ref(q, k, v, cu_q, cu_k, 30, 30, causal=causal, alibi_slopes=slopes)

    check_attention(impl, ref, inputs, torch.float32)


def test_alibi_changes_the_result(gen):
    """The bias is really applied (a kernel that ignored it would still match a reference
    that ignored it)."""
    q, k, v = dense64(gen, DEVICE, 1, 20, 20, 2, 2, 16)
    slopes = torch.ones(2, dtype=torch.float32, device=DEVICE)
    plain = flash_attn_func(q.float(), k.float(), v.float(), causal=True)
    biased = flash_attn_func(q.float(), k.float(), v.float(), causal=True, alibi_slopes=slopes)
    assert (plain - biased).abs().max() > 1e-2


@pytest.mark.parametrize(
    "make,exc,pattern",
    [
        (lambda: torch.ones(4, dtype=torch.float64), TypeError, r"alibi_slopes: dtype torch.float64 is not supported; expected float32"),
        (lambda: torch.ones(3), ValueError, r"alibi_slopes: got shape \(3,\); expected \(nheads,\) = \(4,\) or \(batch, nheads\) = \(2, 4\)"),
        (lambda: [0.5] * 4, TypeError, r"alibi_slopes: expected a torch.Tensor, got list"),
    ],
)
def test_bad_alibi_slopes(make, exc, pattern):
    q = torch.randn(2, 5, 4, 16, device=DEVICE)
    with pytest.raises(exc, match=pattern):
        flash_attn_func(q, q, q, alibi_slopes=make())

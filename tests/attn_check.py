"""Run an attention implementation and the reference on the same inputs and hold the
implementation to the project's bar: for out, lse, dq, dk and dv, its max-abs error
against the float64 reference must be at most 2x the error of PyTorch's own attention
(the reference run in the same dtype) plus a small epsilon. Where rounding the inputs to
that dtype alone moves the exact result further than PyTorch's error (PyTorch's arithmetic
errors can cancel part of it by chance), the bound is 2x that input-rounding error instead."""

import contextlib
import math
import zlib
from typing import Callable, Sequence

import torch

from ringflash import attention_ref, attention_varlen_ref, flash_attn_func, flash_attn_varlen_func
from ringflash.kernels.configs import input_precision
from ringflash.testing import assert_close, error_stats

#: The "small epsilon" added to 2x PyTorch's error, per dtype.
EPS = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}

NAMES = ("dq", "dk", "dv")


@contextlib.contextmanager
def _matching_fp32_precision(dtype: torch.dtype, device: torch.device):
    """Where our fp32 kernels run tf32 matmuls (on a GPU, when a setting allows it), hold
    them against PyTorch in tf32 too; by default both are exact fp32."""
    if dtype != torch.float32 or device.type != "cuda" or input_precision(dtype) == "ieee":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _run(fn: Callable, inputs: Sequence[torch.Tensor], extra: Sequence, dout: torch.Tensor):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out, lse = fn(*leaves, *extra)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return out, lse, grads


def check_attention(
    impl: Callable,
    reference: Callable,
    inputs64: Sequence[torch.Tensor],
    dtype: torch.dtype,
    extra: Sequence = (),
    dout64: torch.Tensor | None = None,
    label: str = "",
    results: dict | None = None,
    relative_eps: bool = False,
) -> None:
    """``impl`` and ``reference`` take (q, k, v, *extra) and return (out, lse).

    ``inputs64`` are float64 q, k, v; they are cast to ``dtype`` for the implementation and
    PyTorch's own run, and used as they are for the ground truth. If ``results`` is a dict,
    the implementation's out, lse and (dq, dk, dv) are stored in it under "out", "lse" and
    "grads" before they are checked (so a caller can compare them with another run).
    ``relative_eps`` scales the epsilon by each tensor's largest reference entry (at least
    1): FlashAttention-2's backward recomputes the probabilities from the saved lse, an
    error relative to the scores that PyTorch, which keeps its softmax, does not make, and
    that shows at large head dims and scales (the property tests draw those). The three
    gradients share one scale, the largest of theirs: dq and dk hold differences
    ``dP - rowsum(dO * O)`` that cancel to exactly 0 where a row sees a single key (PyTorch
    gets that 0 exactly; FlashAttention-2 sums the two terms in different orders), so their
    rounding error follows the size of the terms, which dv shows, not the size of the result.
    """
    if dout64 is None:
        # Drawn from the inputs (hence from the test's seeded generator), not from the global
        # RNG, so that RINGFLASH_TEST_SEED replays a failure.
        seed = zlib.crc32(inputs64[0].detach().cpu().numpy().tobytes())
        gen = torch.Generator().manual_seed(seed)
        dout64 = torch.randn(inputs64[0].shape, generator=gen, dtype=torch.float64).to(inputs64[0].device)
    want_out, want_lse, want_grads = _run(reference, inputs64, extra, dout64)
    low = [t.to(dtype) for t in inputs64]
    with _matching_fp32_precision(dtype, low[0].device):
        base_out, base_lse, base_grads = _run(reference, low, extra, dout64)
    out, lse, grads = _run(impl, low, extra, dout64)
    if results is not None:
        results.update(out=out, lse=lse, grads=grads)
    assert out.dtype == dtype and out.shape == want_out.shape, (out.dtype, out.shape)
    assert lse.dtype == torch.float32 and lse.shape == want_lse.shape, (lse.dtype, lse.shape)
    prefix = f"{label}: " if label else ""

    def eps(*wants: torch.Tensor) -> float:
        scale = 1.0
        if relative_eps:
            for want in wants:
                finite = want[torch.isfinite(want)]
                if finite.numel():
                    scale = max(scale, finite.abs().max().item())
        return EPS[dtype] * scale

    floor: list = []  # the input-rounding floor, computed only when a check needs it

    def check(name: str, got: torch.Tensor, want: torch.Tensor, base: torch.Tensor, atol: float, pick) -> None:
        """Hold ``got`` to 2x PyTorch's error; where that fails, to 2x the error of the exact
        result on the rounded inputs if that is larger: no implementation given ``low`` can
        beat it (large at large scores, e.g. test_softcap's fp16 case, where PyTorch's own
        errors sometimes cancel part of it by chance). Computed on demand: it is a third
        reference run, 20% of a test file's time if done for every check."""
        try:
            assert_close(name, got, want, baseline=base, atol=atol)
            return
        except AssertionError:
            if not floor:
                floor.append(_run(reference, [t.to(inputs64[0].dtype) for t in low], extra, dout64))
            rounded = pick(floor[0])
            # A baseline that overflowed (non-finite error) bounds nothing: the floor does.
            base_err = error_stats(base, want).max_abs
            if math.isfinite(base_err) and error_stats(rounded, want).max_abs <= base_err:
                raise
        assert_close(name + " (bound: the input-rounding floor)", got, want, baseline=rounded, atol=atol)

    check(prefix + "out", out, want_out, base_out, eps(want_out), lambda f: f[0])
    check(prefix + "lse", lse, want_lse, base_lse, eps(want_lse), lambda f: f[1])
    grad_eps = eps(*want_grads)
    for i, (name, g, want, base) in enumerate(zip(NAMES, grads, want_grads, base_grads)):
        assert g.dtype == dtype and g.shape == want.shape
        check(prefix + name, g, want, base, grad_eps, lambda f, i=i: f[2][i])


# -- the kernels and the reference behind one calling convention: (q, k, v, *options) -> (out, lse)


def dense64(gen, device, b, sq, sk, h, hk, d):
    """Float64 q (b, sq, h, d), k and v (b, sk, hk, d) on ``device``."""
    mk = lambda s, n: torch.randn(b, s, n, d, generator=gen, dtype=torch.float64).to(device)  # noqa: E731
    return mk(sq, h), mk(sk, hk), mk(sk, hk)


def dense_impl(q, k, v, causal=False, window=(-1, -1), softcap=0.0):
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap, return_attn_probs=True)
    return out, lse


def dense_ref(q, k, v, causal=False, window=(-1, -1), softcap=0.0):
    return attention_ref(q, k, v, causal=causal, window_size=window, softcap=softcap)


def varlen_impl(q, k, v, cu_q, cu_k, max_q, max_k, causal=False, window=(-1, -1), seqused=None, softcap=0.0):
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, window_size=window,
                                         return_attn_probs=True, seqused_k=seqused, softcap=softcap)
    return out, lse


def varlen_ref(q, k, v, cu_q, cu_k, max_q, max_k, causal=False, window=(-1, -1), seqused=None, softcap=0.0):
    return attention_varlen_ref(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, window_size=window, seqused_k=seqused,
                                softcap=softcap)


def check_varlen_with_an_empty_sequence(gen, device, headdim: int, dtype: torch.dtype, causal: bool) -> None:
    """Varlen GQA (4 query heads, 2 KV heads) over four sequences, one of them empty, against
    the float64 reference."""
    from conftest import cu_seqlens_from_lengths

    lengths, k_lengths = [9, 0, 30, 17], [14, 6, 30, 3]
    q, k, v = (torch.randn(sum(n), heads, headdim, generator=gen, dtype=torch.float64).to(device)
               for n, heads in ((lengths, 4), (k_lengths, 2), (k_lengths, 2)))
    meta = (cu_seqlens_from_lengths(lengths, device), cu_seqlens_from_lengths(k_lengths, device),
            max(lengths), max(k_lengths))
    check_attention(varlen_impl, varlen_ref, (q, k, v), dtype, extra=(*meta, causal))

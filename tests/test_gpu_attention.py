"""The kernels at real sizes in bf16/fp16 on a GPU (``pytest -m gpu``); skipped on the CPU.

Same bar as the CPU tests: error against float64 at most 2x PyTorch's own error in the
same dtype plus a small epsilon, for out, lse, dq, dk and dv.
"""

import pytest
import torch

from attn_check import EPS, check_attention, dense64, dense_impl, dense_ref, varlen_impl, varlen_ref
from conftest import cu_seqlens_from_lengths
from shared_run import exclusive
from ringflash import attention_ref, flash_attn_func, flash_attn_varlen_func
from ringflash.testing import assert_close

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _dense64(gen, b, sq, sk, h, hk, d):
    return dense64(gen, DEV, b, sq, sk, h, hk, d)


_dense_impl, _dense_ref = dense_impl, dense_ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("headdim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(2048, 2048), (1000, 3001)])
def test_dense_real_sizes(gen, dtype, headdim, causal, sq, sk):
    inputs = _dense64(gen, 2, sq, sk, 16, 4, headdim)
    check_attention(_dense_impl, _dense_ref, inputs, dtype, extra=(causal,))


@pytest.mark.parametrize("headdim", [40, 96, 256])
def test_headdims_bf16(gen, headdim):
    inputs = _dense64(gen, 1, 1537, 1537, 8, 8, headdim)
    check_attention(_dense_impl, _dense_ref, inputs, torch.bfloat16, extra=(True,))


@pytest.mark.parametrize("causal,window,softcap", [(True, (256, -1), 0.0), (False, (100, 300), 0.0), (True, (-1, -1), 30.0)])
def test_window_softcap_bf16(gen, causal, window, softcap):
    inputs = _dense64(gen, 2, 1500, 1500, 8, 2, 128)
    check_attention(_dense_impl, _dense_ref, inputs, torch.bfloat16, extra=(causal, window, softcap))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("softcap", [5.0, 50.0])
@pytest.mark.parametrize("headdim", [64, 128, 256])
def test_softcap_tanh_approx(gen, dtype, softcap, headdim):
    """16-bit softcap calls take the GPU's tanh instruction (``common.softcap_mode``; relative
    error about 2**-11): forward and backward at the project's bar, fp16 with a small cap (where
    the instruction's error is largest against the input rounding: scripts/
    emulate_tanh_approx_error.py puts it at 1.1x PyTorch's fp16 error with the worst error on
    every entry) and Gemma's 50. A decode-sized
    call (one query against 1537 keys) goes through the decode kernel's scores as well."""
    from ringflash.kernels.common import SOFTCAP_APPROX, softcap_mode

    assert softcap_mode(softcap, dtype) == SOFTCAP_APPROX.value
    inputs = _dense64(gen, 2, 777, 777, 8, 2, headdim)
    check_attention(_dense_impl, _dense_ref, inputs, dtype, extra=(True, (-1, -1), softcap))
    decode = _dense64(gen, 4, 1, 1537, 8, 2, headdim)
    check_attention(_dense_impl, _dense_ref, decode, dtype, extra=(True, (-1, -1), softcap))


def test_fp32_exact(gen, monkeypatch):
    """RINGFLASH_FP32_PRECISION=ieee: fp32 matmuls, held to the usual bar against PyTorch fp32."""
    monkeypatch.setenv("RINGFLASH_FP32_PRECISION", "ieee")
    inputs = _dense64(gen, 1, 777, 777, 4, 2, 64)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        check_attention(_dense_impl, _dense_ref, inputs, torch.float32, extra=(True,))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_fp32_tf32_when_pytorch_allows_it(gen, monkeypatch):
    """fp32 inputs under torch.set_float32_matmul_precision("high"): tf32 matmuls. Triton hands
    fp32 bits to the tensor cores, which truncate them to tf32 (probabilities included), so
    the error is ~1e-3 relative (measured 1.2e-3 on an H100), a few times cuBLAS-tf32's;
    checked at that level."""
    from ringflash.kernels.configs import input_precision

    monkeypatch.delenv("RINGFLASH_FP32_PRECISION", raising=False)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        assert input_precision(torch.float32) == "tf32"
        _check_tf32(gen)
    finally:
        torch.set_float32_matmul_precision(saved)


def test_fp32_default_follows_pytorch_highest():
    from ringflash.kernels.configs import input_precision

    assert torch.get_float32_matmul_precision() == "highest"
    assert input_precision(torch.float32) == "ieee"


def _check_tf32(gen):
    q, k, v = (t.float() for t in _dense64(gen, 1, 777, 777, 4, 2, 64))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = _dense_impl(qg, kg, vg, True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (qg, kg, vg), dout)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    want, want_lse = _dense_ref(q64, k64, v64, True)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), dout.double())
    for name, got, ref in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (want, want_lse, *want_grads)):
        assert_close(name, got, ref, rel_tol=3e-3)


# About 20 GB each (float64 references of 3000-token sequences x 32 heads): under
# `pytest -n 8` four of them at once ran an H100 out of memory (run 28), so pytest-xdist's
# workers take turns (a lock shared by the session's workers). Each hands its memory back
# before the next turn: PyTorch's caching allocator otherwise keeps it reserved in the
# worker, and in run 48 the next worker's turn found 335 MB free beside one holding 33 GB.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_llama_gqa(gen, dtype, causal):
    with exclusive("gpu_memory"):
        try:
            _check_varlen_llama_gqa(gen, dtype, causal)
        finally:
            torch.cuda.empty_cache()


def _check_varlen_llama_gqa(gen, dtype, causal):
    lengths = [3000, 17, 0, 2053, 1, 1024]
    total = sum(lengths)
    q = torch.randn(total, 32, 128, generator=gen, dtype=torch.float64).to(DEV)
    k = torch.randn(total, 8, 128, generator=gen, dtype=torch.float64).to(DEV)
    v = torch.randn(total, 8, 128, generator=gen, dtype=torch.float64).to(DEV)
    cu = cu_seqlens_from_lengths(lengths, DEV)
    check_attention(varlen_impl, varlen_ref, (q, k, v), dtype, extra=(cu, cu, max(lengths), max(lengths), causal))


def _check_rows(label, got, want, base, dtype):
    assert_close(label, got, want, baseline=base, atol=EPS[dtype])


@pytest.mark.big
def test_single_sequence_128k(gen):
    """One causal sequence of 131072 tokens. Checked on its last rows (which see every key):
    dout is zero elsewhere, so dk/dv come from those rows alone and the reference needs
    only them."""
    n, rows, h, hk, d, dtype = 131072, 256, 8, 2, 128, torch.bfloat16
    q = torch.randn(1, n, h, d, generator=gen).to(DEV, dtype)
    k = torch.randn(1, n, hk, d, generator=gen).to(DEV, dtype)
    v = torch.randn(1, n, hk, d, generator=gen).to(DEV, dtype)
    dout = torch.zeros(1, n, h, d, device=DEV, dtype=dtype)
    dout[:, -rows:] = torch.randn(1, rows, h, d, generator=gen).to(DEV, dtype)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse, _ = flash_attn_func(qg, kg, vg, causal=True, return_attn_probs=True)
    dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), dout)
    results = {}
    for name, cast in (("want", torch.float64), ("base", dtype)):
        qs, ks, vs = (t[:, -rows:] if t is q else t for t in (q, k, v))
        qs, ks, vs = (t.to(cast).requires_grad_() for t in (qs, ks, vs))
        o, l = attention_ref(qs, ks, vs, causal=True)
        results[name] = (o, l, *torch.autograd.grad(o, (qs, ks, vs), dout[:, -rows:].to(cast)))
        del o, l, qs, ks, vs
    got = (out[:, -rows:], lse[:, :, -rows:], dq[:, -rows:], dk, dv)
    for i, label in enumerate(("out", "lse", "dq", "dk", "dv")):
        _check_rows(label, got[i], results["want"][i], results["base"][i], dtype)
    assert torch.all(dq[:, :-rows] == 0)  # rows with zero dout get exactly zero dq


@pytest.mark.big
def test_total_beyond_2_pow_31_elements(gen):
    """Varlen batch whose q holds more than 2**31 elements: offsets must be 64-bit. The
    first and the last sequence (which starts past 2**31 elements) are checked."""
    seqlen, nseq, h, hk, d, dtype = 2048, 260, 32, 4, 128, torch.bfloat16
    total = seqlen * nseq
    assert total * h * d > 2**31
    q = torch.randn(total, h, d, device=DEV, dtype=dtype)
    k = torch.randn(total, hk, d, device=DEV, dtype=dtype)
    v = torch.randn(total, hk, d, device=DEV, dtype=dtype)
    cu = cu_seqlens_from_lengths([seqlen] * nseq, DEV)
    qg, kg, vg = (t.requires_grad_() for t in (q, k, v))
    out, lse, _ = flash_attn_varlen_func(qg, kg, vg, cu, cu, seqlen, seqlen, causal=True, return_attn_probs=True)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), dout)
    for start in (0, total - seqlen):
        sl = slice(start, start + seqlen)
        res = {}
        for name, cast in (("want", torch.float64), ("base", dtype)):
            qs, ks, vs = (t.detach()[sl].unsqueeze(0).to(cast).requires_grad_() for t in (q, k, v))
            o, l = attention_ref(qs, ks, vs, causal=True)
            res[name] = (o[0], l[0], *(g[0] for g in torch.autograd.grad(o, (qs, ks, vs), dout[sl].unsqueeze(0).to(cast))))
        got = (out[sl], lse[:, sl], dq[sl], dk[sl], dv[sl])
        for i, label in enumerate(("out", "lse", "dq", "dk", "dv")):
            _check_rows(f"{label}[seq at {start}]", got[i], res["want"][i], res["base"][i], dtype)


def test_torch_compile_inductor_fullgraph(gen):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(256, 3 * 256)

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = self.proj(x).view(b, s, 3, 4, 64).unbind(2)
            return flash_attn_func(q, k, v, causal=True).reshape(b, s, 256)

    model = Block().to(DEV, torch.bfloat16)
    x = torch.randn(2, 1000, 256, generator=gen).to(DEV, torch.bfloat16)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    out.float().pow(2).sum().backward()


def _sm90_available() -> bool:
    from ringflash.kernels import sm90

    return sm90.AVAILABLE and torch.cuda.get_device_capability() == (9, 0)


def _record_sm90_calls(monkeypatch) -> list:
    """The names of the Gluon launchers (forward, backward) that run, in order, while the test runs."""
    from ringflash.kernels import sm90

    calls: list = []
    for name in ("attention_forward_sm90", "attention_backward_sm90"):
        real = getattr(sm90, name)
        monkeypatch.setattr(sm90, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return calls


@pytest.mark.timeout(300, method="thread")  # a hung Gluon kernel costs one worker, not the run
@pytest.mark.skipif(not torch.cuda.is_available() or not _sm90_available(), reason="needs Hopper (sm_90) and Gluon")
# Every compiled variant costs seconds of Gluon compilation: both dtypes for the default
# variant, bf16 for the others.
@pytest.mark.parametrize("variant,dtype", [("pingpong", torch.bfloat16), ("pingpong", torch.float16),
                                           ("specialized", torch.bfloat16), ("pipelined", torch.bfloat16)],
                         ids=["pingpong-bf16", "pingpong-fp16", "specialized-bf16", "pipelined-bf16"])
@pytest.mark.parametrize("headdim", [64, 128, 96, 112])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,sq,sk,h,hk", [(2, 2048, 2048, 8, 2), (1, 1000, 3001, 4, 4), (2, 3001, 1000, 4, 1),
                                          (3, 1, 700, 2, 2), (1, 129, 1, 2, 1)])
def test_sm90_forward_and_backward(gen, monkeypatch, variant, dtype, headdim, causal, b, sq, sk, h, hk):
    """The Gluon Hopper kernels (RINGFLASH_BACKEND=sm90) against the float64 reference: out
    and lse from its forward, dq, dk and dv from its backward. Lengths off the tiles,
    seqlen_q > seqlen_k under causal (rows that see no key), one query, one key, GQA and
    MQA, d=96 on 128-column tiles; each forward variant (``sm90.VARIANTS``); the call must
    go through both."""
    from ringflash.kernels import sm90

    calls = _record_sm90_calls(monkeypatch)
    monkeypatch.setattr(sm90, "DEFAULT_VARIANT", variant)
    monkeypatch.setenv("RINGFLASH_BACKEND", "sm90")
    monkeypatch.setenv("RINGFLASH_DECODE", "0")  # one-query calls too, not the decode family
    # The pipelined variant's cases also run the atomic 5-GEMM backward.
    monkeypatch.setenv("RINGFLASH_BACKWARD", "atomic" if variant == "pipelined" else "deterministic")
    inputs = _dense64(gen, b, sq, sk, h, hk, headdim)
    check_attention(_dense_impl, _dense_ref, inputs, dtype, extra=(causal,))
    assert set(calls) == {"attention_forward_sm90", "attention_backward_sm90"}, calls
    if variant == "pipelined":
        # The atomic dQ against the deterministic one on the same inputs: they differ only in
        # float32 summation order (and the odd dS rounding), a few bf16 ulps of the largest
        # entry. 2x PyTorch's error is ~10x FlashAttention-2's own here (a float32 emulation:
        # 0.1-0.3x PyTorch's), so a race that corrupts one block's share of dQ (run 42: a
        # consumer overwrote the K tile that the other's dQ was still reading) could pass it.
        monkeypatch.setenv("RINGFLASH_BACKWARD", "deterministic")
        low = [t.to(dtype).requires_grad_() for t in inputs]
        out, _ = _dense_impl(*low, causal)
        dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
        want = torch.autograd.grad(out, low[0], dout)[0].double()
        monkeypatch.setenv("RINGFLASH_BACKWARD", "atomic")
        low = [t.detach().requires_grad_() for t in low]
        out, _ = _dense_impl(*low, causal)
        got = torch.autograd.grad(out, low[0], dout)[0].double()
        ulp = 2.0 ** -7  # bf16's spacing relative to a value's leading power of two
        bound = 4 * ulp * want.abs().max().item() + 1e-6
        worst = (got - want).abs().max().item()
        assert worst <= bound, f"atomic dq differs from the deterministic dq by {worst:.3e} (bound {bound:.3e})"


@pytest.mark.timeout(300, method="thread")  # a hung Gluon kernel costs one worker, not the run
@pytest.mark.skipif(not torch.cuda.is_available() or not _sm90_available(), reason="needs Hopper (sm_90) and Gluon")
@pytest.mark.parametrize("headdim", [64, 128, 96])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,sq,sk,h,hk", [(2, 2048, 2048, 8, 2), (1, 1000, 3001, 4, 4), (2, 3001, 1000, 4, 1),
                                          (3, 1, 700, 2, 2)])
def test_sm90_tma_dq_writer(gen, monkeypatch, headdim, causal, b, sq, sk, h, hk):
    """The atomic 5-GEMM backward with its dQ added by TMA (RINGFLASH_SM90_DQ_WRITER=tma,
    the default) against the float64 reference, and its dq against the vector-reduction
    writer's (red) on the same inputs (the two differ only in float32 summation order):
    lengths off the tiles, rows that see no key, GQA and MQA, one query."""
    writer = "tma"
    monkeypatch.setenv("RINGFLASH_BACKEND", "sm90")
    monkeypatch.setenv("RINGFLASH_DECODE", "0")
    monkeypatch.setenv("RINGFLASH_BACKWARD", "atomic")
    monkeypatch.setenv("RINGFLASH_SM90_DQ_WRITER", writer)
    calls = _record_sm90_calls(monkeypatch)
    inputs = _dense64(gen, b, sq, sk, h, hk, headdim)
    check_attention(_dense_impl, _dense_ref, inputs, torch.bfloat16, extra=(causal,))
    assert "attention_backward_sm90" in calls, calls
    low = [t.to(torch.bfloat16).requires_grad_() for t in inputs]
    out, _ = _dense_impl(*low, causal)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    dq = {}
    for each in ("red", writer):
        monkeypatch.setenv("RINGFLASH_SM90_DQ_WRITER", each)
        low = [t.detach().requires_grad_() for t in low]
        out, _ = _dense_impl(*low, causal)
        dq[each] = torch.autograd.grad(out, low[0], dout)[0].double()
    bound = 4 * 2.0 ** -7 * dq["red"].abs().max().item() + 1e-6
    worst = (dq[writer] - dq["red"]).abs().max().item()
    assert worst <= bound, f"the TMA writer's dq differs from the reductions' by {worst:.3e} (bound {bound:.3e})"


@pytest.mark.timeout(300, method="thread")  # a hung Gluon kernel costs one worker, not the run
@pytest.mark.skipif(not torch.cuda.is_available() or not _sm90_available(), reason="needs Hopper (sm_90) and Gluon")
@pytest.mark.parametrize("backward", ["deterministic", "atomic"])
@pytest.mark.parametrize("headdim,dtype,softcap", [(64, torch.bfloat16, 30.0), (128, torch.float16, 5.0),
                                                   (128, torch.bfloat16, 50.0), (96, torch.bfloat16, 30.0)],
                         ids=["d64-bf16-30", "d128-fp16-5", "d128-bf16-50", "d96-bf16-30"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,sq,sk,h,hk", [(2, 1000, 1000, 8, 2), (1, 1000, 3001, 4, 4), (2, 3001, 1000, 4, 1)])
def test_sm90_softcap(gen, monkeypatch, backward, headdim, dtype, softcap, causal, b, sq, sk, h, hk):
    """Softcap on the Gluon kernels (RINGFLASH_BACKEND=sm90: the GPU's tanh inside the
    scores, 1 - t^2 in dS, the 32-row dK/dV tile) against the float64 reference: out, lse,
    dq, dk, dv; both backwards, rows that see no key (causal, sq > sk), GQA and MQA, a small
    fp16 cap (where the instruction's error is largest)."""
    calls = _record_sm90_calls(monkeypatch)
    monkeypatch.setenv("RINGFLASH_BACKEND", "sm90")
    monkeypatch.setenv("RINGFLASH_BACKWARD", backward)
    inputs = _dense64(gen, b, sq, sk, h, hk, headdim)
    check_attention(_dense_impl, _dense_ref, inputs, dtype, extra=(causal, (-1, -1), softcap))
    assert set(calls) == {"attention_forward_sm90", "attention_backward_sm90"}, calls


@pytest.mark.timeout(300, method="thread")  # a hung Gluon kernel costs one worker, not the run
@pytest.mark.skipif(not torch.cuda.is_available() or not _sm90_available(), reason="needs Hopper (sm_90) and Gluon")
@pytest.mark.parametrize("headdim,dtype", [(256, torch.bfloat16), (256, torch.float16), (192, torch.bfloat16),
                                           (160, torch.bfloat16), (136, torch.bfloat16), (224, torch.bfloat16)],
                         ids=["d256-bf16", "d256-fp16", "d192", "d160", "d136", "d224"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,sq,sk,h,hk,splits", [(2, 1000, 1000, 8, 2, 1), (1, 1000, 3001, 4, 4, 1),
                                                 (2, 3001, 1000, 4, 1, 1), (1, 129, 1, 2, 1, 1),
                                                 (1, 700, 700, 4, 1, 2)])
def test_sm90_wide_forward_and_backward(gen, monkeypatch, headdim, dtype, causal, b, sq, sk, h, hk, splits):
    """The Gluon kernels past d=128 (RINGFLASH_BACKEND=sm90): the forward on 256-column
    tiles with 64-key blocks; the backward's dK/dV consumers split d and share the score
    tiles (``SPLIT_D``), dQ streams 32 keys. out, lse, dq, dk and dv against the float64
    reference: lengths off the tiles, rows that see no key (causal, sq > sk), one key,
    GQA and MQA, d=192 and 136 on zero-filled 256-column tiles, and the underfilled
    launch's head splits (their partial dK/dV summed in float32)."""
    from ringflash.kernels import configs

    calls = _record_sm90_calls(monkeypatch)
    monkeypatch.setenv("RINGFLASH_BACKEND", "sm90")
    monkeypatch.setenv("RINGFLASH_DECODE", "0")
    inputs = _dense64(gen, b, sq, sk, h, hk, headdim)
    with configs.override(sm90_head_splits=splits):
        check_attention(_dense_impl, _dense_ref, inputs, dtype, extra=(causal,))
    assert set(calls) == {"attention_forward_sm90", "attention_backward_sm90"}, calls


@pytest.mark.timeout(300, method="thread")  # a hung Gluon kernel costs one worker, not the run
@pytest.mark.skipif(not torch.cuda.is_available() or not _sm90_available(), reason="needs Hopper (sm_90) and Gluon")
def test_sm90_is_the_default_where_preferred(gen, monkeypatch):
    """Under the default backend a d=128 call of 2k query rows runs the Gluon forward and
    backward (not the portable ones after a fallback): the family must not have turned
    itself off."""
    from ringflash.kernels import sm90

    monkeypatch.delenv("RINGFLASH_BACKEND", raising=False)
    calls = _record_sm90_calls(monkeypatch)
    inputs = _dense64(gen, 1, 2048, 2048, 4, 2, 128)
    check_attention(_dense_impl, _dense_ref, inputs, torch.bfloat16, extra=(True,))
    assert set(calls) == {"attention_forward_sm90", "attention_backward_sm90"} and sm90.disabled_reason is None, \
        (calls, sm90.disabled_reason)


@pytest.mark.timeout(300, method="thread")  # a hung Gluon kernel costs one worker, not the run
@pytest.mark.skipif(not torch.cuda.is_available() or not _sm90_available(), reason="needs Hopper (sm_90) and Gluon")
@pytest.mark.parametrize("headdim,softcap", [(64, 0.0), (128, 0.0), (128, 30.0), (256, 0.0), (192, 0.0)],
                         ids=["d64", "d128", "d128-softcap", "d256", "d192"])
@pytest.mark.parametrize("causal", [False, True])
def test_sm90_varlen_forward_and_backward(gen, monkeypatch, headdim, softcap, causal):
    """The Gluon forward and backward on packed sequences (RINGFLASH_BACKEND=sm90): lengths
    off the tiles, an empty sequence, one of a single token, keys longer than queries
    (bottom-right causal), GQA, softcap, and d past 128 (256-column tiles, the SPLIT_D
    dK/dV program; d=192's columns clipped by the per-sequence descriptors); the tiles past
    a sequence's end must neither count nor overwrite the next sequence's rows (out, dq,
    dk, dv)."""
    calls = _record_sm90_calls(monkeypatch)
    monkeypatch.setenv("RINGFLASH_BACKEND", "sm90")
    monkeypatch.setenv("RINGFLASH_SM90_VARLEN", "1")  # varlen on the Gluon kernels (run 47)
    monkeypatch.setenv("RINGFLASH_DECODE", "0")
    # Two empty query sequences last, the final one with no keys either: their descriptors
    # start at the packed tensors' ends.
    q_lengths, k_lengths = [700, 0, 1, 129, 1300, 0, 0], [900, 5, 1, 129, 1301, 7, 0]
    q = torch.randn(sum(q_lengths), 8, headdim, generator=gen, dtype=torch.float64).to(DEV)
    k, v = (torch.randn(sum(k_lengths), 2, headdim, generator=gen, dtype=torch.float64).to(DEV) for _ in range(2))
    cu_q, cu_k = cu_seqlens_from_lengths(q_lengths, DEV), cu_seqlens_from_lengths(k_lengths, DEV)
    check_attention(varlen_impl, varlen_ref, (q, k, v), torch.bfloat16,
                    extra=(cu_q, cu_k, max(q_lengths), max(k_lengths), causal, (-1, -1), None, softcap))
    assert set(calls) == {"attention_forward_sm90", "attention_backward_sm90"}, calls


@pytest.mark.timeout(300, method="thread")  # a hung Gluon kernel costs one worker, not the run
@pytest.mark.skipif(not torch.cuda.is_available() or not _sm90_available(), reason="needs Hopper (sm_90) and Gluon")
def test_sm90_varlen_gradients_keep_the_inputs_layout(gen, monkeypatch):
    """Packed q/k/v viewed from (heads, tokens, d) buffers: the Gluon varlen backward ran on
    contiguous copies and returned contiguous gradients, where the custom op's fake (and the
    portable kernels) lay them out as the inputs, so a compiled graph's stride check failed.
    Values against the portable kernels' on the same call."""
    from ringflash.kernels.common import grad_buffer

    monkeypatch.setenv("RINGFLASH_DECODE", "0")
    monkeypatch.setenv("RINGFLASH_SM90_VARLEN", "1")  # varlen on the Gluon kernels (run 47)
    lengths = [300, 0, 517]
    cu = cu_seqlens_from_lengths(lengths, DEV)
    q, k, v = (torch.randn(h, sum(lengths), 128, generator=gen).to(DEV, torch.bfloat16).transpose(0, 1)
               for h in (8, 2, 2))
    dout = torch.randn(sum(lengths), 8, 128, generator=gen).to(DEV, torch.bfloat16)
    grads = {}
    for backend in ("sm90", "portable"):
        monkeypatch.setenv("RINGFLASH_BACKEND", backend)
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = flash_attn_varlen_func(*leaves, cu, cu, max(lengths), max(lengths), causal=True)
        grads[backend] = torch.autograd.grad(out, leaves, dout)
    for g, g_portable, x in zip(grads["sm90"], grads["portable"], (q, k, v)):
        assert g.stride() == grad_buffer(x, 0).stride() == g_portable.stride()
        torch.testing.assert_close(g.float(), g_portable.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.timeout(300, method="thread")  # a hung Gluon kernel costs one worker, not the run
@pytest.mark.skipif(not torch.cuda.is_available() or not _sm90_available(), reason="needs Hopper (sm_90) and Gluon")
@pytest.mark.parametrize("splits", [1, 2, 4])
def test_sm90_head_splits_against_the_reference(gen, monkeypatch, splits):
    """The Gluon dK/dV kernel with each GQA group's query heads split across 1, 2 or 4
    programs (``configs.sm90_dkdv_head_splits``: transformers' Llama shape at batch 1, 16/4
    heads, which underfills the GPU), lengths off the tiles, causal: dq, dk and dv against
    the float64 reference at the project's bar."""
    from ringflash.kernels import configs

    monkeypatch.setenv("RINGFLASH_BACKEND", "sm90")
    inputs = _dense64(gen, 1, 1000, 1000, 16, 4, 128)
    with configs.override(sm90_head_splits=splits):
        check_attention(_dense_impl, _dense_ref, inputs, torch.bfloat16, extra=(True,))


@pytest.mark.timeout(300, method="thread")  # a hung Gluon kernel costs one worker, not the run
@pytest.mark.skipif(not torch.cuda.is_available() or not _sm90_available(), reason="needs Hopper (sm_90) and Gluon")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,sq,sk,h,hk", [(2, 2048, 2048, 8, 2), (1, 1000, 1000, 16, 4), (2, 3001, 1000, 4, 1)])
def test_sm90_overlapped_dq_launch(gen, monkeypatch, causal, b, sq, sk, h, hk):
    """The two-kernel Gluon backward with its dQ kernel a programmatic dependent launch of
    the dK/dV kernel (``configs.sm90_backward_overlap``): dq, dk and dv against the float64
    reference, and bit for bit the gradients of the serial launches (the same kernels and
    summation order), eagerly and replayed from a CUDA graph (the launch attribute captured).
    The 16/4-head case splits each group's heads (``sm90_dkdv_head_splits``), whose partial
    sums run after the dQ launch: a sum that ran before the dK/dV kernel ended would differ."""
    from ringflash.kernels import configs, sm90
    from ringflash.kernels.problem import make_problem

    monkeypatch.setenv("RINGFLASH_BACKEND", "sm90")
    monkeypatch.setenv("RINGFLASH_BACKWARD", "deterministic")
    inputs = _dense64(gen, b, sq, sk, h, hk, 128)
    with configs.override(sm90_backward_overlap=True):
        check_attention(_dense_impl, _dense_ref, inputs, torch.bfloat16, extra=(causal,))
    q, k, v = (t.to(torch.bfloat16) for t in inputs)
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    prob = make_problem(q, k, None, sq, sk, 128 ** -0.5, causal, -1, -1, 0.0)
    grads = {}
    for overlap in (False, True):
        with configs.override(sm90_backward_overlap=overlap):
            grads[overlap] = sm90.attention_backward_sm90(dout, q, k, v, out, lse, prob)
    for name, want, got in zip(("dq", "dk", "dv"), grads[False], grads[True]):
        assert torch.equal(want, got), f"{name}: the overlapped launch differs from the serial one"
    with configs.override(sm90_backward_overlap=True):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            captured = sm90.attention_backward_sm90(dout, q, k, v, out, lse, prob)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    for name, want, got in zip(("dq", "dk", "dv"), grads[False], captured):
        assert torch.equal(want, got), f"{name}: the overlapped launch replayed from a CUDA graph differs"


@pytest.mark.timeout(300, method="thread")  # a hung Gluon kernel costs one worker, not the run
@pytest.mark.skipif(not torch.cuda.is_available() or not _sm90_available(), reason="needs Hopper (sm_90) and Gluon")
@pytest.mark.parametrize("causal", [False, True])
def test_sm90_varlen_keeps_sequences_apart(gen, monkeypatch, causal):
    """A NaN and an Inf in one sequence's values reach no other sequence's output through
    the Gluon varlen forward: its tiles past a sequence's end read zeros (per-sequence
    descriptors), not the next sequence's rows (0 x NaN would be NaN). Lengths off the
    128-row tiles, so every sequence's last tile runs into the next one."""
    from ringflash.kernels import sm90

    calls = []
    real = sm90.attention_forward_sm90
    monkeypatch.setattr(sm90, "attention_forward_sm90", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("RINGFLASH_BACKEND", "sm90")
    monkeypatch.setenv("RINGFLASH_SM90_VARLEN", "1")  # varlen on the Gluon kernels (run 47)
    monkeypatch.setenv("RINGFLASH_DECODE", "0")
    lengths = [200, 77, 300, 129]
    total = sum(lengths)
    cu = cu_seqlens_from_lengths(lengths, DEV)
    q, k, v = (torch.randn(total, 4, 128, generator=gen, dtype=torch.float64).to(DEV, torch.bfloat16) for _ in range(3))
    poisoned = v.clone()
    poisoned[200] = float("nan")  # sequence 1's first key
    poisoned[277 + 5] = float("inf")  # sequence 2
    clean = flash_attn_varlen_func(q, k, v, cu, cu, 300, 300, causal=causal)
    dirty = flash_attn_varlen_func(q, k, poisoned, cu, cu, 300, 300, causal=causal)
    assert calls, "the calls did not reach the sm90 forward"
    for first, last in ((0, 200), (577, total)):  # sequences 0 and 3 share no value with 1 and 2
        assert torch.isfinite(dirty[first:last]).all(), (first, last)
        assert torch.equal(dirty[first:last], clean[first:last]), (first, last)


def _dense_grads(q, k, v, dout, **kwargs):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse, _ = flash_attn_func(*leaves, return_attn_probs=True, **kwargs)
    return (out, lse, *torch.autograd.grad(out, leaves, dout))


_FAMILIES = {
    # name: (environment, headdim, dropout_p); every one deterministic by contract
    "sm90-pingpong": ({"RINGFLASH_BACKEND": "sm90"}, 128, 0.0),
    "sm90-d64": ({"RINGFLASH_BACKEND": "sm90"}, 64, 0.0),
    "sm90-dropout": ({"RINGFLASH_BACKEND": "sm90"}, 128, 0.1),
    "portable-d128": ({"RINGFLASH_BACKEND": "portable"}, 128, 0.0),
    "portable-d192-split": ({"RINGFLASH_BACKEND": "portable", "RINGFLASH_HEAD_PARTS": "1"}, 192, 0.0),
    "portable-d256": ({"RINGFLASH_BACKEND": "portable"}, 256, 0.0),
}


@pytest.mark.timeout(300, method="thread")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("family", list(_FAMILIES))
def test_reruns_are_bit_identical(gen, monkeypatch, family, causal):
    """Five runs of the default (deterministic) forward and backward on the same inputs give
    the same bits: out, lse, dq, dk, dv. A race between warps or partitions (run 42's atomic
    dQ read a K tile that the other consumer had already overwritten) shows as a difference
    between runs long before it shows as an error past the float64 bar, which at bf16 is
    ~10x looser than FlashAttention-2's own rounding. Lengths off the tiles, GQA, full and
    causal; the Gluon kernels, the portable ones and the head-dim split."""
    env, headdim, dropout_p = _FAMILIES[family]
    if env["RINGFLASH_BACKEND"] == "sm90" and not _sm90_available():
        pytest.skip("needs Hopper (sm_90) and Gluon")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RINGFLASH_BACKWARD", "deterministic")
    q, k, v = (t.to(torch.bfloat16) for t in _dense64(gen, 2, 1000, 3001, 8, 2, headdim))
    dout = torch.randn(q.shape, generator=gen).to(DEV, torch.bfloat16)
    runs = []
    for _ in range(5):
        if dropout_p:
            torch.manual_seed(7)  # the same mask every run
        runs.append(_dense_grads(q, k, v, dout, causal=causal, dropout_p=dropout_p))
    names = ("out", "lse", "dq", "dk", "dv")
    for i, run in enumerate(runs[1:], 1):
        for name, a, b in zip(names, runs[0], run):
            assert torch.equal(a, b), f"{family}: run {i}'s {name} differs from run 0's by {(a - b).abs().max():.3e}"


@pytest.mark.timeout(300, method="thread")
@pytest.mark.skipif(not torch.cuda.is_available() or not _sm90_available(), reason="needs Hopper (sm_90) and Gluon")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sm90_atomic_backward_with_far_negative_scores(gen, monkeypatch, dtype):
    """Rows whose scores all lie far below 0 (lse near -100): the padded keys past seqlen_k
    (not a multiple of the tile) get P = exp(-lse), which overflows float32 and fp16's dS.
    The atomic dK/dV program's dQ MMA multiplied that by the padded K rows (zeros): inf x 0
    put NaN in dQ. Its dq must equal the deterministic backward's, finite."""
    monkeypatch.setenv("RINGFLASH_BACKEND", "sm90")
    d, n = 64, 1000
    direction = torch.ones(d, dtype=torch.float64) / d**0.5
    k = 0.1 * torch.randn(1, n, 2, d, generator=gen, dtype=torch.float64) + 3.0 * direction  # k.u = 3 +- 0.1
    # Scores q.k near -120: lse near -113.
    q = (-40.0 * direction).expand(1, 300, 2, d) + 0.1 * torch.randn(1, 300, 2, d, generator=gen, dtype=torch.float64)
    v = torch.randn(1, n, 2, d, generator=gen, dtype=torch.float64)
    q, k, v = (t.to(DEV, dtype) for t in (q, k, v))
    dout = torch.randn(q.shape, generator=gen).to(DEV, dtype)
    grads = {}
    for mode in ("deterministic", "atomic"):
        monkeypatch.setenv("RINGFLASH_BACKWARD", mode)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out, lse, _ = flash_attn_func(*leaves, softmax_scale=1.0, return_attn_probs=True)
        assert lse.max().item() < -60, lse.max().item()  # the regime this test is about
        grads[mode] = torch.autograd.grad(out, leaves, dout)
    for name, got, want in zip(("dq", "dk", "dv"), grads["atomic"], grads["deterministic"]):
        assert torch.isfinite(got).all(), f"atomic {name} has non-finite entries"
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 4 * 2.0**-7 * scale + 1e-6, name


def _training_call(gen, layout: str):
    """(draw, step) of one bf16 training call, 8/2 heads, d=128, causal: ``draw()`` gives
    fresh q, k, v, dout on the GPU; ``step(q, k, v, dout)`` gives (out, dq, dk, dv). Dense:
    2 x 1000 tokens (the Gluon kernels' scope on Hopper); varlen: documents of 300, 0, 517
    and 1 tokens."""
    h, hk, d = 8, 2, 128
    if layout == "dense":
        shape_q, shape_kv = (2, 1000, h, d), (2, 1000, hk, d)
        cu = None
    else:
        lengths = [300, 0, 517, 1]
        shape_q, shape_kv = (sum(lengths), h, d), (sum(lengths), hk, d)
        cu = cu_seqlens_from_lengths(lengths, DEV)

    def draw():
        return [torch.randn(s, generator=gen).to(DEV, torch.bfloat16) for s in (shape_q, shape_kv, shape_kv, shape_q)]

    def step(q, k, v, dout):
        if cu is None:
            out = flash_attn_func(q, k, v, causal=True)
        else:
            out = flash_attn_varlen_func(q, k, v, cu, cu, 517, 517, causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    return draw, step


def _leaves(tensors):
    """q, k, v requiring grad; dout not."""
    return [t.requires_grad_(i < 3) for i, t in enumerate(tensors)]


@pytest.mark.timeout(300, method="thread")
@pytest.mark.parametrize("backend", ["default", "portable"])
@pytest.mark.parametrize("layout", ["dense", "varlen"])
def test_cuda_graph_replay_matches_eager(gen, monkeypatch, backend, layout):
    """A training call captured in a CUDA graph (torch.compile's reduce-overhead mode,
    transformers' static-cache generation, a whole captured step) must make no host-device
    sync and no host-side decision from tensor values inside the capture, and its replay on
    new inputs copied into the captured tensors must give what an eager call gives on them:
    out, dq, dk and dv, bit for bit (the default backward is deterministic)."""
    if backend == "portable":
        monkeypatch.setenv("RINGFLASH_BACKEND", "portable")
    draw, step = _training_call(gen, layout)
    static = _leaves(draw())
    side = torch.cuda.Stream()  # warm-up (compiles, first-use checks) off the capture, as PyTorch asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(*static)
    fresh = draw()
    with torch.no_grad():
        for dst, src in zip(static, fresh):
            dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    want = step(*_leaves(fresh))
    for name, got, ref in zip(("out", "dq", "dk", "dv"), captured, want):
        assert torch.equal(got, ref), f"{name}: the replay differs from the eager call by {(got - ref).abs().max().item():.3g}"


@pytest.mark.timeout(300, method="thread")
@pytest.mark.parametrize("backend", ["default", "portable"])
@pytest.mark.parametrize("layout", ["dense", "varlen"])
def test_training_calls_make_no_host_device_sync(gen, monkeypatch, backend, layout):
    """No host-device sync in a forward or backward (a sync stalls the host until the GPU
    drains, so the next launches cannot queue ahead): under torch's sync debug mode a
    repeated call raises on any. The first call may read cu_seqlens once, to check their
    values (validation remembers the tensor)."""
    if backend == "portable":
        monkeypatch.setenv("RINGFLASH_BACKEND", "portable")
    draw, step = _training_call(gen, layout)
    inputs = _leaves(draw())
    step(*inputs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(*inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")

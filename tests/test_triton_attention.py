"""The Triton kernels (through the public API) against the float64 reference.

On the CPU they run in Triton's interpreter at small sizes in fp16 and fp32 (the
interpreter computes bf16 dots wrongly); test_gpu_attention.py runs bf16/fp16 at real sizes.
"""

import pytest
import torch

from attn_check import check_attention, dense64, dense_impl, dense_ref, varlen_impl, varlen_ref
from conftest import AWKWARD_SEQLENS, AWKWARD_VARLEN_BATCHES, HAS_CUDA, cu_seqlens_from_lengths
from ringflash import (
    FlashAttentionTritonFunc,
    attention_ref,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from ringflash.kernels import configs

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPES = [torch.float16, torch.float32]


def _dense64(gen, b, sq, sk, h, hk, d):
    return dense64(gen, DEVICE, b, sq, sk, h, hk, d)


_dense_impl, _dense_ref = dense_impl, dense_ref
_varlen_impl, _varlen_ref = varlen_impl, varlen_ref


SEQLEN_PAIRS = [(s, s) for s in AWKWARD_SEQLENS] + [(17, 129), (129, 17)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sq,sk", SEQLEN_PAIRS)
@pytest.mark.parametrize("causal", [False, True])
def test_dense(gen, dtype, sq, sk, causal):
    inputs = _dense64(gen, 2, sq, sk, 2, 2, 32)
    check_attention(_dense_impl, _dense_ref, inputs, dtype, extra=(causal,))


@pytest.mark.parametrize("heads", [(4, 1), (6, 2)], ids=["mqa", "gqa"])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa(gen, heads, causal):
    inputs = _dense64(gen, 1, 33, 47, *heads, 16)
    check_attention(_dense_impl, _dense_ref, inputs, torch.float16, extra=(causal,))


@pytest.mark.parametrize("headdim", [8, 40, 80, 96, 112, 256])
def test_headdims(gen, headdim):
    inputs = _dense64(gen, 1, 37, 37, 2, 1, headdim)
    check_attention(_dense_impl, _dense_ref, inputs, torch.float16, extra=(True,))


@pytest.mark.parametrize(
    "causal,window",
    [(False, (5, 9)), (False, (0, 0)), (True, (12, -1)), (False, (-1, 3)), (False, (20, -1)), (True, (0, -1))],
)
@pytest.mark.parametrize("sq,sk", [(45, 45), (20, 61), (61, 20)])
def test_sliding_window(gen, causal, window, sq, sk):
    inputs = _dense64(gen, 1, sq, sk, 2, 1, 16)
    check_attention(_dense_impl, _dense_ref, inputs, torch.float32, extra=(causal, window))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_softcap(gen, dtype, causal):
    inputs = _dense64(gen, 1, 40, 40, 2, 2, 16)
    # Large inputs so that the cap actually bites (scores well beyond softcap).
    inputs = [t * 3 for t in inputs]
    check_attention(_dense_impl, _dense_ref, inputs, dtype, extra=(causal, (-1, -1), 2.5))


def _varlen_case(gen, lengths, k_lengths, h, hk, d):
    q = torch.randn(sum(lengths), h, d, generator=gen, dtype=torch.float64).to(DEVICE)
    k = torch.randn(sum(k_lengths), hk, d, generator=gen, dtype=torch.float64).to(DEVICE)
    v = torch.randn(sum(k_lengths), hk, d, generator=gen, dtype=torch.float64).to(DEVICE)
    meta = (cu_seqlens_from_lengths(lengths, DEVICE), cu_seqlens_from_lengths(k_lengths, DEVICE),
            max(lengths), max(k_lengths))
    return (q, k, v), meta


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths", AWKWARD_VARLEN_BATCHES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen(gen, dtype, lengths, causal):
    k_lengths = [n + 5 * (i % 2) for i, n in enumerate(lengths)]  # some sequences have sk != sq
    inputs, meta = _varlen_case(gen, lengths, k_lengths, 4, 2, 32)
    check_attention(_varlen_impl, _varlen_ref, inputs, dtype, extra=(*meta, causal))


@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (4, 2))])
def test_varlen_seqused_k(gen, causal, window):
    lengths, k_lengths = [9, 0, 30, 17], [20, 6, 30, 3]
    used = torch.tensor([11, 0, 30, 1], dtype=torch.int32, device=DEVICE)  # includes an empty prefix
    inputs, meta = _varlen_case(gen, lengths, k_lengths, 2, 1, 16)
    check_attention(_varlen_impl, _varlen_ref, inputs, torch.float32, extra=(*meta, causal, window, used))


@pytest.mark.parametrize(
    "causal,window",
    [(True, (-1, -1)), (False, (3, 0)), (False, (0, 5)), (True, (6, -1)), (False, (-1, 2)),
     (False, (40, -1)), (False, (35, 30))],
)
def test_every_diagonal_offset(gen, causal, window):
    """One varlen batch whose sequences cover every sk - sq offset modulo the block sizes
    (and sq > sk), so the masked/unmasked phase boundaries are hit at every residue; wide
    windows leave fully visible blocks between two masked edges."""
    # Residues modulo 16 cover the interpreter's block sizes (16 and 32 rows or keys).
    lengths = [20] * 17 + [70] * 17 + [33] * 8
    k_lengths = list(range(20, 37)) + list(range(70, 87)) + list(range(1, 33, 4))
    inputs, meta = _varlen_case(gen, lengths, k_lengths, 1, 1, 16)
    check_attention(_varlen_impl, _varlen_ref, inputs, torch.float32, extra=(*meta, causal, window))


def test_varlen_keys_past_seqused_get_zero_gradient(gen):
    inputs, meta = _varlen_case(gen, [8, 8], [12, 12], 2, 2, 16)
    q, k, v = (t.float().requires_grad_() for t in inputs)
    used = torch.tensor([5, 12], dtype=torch.int32, device=DEVICE)
    out = flash_attn_varlen_func(q, k, v, *meta, seqused_k=used)
    dk, dv = torch.autograd.grad(out.sum(), (k, v))
    assert torch.all(dk[5:12] == 0) and torch.all(dv[5:12] == 0)
    assert dk[:5].abs().sum() > 0


def test_non_contiguous_inputs_take_no_copy(gen, monkeypatch):
    """Token/head strides are free: q, k, v sliced out of a fused projection reach the kernel as they are."""
    from ringflash.kernels import dispatch

    seen = []
    real = dispatch.attention_forward

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.data_ptr(), k.data_ptr(), v.data_ptr()))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(dispatch, "attention_forward", spy)
    fused = torch.randn(2, 33, 3 * 2 + 3, 16, generator=gen).half().to(DEVICE)
    q, k, v = fused[:, :, :2], fused[:, :, 2:4], fused[:, :, 7:9]
    assert not q.is_contiguous()
    flash_attn_func(q, k, v, causal=True)
    assert seen == [(q.data_ptr(), k.data_ptr(), v.data_ptr())]


def test_strided_views_match_contiguous(gen):
    """Same numbers whether q/k/v are contiguous or strided views of a larger buffer."""
    b, s, h, d = 2, 40, 2, 16
    fused = torch.randn(b, s, 3, h, d, generator=gen).half().to(DEVICE)
    q, k, v = fused.unbind(2)
    assert q.stride(1) == 3 * h * d
    out_strided = flash_attn_func(q, k, v, causal=True)
    out_contig = flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    assert torch.equal(out_strided, out_contig)
    # A transposed (b, h, s, d)-major buffer viewed as (b, s, h, d): token stride d, head stride s*d.
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(flash_attn_func(qt, k, v, causal=True), out_contig)


def test_gradients_keep_the_inputs_layout(gen):
    """transformers' layout, (b, h, s, d) tensors passed as transposed views: the gradients
    come back laid out as the views (flash-attn's empty_like), so autograd has nothing to
    copy to fit them to the leaves, and they match the float64 reference; a slice of a
    fused projection, which is not dense, gets contiguous gradients."""
    b, s, h, hk, d = 2, 37, 4, 2, 16
    leaves = [torch.randn(b, n, s, d, generator=gen).to(DEVICE).requires_grad_() for n in (h, hk, hk)]
    dout = torch.randn(b, s, h, d, generator=gen).to(DEVICE)
    views = [t.transpose(1, 2) for t in leaves]
    grads = torch.autograd.grad(flash_attn_func(*views, causal=True), views, dout)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_views = [t.transpose(1, 2) for t in ref_leaves]
    want = torch.autograd.grad(attention_ref(*ref_views, causal=True)[0], ref_views, dout.double())
    for got, view, ref in zip(grads, views, want):
        assert got.stride() == view.stride(), (got.stride(), view.stride())
        torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)
    fused = torch.randn(b, s, 3, h, d, generator=gen).to(DEVICE).requires_grad_()
    parts = fused.unbind(2)
    for got in torch.autograd.grad(flash_attn_func(*parts, causal=True), parts, dout):
        assert got.is_contiguous()


def test_packed_variants_match_unpacked(gen):
    b, s, h, d = 2, 21, 2, 16
    qkv = torch.randn(b, s, 3, h, d, generator=gen).half().to(DEVICE).requires_grad_()
    out = flash_attn_qkvpacked_func(qkv, causal=True)
    (dqkv,) = torch.autograd.grad(out.sum(), (qkv,))
    q, k, v = (t.detach().clone().requires_grad_() for t in qkv.unbind(2))
    want = flash_attn_func(q, k, v, causal=True)
    want_grads = torch.autograd.grad(want.sum(), (q, k, v))
    assert torch.equal(out, want)
    assert torch.equal(dqkv, torch.stack(want_grads, dim=2))

    kv = torch.stack([k, v], dim=2).detach()
    assert torch.equal(flash_attn_kvpacked_func(q, kv, causal=True), want)

    lengths = [7, 0, 14]
    cu = cu_seqlens_from_lengths(lengths, DEVICE)
    qkv_v = qkv.detach()[0]  # (21, 3, h, d)
    out_v = flash_attn_varlen_qkvpacked_func(qkv_v, cu, 14, causal=True)
    q_v, k_v, v_v = qkv_v.unbind(1)
    want_v = flash_attn_varlen_func(q_v, k_v, v_v, cu, cu, 14, 14, causal=True)
    assert torch.equal(out_v, want_v)
    kv_v = torch.stack([k_v, v_v], dim=1)
    assert torch.equal(flash_attn_varlen_kvpacked_func(q_v, kv_v, cu, cu, 14, 14, causal=True), want_v)


def test_return_attn_probs_layout(gen):
    q, k, v = (t.half() for t in _dense64(gen, 2, 9, 11, 4, 2, 16))
    out, lse, probs = flash_attn_func(q, k, v, return_attn_probs=True)
    assert probs is None and lse.shape == (2, 4, 9) and lse.dtype == torch.float32
    inputs, meta = _varlen_case(gen, [3, 6], [5, 5], 4, 2, 16)
    out, lse, probs = flash_attn_varlen_func(*(t.half() for t in inputs), *meta, return_attn_probs=True)
    assert probs is None and lse.shape == (4, 9)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(17, 17), (40, 129)])
def test_triton_func_seed_interface(gen, causal, sq, sk):
    """FlashAttentionTritonFunc.apply(Q, K, V, is_causal) with 3-D inputs; L saved as (batch, n_queries)."""
    b, d = 3, 32
    mk = lambda n: torch.randn(b, n, d, generator=gen, dtype=torch.float64).to(DEVICE)  # noqa: E731
    q, k, v = mk(sq), mk(sk), mk(sk)

    def impl(q, k, v):
        out = FlashAttentionTritonFunc.apply(q, k, v, causal)
        saved = out.grad_fn.saved_tensors
        assert len(saved) == 5 and saved[4].shape == (b, sq)
        return out, saved[4]

    def ref(q, k, v):
        out, lse = attention_ref(q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2), causal=causal)
        return out.squeeze(2), lse.squeeze(1)

    check_attention(impl, ref, (q, k, v), torch.float16)


@pytest.mark.parametrize(
    "fwd,dkdv,dq",
    [
        (configs.KernelConfig(16, 32, 4, 1), configs.KernelConfig(32, 16, 4, 1), configs.KernelConfig(16, 32, 4, 1)),
        (configs.KernelConfig(64, 16, 4, 1), configs.KernelConfig(16, 64, 4, 1), configs.KernelConfig(64, 16, 4, 1)),
    ],
    ids=["bm<bn", "bm>bn"],
)
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (9, 4))])
def test_other_block_shapes(gen, fwd, dkdv, dq, causal, window):
    """The phase split (masked / unmasked / masked) must hold for any block shape."""
    inputs = _dense64(gen, 1, 77, 93, 2, 1, 16)
    with configs.override(fwd=fwd, dkdv=dkdv, dq=dq):
        check_attention(_dense_impl, _dense_ref, inputs, torch.float32, extra=(causal, window))


@pytest.mark.parametrize(
    "switches", [dict(split_phases=False), dict(exp2=False), dict(kv_cache=".cg")], ids=["one-loop", "exp", "cg"]
)
def test_forward_technique_switches(gen, switches):
    """The measured alternatives (bench tune) compute the same function."""
    inputs = _dense64(gen, 1, 50, 70, 2, 1, 16)
    fwd = configs.KernelConfig(32, 16, 4, 1, **switches)
    with configs.override(fwd=fwd):
        check_attention(_dense_impl, _dense_ref, inputs, torch.float32, extra=(True, (20, -1), 3.0))


@pytest.mark.parametrize("num_splits", [2, 3, 5])
@pytest.mark.parametrize("causal", [False, True])
def test_split_kv(gen, num_splits, causal):
    """Split-KV: key blocks spread over several programs, merged through lse."""
    inputs = _dense64(gen, 2, 5, 150, 2, 1, 16)
    with configs.override(num_splits=num_splits):
        check_attention(_dense_impl, _dense_ref, inputs, torch.float32, extra=(causal,))
    inputs, meta = _varlen_case(gen, [3, 0, 7], [90, 12, 40], 2, 2, 16)
    with configs.override(num_splits=num_splits):
        check_attention(_varlen_impl, _varlen_ref, inputs, torch.float32, extra=(*meta, causal))


def test_backward_is_deterministic(gen):
    q, k, v = (t.half().requires_grad_() for t in _dense64(gen, 1, 70, 70, 4, 2, 16))
    dout = torch.randn(q.shape, generator=gen).half().to(DEVICE)
    runs = []
    for _ in range(2):
        out = flash_attn_func(q, k, v, causal=True)
        runs.append(torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_empty_inputs():
    q = torch.randn(2, 0, 2, 16, dtype=torch.float16, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 5, 2, 16, dtype=torch.float16, device=DEVICE, requires_grad=True)
    out, lse, _ = flash_attn_func(q, k, k, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (2, 2, 0)
    out.sum().backward()
    assert torch.all(k.grad == 0)
    # keys empty: every row sees nothing -> out 0, lse -inf
    q = torch.randn(1, 3, 2, 16, dtype=torch.float16, device=DEVICE)
    k = torch.randn(1, 0, 2, 16, dtype=torch.float16, device=DEVICE)
    out, lse, _ = flash_attn_func(q, k, k, return_attn_probs=True)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        ({"dropout_p": 1.0}, ValueError, r"dropout_p: got 1.0; expected 0 <= dropout_p < 1"),
        ({"causal": "yes"}, TypeError, r"causal: expected a bool, got str 'yes'"),
        ({"causal": 2}, TypeError, r"causal: expected a bool, got int 2"),
        ({"deterministic": None}, TypeError, r"deterministic: expected a bool"),
    ],
)
def test_unsupported_options_raise(kwargs, exc, pattern):
    q = torch.randn(1, 4, 2, 16, dtype=torch.float16, device=DEVICE)
    with pytest.raises(exc, match=pattern):
        flash_attn_func(q, q, q, **kwargs)


def test_headdim_over_256_raises():
    q = torch.randn(1, 4, 1, 264, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match=r"q: head dim 264 is not supported; expected 1..256"):
        flash_attn_func(q, q, q)


def test_torch_compile_fullgraph_no_graph_break(gen):
    """The custom ops (with fake implementations) let dynamo trace a whole block."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(32, 3 * 32).to(DEVICE)

        def forward(self, x):
            b, s, _ = x.shape
            qkv = self.proj(x).view(b, s, 3, 2, 16)
            out = flash_attn_qkvpacked_func(qkv, causal=True)
            return out.reshape(b, s, 32)

    model = Block().half()
    x = torch.randn(2, 19, 32, generator=gen).half().to(DEVICE)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    out.sum().backward()  # the backward custom op traces too


def test_torch_compile_varlen_fullgraph(gen):
    lengths = [7, 0, 12]
    cu = cu_seqlens_from_lengths(lengths, DEVICE)
    q = torch.randn(19, 2, 16, generator=gen).half().to(DEVICE).requires_grad_()

    def f(q):
        return flash_attn_varlen_func(q, q * 2, q * 3, cu, cu, 12, 12, causal=True)

    eager = f(q)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q)
    torch.testing.assert_close(out, eager)
    (g,) = torch.autograd.grad(out.sum(), (q,))
    (g_eager,) = torch.autograd.grad(eager.sum(), (q,))
    torch.testing.assert_close(g, g_eager)


@pytest.mark.parametrize("window", [(-1, -1), (6, -1), (3, 2)])
def test_explicit_diag_offsets(gen, window):
    """Entries carrying their own diagonal (query row i sees key j iff j <= i + diag): the
    geometry of context-parallel steps. Fully visible (diag >= sk), invisible (diag < -sq),
    shifted diagonals, huge offsets (clamped), forward and backward, several groups."""
    from naive import naive_attention
    from ringflash.autograd import FlashAttnFunc
    from ringflash.kernels.problem import SeqMeta

    k_lengths = [40, 23, 17]
    q_segments = [[(0, 20), (20, 33), (33, 40)], [(40, 52), (52, 60), (60, 60)]]  # (start, end) per group/seq
    diags = [[5, 10**9, -3], [-(10**9), 17, 0]]
    h, hk, d = 2, 1, 16
    cu_k = cu_seqlens_from_lengths(k_lengths, DEVICE)
    q64 = torch.randn(60, h, d, generator=gen, dtype=torch.float64).to(DEVICE)
    k64 = torch.randn(sum(k_lengths), hk, d, generator=gen, dtype=torch.float64).to(DEVICE)
    v64 = torch.randn(sum(k_lengths), hk, d, generator=gen, dtype=torch.float64).to(DEVICE)
    starts = torch.tensor([[a for a, _ in row] for row in q_segments], dtype=torch.int32, device=DEVICE)
    ends = torch.tensor([[b for _, b in row] for row in q_segments], dtype=torch.int32, device=DEVICE)
    diag_t = torch.tensor(diags, dtype=torch.int32, device=DEVICE)
    meta = SeqMeta(starts, ends, cu_k, None, diag_t)
    causal = window == (-1, -1)

    def impl(q, k, v):
        return FlashAttnFunc.apply(q, k, v, meta, 20, 40, d ** -0.5, causal, window[0], window[1], 0.0)

    def ref(q, k, v):
        kstart = 0
        rows = {}
        for b, n in enumerate(k_lengths):
            for g in range(2):
                a, e = q_segments[g][b]
                if e > a:
                    o, l = naive_attention(q[a:e].unsqueeze(0).cpu(), k[kstart:kstart + n].unsqueeze(0).cpu(),
                                           v[kstart:kstart + n].unsqueeze(0).cpu(), causal=causal, window=window,
                                           diag=max(min(diags[g][b], 1 << 29), -(1 << 29)))
                    rows[a] = (o[0].to(q.device, q.dtype), l[0].to(q.device, q.dtype))
            kstart += n
        ordered = [rows[a] for a in sorted(rows)]
        return torch.cat([o for o, _ in ordered]), torch.cat([l for _, l in ordered], dim=1)

    check_attention(impl, ref, (q64, k64, v64), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dkv_rows_scatter_the_key_gradients(gen, dtype):
    """attention_backward's dkv_rows (context parallelism's write straight into a
    reduce-scatter buffer): key i's dK/dV land in row dkv_rows[i] of a larger float32
    buffer, equal to the plain backward's dK/dV; rows no key maps to stay untouched."""
    from ringflash.kernels.bwd import attention_backward
    from ringflash.kernels.fwd import attention_forward
    from ringflash.kernels.problem import SeqMeta, make_problem

    k_lengths = [23, 0, 40]
    q_lengths = [9, 0, 31]
    h, hk, d = 4, 2, 16
    cu_k = cu_seqlens_from_lengths(k_lengths, DEVICE)
    cu_q = cu_seqlens_from_lengths(q_lengths, DEVICE)
    mk = lambda n, heads: torch.randn(n, heads, d, generator=gen).to(DEVICE, dtype)  # noqa: E731
    q, k, v, dout = mk(sum(q_lengths), h), mk(sum(k_lengths), hk), mk(sum(k_lengths), hk), mk(sum(q_lengths), h)
    meta = SeqMeta(cu_q[None, :-1], cu_q[None, 1:], cu_k, None, None)
    prob = make_problem(q, k, meta, max(q_lengths), max(k_lengths), d ** -0.5, True, -1, 0, 0.0)
    out, lse = attention_forward(q, k, v, prob, meta)
    _, dk, dv = attention_backward(dout, q, k, v, out, lse, prob, meta)

    total_k, rows_total = sum(k_lengths), 2 * sum(k_lengths) + 5
    rows = torch.randperm(rows_total, generator=gen)[:total_k].to(DEVICE)
    full = torch.full((rows_total, 2, hk, d), 7.0, dtype=torch.float32, device=DEVICE)
    attention_backward(dout, q, k, v, out, lse, prob, meta, dk=full[:, 0], dv=full[:, 1], dkv_rows=rows)
    torch.testing.assert_close(full[rows, 0], dk.float(), rtol=2e-3 if dtype == torch.float16 else 1e-5, atol=1e-3)
    torch.testing.assert_close(full[rows, 1], dv.float(), rtol=2e-3 if dtype == torch.float16 else 1e-5, atol=1e-3)
    untouched = torch.ones(rows_total, dtype=torch.bool, device=DEVICE)
    untouched[rows] = False
    assert torch.all(full[untouched] == 7.0)
    with pytest.raises(ValueError, match="dkv_rows: given for a dense problem"):
        attention_backward(dout[None], q[None], k[None], v[None], out[None], lse[None], prob, None, dkv_rows=rows)

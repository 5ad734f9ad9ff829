"""Edge cases of the public API: packed variants, grouped attention, zero-size dims,
softcap range, double backward, torch.compile of the seed interface.

Tests marked "regression" failed when they were written (see each docstring); the others
are cheap checks that passed. Sizes are tiny: the whole file runs in well under a minute
under Triton's interpreter."""

import pytest
import torch

from attn_check import check_attention, dense64, dense_impl, dense_ref
from conftest import HAS_CUDA, cu_seqlens_from_lengths
from ringflash import (
    FlashAttentionTritonFunc,
    attention_ref,
    attention_varlen_ref,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    grouped_flash_attn_varlen_func,
)

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
TOL = dict(rtol=1e-5, atol=1e-5)


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=dtype).to(DEVICE)


def _grads(fn, inputs, dout):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*xs)
    return (out, *torch.autograd.grad(out, xs, dout))


def _check_against_reference(fn, ref_fn, inputs, gen):
    """fn on float32 inputs against ref_fn on their float64 copies: out and every gradient."""
    out = fn(*inputs)
    dout = _randn(gen, *out.shape)
    got = _grads(fn, inputs, dout)
    want = _grads(ref_fn, [x.double() for x in inputs], dout.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **TOL)


# ------------------------------------------------------------------ packed variants (pass)

def test_packed_views_of_any_layout_match_the_reference(gen):
    """qkv / kv packs taken from permuted, strided, offset and expanded (stride 0) buffers."""
    base = _randn(gen, 3, 2, 13, 4, 16)  # (3, b, s, h, d): the pack axis outermost
    _check_against_reference(lambda x: flash_attn_qkvpacked_func(x.permute(1, 2, 0, 3, 4), causal=True),
                             lambda x: attention_ref(*x.unbind(0), causal=True)[0], [base], gen)
    flat = _randn(gen, 2 * 5 * 3 * 2 * 8 + 7)  # a storage offset of 7 elements
    _check_against_reference(lambda x: flash_attn_qkvpacked_func(x[7:].view(2, 5, 3, 2, 8)),
                             lambda x: attention_ref(*x[7:].view(2, 5, 3, 2, 8).unbind(2))[0], [flat], gen)
    q = _randn(gen, 2, 9, 6, 16)
    kv = _randn(gen, 2, 11, 1, 3, 16)  # k and v the same memory (expanded over the pack axis), GQA 6/3
    _check_against_reference(lambda q, kv: flash_attn_kvpacked_func(q, kv.expand(2, 11, 2, 3, 16), window_size=(3, 2)),
                             lambda q, kv: attention_ref(q, *kv.expand(2, 11, 2, 3, 16).unbind(2),
                                                         window_size=(3, 2))[0], [q, kv], gen)


def test_varlen_packed_views_match_the_reference(gen):
    lengths, k_lengths = [5, 0, 12, 1], [3, 7, 0, 9]
    cu, cu_k = cu_seqlens_from_lengths(lengths, DEVICE), cu_seqlens_from_lengths(k_lengths, DEVICE)
    base = _randn(gen, sum(lengths), 4, 3, 16)  # (total, h, 3, d): the pack axis not next to total
    _check_against_reference(
        lambda x: flash_attn_varlen_qkvpacked_func(x.transpose(1, 2), cu, 12, causal=True),
        lambda x: attention_varlen_ref(*x.transpose(1, 2).unbind(1), cu, cu, 12, 12, causal=True)[0], [base], gen)
    q, kv = _randn(gen, sum(lengths), 4, 16), _randn(gen, sum(k_lengths), 2, 2, 16)
    _check_against_reference(
        lambda q, kv: flash_attn_varlen_kvpacked_func(q, kv, cu, cu_k, 12, 9, causal=True),
        lambda q, kv: attention_varlen_ref(q, *kv.unbind(1), cu, cu_k, 12, 9, causal=True)[0], [q, kv], gen)


@pytest.mark.parametrize("call,pattern", [
    (lambda: flash_attn_qkvpacked_func(torch.randn(2, 5, 4, 2, 8)), r"qkv: expected shape \(batch, seqlen, 3"),
    (lambda: flash_attn_qkvpacked_func(torch.randn(1, 2, 3, 1, 257)),
     r"qkv \(unpacked into q, k, v\): q: head dim 257 is not supported; expected 1..256"),
    # An error about a slice names the packed argument too (it named k alone before).
    (lambda: flash_attn_kvpacked_func(torch.randn(2, 5, 2, 8), torch.randn(3, 5, 2, 2, 8)),
     r"kv \(unpacked into k, v\): k: batch 3 differs from q's batch 2"),
    (lambda: flash_attn_kvpacked_func(torch.randn(2, 5, 2, 8), torch.randn(2, 5, 3, 2, 8)), r"kv: expected shape"),
    (lambda: flash_attn_varlen_qkvpacked_func(torch.randn(1, 5, 3, 2, 8), cu_seqlens_from_lengths([5]), 5),
     r"qkv: expected a 4-D tensor"),
])
def test_packed_bad_inputs(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


# ------------------------------------------------------------------ zero-size dims (pass)

@pytest.mark.parametrize("shapes", [
    ((0, 5, 2, 8), (0, 6, 2, 8)),  # batch 0
    ((2, 0, 2, 8), (2, 6, 2, 8)),  # no queries
    ((2, 5, 2, 8), (2, 0, 2, 8)),  # no keys: out 0, lse -inf, zero gradients
], ids=["batch0", "seqlen_q0", "seqlen_k0"])
def test_zero_size_dims(gen, shapes):
    q, k, v = _randn(gen, *shapes[0]), _randn(gen, *shapes[1]), _randn(gen, *shapes[1])
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse, _ = flash_attn_func(*xs, causal=True, return_attn_probs=True)
    ref_out, ref_lse = attention_ref(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(out.double(), ref_out)
    torch.testing.assert_close(lse.double(), ref_lse)
    out.sum().backward()
    for x in xs:
        assert x.grad is not None and x.grad.shape == x.shape and not x.grad.isnan().any()


# ------------------------------------------------------------------ softcap range (regression)

@pytest.mark.parametrize("softcap", [30.0, 1e4, 1e6])
def test_large_softcap_is_accurate(gen, softcap):
    """A large softcap barely caps (softcap * tanh(s / softcap) ~ s). Found: the kernels'
    tanh, ``1 - 2 / (exp2(2x log2 e) + 1)`` (kernels/common.py), cancels near 0, so its
    absolute error (~6e-8) is multiplied by softcap: out off by 5.6e-4 at softcap=1e4 and
    by 0.07 at 1e6 in float32 (PyTorch's own float32 error: 4e-7); at softcap=30 it is
    already 3x PyTorch's error."""
    q, k, v = (_randn(gen, 1, 32, 2, 64) for _ in range(3))
    out = flash_attn_func(q, k, v, softcap=softcap)
    ref, _ = attention_ref(q.double(), k.double(), v.double(), softcap=softcap)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    # The project's bar, gradients included: 2x PyTorch's own float32 error.
    check_attention(dense_impl, dense_ref, dense64(gen, DEVICE, 1, 37, 45, 2, 1, 64), torch.float32,
                    extra=(True, (-1, -1), softcap))


# ------------------------------------------------------------------ double backward (regression)

def _gradient_penalty_grad(fn, inputs):
    """d/dq of (|dL/dq|^2 + |q|^2) with L = fn(q, k, v).sum(): a second-order use."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    g = torch.autograd.grad(fn(*xs).sum(), xs, create_graph=True)
    return torch.autograd.grad((g[0] ** 2).sum() + (xs[0] ** 2).sum(), xs[0])[0]


@pytest.mark.parametrize("which", ["flash_attn_func", "FlashAttentionTritonFunc"])
def test_double_backward_raises_instead_of_dropping_the_second_order_term(gen, which):
    """Found: the backward is not differentiable, yet with create_graph=True it returns
    gradients detached from the graph, so a gradient penalty silently loses the attention's
    second-order term (here its d/dq equals 2q exactly, off by 2.2 from the reference).
    Expected: a clear error, e.g. from the backward when ``torch.is_grad_enabled()`` (create_graph)
    and q, k or v requires grad. ``once_differentiable`` alone does not catch this case: it
    only looks at whether the incoming dout requires grad, and here dout does not."""
    if which == "flash_attn_func":
        inputs = [_randn(gen, 1, 5, 2, 8), _randn(gen, 1, 6, 2, 8), _randn(gen, 1, 6, 2, 8)]
        fn = flash_attn_func
    else:
        inputs = [_randn(gen, 1, 5, 8), _randn(gen, 1, 6, 8), _randn(gen, 1, 6, 8)]
        fn = lambda q, k, v: FlashAttentionTritonFunc.apply(q, k, v, False)  # noqa: E731
    with pytest.raises(RuntimeError, match="double backward"):
        _gradient_penalty_grad(fn, inputs)


# ------------------------------------------------------------------ grouped attention

def _grouped_case(gen, k_lengths, q_lengths, used, h=4, hk=2, d=16):
    cu_k = cu_seqlens_from_lengths(k_lengths, DEVICE)
    cu_q = [cu_seqlens_from_lengths(ls, DEVICE) for ls in q_lengths]
    used = [None if u is None else torch.tensor(u, dtype=torch.int32, device=DEVICE) for u in used]
    qs = [_randn(gen, sum(ls), h, d) for ls in q_lengths]
    k, v = _randn(gen, sum(k_lengths), hk, d), _randn(gen, sum(k_lengths), hk, d)
    return qs, k, v, cu_q, cu_k, used, [max(ls) for ls in q_lengths], max(k_lengths)


def test_grouped_empty_groups_and_zero_prefixes_match_the_reference(gen):
    """A group with no queries, a group seeing no keys, sequences with more queries than
    prefix keys (causal rows that see nothing): out, lse and gradients (pass)."""
    qs, k, v, cu_q, cu_k, used, max_q, max_k = _grouped_case(
        gen, [10, 6, 3], [[0, 0, 0], [8, 5, 2], [4, 1, 3]], [[5, 2, 0], [3, 0, 3], None])
    max_q[0] = 0
    xs = [t.clone().requires_grad_() for t in (*qs, k, v)]
    outs, lses = grouped_flash_attn_varlen_func(xs[:3], xs[3], xs[4], cu_q, cu_k, used, max_q, max_k)
    douts = [_randn(gen, *o.shape) for o in outs]
    grads = torch.autograd.grad(outs, xs, douts)
    x64 = [t.double().requires_grad_() for t in (*qs, k, v)]
    refs = [attention_varlen_ref(x64[g], x64[3], x64[4], cu_q[g], cu_k, max_q[g], max_k, causal=True,
                                 seqused_k=used[g]) for g in range(3)]
    pairs = [(r[0], d.double()) for r, d in zip(refs, douts) if r[0].requires_grad]
    ref_grads = torch.autograd.grad([p[0] for p in pairs], x64, [p[1] for p in pairs], allow_unused=True)
    for (o, lse), (ro, rl) in zip(zip(outs, lses), refs):
        torch.testing.assert_close(o.double(), ro, **TOL)
        torch.testing.assert_close(lse.double(), rl, **TOL)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), torch.zeros_like(a.double()) if b is None else b, **TOL)


def test_grouped_window_wider_than_max_seqlen_k_is_unbounded_as_in_varlen(gen):
    """Found: flash_attn_varlen_func (and the reference) read a window side >= max_seqlen_k
    as unbounded (flash-attn's rule, ``validation.window_within``); grouped attention passes
    the window through ``check_window`` only, so where a group's queries outnumber its key
    prefix, rows get the literal bound and see no key (out 0, lse -inf): off by 2.7 from the
    same ranges through flash_attn_varlen_func."""
    qs, k, v, cu_q, cu_k, used, max_q, max_k = _grouped_case(gen, [8, 6], [[20, 5]], [[2, 2]])
    window = (-1, 10)
    outs, _ = grouped_flash_attn_varlen_func(qs, k, v, cu_q, cu_k, used, max_q, max_k, causal=False,
                                             window_size=window)
    want = flash_attn_varlen_func(qs[0], k, v, cu_q[0], cu_k, max_q[0], max_k, window_size=window, seqused_k=used[0])
    torch.testing.assert_close(outs[0], want, **TOL)


@pytest.mark.parametrize("change,pattern", [
    (dict(max_seqlen_k=None), r"max_seqlen_k"),
    (dict(max_seqlen_q_list=[None, None]), r"max_seqlen_q"),
])
def test_grouped_missing_max_seqlen_is_a_clear_error(gen, change, pattern):
    """Found: max_seqlen_k=None is accepted, the forward runs, and the backward dies in
    ``cdiv`` with "bad operand type for unary -: 'NoneType'"; None in max_seqlen_q_list
    fails with "'>' not supported between instances of 'NoneType' and 'NoneType'".
    flash_attn_varlen_func refuses None for both, naming the argument."""
    qs, k, v, cu_q, cu_k, used, max_q, max_k = _grouped_case(gen, [10, 6], [[3, 2], [4, 0]], [[5, 2], None])
    args = dict(q_list=qs, k=k, v=v, cu_seqlens_q_list=cu_q, cu_seqlens_k=cu_k, seqused_k_list=used,
                max_seqlen_q_list=max_q, max_seqlen_k=max_k)
    args.update(change)
    with pytest.raises(TypeError, match=pattern):
        grouped_flash_attn_varlen_func(**args)


# ------------------------------------------------------------------ torch.compile (regression)

def test_seed_interface_compiles_fullgraph(gen):
    """Found: torch.compile(fullgraph=True) of FlashAttentionTritonFunc.apply fails in
    Dynamo ("Missing richcompare_impl override", ObjectVariable.__eq__): its forward looks
    its checks up in ``_SEED_CALLS`` by ``V.call_key`` even while tracing, where
    flash_attn_func skips its memo (``torch.compiler.is_compiling()``). Every other public
    function compiles (aot_eager)."""
    torch._dynamo.reset()
    Q, K, Vt = _randn(gen, 2, 5, 8), _randn(gen, 2, 6, 8), _randn(gen, 2, 6, 8)
    compiled = torch.compile(lambda q, k, v: FlashAttentionTritonFunc.apply(q, k, v, True), fullgraph=True,
                             backend="aot_eager")
    out = compiled(Q, K, Vt)
    ref, _ = attention_ref(Q.unsqueeze(2).double(), K.unsqueeze(2).double(), Vt.unsqueeze(2).double(), causal=True)
    torch.testing.assert_close(out.double(), ref.squeeze(2), **TOL)


@pytest.mark.timeout(60)
def test_oversized_max_seqlen_does_not_grow_the_launch(gen):
    """max_seqlen_q/k far past the packed tensors (allowed, as in flash-attn): the grid is
    sized by the packed lengths instead. Found: max_seqlen_q=100000 on 8 tokens took 42 s
    under the interpreter, and 2**31 would pass CUDA's grid limit."""
    q, k, v = (_randn(gen, 8, 2, 16).requires_grad_() for _ in range(3))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    out = flash_attn_varlen_func(q, k, v, cu, cu, 2**31 - 1, 2**31 - 1, causal=True)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = attention_varlen_ref(*leaves, cu, cu, 5, 5, causal=True)
    torch.testing.assert_close(out.double(), ref, **TOL)
    for got, want in zip(grads, torch.autograd.grad(ref.sum(), leaves)):
        torch.testing.assert_close(got.double(), want, **TOL)


# ------------------------------------------------------------------ tensor layouts (regression)

@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("which", ["q", "k", "v", "qkv", "kv", "cu_seqlens_q", "Q"])
@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr", "jagged"])
def test_non_strided_layouts_are_a_clear_error(gen, which, layout):
    """Found: a sparse or jagged nested tensor has a float dtype and a shape, so it passed
    every check and failed deep inside: RuntimeError "unsupported memory format option
    Contiguous" (sparse COO, in kernel_operand), "Sparse CSR tensors do not have strides"
    (in flash_attn_func's memo key), NotImplementedError from aten::as_strided (a sparse
    cu_seqlens), ValueError "ge: relation is indeterminate" (jagged). Now a TypeError that
    names the argument and its layout."""
    def convert(x):
        if layout == "sparse_coo":
            return x.to_sparse()
        if layout == "sparse_csr":
            return x.reshape(-1, x.shape[-1]).to_sparse_csr()  # CSR is 2-D (the rank check comes after)
        return torch.nested.nested_tensor(list(x), layout=torch.jagged)

    q, k, v = (_randn(gen, 2, 5, 2, 16) for _ in range(3))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    flat = lambda x: x.reshape(10, 2, 16)  # noqa: E731
    calls = {
        "q": lambda: flash_attn_func(convert(q), k, v),
        "k": lambda: flash_attn_func(q, convert(k), v),
        "v": lambda: flash_attn_varlen_func(flat(q), flat(k), convert(flat(v)), cu, cu, 6, 6),
        "qkv": lambda: flash_attn_qkvpacked_func(convert(torch.stack([q, k, v], 2))),
        "kv": lambda: flash_attn_kvpacked_func(q, convert(torch.stack([k, v], 2))),
        "cu_seqlens_q": lambda: flash_attn_varlen_func(flat(q), flat(k), flat(v), cu.to_sparse(), cu, 6, 6),
        "Q": lambda: FlashAttentionTritonFunc.apply(convert(q[:, :, 0]), k[:, :, 0], v[:, :, 0], False),
    }
    if which == "cu_seqlens_q" and layout != "sparse_coo":
        pytest.skip("a 1-D int32 tensor: only its COO form exists")
    with pytest.raises(TypeError, match=rf"^{which}: layout torch\.{layout} is not supported"):
        calls[which]()


def test_meta_tensors_are_a_clear_error():
    """A meta (or other non-CUDA) tensor reached the launchers, which failed with "Cannot
    copy out of meta tensor" here and an obscure Triton error on a GPU."""
    q = torch.randn(1, 4, 2, 16, device="meta")
    with pytest.raises(ValueError, match=r"q: is on device 'meta'; expected a CUDA tensor"):
        flash_attn_func(q, q, q)

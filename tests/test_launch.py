"""The launch cache (``kernels.launch.cached_launch`` and ``fast_launch``) and the decode
plans built on it: a call reusing an earlier call's compiled kernel and plan must still give
the float64 answer when what Triton specializes on differs between the calls (a per-call
integer of another class, a tensor at an unaligned address), and its bookkeeping must
follow Triton's rules."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import HAS_CUDA, needs_interpreter
from ringflash import attention_ref, flash_attn_func, flash_attn_with_kvcache
from ringflash.kernels import launch as L

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def test_int_class_follows_tritons_specialization():
    assert L.int_class(1) != L.int_class(17)  # 1 becomes a constant
    assert L.int_class(32) != L.int_class(33)  # multiples of 16 are marked
    assert L.int_class(2**31) != L.int_class(2**31 - 16)  # int64 past int32
    assert L.int_class(48) == L.int_class(2**20)
    assert L.int_class(7) == L.int_class(9)


def test_alignment_names_each_unaligned_tensor():
    buf = torch.zeros(64, dtype=torch.float16)
    aligned, off = buf[:16], buf[1:17]
    assert L._alignment((aligned, 3, aligned)) is True
    assert L._alignment((aligned, off)) == (True, False)
    assert L._alignment((off, aligned)) == (False, True)
    assert L._alignment((aligned, off, 3), pointers=2) == (True, False)
    assert L._alignment((aligned, aligned, 3), pointers=2) is True


def test_a_wrong_pointer_count_is_refused():
    t = torch.zeros(4)
    L._check_pointers((t, t, 1), 2)
    with pytest.raises(ValueError, match="pointers=1"):
        L._check_pointers((t, t, 1), 1)
    with pytest.raises(ValueError, match="pointers=3"):
        L._check_pointers((t, t, 1), 3)


def test_constexpr_tail_is_in_signature_order_or_none():
    class Fake:
        arg_names = ["X", "n", "A", "B"]
    assert L._constexpr_tail(Fake, 2, dict(B=2, A=1, num_warps=4)) == (1, 2)
    assert L._constexpr_tail(Fake, 2, dict(B=2)) is None  # A left to its default: not kept


def _decode_ref(q, k_cache, v_cache, n_keys):
    out, _ = attention_ref(q.double(), k_cache[:, :n_keys].double(), v_cache[:, :n_keys].double(), causal=True)
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_repeated_decode_calls_across_key_classes_and_alignments(dtype):
    """The same shapes call after call (one plan, one compiled kernel per class), with the
    cache length crossing Triton's integer classes (1, a multiple of 16, neither) and q at an
    unaligned address: each call matches float64."""
    gen = torch.Generator().manual_seed(5)
    b, cap, hq, hk, d = 3, 48, 4, 2, 16
    k_cache = torch.randn(b, cap, hk, d, generator=gen).to(dtype).to(DEVICE)
    v_cache = torch.randn(b, cap, hk, d, generator=gen).to(dtype).to(DEVICE)
    store = torch.randn(b * hq * d + 8, generator=gen).to(dtype).to(DEVICE)
    q_aligned = store[:b * hq * d].view(b, 1, hq, d)
    q_unaligned = store[1:1 + b * hq * d].view(b, 1, hq, d)  # 2 or 4 bytes past a 16-byte boundary
    assert q_unaligned.data_ptr() % 16 != 0
    tol = dict(atol=8e-3, rtol=2e-3) if dtype == torch.float16 else dict(atol=1e-4, rtol=1e-4)
    for n_keys in (16, 1, 7, 32, 33, 16):
        for q in (q_aligned, q_unaligned, q_aligned):
            out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=n_keys, causal=True)
            torch.testing.assert_close(out.double().cpu(), _decode_ref(q, k_cache, v_cache, n_keys).cpu(), **tol)
        tensor_lengths = torch.full((b,), n_keys, dtype=torch.int32, device=DEVICE)
        out = flash_attn_with_kvcache(q_unaligned, k_cache, v_cache, cache_seqlens=tensor_lengths, causal=True)
        torch.testing.assert_close(out.double().cpu(), _decode_ref(q_unaligned, k_cache, v_cache, n_keys).cpu(),
                                   **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (run `pytest -m gpu` on the GPU machine)")
def test_decode_reuses_the_compiled_kernel_and_stays_exact():
    """On the GPU the second identical decode call goes through the kept kernel (the table
    holds the decode and combine kernels), and every call with new contents is exact."""
    from ringflash.kernels import decode as D
    L.clear()
    gen = torch.Generator().manual_seed(3)
    b, cap, hq, hk, d = 2, 4096, 32, 8, 128
    k_cache = torch.randn(b, cap, hk, d, generator=gen).to(torch.bfloat16).cuda()
    v_cache = torch.randn(b, cap, hk, d, generator=gen).to(torch.bfloat16).cuda()
    for step in range(4):
        q = torch.randn(b, 1, hq, d, generator=gen).to(torch.bfloat16).cuda()
        out = flash_attn_func(q, k_cache, v_cache, causal=True)
        torch.testing.assert_close(out.double().cpu(), _decode_ref(q, k_cache, v_cache, cap).cpu(),
                                   atol=2e-2, rtol=2e-2)
    kernels = {k[0] for k in L._COMPILED}
    assert D._decode_kernel in kernels


def test_bf16_decode_returns_bf16():
    """The interpreter computes bf16 in float32 (kernel_operand): the plan's outputs keep the
    caller's dtype all the same (an early version of the plans returned float32 on the CPU)."""
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(2, 1, 4, 16, generator=gen).to(torch.bfloat16).to(DEVICE)
    k = torch.randn(2, 300, 2, 16, generator=gen).to(torch.bfloat16).to(DEVICE)
    v = torch.randn(2, 300, 2, 16, generator=gen).to(torch.bfloat16).to(DEVICE)
    for out in (flash_attn_with_kvcache(q, k, v, cache_seqlens=37, causal=True), flash_attn_func(q, k, v)):
        assert out.dtype == torch.bfloat16
    torch.testing.assert_close(flash_attn_func(q, k, v).double().cpu(),
                               attention_ref(q.double(), k.double(), v.double())[0].cpu(), atol=2e-2, rtol=2e-2)


def test_a_launch_hook_sends_launches_through_triton():
    """Triton 3.6 keeps hooks in a chain that is empty when none is set; older versions use
    None; a profiler's hook must see every launch, so any hook disables the shortcut."""
    import types
    assert not L._hook_set(None)
    assert not L._hook_set(types.SimpleNamespace(calls=[]))
    assert L._hook_set(types.SimpleNamespace(calls=[print]))
    assert L._hook_set(print)


def _memo_inputs(dtype=torch.float16, seed=11):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen).to(dtype).to(DEVICE)  # noqa: E731
    return mk(2, 1, 4, 16), mk(2, 300, 2, 16), mk(2, 300, 2, 16)  # 300 keys: the decode family


def test_inference_calls_skip_the_checks_they_already_passed(monkeypatch):
    """``flash_attn_func`` without autograd remembers a call's validated options by its
    tensors' metadata: the same call again skips the checks (here: they would raise) and
    gives the same answer; a call with other shapes is checked again."""
    from ringflash import interface as I
    from ringflash import validation as V

    I._CHECKED_CALLS.clear()
    q, k, v = _memo_inputs()
    ref = attention_ref(q.double(), k.double(), v.double(), causal=True)[0].cpu()
    with torch.no_grad():
        first = flash_attn_func(q, k, v, causal=True)
        assert len(I._CHECKED_CALLS) == 1

        def checked_again(*args, **kwargs):
            raise AssertionError("check_dense_qkv ran for a remembered call")
        monkeypatch.setattr(V, "check_dense_qkv", checked_again)
        again = flash_attn_func(q, k, v, causal=True)
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        torch.testing.assert_close(again.double().cpu(), ref, atol=8e-3, rtol=2e-3)
        with pytest.raises(AssertionError, match="check_dense_qkv ran"):
            flash_attn_func(q[:1], k[:1], v[:1], causal=True)  # new shapes: checked


def test_autograd_calls_share_the_memo_and_stay_exact(monkeypatch):
    """A training call (autograd on) remembered by an earlier call with the same metadata
    skips the checks too, and its output and gradients still match float64."""
    from ringflash import interface as I
    from ringflash import validation as V

    I._CHECKED_CALLS.clear()
    q, k, v = (t.float() for t in _memo_inputs(seed=12))
    dout = torch.randn_like(q)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = attention_ref(*ref_leaves, causal=True)[0]
    ref.backward(dout.double())
    with torch.no_grad():
        flash_attn_func(q, k, v, causal=True)  # remembered without autograd
    monkeypatch.setattr(V, "check_dense_qkv", lambda *a, **kw: pytest.fail("checked again"))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = flash_attn_func(*leaves, causal=True)
    assert out.grad_fn is not None
    out.backward(dout)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-4, rtol=1e-4)


def test_inference_memo_refuses_what_the_checks_refuse():
    """A remembered call does not let through an argument the checks refuse: option values
    equal to accepted ones but of another type, and tensors differing in dtype, layout or
    autograd needs, all take the checked path."""
    from ringflash import interface as I

    I._CHECKED_CALLS.clear()
    q, k, v = _memo_inputs()
    with torch.no_grad():
        flash_attn_func(q, k, v, softcap=1.0, window_size=(8, 0), softmax_scale=0.5)
        flash_attn_func(q, k, v, softcap=1.0, window_size=(8, 0), softmax_scale=0.5)  # remembered
        with pytest.raises(TypeError, match="softcap"):
            flash_attn_func(q, k, v, softcap=True, window_size=(8, 0), softmax_scale=0.5)  # True == 1.0
        with pytest.raises(TypeError, match="softmax_scale"):
            flash_attn_func(q, k, v, softcap=1.0, window_size=(8, 0), softmax_scale="0.5")
        with pytest.raises(TypeError, match="window_size"):
            flash_attn_func(q, k, v, softcap=1.0, window_size=(8.0, 0), softmax_scale=0.5)
        with pytest.raises(TypeError, match="dtype"):
            flash_attn_func(q, k.float(), v, softcap=1.0, window_size=(8, 0), softmax_scale=0.5)
        k_strided = torch.randn(2, 2, 300, 16).to(k.dtype).to(DEVICE).transpose(1, 2)  # another layout
        k_strided.copy_(k)
        torch.testing.assert_close(flash_attn_func(q, k_strided, v), flash_attn_func(q, k, v), rtol=0, atol=0)
    qg = q.clone().requires_grad_()
    assert flash_attn_func(qg, k, v).grad_fn is not None  # autograd: never the remembered path


def test_decode_plans_follow_the_float32_matmul_precision():
    """An fp32 decode call's plan fixes the dots' precision, which follows
    ``torch.set_float32_matmul_precision``: changing the setting between two calls of the
    same shapes must change the plan (a plan keyed on shapes alone kept the first one)."""
    from ringflash.kernels import decode as D

    q, k, v = _memo_inputs(torch.float32)
    old = torch.get_float32_matmul_precision()
    seen = set()
    D._PLANS.clear()
    try:
        for setting in ("highest", "high"):
            torch.set_float32_matmul_precision(setting)
            with torch.no_grad():
                flash_attn_func(q, k, v, causal=True)
            seen |= {plan.constexprs["INPUT_PRECISION"] for plan in D._PLANS.values()}
    finally:
        torch.set_float32_matmul_precision(old)
    assert seen == {"ieee", "tf32"}


def test_kvcache_steps_skip_the_checks_they_already_passed(monkeypatch):
    """``flash_attn_with_kvcache`` remembers a call's checked options the same way: a repeated
    step skips the checks and matches float64 (an int ``cache_leftpad`` is still turned into
    the kernels' tensor at each call), while an option of another type or other shapes is
    checked again. An int ``cache_seqlens`` / ``cache_leftpad`` is remembered by its type:
    a generation loop's next value skips the checks too, and its own value checks (>= 0,
    room in the cache) run at every call."""
    from ringflash import kvcache as KV

    KV._CHECKED_STEPS.clear()
    q, k, v = _memo_inputs()
    lengths = torch.full((2,), 290, dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        first = flash_attn_with_kvcache(q, k, v, cache_seqlens=lengths, cache_leftpad=5, causal=True, softcap=1.0)
        real_check = KV._check_step

        def checked_again(*args, **kwargs):
            raise AssertionError("checked again")
        monkeypatch.setattr(KV, "_check_step", checked_again)
        again = flash_attn_with_kvcache(q, k, v, cache_seqlens=lengths, cache_leftpad=5, causal=True, softcap=1.0)
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        ref = attention_ref(q.double(), k[:, 5:290].double(), v[:, 5:290].double(), causal=True, softcap=1.0)[0]
        torch.testing.assert_close(again.double().cpu(), ref.cpu(), atol=8e-3, rtol=2e-3)
        for changed in (dict(softcap=True), dict(cache_seqlens=lengths[:1]), dict(cache_leftpad=None)):
            with pytest.raises(AssertionError, match="checked again"):
                flash_attn_with_kvcache(q, k, v, **{**dict(cache_seqlens=lengths, cache_leftpad=5, causal=True,
                                                            softcap=1.0), **changed})
        # Another int padding: the same key, the checks skipped, the new value used and checked.
        shifted = flash_attn_with_kvcache(q, k, v, cache_seqlens=lengths, cache_leftpad=6, causal=True, softcap=1.0)
        ref = attention_ref(q.double(), k[:, 6:290].double(), v[:, 6:290].double(), causal=True, softcap=1.0)[0]
        torch.testing.assert_close(shifted.double().cpu(), ref.cpu(), atol=8e-3, rtol=2e-3)
        with pytest.raises(ValueError, match="cache_leftpad: got -1"):
            flash_attn_with_kvcache(q, k, v, cache_seqlens=lengths, cache_leftpad=-1, causal=True, softcap=1.0)
        monkeypatch.setattr(KV, "_check_step", real_check)
        flash_attn_with_kvcache(q, k, v, cache_seqlens=280, causal=True)
        monkeypatch.setattr(KV, "_check_step", checked_again)
        grown = flash_attn_with_kvcache(q, k, v, cache_seqlens=281, causal=True)  # the next step: remembered
        ref = attention_ref(q.double(), k[:, :281].double(), v[:, :281].double(), causal=True)[0]
        torch.testing.assert_close(grown.double().cpu(), ref.cpu(), atol=8e-3, rtol=2e-3)
        with pytest.raises(ValueError, match="exceed"):
            flash_attn_with_kvcache(q, k, v, cache_seqlens=301, causal=True)  # its value checked at every call
        with pytest.raises(ValueError, match="cache_seqlens: got -2"):
            flash_attn_with_kvcache(q, k, v, cache_seqlens=-2, causal=True)
        monkeypatch.setattr(KV, "_check_step", real_check)
        with pytest.raises(TypeError, match="softcap"):
            flash_attn_with_kvcache(q, k, v, cache_seqlens=lengths, cache_leftpad=5, causal=True, softcap=True)


def test_call_key_takes_only_plain_options_and_tensors():
    """Memo keys exist only for what the checks read by metadata and value alone."""
    import numpy as np
    from ringflash import validation as V

    t = torch.zeros(2, 3)
    assert V.call_key((t, None), (1.0, True, None)) == V.call_key((torch.ones(2, 3), None), (1.0, True, None))
    assert V.call_key((t,), (1.0,)) != V.call_key((t.t(),), (1.0,))  # strides
    assert V.call_key((t,), (1,)) != V.call_key((t,), (1.0,))  # types
    assert V.call_key((torch.nn.Parameter(t),), ()) is None  # a subclass
    assert V.call_key((t,), (np.float64(1.0),)) is None  # a numpy scalar


def test_specialization_key_separates_what_triton_specializes_on():
    """``fast_launch``'s key, read off the arguments: integers by Triton's class (1, a
    multiple of 16, beyond int32), tensors by dtype and 16-byte alignment, floats by type,
    None and bools by value; an argument it cannot key is refused, not guessed."""
    buf = torch.zeros(64, dtype=torch.float16)
    key = lambda *args: L.specialization_key(args)  # noqa: E731
    assert key(buf[:8], 7, 2.0) == key(buf[8:16], 9, 3.5)  # same dtype, both aligned; same classes
    for a, b in ((1, 7), (32, 33), (2**31 - 16, 2**31), (2**62, 2**63), (-16, -15)):
        assert key(a) != key(b), (a, b)
    assert key(48) == key(2**20) and key(-32) == key(16)
    assert key(buf[:8]) != key(buf[1:9])  # unaligned
    assert key(buf[:8]) != key(buf.float()[:8])  # dtype
    assert key(2) != key(2.0) and key(None) != key(buf) and key(True) != key(False)
    assert key(object()) is None  # not keyed: Triton's own launch takes it
    assert L.specialization_key((object(),), other_key=lambda a: "k") == ("k",)


class _FakeCompiled:
    """What Triton's launch returns: a compiled kernel whose ``run`` launches it again."""

    def __init__(self, log):
        self.log, self.packed_metadata, self.function = log, "meta", "fn"

    def run(self, *launch_args):
        self.log.append(("kept", launch_args))


class _FakeKernel:
    arg_names = ["X", "n", "BLOCK", "FLAG"]

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def launch(*args, **constexprs):
            self.log.append(("triton", grid, args, constexprs))
            return _FakeCompiled(self.log)
        return launch


def test_fast_launch_keeps_the_compiled_kernel_per_specialization(monkeypatch):
    """The first launch of a specialization goes through Triton; a later one with the same
    key calls the kept kernel's launcher with the grid, the arguments and the constexprs in
    signature order; an integer of another class, an unaligned tensor or another constexpr
    goes through Triton again."""
    monkeypatch.setattr(L, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(L, "_raw_stream", lambda device: 123)
    monkeypatch.setattr(L, "_hooked", lambda: False)
    L.clear()
    kernel, buf = _FakeKernel(), torch.zeros(64, dtype=torch.float16)
    calls = [((buf[:8], 5), dict(BLOCK=16, FLAG=True)),
             ((buf[8:16], 7), dict(BLOCK=16, FLAG=True)),   # same key: kept
             ((buf[:8], 32), dict(BLOCK=16, FLAG=True)),    # a multiple of 16: Triton
             ((buf[1:9], 5), dict(BLOCK=16, FLAG=True)),    # unaligned: Triton
             ((buf[:8], 5), dict(BLOCK=32, FLAG=True)),     # another constexpr: Triton
             ((buf[:8], 3), dict(BLOCK=32, FLAG=True)),     # kept
             ((buf[:8], np.int64(3)), dict(BLOCK=32, FLAG=True))]  # not keyed: Triton
    for args, constexprs in calls:
        L.fast_launch(kernel, (4, 2, 1), args, constexprs)
    assert [entry[0] for entry in kernel.log] == ["triton", "kept", "triton", "triton", "triton", "kept", "triton"]
    kept = kernel.log[1][1]
    assert kept[:9] == (4, 2, 1, 123, "fn", "meta", None, None, None)
    assert kept[9] is calls[1][0][0] and kept[10:] == (7, 16, True)
    L.clear()


def test_fast_launch_refuses_a_call_site_that_leaves_a_parameter_to_its_default(monkeypatch):
    """Interpreted, every call site is checked: one that would never be kept on a GPU fails."""
    monkeypatch.setattr(L, "interpreting", lambda: True)
    kernel = _FakeKernel()
    with pytest.raises(ValueError, match="do not name every parameter"):
        L.fast_launch(kernel, (1, 1, 1), (torch.zeros(4), 3), dict(BLOCK=16))


def test_descriptor_key_follows_tritons_specialization():
    """The launchers key a TMA descriptor (the Gluon kernels', and the portable forward's
    K/V ones under RINGFLASH_FWD_KV_TMA) by class, dtype and block shape: descriptors with
    equal keys get the same specialization from Triton (whatever their shapes and strides),
    and those Triton tells apart get different keys."""
    from ringflash.kernels import sm90
    if not sm90.AVAILABLE:
        pytest.skip("this Triton has no Gluon")
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton import next_power_of_2
    from triton.tools.tensor_descriptor import TensorDescriptor

    def triton_key(d):
        return native_specialize_impl(BaseBackend, d, False, True, True)[0]

    x = [torch.zeros(2, 300, 4, 128, dtype=torch.bfloat16), torch.zeros(1, 77, 2, 128, dtype=torch.bfloat16),
         torch.zeros(1, 77, 2, 64, dtype=torch.bfloat16), torch.zeros(1, 77, 2, 96, dtype=torch.float16)]
    descs = [sm90._with_base(sm90._template_of(t, rows), t) for t in x for rows in (64, 128)]
    descs += [TensorDescriptor.from_tensor(t, [1, rows, 1, next_power_of_2(t.shape[-1])]) for t in x for rows in (32, 64)]
    for a in descs:
        for b in descs:
            assert (L.descriptor_key(a) == L.descriptor_key(b)) == (triton_key(a) == triton_key(b))
    with pytest.raises(TypeError, match="TensorDescriptor"):
        L.descriptor_key(x[0])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (run `pytest -m gpu` on the GPU machine)")
@pytest.mark.parametrize("backend", ["portable", "sm90"])
def test_training_launches_go_through_the_kept_kernels_and_stay_exact(monkeypatch, backend):
    """``fast_launch`` on the GPU: repeated forward+backward calls, with sequence lengths
    crossing Triton's integer classes (a multiple of 16 or not) and a transposed layout,
    run the kept kernels (the table holds the training kernels) and give bitwise the same
    results as the first call, which matches float64."""
    from ringflash.kernels import bwd, fwd, sm90

    if backend == "sm90" and not (sm90.AVAILABLE and torch.cuda.get_device_capability() == (9, 0)):
        pytest.skip("needs Hopper (sm_90) and Gluon")
    monkeypatch.setenv("RINGFLASH_BACKEND", backend)
    L.clear()
    gen = torch.Generator().manual_seed(21)
    for seqlen in (1024, 1040, 1037, 1024):
        for transposed in (False, True):
            shape = (2, 4, seqlen, 128) if transposed else (2, seqlen, 4, 128)
            leaves = [torch.randn(shape, generator=gen).to("cuda", torch.bfloat16).requires_grad_() for _ in range(3)]
            views = [t.transpose(1, 2) if transposed else t for t in leaves]
            dout = torch.randn(views[0].shape, generator=gen).to("cuda", torch.bfloat16)
            runs = []
            for _ in range(2):
                out = flash_attn_func(*views, causal=True)
                runs.append((out, *torch.autograd.grad(out, leaves, dout)))
            for first, again in zip(*runs):
                assert torch.equal(first, again)
            ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
            want = attention_ref(*(t.transpose(1, 2) if transposed else t for t in ref_leaves), causal=True)[0]
            want_grads = torch.autograd.grad(want, ref_leaves, dout.double())
            for got, ref in zip(runs[0], (want, *want_grads)):
                torch.testing.assert_close(got.double(), ref, atol=3e-2, rtol=3e-2)
    kept = {key[0] for key in L._COMPILED}
    expected = {sm90._fwd_sm90_kernel, sm90._bwd_dkdv_sm90_kernel, sm90._bwd_dq_sm90_kernel} if backend == "sm90" \
        else {fwd._fwd_kernel, bwd._bwd_dkdv_kernel, bwd._bwd_dq_kernel}
    assert expected | {bwd._bwd_preprocess_kernel} <= kept, kept


def _record_planned_launches(monkeypatch) -> list:
    """Every ``PlannedLaunch`` becomes a record of its launch (nothing runs): (kernel, grid,
    arguments, tensors by shape, strides and dtype, constexprs). Each launch also checks
    what ``PlannedLaunch`` checks under the interpreter: one Triton specialization per site."""
    launches, specializations = [], {}

    def describe(a):
        return ("tensor", tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a

    def record(site, grid, args):
        launches.append((site.kernel, tuple(grid), tuple(describe(a) for a in args), tuple(site.constexprs.items())))
        key = L.specialization_key(args)
        assert specializations.setdefault(site, key) == key, "a plan's key misses something Triton specializes on"

    monkeypatch.setattr(L.PlannedLaunch, "__call__", record)
    return launches


@needs_interpreter  # CPU tensors, nothing launched: the launchers refuse them outside the interpreter
def test_portable_plans_launch_what_a_fresh_plan_would(monkeypatch):
    """The portable launchers work each call signature's launches out once (``fwd._PLANS``,
    ``bwd._PLANS``): a call that reuses a plan made by an earlier one launches exactly what
    a plan made for it alone would (kernel, grid, every argument, constexprs), across
    lengths on and off Triton's integer classes, layouts, GQA, masks, windows, softcap,
    ALiBi, dropout probabilities and seeds, varlen metadata, output buffers given (as
    context parallelism does), dK/dV rows, the atomic dQ, split-KV, split and two-pass
    dK/dV, and the head-dim split; and every launch through one plan's site is specialized
    alike by Triton (the seed's integer class among it)."""
    from ringflash.kernels import configs
    from ringflash.kernels.bwd import attention_backward, prepare_backward
    from ringflash.kernels.fwd import attention_forward
    from ringflash.kernels.problem import SeqMeta, make_problem

    launches = _record_planned_launches(monkeypatch)
    gen = torch.Generator().manual_seed(4)

    def rand(*shape, transposed=False):
        if transposed:  # (b, s, h, d) viewed from (b, h, s, d)
            b, s, h, d = shape
            return torch.randn(b, h, s, d, generator=gen).transpose(1, 2)
        return torch.randn(*shape, generator=gen)

    cases = []  # (q, k, v, meta, causal, window, softcap, alibi, dropout, extra, env)
    for sq, sk in ((32, 32), (37, 50)):
        for transposed in (False, True):
            for causal in (False, True):
                cases.append((rand(2, sq, 4, 16, transposed=transposed), rand(2, sk, 2, 16, transposed=transposed),
                              rand(2, sk, 2, 16, transposed=transposed), None, causal, (-1, -1), 0.0, None, None,
                              {}, {}))
    q, k, v = rand(2, 37, 4, 16), rand(2, 50, 2, 16), rand(2, 50, 2, 16)
    plain = (q, k, v, None, True, (-1, -1), 0.0, None, None, {}, {})

    def variant(**changes):
        fields = dict(zip(("q", "k", "v", "meta", "causal", "window", "softcap", "alibi", "dropout", "extra", "env"),
                          plain))
        fields.update(changes)
        return tuple(fields.values())

    cases += [
        variant(q=rand(2, 37, 4, 16, transposed=True)), variant(v=rand(2, 50, 2, 16, transposed=True)),
        variant(q=torch.randn(2 * 37 * 4 * 16 + 1, generator=gen)[1:].view(2, 37, 4, 16)),  # off 16 bytes
        variant(causal=False, window=(8, 3)), variant(softcap=5.0),
        variant(alibi=torch.rand(1, 4)), variant(alibi=torch.rand(2, 4)),
        variant(dropout=(0.1, 5)), variant(dropout=(0.1, 32)), variant(dropout=(0.1, 1)), variant(dropout=(0.2, 5)),
        variant(dropout=(0.1, 2**40)), variant(extra=dict(atomic_dq=True)),
        variant(env=dict(RINGFLASH_DKV_SPLITS="2")),
        variant(q=rand(2, 37, 4, 96), k=rand(2, 50, 2, 96), v=rand(2, 50, 2, 96), env=dict(RINGFLASH_HEAD_PARTS="0")),
        variant(q=rand(2, 37, 4, 96), k=rand(2, 50, 2, 96), v=rand(2, 50, 2, 96), env=dict(RINGFLASH_HEAD_PARTS="1")),
        variant(extra=dict(override=dict(num_splits=2))),
        variant(extra=dict(override=dict(dkdv=configs.KernelConfig(16, 16, 4, 1, dkdv_passes=2)))),
    ]
    cu = torch.tensor([0, 20, 20, 57], dtype=torch.int32)
    qv, kv = rand(57, 4, 16), rand(57, 2, 16)
    for used in (None, torch.tensor([20, 0, 30], dtype=torch.int32)):
        meta = SeqMeta.from_cu_seqlens(cu, cu, used)
        cases.append((qv, kv, kv.clone(), meta, True, (-1, -1), 0.0, None, None, {}, {}))
    meta = SeqMeta.from_cu_seqlens(cu, cu)
    big = torch.zeros(80, 2, 16)
    cases += [
        (qv, kv, kv, meta, True, (-1, -1), 0.0, None, None, dict(buffers=True), {}),
        (qv, kv, kv, meta, True, (-1, -1), 0.0, None, None, dict(buffers=True, rows=torch.arange(57) + 10, big=big), {}),
    ]

    def run(case):
        q, k, v, meta, causal, window, softcap, alibi, dropout, extra, env = case
        for name in ("RINGFLASH_DKV_SPLITS", "RINGFLASH_HEAD_PARTS"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        if meta is None:
            prob = make_problem(q, k, None, q.shape[1], k.shape[1], 0.25, causal, *window, softcap)
        else:
            prob = make_problem(q, k, meta, 37, 37, 0.25, causal, *window, softcap)
        start = len(launches)
        with configs.override(**extra.get("override", {})):
            kwargs = {}
            if extra.get("buffers"):  # context parallelism's: float32 out and gradients, strided views
                kwargs = dict(out=torch.zeros(q.shape[0], 2 * q.shape[1], q.shape[2])[:, ::2],
                              lse=torch.zeros(q.shape[1], q.shape[0]))
            out, lse = attention_forward(q, k, v, prob, meta, alibi_slopes=alibi, dropout=dropout, **kwargs)
            grads = {}
            if extra.get("buffers"):
                rows = extra.get("big", k).shape[0]
                grads = dict(dq=torch.zeros(q.shape), dk=torch.zeros(rows, *k.shape[1:]),
                             dv=torch.zeros(rows, *k.shape[1:]), prepared=prepare_backward(out, out, lse, prob))
                if "rows" in extra:
                    grads["dkv_rows"] = extra["rows"]
            attention_backward(torch.randn_like(out), q, k, v, out, lse, prob, meta, alibi_slopes=alibi, dropout=dropout,
                               atomic_dq=extra.get("atomic_dq", False), **grads)
        return launches[start:]

    fresh = []
    for case in cases:
        L.clear()
        fresh.append(run(case))
    L.clear()
    for _ in range(2):  # plans made by earlier cases, then all of them reused
        for i, (case, want) in enumerate(zip(cases, fresh)):
            assert run(case) == want, i


@st.composite
def _portable_call_sequences(draw):
    """A few dense calls for the plan property below: one small, awkward call, then calls
    that each redraw one of its fields (a layout, the lengths or an option), so that the
    calls share all of a plan's key but what was redrawn."""
    b, h, group = draw(st.sampled_from([1, 2])), draw(st.sampled_from([2, 4])), draw(st.sampled_from([1, 2]))
    d = draw(st.sampled_from([16, 24, 48]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    choices = dict(
        q_layout=["contiguous", "transposed", "offset"], k_layout=["contiguous", "transposed", "offset"],
        v_layout=["contiguous", "transposed", "offset"], lengths=[(17, 31), (16, 48), (1, 16)],
        causal=[False, True], window=[(-1, -1), (4, 0), (3, 5)], softcap=[0.0, 4.0],
        alibi=[None, (1, h), (b, h)], dropout=[None, (0.2, 5), (0.2, 32), (0.5, 1), (0.75, 2**33)],
        atomic_dq=[False, True],
    )

    def tensor(s, heads, layout):
        if layout == "transposed":
            return torch.randn(b, heads, s, d, generator=gen).transpose(1, 2)
        if layout == "offset":  # contiguous, 4 bytes off 16-byte alignment
            return torch.randn(b * s * heads * d + 1, generator=gen)[1:].view(b, s, heads, d)
        return torch.randn(b, s, heads, d, generator=gen)

    fields = {name: draw(st.sampled_from(values)) for name, values in choices.items()}
    calls = []
    for i in range(draw(st.integers(2, 6))):
        if i:
            name = draw(st.sampled_from(sorted(choices)))
            fields = dict(fields, **{name: draw(st.sampled_from(choices[name]))})
        sq, sk = fields["lengths"]
        calls.append((tensor(sq, h, fields["q_layout"]), tensor(sk, h // group, fields["k_layout"]),
                      tensor(sk, h // group, fields["v_layout"]),
                      {name: fields[name] for name in ("causal", "window", "softcap", "alibi", "dropout", "atomic_dq")}))
    return calls


@needs_interpreter
@settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(calls=_portable_call_sequences())
def test_portable_plans_in_any_call_order(calls):
    """Any sequence of dense calls launches, through the plans earlier calls left, what each
    call's own fresh plans would (forward and backward), and one specialization per site."""
    from ringflash.kernels.bwd import attention_backward
    from ringflash.kernels.fwd import attention_forward
    from ringflash.kernels.problem import make_problem

    def run(q, k, v, options):
        if options["causal"] and options["window"] != (-1, -1):
            window = (options["window"][0], 0)
        else:
            window = options["window"]
        prob = make_problem(q, k, None, q.shape[1], k.shape[1], 0.3, options["causal"], *window, options["softcap"])
        alibi = None if options["alibi"] is None else torch.rand(*options["alibi"])
        start = len(launches)
        out, lse = attention_forward(q, k, v, prob, alibi_slopes=alibi, dropout=options["dropout"])
        attention_backward(torch.ones_like(out), q, k, v, out, lse, prob, alibi_slopes=alibi,
                           dropout=options["dropout"], atomic_dq=options["atomic_dq"])
        return launches[start:]

    with pytest.MonkeyPatch.context() as patch:
        launches = _record_planned_launches(patch)
        fresh = []
        for call in calls:
            L.clear()
            fresh.append(run(*call))
        L.clear()
        for call, want in zip(calls, fresh):
            assert run(*call) == want

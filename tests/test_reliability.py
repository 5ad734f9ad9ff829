"""Regression tests of the reliability review (single process; the distributed findings are in
test_cp_reliability.py). Each test names its finding; each failed before its fix.

Bad input must give a clear error naming the argument, never a wrong answer, a hang or an
out-of-bounds access."""

import math

import numpy as np
import pytest
import torch

from attn_check import check_attention, dense64, dense_impl, dense_ref, varlen_impl, varlen_ref
from conftest import HAS_CUDA, cu_seqlens_from_lengths
from ringflash import (
    FlashAttentionPyTorchFunc,
    FlashAttentionTritonFunc,
    attention_ref,
    attention_varlen_ref,
    flash_attn_func,
    flash_attn_varlen_func,
)
from ringflash.kernels.common import MAX_TILE_ROWS, kernel_operand

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def _varlen64(gen, lengths, h=2, hk=1, d=16):
    total = sum(lengths)
    mk = lambda n: torch.randn(total, n, d, generator=gen, dtype=torch.float64).to(DEVICE)  # noqa: E731
    return mk(h), mk(hk), mk(hk)


# -- finding 2: non-contiguous cu_seqlens (and seqused_k) --------------------------------------


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values with stride 2 (a column of a stacked tensor)."""
    out = torch.stack([t, t], 1)[:, 0]
    assert not out.is_contiguous()
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_noncontiguous_cu_seqlens_give_the_right_answer(gen, causal):
    lengths = [5, 0, 12, 7]
    cu = _strided(cu_seqlens_from_lengths(lengths, DEVICE))
    inputs = _varlen64(gen, lengths)
    check_attention(varlen_impl, varlen_ref, inputs, torch.float32, extra=(cu, cu, 12, 12, causal))


def test_noncontiguous_seqused_k_is_read_correctly(gen):
    """It used to fail with an error naming SeqMeta instead of reading the values."""
    lengths = [6, 9]
    cu = cu_seqlens_from_lengths(lengths, DEVICE)
    used = _strided(torch.tensor([4, 9], dtype=torch.int32, device=DEVICE))
    inputs = _varlen64(gen, lengths)
    check_attention(varlen_impl, varlen_ref, inputs, torch.float32, extra=(cu, cu, 9, 9, True, (-1, -1), used))


# -- finding 3: bf16 on the CPU ----------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_bf16_dense_matches_the_reference(gen, causal):
    """The interpreter's bf16 tl.dot gave outputs of 8e8 where the answer is 3: bf16 now
    computes in float32 there (on a GPU this is the real bf16 kernel)."""
    inputs = dense64(gen, DEVICE, 2, 37, 29, 4, 2, 32)
    check_attention(dense_impl, dense_ref, inputs, torch.bfloat16, extra=(causal,))


def test_bf16_varlen_matches_the_reference(gen):
    lengths = [9, 0, 21]
    cu = cu_seqlens_from_lengths(lengths, DEVICE)
    inputs = _varlen64(gen, lengths, h=4, hk=2, d=24)
    check_attention(varlen_impl, varlen_ref, inputs, torch.bfloat16, extra=(cu, cu, 21, 21, True))


# -- finding 4: a cu_seqlens buffer refilled behind the version counter ------------------------


def test_refilled_cu_seqlens_is_checked_again():
    """After a valid call, the same buffer refilled through ``.data`` (no version bump) with
    values that no longer cover q used to skip the check and return uninitialised rows."""
    q, k, v = (torch.randn(20, 2, 16, device=DEVICE) for _ in range(3))
    cu = torch.tensor([0, 8, 20], dtype=torch.int32, device=DEVICE)
    flash_attn_varlen_func(q, k, v, cu, cu, 12, 12)
    version = cu._version
    cu.data.copy_(torch.tensor([0, 8, 14], dtype=torch.int32))
    assert cu._version == version  # the write really bypassed the counter
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match=r"cu_seqlens_q: last entry is 14; expected the token count 20"):
            flash_attn_varlen_func(q, k, v, cu, cu, 12, 12)
    else:  # the host remembers the tensor; the device-side check catches the refill
        out = flash_attn_varlen_func(q, k, v, cu, cu, 12, 12)
        assert out.isnan().all()


@pytest.mark.parametrize(
    "cu_values,max_seqlen",
    [([0, 8, 14], 12), ([1, 8, 20], 12), ([0, 13, 8, 20], 13), ([0, 8, 20], 11)],
    ids=["short", "start", "decreasing", "max_seqlen"],
)
def test_unchecked_bad_cu_seqlens_turn_every_output_into_nan(monkeypatch, cu_values, max_seqlen):
    """Where the host does not check (RINGFLASH_CHECK_CU_SEQLENS=0, torch.compile, a
    remembered GPU tensor), the device-side check must: NaN outputs and gradients, never
    a plausible wrong answer."""
    monkeypatch.setenv("RINGFLASH_CHECK_CU_SEQLENS", "0")
    q, k, v = (torch.randn(20, 2, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    cu = torch.tensor(cu_values, dtype=torch.int32, device=DEVICE)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, return_attn_probs=True)
    assert out.isnan().all() and lse.isnan().all()
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.isnan().all()


def test_unchecked_bad_cu_seqlens_poison_gradients_laid_out_like_transposed_inputs(monkeypatch):
    """Gradients of transposed views come back in the views' layout (a permutation of a
    contiguous block): the device-side check must still fill all of them with NaN."""
    monkeypatch.setenv("RINGFLASH_CHECK_CU_SEQLENS", "0")
    leaves = [torch.randn(2, 20, 16, device=DEVICE, requires_grad=True) for _ in range(3)]
    cu = torch.tensor([0, 8, 14], dtype=torch.int32, device=DEVICE)
    out = flash_attn_varlen_func(*(t.transpose(0, 1) for t in leaves), cu, cu, 12, 12)
    assert out.isnan().all()
    out.sum().backward()
    for t in leaves:
        assert t.grad.isnan().all()


def test_the_guard_poisons_only_single_blocks_of_memory():
    from ringflash.kernels.guard import _one_block

    base = torch.zeros(4, 6, 8)
    assert _one_block(base) and _one_block(base.transpose(0, 1)) and _one_block(base.permute(2, 0, 1))
    assert _one_block(torch.zeros(3, 1, 5)[:, :, :]) and _one_block(torch.zeros(0, 3, 4).expand(0, 3, 4))
    assert not _one_block(base[:, ::2]) and not _one_block(torch.zeros(4, 1, 8).expand(4, 6, 8))


def test_unchecked_good_cu_seqlens_are_not_poisoned(monkeypatch, gen):
    monkeypatch.setenv("RINGFLASH_CHECK_CU_SEQLENS", "0")
    lengths = [3, 11, 0, 6]
    cu = cu_seqlens_from_lengths(lengths, DEVICE)
    used = torch.tensor([3, 5, 0, 6], dtype=torch.int32, device=DEVICE)
    inputs = _varlen64(gen, lengths)
    check_attention(varlen_impl, varlen_ref, inputs, torch.float32, extra=(cu, cu, 11, 11, True, (-1, -1), used))


def test_bad_seqused_k_is_poisoned_when_unchecked(monkeypatch):
    monkeypatch.setenv("RINGFLASH_CHECK_CU_SEQLENS", "0")
    q, k, v = (torch.randn(10, 2, 16, device=DEVICE) for _ in range(3))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    used = torch.tensor([4, 7], dtype=torch.int32, device=DEVICE)
    assert flash_attn_varlen_func(q, k, v, cu, cu, 6, 6, seqused_k=used).isnan().all()


def test_compiled_call_checks_on_the_device():
    """torch.compile skips the host checks while tracing: the device-side check runs instead."""
    torch._dynamo.reset()
    q, k, v = (torch.randn(20, 2, 16, device=DEVICE) for _ in range(3))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def attend(q, k, v, cu):
        return flash_attn_varlen_func(q, k, v, cu, cu, 12, 12, causal=True)

    good = torch.tensor([0, 8, 20], dtype=torch.int32, device=DEVICE)
    want = flash_attn_varlen_func(q, k, v, good, good, 12, 12, causal=True)
    torch.testing.assert_close(attend(q, k, v, good), want)
    bad = torch.tensor([0, 8, 14], dtype=torch.int32, device=DEVICE)
    assert attend(q, k, v, bad).isnan().all()


# -- finding 7: torch.inference_mode ---------------------------------------------------------


def test_inference_mode_dense_and_varlen():
    q, k, v = (torch.randn(1, 9, 2, 16, device=DEVICE) for _ in range(3))
    with torch.inference_mode():
        out = flash_attn_func(q, k, v, causal=True)
        cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
        out_v = flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 5, 5, causal=True)
        # the same inference tensor twice: nothing may be remembered by version counter
        flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 5, 5, causal=True)
    want, _ = attention_ref(q, k, v, causal=True)
    torch.testing.assert_close(out, want, atol=2e-3, rtol=0)
    want_v, _ = attention_varlen_ref(q[0], k[0], v[0], cu, cu, 5, 5, causal=True)
    torch.testing.assert_close(out_v, want_v, atol=2e-3, rtol=0)


# -- finding 10: token strides whose tile offsets pass 2**31 ----------------------------------


def test_huge_token_stride_is_copied_not_overflowed():
    """An sbhd-style view whose token stride times a tile's rows passes 2**31 elements used
    to overflow the kernels' 32-bit in-tile offsets (a segfault on an H200)."""
    stride, seqlen = 2**27, 17  # row 16 of the first tile sits 2**31 elements in
    assert stride * MAX_TILE_ROWS >= 2**31
    # 4 GiB of address space, of which only the 17 rows' pages are ever touched.
    storage = torch.empty(stride * seqlen, dtype=torch.float16, device=DEVICE)
    q = storage.as_strided((1, seqlen, 1, 16), (0, stride, 16, 1))
    q.copy_(torch.randn(1, seqlen, 1, 16))
    assert kernel_operand(q, 1).stride(1) == 16  # copied to a compact layout
    k, v = (torch.randn(1, seqlen, 1, 16, dtype=torch.float16, device=DEVICE) for _ in range(2))
    out = flash_attn_func(q, k, v)
    want, _ = attention_ref(q.double(), k.double(), v.double())
    torch.testing.assert_close(out.double(), want, atol=2e-3, rtol=0)


# -- finding 11: non-finite scalars -------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(softcap=math.nan), r"softcap: got nan; expected 0 \(off\) or a finite number > 0"),
        (dict(softcap=math.inf), r"softcap: got inf; expected 0 \(off\) or a finite number > 0"),
        (dict(softmax_scale=math.nan), r"softmax_scale: got nan; expected a finite number"),
        (dict(softmax_scale=-math.inf), r"softmax_scale: got -inf; expected a finite number"),
    ],
)
def test_non_finite_scalars_are_refused(kwargs, pattern):
    q, k, v = (torch.randn(1, 4, 2, 16, device=DEVICE) for _ in range(3))
    with pytest.raises(ValueError, match=pattern):
        flash_attn_func(q, k, v, **kwargs)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=pattern):
        flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 4, 4, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        attention_ref(q, k, v, **kwargs)


# -- the smaller findings ----------------------------------------------------------------------


@pytest.mark.parametrize("fn", [FlashAttentionTritonFunc, FlashAttentionPyTorchFunc], ids=["triton", "pytorch"])
def test_seed_interface_refuses_a_non_bool_causal(fn):
    """``.apply(Q, K, V, "no")`` used to run causal attention (a non-empty string is truthy)."""
    x = torch.randn(1, 4, 16, device=DEVICE)
    with pytest.raises(TypeError, match=r"is_causal: expected a bool, got str 'no'"):
        fn.apply(x, x, x, "no")


def test_numpy_integers_and_int_flags_are_accepted_as_flash_attn_does(gen):
    """numpy integers for window_size / max_seqlen and ``causal=1`` used to raise TypeError."""
    lengths = [7, 12]
    cu = cu_seqlens_from_lengths(lengths, DEVICE)
    q, k, v = (t.float() for t in _varlen64(gen, lengths))
    got = flash_attn_varlen_func(q, k, v, cu, cu, np.int64(12), np.int32(12), causal=1,
                                 window_size=(np.int64(3), np.int64(-1)))
    want = flash_attn_varlen_func(q, k, v, cu, cu, 12, 12, causal=True, window_size=(3, -1))
    torch.testing.assert_close(got, want)
    for bad in ("yes", 2, None):
        with pytest.raises(TypeError, match=r"causal: expected a bool"):
            flash_attn_varlen_func(q, k, v, cu, cu, 12, 12, causal=bad)


def test_list_cu_seqlens_is_a_clear_type_error():
    q = torch.randn(6, 2, 16, device=DEVICE)
    with pytest.raises(TypeError, match=r"cu_seqlens_q: expected an int32 torch.Tensor \(batch \+ 1,\), got a list"):
        flash_attn_varlen_func(q, q, q, [0, 6], [0, 6], 6, 6)

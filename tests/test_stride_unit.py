"""The portable kernels take the dense tensors' (batch, token, head) strides in units of
``problem.stride_unit`` elements and multiply them back by a constexpr, so that the compiler
knows each row's alignment: without it a head dim that is not a multiple of 16 (d=72) ran
every load and store of a tile as single 2-byte accesses, 3-12x slower than FA2 (run 51).
Here: the unit itself, and forward and backward against the float64 reference on layouts
whose units are 8, 4 and 2 (interpreted on the CPU; the GPU tests cover the same calls at
real sizes, and ``test_compile_sm90`` that d=72 compiles to vector accesses)."""

import pytest
import torch
import torch.nn.functional as F

from attn_check import check_attention, check_varlen_with_an_empty_sequence, dense_impl, dense_ref
from conftest import HAS_CUDA
from ringflash.kernels.problem import stride_unit

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float16  # the interpreter's bf16 dot is wrong


def _meta(*shape):
    return torch.empty(shape, device="meta")


def test_stride_unit_is_the_rows_alignment():
    assert stride_unit(_meta(2, 64, 28, 72), is_varlen=False) == 8  # head stride 72
    assert stride_unit(_meta(2, 64, 3, 40), _meta(2, 64, 3, 72), is_varlen=False) == 8
    assert stride_unit(_meta(2, 64, 3, 20), is_varlen=False) == 4
    assert stride_unit(_meta(2, 64, 3, 7), is_varlen=False) == 1
    assert stride_unit(_meta(100, 3, 36), is_varlen=True) == 4  # varlen: (token, head) strides
    # Every stride a multiple of 16: Triton's own specialization says as much, so unit 1
    # and the kernels compile as before.
    assert stride_unit(_meta(2, 64, 28, 112), is_varlen=False) == 1
    assert stride_unit(_meta(2, 64, 28, 72), _meta(2, 64, 28, 112), is_varlen=False) == 8
    # A stride past 32 bits goes to Triton as a 64-bit integer; its quotient would not.
    huge = torch.empty(0, device="meta").as_strided((2, 4, 3, 72), (2**31 + 8, 216, 72, 1))
    assert stride_unit(huge, is_varlen=False) == 1


def _padded_heads(x):
    """x with one more head allocated than used: the batch and token strides change."""
    return F.pad(x, (0, 0, 0, 1))[..., :-1, :]


@pytest.mark.parametrize("headdim,padded", [(72, False), (72, True), (20, True), (36, False), (10, False)])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_on_aligned_units(gen, headdim, padded, causal):
    """Units 8 (d=72), 4 (d=20 and 36) and 2 (d=10): out, lse, dq, dk and dv."""
    b, sq, sk, h, hk = 2, 37, 45, 4, 2
    q, k, v = (torch.randn(b, s, n, headdim, generator=gen, dtype=torch.float64).to(DEVICE)
               for s, n in ((sq, h), (sk, hk), (sk, hk)))
    layout = _padded_heads if padded else (lambda x: x)
    assert stride_unit(layout(q.to(DTYPE)), layout(k.to(DTYPE)), is_varlen=False) in (2, 4, 8)

    def impl(q, k, v, causal):
        return dense_impl(layout(q), layout(k), layout(v), causal)

    check_attention(impl, dense_ref, (q, k, v), DTYPE, extra=(causal,))


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_on_aligned_units(gen, causal):
    """Varlen at d=72 (unit 8), an empty sequence among the others."""
    check_varlen_with_an_empty_sequence(gen, DEVICE, 72, DTYPE, causal)


@pytest.mark.parametrize("d,paged,splits", [(72, None, 0), (72, 8, 3), (20, None, 2), (10, 8, 0)])
def test_decode_on_aligned_units(gen, d, paged, splits):
    """The decode kernel (q, the K/V cache and out in units 8, 4 and 2; contiguous and paged
    caches, new keys appended) and the split-KV combine kernel (its float32 partials and
    out in such units) against the float64 reference of ``test_kvcache``."""
    from test_kvcache import _case

    _case(gen, d=d, seqlen_q=2, seqlen_new=1, paged=paged, num_splits=splits, dtype=torch.float16)

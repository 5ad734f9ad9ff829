"""The portable kernels with the head dim split in two power-of-two parts
(``configs.head_parts``: d=192 as 128 + 64 instead of padded to 256; d=96 and d=160, whose
32-wide second part gave wrong outputs on the GPU in run 49, stay padded) against the
float64 reference: every feature whose code the second part touches (both backward kernels, the
atomic dQ, two-pass and split dK/dV, split-KV, varlen with an empty sequence, windows,
softcap, ALiBi, dropout, context parallelism's scattered dK/dV rows)."""

import pytest
import torch

from attn_check import check_attention, check_varlen_with_an_empty_sequence, dense64, dense_impl, dense_ref
from conftest import HAS_CUDA, cu_seqlens_from_lengths
from ringflash.kernels import configs

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if HAS_CUDA else [])


@pytest.fixture(autouse=True)
def head_parts():
    with configs.override(head_parts=True):
        yield


def test_head_parts_widths(monkeypatch):
    """On by default (``HEAD_PARTS_DEFAULT``): a split only where the head dim
    is exactly two powers of two, the second at least ``HEAD_PART_MIN`` wide (other splits
    miscompile in Triton 3.6 for sm_90: run 41), one padded tile elsewhere."""
    with configs.override(head_parts=False):
        assert configs.head_parts(192) == (256, 0)
        monkeypatch.setenv("RINGFLASH_HEAD_PARTS", "1")
        assert configs.head_parts(192) == (256, 0)  # the override wins over the environment
    expected = {96: (128, 0), 160: (256, 0), 192: (128, 64),
                40: (64, 0), 48: (64, 0), 72: (128, 0), 80: (128, 0), 136: (256, 0), 224: (256, 0),
                16: (16, 0), 24: (32, 0), 64: (64, 0), 112: (128, 0), 128: (128, 0), 256: (256, 0)}
    for d, parts in expected.items():
        assert configs.head_parts(d) == parts, d
    monkeypatch.delitem(configs._override, "head_parts")  # the environment decides
    monkeypatch.setenv("RINGFLASH_HEAD_PARTS", "1")
    assert configs.head_parts(192) == (128, 64)
    monkeypatch.setenv("RINGFLASH_HEAD_PARTS", "0")
    assert configs.head_parts(192) == (256, 0)
    monkeypatch.delenv("RINGFLASH_HEAD_PARTS")
    assert configs.head_parts(192) == ((128, 64) if configs.HEAD_PARTS_DEFAULT == "1" else (256, 0))
    monkeypatch.setenv("RINGFLASH_HEAD_PARTS", "yes")
    with pytest.raises(ValueError, match="RINGFLASH_HEAD_PARTS: got 'yes'; expected 0 or 1"):
        configs.head_parts(192)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("headdim", [96, 160, 192])
@pytest.mark.parametrize("causal", [False, True])
def test_dense(gen, dtype, headdim, causal):
    inputs = dense64(gen, DEVICE, 2, 37, 29, 4, 2, headdim)
    check_attention(dense_impl, dense_ref, inputs, dtype, extra=(causal,))


def test_window_and_softcap(gen):
    inputs = [t * 3 for t in dense64(gen, DEVICE, 1, 45, 61, 2, 1, 192)]
    check_attention(dense_impl, dense_ref, inputs, torch.float32, extra=(False, (5, 9), 2.5))


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_with_an_empty_sequence(gen, causal):
    check_varlen_with_an_empty_sequence(gen, DEVICE, 192, torch.float32, causal)


def test_alibi(gen):
    from test_alibi import _dense, _slopes

    impl, ref = _dense(_slopes(gen, (2, 4)), True)
    check_attention(impl, ref, dense64(gen, DEVICE, 2, 33, 41, 4, 2, 192), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_matches_its_mask(gen, dtype):
    from test_dropout import _check_dense_dropout

    _check_dense_dropout(gen, dtype, 2, 192, 37, 37, (4, 2), dict(causal=True))


@pytest.mark.parametrize(
    "env,overrides",
    [({"RINGFLASH_BACKWARD": "atomic"}, {}),
     ({"RINGFLASH_DKV_SPLITS": "3"}, {}),
     ({}, dict(dkdv=configs.KernelConfig(32, 16, 4, 1, dkdv_passes=2))),
     ({}, dict(num_splits=3))],
    ids=["atomic-dq", "dkdv-splits", "two-pass-dkdv", "split-kv"],
)
def test_backward_and_forward_variants(gen, monkeypatch, env, overrides):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    inputs = dense64(gen, DEVICE, 2, 70, 90, 4, 2, 192)
    with configs.override(**overrides):
        check_attention(dense_impl, dense_ref, inputs, torch.float32, extra=(True,))


def test_scattered_key_gradient_rows(gen):
    """Context parallelism's dkv_rows: both parts of dK/dV land in the rows given."""
    from ringflash.kernels.bwd import attention_backward
    from ringflash.kernels.fwd import attention_forward
    from ringflash.kernels.problem import SeqMeta, make_problem

    q_lengths, k_lengths, h, hk, d = [9, 0, 31], [23, 0, 40], 4, 2, 192
    cu_q, cu_k = cu_seqlens_from_lengths(q_lengths, DEVICE), cu_seqlens_from_lengths(k_lengths, DEVICE)
    mk = lambda n, heads: torch.randn(n, heads, d, generator=gen).to(DEVICE)  # noqa: E731
    q, k, v, dout = mk(sum(q_lengths), h), mk(sum(k_lengths), hk), mk(sum(k_lengths), hk), mk(sum(q_lengths), h)
    meta = SeqMeta(cu_q[None, :-1], cu_q[None, 1:], cu_k, None, None)
    prob = make_problem(q, k, meta, max(q_lengths), max(k_lengths), d ** -0.5, True, -1, 0, 0.0)
    out, lse = attention_forward(q, k, v, prob, meta)
    _, dk, dv = attention_backward(dout, q, k, v, out, lse, prob, meta)
    rows_total = 2 * sum(k_lengths) + 5
    rows = torch.randperm(rows_total, generator=gen)[:sum(k_lengths)].to(DEVICE)
    full = torch.full((rows_total, 2, hk, d), 7.0, dtype=torch.float32, device=DEVICE)
    attention_backward(dout, q, k, v, out, lse, prob, meta, dk=full[:, 0], dv=full[:, 1], dkv_rows=rows)
    torch.testing.assert_close(full[rows, 0], dk, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full[rows, 1], dv, rtol=1e-5, atol=1e-5)
    untouched = torch.ones(rows_total, dtype=torch.bool, device=DEVICE)
    untouched[rows] = False
    assert torch.all(full[untouched] == 7.0)


def test_every_split_is_exact():
    """No head dim gets a second part with padding or narrower than ``HEAD_PART_MIN``: the
    splits Triton 3.6 miscompiles for sm_90 (run 41). The kernels load the second part
    without column masks, so a padded one would also read past the head dim."""
    for d in range(1, 257):
        first, second = configs.head_parts(d)
        padded = max(16, 1 << (d - 1).bit_length())
        if second == 0:
            assert first == padded, d
        else:
            assert first + second == d and second >= configs.HEAD_PART_MIN, (d, first, second)
            assert first & (first - 1) == 0 and second & (second - 1) == 0, (d, first, second)

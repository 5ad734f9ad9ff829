"""The portable forward with K and V read through TMA descriptors (``KernelConfig.kv_tma``,
which the short-document tile asks for on sm_90, or ``RINGFLASH_FWD_KV_TMA=1``;
``fwd._fwd_kernel``'s KV_TMA): against the float64
reference (out, lse, dq, dk, dv; the backward is the usual one), and equal to the pointer
loads on the same inputs. On the CPU the interpreter runs the descriptors' loads; on a GPU
(sm_90 on) these tests run the TMA kernels at the same sizes, the d=72 dense cases and the
short documents at d=96 and 128 on ``SHORT_KEYS_TABLE``'s tile (run 56's fastest; made the
default after run 57 passed them). Run 53 (Nsight Compute) motivates it: see ``configs.fwd_kv_tma``."""

import pytest
import torch

from attn_check import (check_attention, check_varlen_with_an_empty_sequence, dense_impl, dense_ref, varlen_impl,
                        varlen_ref)
from conftest import HAS_CUDA, cu_seqlens_from_lengths
from ringflash import flash_attn_func, flash_attn_varlen_func
from ringflash.kernels import configs, fwd

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float16  # the interpreter's bf16 dot is wrong
TMA_DEVICE = not HAS_CUDA or torch.cuda.get_device_capability()[0] >= 9


@pytest.fixture
def kv_tma(monkeypatch):
    if not TMA_DEVICE:
        pytest.skip("TMA needs sm_90 or later")
    monkeypatch.setenv("RINGFLASH_FWD_KV_TMA", "1")
    assert configs.fwd_kv_tma(torch.device(DEVICE))


def _tma_plans() -> int:
    return sum(plan.kv_box is not None for plan in fwd._PLANS.values())


@pytest.fixture(autouse=True)
def _fresh_plans():
    fwd._PLANS.clear()  # counted per test (``_tma_plans``)


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (6, 3))])
@pytest.mark.parametrize("headdim", [64, 72])
def test_dense_through_descriptors(gen, kv_tma, headdim, causal, window):
    """Keys past a block's end (45 keys) and columns past d (d=72 in a 128-wide tile) read
    as zeros from the descriptor."""
    q, k, v = (torch.randn(2, s, n, headdim, generator=gen, dtype=torch.float64).to(DEVICE)
               for s, n in ((37, 4), (45, 2), (45, 2)))
    check_attention(dense_impl, dense_ref, (q, k, v), DTYPE, extra=(causal, window))
    assert _tma_plans() > 0, "the forward did not take the descriptors"


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_through_descriptors(gen, kv_tma, causal):
    check_varlen_with_an_empty_sequence(gen, DEVICE, 64, DTYPE, causal)
    assert _tma_plans() > 0


@pytest.mark.parametrize("headdim", [96, 128])
def test_short_documents_on_the_short_keys_tile(gen, kv_tma, monkeypatch, headdim):
    """Packed short documents, full attention (the 64 x 256 pack's kind of call): on an
    sm_90 GPU they take ``SHORT_KEYS_TABLE``'s tile, run 56's fastest, which nothing
    else here runs at a 128-wide head tile; lengths of one key block, one key, none, and
    neither a multiple of the tile's 64 keys nor of its 128 rows. On sm_90 the variable is
    unset, so this checks the default path; elsewhere (the interpreter) it forces the
    descriptors, which no other GPU's table asks for."""
    hopper = HAS_CUDA and torch.cuda.get_device_capability() == (9, 0)
    if hopper:
        monkeypatch.delenv("RINGFLASH_FWD_KV_TMA")
    chosen = []
    pick = configs.config_for

    def recording(kind, *args, **kwargs):
        cfg = pick(kind, *args, **kwargs)
        if kind == "fwd":
            chosen.append(cfg)
        return cfg

    monkeypatch.setattr(configs, "config_for", recording)
    lengths = [256, 1, 0, 200, 131, 64]
    cu = cu_seqlens_from_lengths(lengths, DEVICE)
    q, k, v = (torch.randn(sum(lengths), heads, headdim, generator=gen, dtype=torch.float64).to(DEVICE)
               for heads in (4, 2, 2))
    meta = (cu, cu, max(lengths), max(lengths))
    check_attention(varlen_impl, varlen_ref, (q, k, v), DTYPE, extra=(*meta, False))
    assert _tma_plans() > 0
    if hopper:
        short = configs.SHORT_KEYS_TABLE[(9, 0)]["fwd"][((128, 0), False)][1]
        assert chosen and all(cfg == short for cfg in chosen), chosen


def test_a_neighbouring_sequence_never_reaches_the_output(gen, kv_tma, monkeypatch):
    """A varlen descriptor spans every sequence, so a block at a sequence's end reads the
    next sequence's keys: their scores are masked and their V rows zeroed, so an inf in the
    next sequence's V changes nothing before it. Equal to the pointer loads, bit for bit."""
    lengths = [23, 0, 21, 17]
    cu = cu_seqlens_from_lengths(lengths, DEVICE)
    q, k, v = (torch.randn(sum(lengths), n, 64, generator=gen).to(DEVICE, DTYPE) for n in (4, 2, 2))
    v[cu[2]] = float("inf")  # the third sequence's first key

    def first_two(tma: str):
        monkeypatch.setenv("RINGFLASH_FWD_KV_TMA", tma)
        return flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths))[: int(cu[2])]

    pointers, descriptors = first_two("0"), first_two("1")
    assert _tma_plans() > 0
    assert torch.isfinite(descriptors).all()
    assert torch.equal(pointers, descriptors)


def test_keys_past_seqused(gen, kv_tma, monkeypatch):
    """Keys past each sequence's ``seqused_k`` (a cache's unused slots) hold stale values
    (inf here): the descriptor reads them in the sequence's last block, the kernel must not
    use them."""
    lengths_q, lengths_k, used = [3, 5], [40, 24], [29, 7]
    cu_q, cu_k = cu_seqlens_from_lengths(lengths_q, DEVICE), cu_seqlens_from_lengths(lengths_k, DEVICE)
    q = torch.randn(sum(lengths_q), 4, 64, generator=gen).to(DEVICE, DTYPE)
    k, v = (torch.randn(sum(lengths_k), 2, 64, generator=gen).to(DEVICE, DTYPE) for _ in range(2))
    v[used[0]:lengths_k[0]] = float("inf")
    v[lengths_k[0] + used[1]:] = float("inf")
    seqused = torch.tensor(used, dtype=torch.int32, device=DEVICE)

    def call(tma: str):
        monkeypatch.setenv("RINGFLASH_FWD_KV_TMA", tma)
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=True,
                                      seqused_k=seqused)

    pointers, descriptors = call("0"), call("1")
    assert _tma_plans() > 0
    assert torch.isfinite(descriptors).all()
    assert torch.equal(pointers, descriptors)


def test_the_config_asks_and_the_variable_overrides(monkeypatch):
    """Unset, ``KernelConfig.kv_tma`` decides; RINGFLASH_FWD_KV_TMA=0 turns the descriptors
    off and =1 on whatever the config says; a bad value is refused by name."""
    device = torch.device(DEVICE)
    monkeypatch.delenv("RINGFLASH_FWD_KV_TMA", raising=False)
    assert not configs.fwd_kv_tma(device)
    assert configs.fwd_kv_tma(device, True) == TMA_DEVICE
    monkeypatch.setenv("RINGFLASH_FWD_KV_TMA", "0")
    assert not configs.fwd_kv_tma(device, True)
    monkeypatch.setenv("RINGFLASH_FWD_KV_TMA", "1")
    assert configs.fwd_kv_tma(device) == TMA_DEVICE
    monkeypatch.setenv("RINGFLASH_FWD_KV_TMA", "yes")
    with pytest.raises(ValueError, match="RINGFLASH_FWD_KV_TMA: got 'yes'; expected 0, 1 or unset"):
        configs.fwd_kv_tma(device)


def test_a_config_that_asks_takes_the_descriptors(gen, monkeypatch):
    """With the variable unset, a forward config with ``kv_tma`` (forced here) reads K and V through descriptors, with the pointer loads'
    answer on the same tile, bit for bit."""
    if not TMA_DEVICE:
        pytest.skip("TMA needs sm_90 or later")
    monkeypatch.delenv("RINGFLASH_FWD_KV_TMA", raising=False)
    lengths = [23, 0, 21, 17]
    cu = cu_seqlens_from_lengths(lengths, DEVICE)
    q, k, v = (torch.randn(sum(lengths), n, 64, generator=gen).to(DEVICE, DTYPE) for n in (4, 2, 2))
    outputs = []
    for kv_tma in (False, True):
        with configs.override(fwd=configs.KernelConfig(64, 32, 4, 2, kv_tma=kv_tma)):
            outputs.append(flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths)))
        assert _tma_plans() == kv_tma
    assert torch.equal(*outputs)


def test_unaligned_keys_take_the_pointer_loads(gen, kv_tma):
    """A K whose head stride is not a multiple of 16 bytes (d=20 in 16-bit: 40 bytes) cannot
    be a TMA operand: the plan keeps the pointer loads, and the answer is the reference's."""
    q, k, v = (torch.randn(1, s, 2, 20, generator=gen, dtype=torch.float64).to(DEVICE) for s in (9, 11, 11))
    check_attention(dense_impl, dense_ref, (q, k, v), DTYPE, extra=(False,))
    assert _tma_plans() == 0
    out = flash_attn_func(q.to(DTYPE), k.to(DTYPE), v.to(DTYPE))
    assert out.shape == (1, 9, 2, 20)


def test_no_keys_takes_the_pointer_loads(kv_tma):
    """A descriptor cannot span an empty dimension: no keys (every row sees none: out 0,
    lse -inf) keeps the pointer loads."""
    q = torch.randn(1, 5, 2, 16).to(DEVICE, DTYPE)
    k = torch.randn(1, 0, 2, 16).to(DEVICE, DTYPE)
    out, lse, _ = flash_attn_func(q, k, k, return_attn_probs=True)
    assert _tma_plans() == 0
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == float("-inf")).all())

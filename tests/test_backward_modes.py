"""The two backwards: the default separate dK/dV and dQ kernels (deterministic) and the
5-GEMM one (``RINGFLASH_BACKWARD=atomic``: dQ accumulated by atomics inside the dK/dV
kernel). Both against float64 over dense, varlen, GQA, windows, softcap, ALiBi and
dropout; ``deterministic=True`` always takes the first."""

import dataclasses

import pytest
import torch

from attn_check import check_attention, dense64, dense_impl, dense_ref, varlen_impl, varlen_ref
from conftest import HAS_CUDA, cu_seqlens_from_lengths
from ringflash import flash_attn_func
from ringflash.kernels import configs

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def atomic(monkeypatch):
    monkeypatch.setenv("RINGFLASH_BACKWARD", "atomic")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("sq,sk,heads", [(37, 37, (4, 2)), (17, 70, (2, 2)), (70, 17, (3, 1))])
@pytest.mark.parametrize("causal", [False, True])
def test_atomic_dense(atomic, gen, dtype, sq, sk, heads, causal):
    check_attention(dense_impl, dense_ref, dense64(gen, DEVICE, 2, sq, sk, *heads, 32), dtype, extra=(causal,))


@pytest.mark.parametrize("window,softcap", [((7, 2), 0.0), ((-1, -1), 2.5)], ids=["window", "softcap"])
def test_atomic_window_softcap(atomic, gen, window, softcap):
    inputs = [t * (3 if softcap else 1) for t in dense64(gen, DEVICE, 1, 45, 45, 2, 1, 16)]
    check_attention(dense_impl, dense_ref, inputs, torch.float32, extra=(True, window, softcap))


def test_atomic_varlen(atomic, gen):
    lengths, k_lengths = [9, 0, 40, 1], [14, 3, 40, 6]
    mk = lambda n, h: torch.randn(n, h, 16, generator=gen, dtype=torch.float64).to(DEVICE)  # noqa: E731
    inputs = (mk(sum(lengths), 4), mk(sum(k_lengths), 2), mk(sum(k_lengths), 2))
    meta = (cu_seqlens_from_lengths(lengths, DEVICE), cu_seqlens_from_lengths(k_lengths, DEVICE), 40, 40)
    check_attention(varlen_impl, varlen_ref, inputs, torch.float32, extra=(*meta, True))


def test_atomic_matches_deterministic_with_alibi_and_dropout(gen, monkeypatch):
    """Same mask (same seed), same ALiBi: the two backwards agree to rounding."""
    q, k, v = (t.float() for t in dense64(gen, DEVICE, 2, 33, 33, 4, 2, 16))
    slopes = torch.rand(4, generator=gen).to(DEVICE)
    grads = []
    for mode in ("deterministic", "atomic"):
        monkeypatch.setenv("RINGFLASH_BACKWARD", mode)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(7)
        out = flash_attn_func(*leaves, dropout_p=0.2, causal=True, alibi_slopes=slopes)
        grads.append(torch.autograd.grad(out.square().sum(), leaves))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_backward_asks_for_the_atomic_tiles_only_when_atomic(gen, monkeypatch):
    """The dK/dV kernel's config is asked with ``atomic_dq`` exactly when the 5-GEMM backward
    runs (``configs.ATOMIC_DQ_TABLE``'s tiles), and each backward stays correct."""
    from ringflash.kernels import launch

    asked = []
    real = configs.config_for

    def spy(kind, *args, **kwargs):
        if kind == "dkdv":
            asked.append(kwargs.get("atomic_dq", False))
        return real(kind, *args, **kwargs)

    monkeypatch.setattr(configs, "config_for", spy)
    for mode, deterministic, want in (("atomic", False, True), ("deterministic", False, False),
                                      ("atomic", True, False)):
        monkeypatch.setenv("RINGFLASH_BACKWARD", mode)
        for table in launch._PLAN_TABLES:  # plans made earlier would skip the config lookup
            table.clear()
        asked.clear()
        impl = lambda q, k, v, causal: flash_attn_func(  # noqa: E731
            q, k, v, causal=causal, deterministic=deterministic, return_attn_probs=True)[:2]
        check_attention(impl, dense_ref, dense64(gen, DEVICE, 1, 21, 21, 2, 1, 16), torch.float32, extra=(True,))
        assert asked == [want], (mode, deterministic, asked)


def test_deterministic_flag_refuses_atomics(monkeypatch):
    monkeypatch.setenv("RINGFLASH_BACKWARD", "atomic")
    assert configs.use_atomic_dq(False) and not configs.use_atomic_dq(True)
    monkeypatch.setenv("RINGFLASH_BACKWARD", "sometimes")
    with pytest.raises(ValueError, match="RINGFLASH_BACKWARD: got 'sometimes'"):
        configs.use_atomic_dq(False)


# --- the dK/dV kernel's query split (RINGFLASH_DKV_SPLITS) -------------------------------


# Which query blocks a split visits is the same code in both backwards (the atomic one only
# adds each block's dQ share), so the atomic backward runs one split count (CI time).
@pytest.mark.parametrize("mode,splits", [("deterministic", "2"), ("deterministic", "3"), ("deterministic", "64"),
                                         ("atomic", "3")])
def test_dkv_splits_dense_and_varlen(gen, monkeypatch, splits, mode):
    """Several programs per key block, each summing every N-th of its query blocks (of every
    query head) into a float32 partial: against float64 with GQA 6/2 and one head, a causal
    window and varlen, with both backwards (64 is clamped to the query blocks), and
    bit-identical across runs (the partials are added in a fixed order)."""
    monkeypatch.setenv("RINGFLASH_DKV_SPLITS", splits)
    monkeypatch.setenv("RINGFLASH_BACKWARD", mode)
    check_attention(dense_impl, dense_ref, dense64(gen, DEVICE, 2, 37, 45, 6, 2, 16), torch.float32,
                    extra=(True, (9, -1), 0.0))
    check_attention(dense_impl, dense_ref, dense64(gen, DEVICE, 1, 70, 33, 1, 1, 16), torch.float32, extra=(True,))
    lengths, k_lengths = [9, 0, 40, 1], [14, 3, 40, 6]
    mk = lambda n, h: torch.randn(n, h, 16, generator=gen, dtype=torch.float64).to(DEVICE)  # noqa: E731
    inputs = (mk(sum(lengths), 6), mk(sum(k_lengths), 2), mk(sum(k_lengths), 2))
    meta = (cu_seqlens_from_lengths(lengths, DEVICE), cu_seqlens_from_lengths(k_lengths, DEVICE), 40, 40)
    check_attention(varlen_impl, varlen_ref, inputs, torch.float16, extra=(*meta, True))
    if mode == "deterministic":
        q, k, v = (t.float() for t in dense64(gen, DEVICE, 1, 33, 33, 6, 2, 16))
        runs = []
        for _ in range(2):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            runs.append(torch.autograd.grad(flash_attn_func(*leaves, causal=True).square().sum(), leaves))
        assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_dkv_splits_setting(monkeypatch):
    from ringflash.kernels.problem import AttnProblem

    prob = AttnProblem(batch=1, nheads=8, nheads_k=2, headdim=64, max_seqlen_q=1000, max_seqlen_k=1000,
                       is_varlen=False, softmax_scale=0.1, causal=True, window_left=-1, window_right=0, softcap=0.0)
    cfg = configs.DEFAULT["dkdv"]
    cpu = torch.device("cpu")
    assert configs.dkv_splits(prob, cfg, cpu) == 1  # off by default until measured on a GPU
    monkeypatch.setenv("RINGFLASH_DKV_SPLITS", "5")
    assert configs.dkv_splits(prob, cfg, cpu) == 5
    monkeypatch.setenv("RINGFLASH_DKV_SPLITS", "999")
    assert configs.dkv_splits(prob, cfg, cpu) == -(-1000 // cfg.block_m)  # at most one per query block
    # KV heads x splits is grid axis 1, which CUDA caps at 65535.
    many_heads = AttnProblem(batch=1, nheads=4096, nheads_k=4096, headdim=64, max_seqlen_q=100000,
                             max_seqlen_k=64, is_varlen=False, softmax_scale=0.1, causal=False, window_left=-1,
                             window_right=-1, softcap=0.0)
    assert 4096 * configs.dkv_splits(many_heads, cfg, cpu) <= configs.MAX_GRID_YZ
    monkeypatch.setenv("RINGFLASH_DKV_SPLITS", "auto")
    assert configs.dkv_splits(prob, cfg, cpu) == 1  # no GPU to fill
    for bad in ("0", "many"):
        monkeypatch.setenv("RINGFLASH_DKV_SPLITS", bad)
        with pytest.raises(ValueError, match="RINGFLASH_DKV_SPLITS"):
            configs.dkv_splits(prob, cfg, cpu)


# --- the dK/dV kernel in two passes (KernelConfig.dkdv_passes=2) -------------------------


@pytest.mark.parametrize("mode", ["deterministic", "atomic"])
def test_dkdv_in_two_passes(gen, monkeypatch, mode):
    """dV in one launch and dK (with the atomic dQ) in another, each recomputing P: against
    float64 with GQA, a causal window and softcap, and bit-identical to the one-pass kernel
    with ALiBi and dropout (the same mask regenerated in each pass)."""
    monkeypatch.setenv("RINGFLASH_BACKWARD", mode)
    one = configs.KernelConfig(64, 64, 4, 2) if HAS_CUDA else configs.INTERPRETER["dkdv"]
    two = dataclasses.replace(one, dkdv_passes=2)
    inputs = [t * 3 for t in dense64(gen, DEVICE, 2, 37, 45, 6, 2, 16)]
    with configs.override(dkdv=two):
        check_attention(dense_impl, dense_ref, inputs, torch.float32, extra=(True, (9, 0), 2.5))
    q, k, v = (t.float() for t in inputs)
    slopes = torch.rand(6, generator=gen).to(DEVICE)
    grads = []
    for cfg in (one, two):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        torch.manual_seed(7)
        with configs.override(dkdv=cfg):
            out = flash_attn_func(*leaves, dropout_p=0.2, causal=True, alibi_slopes=slopes)
            grads.append(torch.autograd.grad(out.square().sum(), leaves))
    # The same operations in both: bit for bit where nothing reorders them (no atomics, the
    # interpreter), to rounding otherwise.
    exact = mode == "deterministic" and not HAS_CUDA
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=0 if exact else 1e-5, rtol=0 if exact else 1e-5)


def test_atomic_request_past_d128_runs_the_two_kernel_backward(gen, atomic, monkeypatch):
    """RINGFLASH_BACKWARD=atomic at d=192 (its kernel does not fit an H200's shared memory,
    run 39) runs the dQ kernel, as the deterministic backward does, against float64; at
    d=128 it runs none."""
    from ringflash.kernels import bwd

    launched = []
    real = bwd._bwd_dq_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

    monkeypatch.setattr(bwd, "_bwd_dq_kernel", Spy())
    for headdim, dq_kernel in ((192, True), (128, False)):
        launched.clear()
        inputs = dense64(gen, DEVICE, 1, 9, 11, 2, 1, headdim)
        check_attention(dense_impl, dense_ref, inputs, torch.float32, extra=(True,))
        assert bool(launched) == dq_kernel, (headdim, launched)

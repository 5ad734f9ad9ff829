"""Launch configuration helpers that need no GPU: the register-aware autotune candidates
and the `bench registers` report's reading of compiled variants."""

import dataclasses
import types

import pytest

from ringflash.bench import registers
from ringflash.kernels import configs


@pytest.mark.parametrize("headdim", [32, 64, 80, 128, 192, 256])
@pytest.mark.parametrize("kind", configs.KINDS)
def test_candidates_fit_the_register_budget(kind, headdim):
    block_d = sum(configs.head_parts(headdim))  # the tiles' width: padded, or the split's two parts
    cands = configs.candidates(kind, headdim)
    assert cands, (kind, headdim)
    assert len(set(cands)) == len(cands)
    for cfg in cands:
        if block_d > 128 and (cfg.block_m, cfg.block_n) in configs.WIDE_HEAD_EXTRA_SHAPES.get(kind, ()):
            continue  # compiled without spills (configs.WIDE_HEAD_EXTRA_SHAPES), over the estimate
        assert configs.tile_registers(kind, cfg, block_d) <= configs.TILE_REGISTER_BUDGET, cfg


def test_headdim_256_entries_fit_the_register_budget():
    # The d=256 entries before `bench tune --headdims 256` (run 27) were over the budget and
    # ran the backward at 0.4x FA2; every entry chosen since is a candidate, and fits it or
    # is one of the shapes the estimate refuses but the compiler does not spill
    # (WIDE_HEAD_EXTRA_SHAPES: run 37's dQ 128x32 and two-pass dK/dV 32x128, fastest).
    table = configs.TABLE[(9, 0)]
    for kind in configs.KINDS:
        for causal in (False, True):
            cfg = table[kind][(256, causal)]
            if (cfg.block_m, cfg.block_n) not in configs.WIDE_HEAD_EXTRA_SHAPES.get(kind, ()):
                assert configs.tile_registers(kind, cfg, 256) <= configs.TILE_REGISTER_BUDGET, (kind, causal, cfg)
            assert cfg in configs.candidates(kind, 256), (kind, causal, cfg)


def test_tile_registers_counts_accumulators_and_held_tiles():
    cfg = configs.KernelConfig(128, 64, 8, 3)
    # forward: out (128 x 128 fp32) + q (128 x 128 bf16) over 256 threads
    assert configs.tile_registers("fwd", cfg, 128) == (128 * 128 + 128 * 128 / 2) / 256
    # dK/dV keeps BLOCK_N = 64 key rows: dk, dv fp32 + k, v bf16
    assert configs.tile_registers("dkdv", cfg, 128) == (2 * 64 * 128 + 64 * 128) / 256


def test_registers_report_reads_compiled_variants():
    """A stand-in for Triton's JIT cache: names come from the argument list, counts from
    the compiled kernel."""
    from triton.runtime.jit import JITFunction

    class FakeKernel:
        src = types.SimpleNamespace(constants={(2,): 64, (3,): 32, (4,): 128},
                                    fn=types.SimpleNamespace(arg_names=["Q", "K", "BLOCK_M", "BLOCK_N", "BLOCK_D"]))
        metadata = types.SimpleNamespace(num_warps=8, num_stages=2, shared=65536)
        n_regs, n_spills = 255, 1024

    fn = JITFunction.__new__(JITFunction)
    fn.__name__ = "_bwd_dkdv_kernel"
    fn.device_caches = {0: ({"key": FakeKernel()}, None, None, None, None)}
    module = types.ModuleType("fake_kernels")
    module._bwd_dkdv_kernel = fn
    (variant,) = registers.compiled_variants([module])
    assert variant["constants"] == {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_D": 128}
    row = registers._row(variant, 128, True)
    assert row[registers.COLUMNS.index("n_spills")] == 1024
    assert row[registers.COLUMNS.index("estimated_tile_regs")] == round(3 * 32 * 128 / 256)


def test_registers_command_needs_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the command runs for real (device_run.sh registers)")
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        registers.main([])


@pytest.mark.parametrize("headdim", [64, 128, 256])
def test_exact_fp32_takes_the_small_register_tiles(monkeypatch, headdim):
    """Exact fp32 dots are FMA loops on register tiles: the 16-bit tables' shapes spilled
    (run 35: 9x slower at d=128). fp32 under tf32 and 16-bit inputs keep the tables."""
    import torch
    from ringflash.kernels.problem import make_problem
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(configs, "_device_index", lambda device: 0)
    monkeypatch.setattr(configs, "_shared_memory_limit", lambda index: 227 * 1024)
    monkeypatch.delenv("RINGFLASH_FP32_PRECISION", raising=False)
    configs.fit_shared_memory.cache_clear()

    def fake(dtype):
        t = torch.empty(1, 128, 4, headdim, dtype=dtype)
        return types.SimpleNamespace(device=types.SimpleNamespace(type="cuda", index=0), dtype=dtype,
                                     element_size=t.element_size, shape=t.shape)
    q32 = fake(torch.float32)
    prob = make_problem(q32, q32, None, 128, 128, 1.0, True, -1, -1, 0.0)
    try:
        for kind in configs.KINDS:
            assert configs.config_for(kind, q32, prob) == configs.FP32_EXACT[headdim][kind]
            assert configs.config_for(kind, fake(torch.bfloat16), prob) == configs.TABLE[(9, 0)][kind][(headdim, True)]
        prev = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")  # tf32: tensor cores, the table's shapes
        try:
            table_cfg = configs.TABLE[(9, 0)]["fwd"][(headdim, True)]
            assert configs.config_for("fwd", q32, prob) == configs.fit_shared_memory("fwd", table_cfg, prob.block_d, 4, 0)
        finally:
            torch.set_float32_matmul_precision(prev)
    finally:
        configs.fit_shared_memory.cache_clear()


def test_dropout_takes_its_own_measured_tiles(monkeypatch):
    """With dropout the d=128 causal forward and dK/dV kernels take ``DROPOUT_TABLE``'s tiles
    (run 36: the forward 14% faster than with the table's); other keys and calls without
    dropout keep the table."""
    import torch
    from ringflash.kernels.problem import make_problem
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(configs, "_device_index", lambda device: 0)
    monkeypatch.setattr(configs, "_shared_memory_limit", lambda index: 227 * 1024)
    configs.fit_shared_memory.cache_clear()
    try:
        for headdim, causal in ((128, True), (128, False), (64, True)):
            t = torch.empty(1, 1024, 4, headdim, dtype=torch.bfloat16)  # beyond SHORT_KEYS_TABLE's lengths
            q = types.SimpleNamespace(device=types.SimpleNamespace(type="cuda", index=0), dtype=t.dtype,
                                      element_size=t.element_size, shape=t.shape)
            prob = make_problem(q, q, None, 1024, 1024, 1.0, causal, -1, -1, 0.0)
            for kind in configs.KINDS:
                plain = configs.config_for(kind, q, prob)
                assert plain == configs.fit_shared_memory(kind, configs.TABLE[(9, 0)][kind][(headdim, causal)],
                                                          prob.block_d, 2, 0)
                entry = configs.DROPOUT_TABLE[(9, 0)].get(kind, {}).get((headdim, causal))
                want = plain if entry is None else configs.fit_shared_memory(kind, entry, prob.block_d, 2, 0)
                assert configs.config_for(kind, q, prob, dropout=True) == want
        assert configs.DROPOUT_TABLE[(9, 0)]["fwd"][(128, True)] != configs.TABLE[(9, 0)]["fwd"][(128, True)]
    finally:
        configs.fit_shared_memory.cache_clear()


def test_decode_splits_finish_the_busiest_sm_first():
    """The decode fan-out (H200: 132 SMs, 32/8 heads, key blocks of 64): at b=8 sk=8k the
    old rule's 5 splits ran 72 us and 6-8 ran 70 (run 35); every choice keeps at least two
    programs per SM where it can, at least four key blocks per split and at most
    ``MAX_DECODE_SPLITS``, and a launch that fills the GPU is not split."""
    from ringflash.kernels.decode import decode_splits_for
    assert decode_splits_for(132, 64, 128) == 6  # b=8 sk=8k
    assert decode_splits_for(132, 128, 64) == 3  # b=16 sk=4k: run 35's best, 3-4
    assert decode_splits_for(132, 8, 512) == 33  # b=1 sk=32k: run 36's 48.2 us, best 47.7 (32)
    assert decode_splits_for(132, 512, 32) == 1  # b=64 sk=2k
    for programs in (1, 3, 8, 64, 131, 132, 1000):
        for key_blocks in (1, 3, 4, 17, 128, 4096):
            s = decode_splits_for(132, programs, key_blocks)
            most = max(1, min(key_blocks // 4, configs.MAX_DECODE_SPLITS))
            assert 1 <= s <= most
            if programs >= 132:
                assert s == 1
            elif programs * most >= 2 * 132:
                assert programs * s >= 2 * 132


def test_d256_dkdv_candidates_include_two_passes_and_eight_warps():
    """The tuner's d=256 dK/dV list holds the two-pass variant of every shape and the 8-warp
    small tiles whose 4-warp twins spill on Hopper; d<=128 lists are unchanged by either."""
    big = configs.candidates("dkdv", 256)
    shapes = {(c.block_m, c.block_n, c.num_warps) for c in big}
    assert (64, 32, 8) in shapes
    for cfg in big:
        if cfg.dkdv_passes == 1:
            assert dataclasses.replace(cfg, dkdv_passes=2) in big
    for d in (64, 128):
        assert all(c.dkdv_passes == 1 for c in configs.candidates("dkdv", d))
    with pytest.raises(ValueError, match="dkdv_passes"):
        configs.KernelConfig(64, 64, 4, 2, dkdv_passes=3)


def _hopper_config_for(monkeypatch):
    """``cfg(kind, headdim, causal, seqlen)``: ``config_for`` of a dense bf16 call on an
    sm_90 GPU with 227 KB of shared memory a block, on this CPU."""
    import torch
    from ringflash.kernels.problem import make_problem
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(configs, "_device_index", lambda device: 0)
    monkeypatch.setattr(configs, "_shared_memory_limit", lambda index: 227 * 1024)
    configs.fit_shared_memory.cache_clear()

    def cfg(kind, headdim, causal, seqlen, dropout=False, atomic_dq=False):
        t = torch.empty(1, seqlen, 4, headdim, dtype=torch.bfloat16)
        q = types.SimpleNamespace(device=types.SimpleNamespace(type="cuda", index=0), dtype=t.dtype,
                                  element_size=t.element_size, shape=t.shape)
        return configs.config_for(kind, q, make_problem(q, q, None, seqlen, seqlen, 1.0, causal, -1, -1, 0.0),
                                  dropout=dropout, atomic_dq=atomic_dq)

    return cfg


def test_headdim_entries_win_over_their_bucket(monkeypatch):
    """``HEAD_PARTS_TABLE`` (run 43): d=192's dQ takes its own measured tile; d=256 keeps
    the bucket's dQ, and so does d=160 (no longer split since run 49); d=96's forward takes
    the bucket's (the faster short tiles miscompiled its split, run 46)."""
    cfg = _hopper_config_for(monkeypatch)
    table = configs.TABLE[(9, 0)]
    try:
        for causal in (False, True):
            assert cfg("dq", 192, causal, 4096) == configs.KernelConfig(128, 64, 8, 2)
            for d in (160, 256):
                assert cfg("dq", d, causal, 4096) == table["dq"][(256, causal)]
            for seqlen in (512, 513):  # (shorter full calls: SHORT_KEYS_TABLE)
                assert cfg("fwd", 96, causal, seqlen) == table["fwd"][(128, causal)]
            assert cfg("fwd", 128, causal, 512) == table["fwd"][(128, causal)]
            with configs.override(head_parts=False):  # one padded 256-wide tile: the bucket's
                assert cfg("dq", 192, causal, 4096) == table["dq"][(256, causal)]
    finally:
        configs.fit_shared_memory.cache_clear()


def test_short_keys_entries_take_only_the_calls_they_were_measured_on(monkeypatch):
    """``SHORT_KEYS_TABLE`` (runs 49 and 56): the full forward of one 128-wide head tile (d=80
    to 128; d=96 no longer splits) takes the short-document tile, K and V through TMA
    descriptors, up to 256 keys and the bucket's beyond; causal calls, other buckets, the
    split d=192 and the backward kernels keep theirs at every length, and so does a call with
    dropout. RINGFLASH_FWD_KV_TMA=0 takes the pointer loads' tile for the same calls only."""
    cfg = _hopper_config_for(monkeypatch)
    table = configs.TABLE[(9, 0)]
    monkeypatch.delenv("RINGFLASH_FWD_KV_TMA", raising=False)
    for setting, short in ((None, configs.KernelConfig(128, 64, 4, 2, kv_tma=True)),
                           ("1", configs.KernelConfig(128, 64, 4, 2, kv_tma=True)),
                           ("0", configs.KernelConfig(128, 32, 4, 3, split_phases=False))):
        if setting is not None:
            monkeypatch.setenv("RINGFLASH_FWD_KV_TMA", setting)
        try:
            for d in (80, 96, 112, 128):
                for seqlen in (1, 200, 256):
                    assert cfg("fwd", d, False, seqlen) == short
                assert cfg("fwd", d, False, 257) == table["fwd"][(128, False)]
                assert cfg("fwd", d, True, 256) == table["fwd"][(128, True)]
            assert cfg("fwd", 64, False, 256) == table["fwd"][(64, False)]
            assert cfg("fwd", 192, False, 256) == table["fwd"][(256, False)]
            for kind in ("dkdv", "dq"):
                assert cfg(kind, 128, False, 256) == table[kind][(128, False)]
            assert cfg("fwd", 128, False, 256, dropout=True) == table["fwd"][(128, False)]  # measured without
        finally:
            configs.fit_shared_memory.cache_clear()


def test_softcap_mode_takes_the_tanh_instruction_for_16_bit_inputs_on_the_gpu(monkeypatch):
    """fp16/bf16 on a GPU: the tanh instruction; fp32 (held to float32 rounding) and the
    interpreter (no inline assembly): the exact tanh; no softcap: off."""
    import torch

    from ringflash.kernels import common
    monkeypatch.setattr(common, "interpreting", lambda: False)
    assert common.softcap_mode(0.0, torch.bfloat16) == common.SOFTCAP_OFF.value == 0
    for dtype in (torch.float16, torch.bfloat16):
        assert common.softcap_mode(30.0, dtype) == common.SOFTCAP_APPROX.value
    assert common.softcap_mode(30.0, torch.float32) == common.SOFTCAP_EXACT.value
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm: no PTX
    assert common.softcap_mode(30.0, torch.float16) == common.SOFTCAP_EXACT.value
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(common, "interpreting", lambda: True)
    assert common.softcap_mode(30.0, torch.float16) == common.SOFTCAP_EXACT.value


def test_atomic_backward_takes_its_own_dkdv_tiles(monkeypatch):
    """The portable 5-GEMM backward's dK/dV kernel takes ``ATOMIC_DQ_TABLE``'s tiles on
    sm_90 for every head dim of a listed bucket (run 52: the deterministic kernel's tiles
    spilled 568-1072 bytes there and ran 0.21-0.38x), over dropout's; other keys, and the
    deterministic backward, keep the tables."""
    cfg = _hopper_config_for(monkeypatch)
    try:
        listed = configs.ATOMIC_DQ_TABLE[(9, 0)]
        assert listed, "ATOMIC_DQ_TABLE lists no sm_90 entry"
        for headdim in (40, 48, 64, 72, 112, 128):
            for causal in (False, True):
                entry = listed.get((configs.headdim_bucket(headdim), causal))
                plain = cfg("dkdv", headdim, causal, 4096)
                atomic = cfg("dkdv", headdim, causal, 4096, atomic_dq=True)
                if entry is None:
                    assert atomic == plain, (headdim, causal)
                else:
                    assert atomic == configs.fit_shared_memory("dkdv", entry, sum(configs.head_parts(headdim)), 2, 0)
                    assert atomic != plain and atomic.num_warps == 8, (headdim, causal, atomic)
                    assert cfg("dkdv", headdim, causal, 4096, dropout=True, atomic_dq=True) == atomic
                # The other kernels take no atomic entry.
                assert cfg("fwd", headdim, causal, 4096, atomic_dq=True) == cfg("fwd", headdim, causal, 4096)
    finally:
        configs.fit_shared_memory.cache_clear()

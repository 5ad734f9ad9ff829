"""The Gluon Hopper forward's host side on any machine: which calls the dispatcher sends it
(``RINGFLASH_BACKEND``), and that everything outside its scope stays on the portable
kernels. Its numerics are checked on the GPU (test_gpu_attention.py::test_sm90_forward); its
compilation for sm_90 in test_compile_sm90.py."""

import pytest
import torch

from conftest import HAS_CUDA
from ringflash.kernels import dispatch, sm90
from ringflash.kernels.problem import make_problem

# test_plans_launch_what_a_fresh_plan_would stubs out the planned launches only: the one
# left (the dropout keys) needs its tensors on the GPU of a GPU machine (run 49).
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def test_backend_names(monkeypatch):
    monkeypatch.setenv("RINGFLASH_BACKEND", "gluon")
    with pytest.raises(ValueError, match=r"RINGFLASH_BACKEND: got 'gluon'; expected portable, sm90 or unset"):
        dispatch.backend()
    for name in ("portable", "sm90"):
        monkeypatch.setenv("RINGFLASH_BACKEND", name)
        assert dispatch.backend() == name
    monkeypatch.delenv("RINGFLASH_BACKEND")
    assert dispatch.backend() == ""


def _problem(q, k, causal=True, window=(-1, -1), softcap=0.0, scale=None):
    return make_problem(q, k, None, q.shape[1], k.shape[1], scale or q.shape[-1] ** -0.5, causal, *window, softcap)


class _OnHopper:
    """A stand-in for a CUDA tensor on an sm_90 GPU (``supports`` reads only metadata)."""

    def __init__(self, t):
        self.t = t
        self.device = torch.device("cuda", 0)
        self.dtype, self.shape = t.dtype, t.shape

    def __getattr__(self, name):
        return getattr(self.t, name)


@pytest.fixture
def on_hopper(monkeypatch):
    if not sm90.AVAILABLE:
        pytest.skip("this Triton has no Gluon Hopper module")
    monkeypatch.setattr(sm90.configs, "_capability", lambda device: (9, 0))


def test_scope(on_hopper):
    q = torch.zeros(2, 100, 8, 128, dtype=torch.bfloat16)
    k = torch.zeros(2, 300, 2, 128, dtype=torch.bfloat16)
    wrap = _OnHopper
    supported = lambda q, k, v, prob, **kw: sm90.supports(wrap(q), wrap(k), wrap(v), prob,  # noqa: E731
                                                           kw.get("meta"), kw.get("alibi"), kw.get("dropout"))
    assert supported(q, k, k, _problem(q, k))
    assert supported(q, k, k, _problem(q, k, causal=False))
    # Outside the scope: each falls back to the portable forward.
    assert not supported(q, k, k, _problem(q, k, causal=False, window=(64, 64)))
    assert supported(q, k, k, _problem(q, k, softcap=30.0))  # the GPU's tanh, as the portable kernels'
    assert not supported(q, k, k, _problem(q, k, scale=-0.1))
    assert not supported(q, k, k, _problem(q, k), alibi=torch.zeros(8))
    assert supported(q, k, k, _problem(q, k), dropout=(0.1, 0))  # the portable kernels' mask
    assert supported(q, k, k, _problem(q, k), dropout=(1 - 2.0**-8, 0))  # threshold 255
    # A probability that rounds to threshold 256 (drop all) does not fit the assembly's bytes.
    assert not supported(q, k, k, _problem(q, k), dropout=(1 - 2.0**-10, 0))
    # Head dims 40..128 in steps of 8 (padded tiles); others stay portable.
    for d, want in ((96, True), (80, True), (40, True), (36, False), (32, False)):
        qd, kd = torch.zeros(2, 100, 8, d, dtype=torch.bfloat16), torch.zeros(2, 300, 2, d, dtype=torch.bfloat16)
        assert supported(qd, kd, kd, _problem(qd, kd)) == want, d
    # d = 136..256 on 256-column tiles (the backward's dK/dV: SPLIT_D), without dropout or
    # softcap.
    for d, want in ((136, True), (192, True), (256, True), (264, False), (128, True)):
        qd, kd = torch.zeros(2, 100, 8, d, dtype=torch.bfloat16), torch.zeros(2, 300, 2, d, dtype=torch.bfloat16)
        assert supported(qd, kd, kd, _problem(qd, kd)) == want, d
        if d > 128:
            assert not supported(qd, kd, kd, _problem(qd, kd), dropout=(0.1, 0)), d
            assert not supported(qd, kd, kd, _problem(qd, kd, softcap=30.0)), d
            # Taken by the default backend only at the measured head dims (192 and 256, from
            # 512 query rows: test_preferred_where_measured_faster), not at 100 rows.
            for kind in ("fwd", "bwd"):
                assert not sm90.preferred(_problem(qd, kd), None, kind), d
    q32, k32 = q.float(), k.float()
    assert not supported(q32, k32, k32, _problem(q32, k32))
    # Grid axes 1 and 2 (heads, batch) stop at 65535: the portable kernels handle more.
    many = torch.zeros(65536, 4, 1, 64, dtype=torch.bfloat16)
    assert not supported(many, many, many, _problem(many, many))
    assert supported(many[:65535], many[:65535], many[:65535], _problem(many[:65535], many[:65535]))
    # A broadcast (stride 0) dimension: TMA does not take it.
    expanded = torch.zeros(1, 100, 1, 64, dtype=torch.bfloat16).expand(2, 100, 8, 64)
    assert not supported(expanded, k[..., :64], k[..., :64], _problem(expanded, k[..., :64]))
    # TMA needs 16-byte strides: a token stride of 8 heads x 100 columns (200 bytes) is not.
    odd = torch.zeros(2, 100, 8, 100, dtype=torch.bfloat16)[..., :64]
    assert not supported(odd, k[..., :64], k[..., :64], _problem(odd, k[..., :64]))


def test_varlen_scope(on_hopper, monkeypatch):
    """Plain varlen calls are in scope under RINGFLASH_SM90_VARLEN=1 only (run 47's fault);
    grouped, context-parallel (explicit diagonals) and seqused_k metadata are not; none are
    preferred until measured."""
    from ringflash.kernels.problem import SeqMeta

    cu = torch.tensor([0, 100, 250], dtype=torch.int32)
    q, k = torch.zeros(250, 8, 128, dtype=torch.bfloat16), torch.zeros(250, 2, 128, dtype=torch.bfloat16)
    wrap = _OnHopper
    plain = SeqMeta.from_cu_seqlens(cu, cu)
    plain_prob = make_problem(q, k, plain, 150, 150, 0.1, True, -1, -1, 0.0)
    for value in (None, "0"):
        if value is None:
            monkeypatch.delenv("RINGFLASH_SM90_VARLEN", raising=False)
        else:
            monkeypatch.setenv("RINGFLASH_SM90_VARLEN", value)
        assert not sm90.supports(wrap(q), wrap(k), wrap(k), plain_prob, plain, None, None), value
    monkeypatch.setenv("RINGFLASH_SM90_VARLEN", "yes")
    with pytest.raises(ValueError, match=r"RINGFLASH_SM90_VARLEN: got 'yes'; expected 0 or 1"):
        sm90.supports(wrap(q), wrap(k), wrap(k), plain_prob, plain, None, None)
    monkeypatch.setenv("RINGFLASH_SM90_VARLEN", "1")
    for meta, want in ((SeqMeta.from_cu_seqlens(cu, cu), True),
                       (SeqMeta.from_cu_seqlens(cu, cu, torch.tensor([90, 150], dtype=torch.int32)), False)):
        prob = make_problem(q, k, meta, 150, 150, 0.1, True, -1, -1, 0.0)
        assert sm90.supports(wrap(q), wrap(k), wrap(k), prob, meta, None, None) == want
        assert not sm90.preferred(prob)
    # A grid whose descriptors' scratch would pass 256 MB: 64 query blocks x 8 heads x 4096
    # sequences x 256 bytes.
    # (The packed tensors must hold 8192 rows: a longer max_seqlen is clamped to them.)
    many = torch.arange(0, 4097, dtype=torch.int32)
    many_meta = SeqMeta.from_cu_seqlens(many, many)
    q_big, k_big = q.new_zeros(8192, 8, 128), k.new_zeros(8192, 2, 128)
    many_prob = make_problem(q_big, k_big, many_meta, 8192, 8192, 0.1, True, -1, -1, 0.0)
    assert not sm90.supports(wrap(q_big), wrap(k_big), wrap(k_big), many_prob, many_meta, None, None)
    import dataclasses

    meta = dataclasses.replace(SeqMeta.from_cu_seqlens(cu, cu), diag=torch.zeros(1, 2, dtype=torch.int32))
    prob = make_problem(q, k, meta, 150, 150, 0.1, True, -1, -1, 0.0)
    assert not sm90.supports(wrap(q), wrap(k), wrap(k), prob, meta, None, None)


def test_not_on_other_gpus(monkeypatch):
    if not sm90.AVAILABLE:
        pytest.skip("this Triton has no Gluon Hopper module")
    monkeypatch.setattr(sm90.configs, "_capability", lambda device: (10, 0))
    q = torch.zeros(1, 64, 2, 64, dtype=torch.float16)
    assert not sm90.supports(_OnHopper(q), _OnHopper(q), _OnHopper(q), _problem(q, q), None, None, None)


def test_cpu_calls_stay_portable(monkeypatch):
    """On the CPU (the interpreter) RINGFLASH_BACKEND=sm90 changes nothing."""
    monkeypatch.setenv("RINGFLASH_BACKEND", "sm90")
    q = torch.randn(1, 40, 2, 64, dtype=torch.float16)
    assert not sm90.supports(q, q, q, _problem(q, q), None, None, None)


def test_preferred_where_measured_faster():
    """The default backend takes the sm90 forward and backward from the measured seqlen
    thresholds on, and not inside a configs.override block naming the portable kernel's
    tiles (fwd= for the forward, dkdv=/dq= for the backward)."""
    from ringflash.kernels import configs

    # Head dims not measured take the next measured one's threshold (the same or a wider tile).
    for d, threshold in ((40, 4096), (56, 4096), (72, 512), (120, 512), (136, 512), (200, 512), (248, 512)):
        assert configs.sm90_min_seqlen_q(d) == threshold, d
        short, long_ = (torch.zeros(1, n, 2, d, dtype=torch.bfloat16) for n in (threshold - 1, threshold))
        assert not sm90.preferred(_problem(short, short)) and sm90.preferred(_problem(long_, long_)), d
    unmeasured = torch.zeros(1, 1 << 15, 2, 112, dtype=torch.bfloat16)  # dropout: measured at d=128 only
    measured = torch.zeros(1, 1 << 15, 2, 128, dtype=torch.bfloat16)
    assert sm90.preferred(_problem(measured, measured))
    assert sm90.preferred(_problem(measured, measured), dropout=(0.1, 3))  # dropout measured at d=128
    assert not sm90.preferred(_problem(unmeasured, unmeasured), dropout=(0.1, 3))
    # Softcap: where configs.SM90_SOFTCAP says it measured faster (run 45), as without it.
    for kind in ("fwd", "bwd"):
        assert sm90.preferred(_problem(measured, measured, softcap=30.0), kind=kind) == configs.SM90_SOFTCAP
    for d, threshold in configs.SM90_MIN_SEQLEN_Q.items():
        short, long_ = (torch.zeros(1, n, 2, d, dtype=torch.bfloat16) for n in (threshold - 1, threshold))
        for kind in ("fwd", "bwd"):
            assert not sm90.preferred(_problem(short, short), kind=kind)
            assert sm90.preferred(_problem(long_, long_), kind=kind)
        with configs.override(fwd=configs.KernelConfig(64, 64, 4, 2)):
            assert not sm90.preferred(_problem(long_, long_))
            assert sm90.preferred(_problem(long_, long_), kind="bwd")
        for portable_bwd in ({"dkdv": configs.KernelConfig(64, 64, 4, 2)}, {"dq": configs.KernelConfig(64, 64, 4, 2)}):
            with configs.override(**portable_bwd):
                assert sm90.preferred(_problem(long_, long_))
                assert not sm90.preferred(_problem(long_, long_), kind="bwd")
        with configs.override(sm90_fwd=configs.KernelConfig(128, 64, 4, 2)):
            assert sm90.preferred(_problem(long_, long_))
            assert configs.sm90_forward_config(d, True) == configs.KernelConfig(128, 64, 4, 2)
    # every measured head dim runs on a tile width with a forward config
    assert {sm90._block_d(d) for d in configs.SM90_MIN_SEQLEN_Q} <= {d for d, _ in configs.SM90_FORWARD}
    assert {d for d, _ in configs.SM90_FORWARD} == {sm90._block_d(d) for d in (64, 128, 256)}


def test_variant_names():
    q = torch.zeros(1, 8, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"variant: got 'ws'; expected one of"):
        sm90.attention_forward_sm90(q, q, q, _problem(q, q), variant="ws")


def test_backward_routing(monkeypatch):
    """The Gluon backward (deterministic or atomic) with RINGFLASH_BACKEND=sm90 wherever the
    scope test passes, plain varlen included; under the default backend only where
    ``preferred`` (not this 8-row call, nor varlen), and never with =portable."""
    taken = []
    monkeypatch.setattr(sm90, "supports", lambda *a: True)
    monkeypatch.setattr(sm90, "attention_backward_sm90", lambda *a, **k: taken.append("sm90") or "sm90")
    monkeypatch.setattr(dispatch, "attention_backward", lambda *a, **k: taken.append("portable") or "portable")
    q = torch.zeros(1, 8, 2, 64, dtype=torch.bfloat16)
    args = (q, q, q, q, q, torch.zeros(1, 2, 8), _problem(q, q))
    for env, atomic, want in (("sm90", False, "sm90"), ("sm90", True, "sm90"), ("", False, "portable"),
                              ("", True, "portable"), ("portable", False, "portable")):
        monkeypatch.setenv("RINGFLASH_BACKEND", env)
        taken.clear()
        assert dispatch.backward(*args, atomic_dq=atomic) == want and taken == [want], (env, atomic)
    monkeypatch.setenv("RINGFLASH_BACKEND", "sm90")
    from ringflash.kernels.problem import SeqMeta

    cu = torch.tensor([0, 8], dtype=torch.int32)
    assert dispatch.backward(*args[:-1], args[-1], SeqMeta.from_cu_seqlens(cu, cu)) == "sm90"  # varlen
    monkeypatch.setenv("RINGFLASH_BACKEND", "")
    long_q = torch.zeros(1, 4096, 2, 64, dtype=torch.bfloat16)
    varlen_prob = make_problem(long_q[0], long_q[0], SeqMeta.from_cu_seqlens(cu, cu), 4096, 4096, 0.1, True, -1, -1,
                               0.0)
    assert varlen_prob.is_varlen  # long enough for the dense threshold, but varlen: portable
    assert dispatch.backward(*args[:-1], varlen_prob, SeqMeta.from_cu_seqlens(cu, cu)) == "portable"
    monkeypatch.setenv("RINGFLASH_BACKEND", "sm90")
    monkeypatch.setattr(sm90, "supports", lambda *a: False)
    assert dispatch.backward(*args) == "portable"


def test_failure_falls_back_under_the_default_backend(monkeypatch):
    """A Gluon kernel that raises (a Triton it does not suit) turns the family off with a
    warning under the default backend, and the portable kernels answer; with
    RINGFLASH_BACKEND=sm90 the error propagates."""
    monkeypatch.setattr(sm90, "disabled_reason", None)

    def broken(*args):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setenv("RINGFLASH_BACKEND", "sm90")
    with pytest.raises(RuntimeError, match="PassManager"):
        sm90.run_or_disable(broken)
    assert sm90.disabled_reason is None
    monkeypatch.delenv("RINGFLASH_BACKEND")
    with pytest.warns(RuntimeWarning, match=r"Gluon sm_90 kernels failed \(RuntimeError: PassManager::run failed\)"):
        assert sm90.run_or_disable(broken) is None
    assert sm90.disabled_reason.startswith("RuntimeError")
    # Off for the rest of the process: supports() says no before anything else.
    q = torch.zeros(1, 8, 2, 64, dtype=torch.bfloat16)
    assert not sm90.supports(_OnHopper(q), _OnHopper(q), _OnHopper(q), _problem(q, q), None, None, None)


def test_triton_version_gate():
    import triton

    version = tuple(int(x) for x in triton.__version__.split(".")[:2])
    assert sm90.AVAILABLE == (version >= sm90.MIN_TRITON and sm90.gluon is not None)


def test_dropout_keys_rebuild_the_portable_mask():
    """The Gluon kernels draw dropout's mask from the Philox words of ``dropout_keys``
    (``sm90._dropout_factor``); that formula, written here in torch, gives the
    portable kernels' mask (``dropout_keep_mask``, the S_dmask kernel) bit for bit: seeds
    past 32 bits, rows and keys past 16 (the pairs), off the tiles."""
    from ringflash.kernels.dropout_mask import dropout_keep_mask, dropout_keys
    from ringflash.kernels.problem import dropout_threshold

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m32 = 0xFFFFFFFF

    def word(pos, key, multiplier):
        x = (pos * multiplier + key) & m32
        return x ^ (x >> 16)

    for seed, p, rows, cols in ((0, 0.3, 37, 70), (11, 0.1, 5, 33), (2**40 + 3, 0.5, 64, 130), (7, 0.75, 40, 48)):
        keys = dropout_keys(2, 3, seed, device).cpu().to(torch.int64) & m32
        i, j = torch.arange(rows), torch.arange(cols)
        query_words = word((i // 16) * 8 + i % 8, keys[..., 0, None], 0x9E3779B1)  # (b, h, rows)
        key_words = word((j // 16) * 8 + j % 8, keys[..., 1, None], 0x85EBCA6B)  # (b, h, cols)
        x = query_words[..., :, None] ^ key_words[..., None, :]
        x = (x * 0x9E3779B1) & m32
        x ^= x >> 15
        x = (x * 0x85EBCA77) & m32
        x ^= x >> 16
        byte = 2 * (i % 16 >= 8)[:, None] + (j % 16 >= 8)[None, :]
        bits = (x >> (8 * byte)) & 0xFF
        want = dropout_keep_mask(2, 3, rows, cols, p, seed, device).cpu()
        assert torch.equal(bits >= dropout_threshold(p), want), seed


def _run_dropout_asm(asm: str, operands: list) -> list:
    """The eight outputs ($0-$7) of ``sm90._dropout_asm``'s PTX on its 32 input operands
    ($8-$39): an interpreter for the few instructions it uses (a new one fails the test)."""
    m32 = 0xFFFFFFFF
    regs = {f"${8 + i}": v & m32 for i, v in enumerate(operands)}
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *src = [a.strip() for a in rest.split(",")]
        val = lambda a: regs[a] if a in regs else int(a, 0) & m32  # noqa: E731
        if op == "xor.b32":
            regs[dst] = val(src[0]) ^ val(src[1])
        elif op == "and.b32":
            regs[dst] = val(src[0]) & val(src[1])
        elif op == "or.b32":
            regs[dst] = val(src[0]) | val(src[1])
        elif op == "sub.u32":
            regs[dst] = (val(src[0]) - val(src[1])) & m32
        elif op == "mul.lo.s32":
            regs[dst] = val(src[0]) * val(src[1]) & m32
        elif op == "shr.b32":
            regs[dst] = val(src[0]) >> int(src[1])
        elif op == "lop3.b32":  # bit i: table[a_i << 2 | b_i << 1 | c_i]
            a, b, c, table = val(src[0]), val(src[1]), val(src[2]), int(src[3], 0)
            regs[dst] = sum(((table >> ((a >> i & 1) << 2 | (b >> i & 1) << 1 | (c >> i & 1))) & 1) << i
                            for i in range(32))
        elif op == "prmt.b32":  # default mode: selector nibble k picks byte k of {b, a}; bit 3 spreads its sign
            data, selector = val(src[0]) | val(src[1]) << 32, int(src[2], 0)
            out = 0
            for k in range(4):
                nibble = selector >> (4 * k) & 0xF
                byte = data >> (8 * (nibble & 7)) & 0xFF
                out |= (0xFF if byte & 0x80 else 0) << (8 * k) if nibble & 8 else byte << (8 * k)
            regs[dst] = out
        else:
            raise AssertionError(f"unknown instruction {op}")
    return [regs[f"${i}"] for i in range(8)]


@pytest.mark.parametrize("p", [0.3, 0.75, 2.0**-8, 255 / 256], ids=["p0.3", "p0.75", "t1", "t255"])
@pytest.mark.parametrize("key_major", [False, True])
def test_dropout_assembly_sets_the_portable_mask(key_major, p):
    """``sm90._dropout_factor``'s assembly, run here on the registers of an m64nNk16 wgmma
    accumulator (thread t of warp w, register r: row 16 w + (t // 4) + 8 ((r // 2) % 2),
    column 8 (r // 4) + 2 (t % 4) + r % 2), eight at a time as ``pack=8`` hands them over,
    gives the portable kernels' mask entry for entry: queries as rows for the forward and
    dQ tiles, keys as rows for the dK/dV ones. (That the registers arrive in this order is
    the GPU test ``test_sm90_dropout_matches_its_mask``'s to show.)"""
    from ringflash.kernels.dropout_mask import dropout_keep_mask, dropout_keys
    from ringflash.kernels.problem import dropout_threshold

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m32, seed = 0xFFFFFFFF, 2**33 + 5
    queries, keys_n = 192, 256
    want = dropout_keep_mask(1, 1, queries, keys_n, p, seed, device)[0, 0].cpu()
    key_r, key_c = (int(x) & m32 for x in dropout_keys(1, 1, seed, device).cpu().view(-1)[:2])

    def word(pos, key, multiplier):
        x = (pos * multiplier + key) & m32
        return x ^ (x >> 16)

    asm = (sm90._DROPOUT_ASM_KEY_MAJOR if key_major else sm90._DROPOUT_ASM_QUERY_MAJOR).value
    kept = 0x3F800000  # 1.0f, in every entry but the group's last (its own value: a probability)
    threshold_bytes = dropout_threshold(p) * 0x01010101
    rows, cols, row0, col0 = (64, 64, 128, 64) if key_major else (64, 128, 128, 128)  # tiles off the origin
    seen = 0
    for thread in range(128):
        warp, lane = divmod(thread, 32)
        for group in range(rows * cols // 128 // 8):
            entries = []
            for r in range(8 * group, 8 * group + 8):
                row = row0 + 16 * warp + lane // 4 + 8 * ((r // 2) % 2)
                col = col0 + 8 * (r // 4) + 2 * (lane % 4) + r % 2
                entries.append((col, row) if key_major else (row, col))  # (query, key)
            values = [kept] * 7 + [0x3E99999A]  # 0.3f: entries keep their own operand
            operands = ([word((q // 16) * 8 + q % 8, key_r, 0x9E3779B1) for q, _ in entries]
                        + [word((k // 16) * 8 + k % 8, key_c, 0x85EBCA6B) for _, k in entries]
                        + [threshold_bytes] * 8 + values)
            got = _run_dropout_asm(asm, operands)
            for (q, k), value, factor in zip(entries, values, got):
                assert factor in (0, value)
                assert (factor == value) == bool(want[q, k]), (q, k)
                seen += 1
    assert seen == rows * cols


def test_recording_families():
    """``dispatch.recording_families`` names the family of each call (benchmarks report it)."""
    from ringflash import flash_attn_func

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the suite runs on GPU machines too
    q = torch.randn(1, 40, 2, 16, device=device, requires_grad=True)
    with dispatch.recording_families() as log:
        flash_attn_func(q, q, q, causal=True).sum().backward()
    assert log == [("fwd", "portable"), ("bwd", "portable")]
    flash_attn_func(q, q, q)  # outside the block: not recorded
    assert len(log) == 2


def test_dropout_preference():
    """The Gluon kernels draw dropout's mask in inline PTX (HAS_DROPOUT 2), and the default
    backend takes them with dropout only at the measured head dims
    (``configs.SM90_DROPOUT_HEADDIMS``), from the same seqlen as without."""
    from ringflash.kernels import configs

    assert sm90._dropout_mode(None) == 0 and sm90._dropout_mode((0.1, 0)) == 2
    for d in configs.SM90_MIN_SEQLEN_Q:
        x = torch.zeros(1, 1 << 13, 2, d, dtype=torch.bfloat16)
        for kind in ("fwd", "bwd"):
            assert sm90.preferred(_problem(x, x), (0.1, 3), kind) == (d in configs.SM90_DROPOUT_HEADDIMS)


def test_scratch_allocator_is_registered_once(monkeypatch):
    """The varlen forward's device-made descriptors need Triton's scratch allocator: ours is
    registered where none is, and a caller's own is left in place."""
    import triton
    from triton.runtime import _allocation

    fresh = type(_allocation._allocator)("test", default=_allocation._NULL_ALLOCATOR)
    monkeypatch.setattr(_allocation, "_allocator", fresh)
    sm90._ensure_scratch_allocator()
    assert _allocation._allocator.get() is sm90._scratch

    def theirs(size, alignment, stream):
        raise AssertionError("not called here")

    triton.set_allocator(theirs)
    sm90._ensure_scratch_allocator()
    assert _allocation._allocator.get() is theirs


def test_dkdv_head_splits_fill_the_gpu(monkeypatch):
    """The Gluon dK/dV kernel splits a GQA group's query heads across programs only where
    the launch has fewer than two programs per SM, by the smallest divisor of the group
    that reaches two (the whole group where none does); never for MHA or off the GPU; an
    override must divide the group."""
    from ringflash.kernels import configs

    monkeypatch.setattr(configs, "sm_count", lambda device: 132)
    gpu = torch.device("cuda", 0)
    assert configs.sm90_dkdv_head_splits(128, 4, gpu) == 4  # Llama 16/4 at 4k, batch 1: 128 programs
    assert configs.sm90_dkdv_head_splits(132, 4, gpu) == 2
    assert configs.sm90_dkdv_head_splits(264, 4, gpu) == 1
    assert configs.sm90_dkdv_head_splits(64, 4, gpu) == 4  # none reaches two per SM: the whole group
    assert configs.sm90_dkdv_head_splits(100, 6, gpu) == 3
    assert configs.sm90_dkdv_head_splits(16, 1, gpu) == 1  # MHA: nothing to split
    assert configs.sm90_dkdv_head_splits(16, 4, torch.device("cpu")) == 1
    with configs.override(sm90_head_splits=2):
        assert configs.sm90_dkdv_head_splits(10_000, 4, gpu) == 2
        with pytest.raises(ValueError, match="sm90_head_splits: got 2; expected a divisor of the group size 3"):
            configs.sm90_dkdv_head_splits(10, 3, gpu)


def test_heads_first_order_for_small_causal_launches():
    """The Gluon kernels order a causal launch block by block across heads and sequences
    only while the tensors their programs stream in common fit SM90_HEADS_FIRST_MAX_BYTES
    (L2 keeps them whatever the order); full masks and larger problems keep the
    head-by-head order, and the block count must fit grid axis 2."""
    from ringflash.kernels import configs

    def kv_bytes(b, s, hk, d):
        one = torch.zeros(1, 1, 1, 1, dtype=torch.bfloat16)  # only the sizes are read
        return sm90._streamed_bytes(one.expand(b, s, hk, d), one.expand(b, s, hk, d))

    seed004, llama_step, wide = kv_bytes(4, 8192, 1, 64), kv_bytes(1, 4096, 4, 128), kv_bytes(16, 4096, 16, 128)
    assert seed004 == llama_step == 8 << 20 and wide == 512 << 20
    assert configs.sm90_heads_first(True, seed004, 64) and configs.sm90_heads_first(True, llama_step, 32)
    assert not configs.sm90_heads_first(True, wide, 32)
    assert not configs.sm90_heads_first(False, seed004, 64)
    assert not configs.sm90_heads_first(True, seed004, configs.MAX_GRID_YZ + 1)
    with configs.override(sm90_heads_first=False):  # the probes' A/B
        assert not configs.sm90_heads_first(True, seed004, 64)


def _record_planned_launches(monkeypatch) -> list:
    """Every ``PlannedLaunch`` becomes a record of its launch (nothing runs): (kernel, grid,
    arguments as geometry and values, constexprs). A descriptor must describe the tensor
    it is launched over (the template's shape and strides are that tensor's)."""
    from ringflash.kernels import launch as L

    launches = []

    def describe(a):
        if isinstance(a, torch.Tensor):
            return ("tensor", tuple(a.shape), a.stride(), a.dtype)
        if isinstance(a, sm90.TensorDescriptor):
            assert list(a.shape) == list(a.base.shape) and list(a.strides) == list(a.base.stride()), \
                "a descriptor's template does not describe its tensor"
            return ("descriptor", tuple(a.shape), tuple(a.strides), tuple(a.block_shape), a.base.dtype)
        return a

    def record(site, grid, args):
        launches.append((site.kernel, tuple(grid), tuple(describe(a) for a in args), tuple(site.constexprs.items())))

    monkeypatch.setattr(L.PlannedLaunch, "__call__", record)
    return launches


def test_plans_launch_what_a_fresh_plan_would(monkeypatch):
    """The Gluon launchers work each call signature's launches out once (``_PLANS``): a
    call that reuses a plan made by an earlier one launches exactly what a plan made for
    it alone would, across lengths on and off Triton's integer classes, GQA, transposed
    layouts, full and causal masks, dropout probabilities, an override context, a head
    split and varlen metadata."""
    from ringflash.kernels import configs
    from ringflash.kernels import launch as L
    from ringflash.kernels.problem import SeqMeta

    if not sm90.AVAILABLE:
        pytest.skip("this Triton has no Gluon Hopper module")
    launches = _record_planned_launches(monkeypatch)
    gen = torch.Generator().manual_seed(3)

    def dense(b, sq, sk, h, hk, d, transposed=False):
        def make(s, heads):
            x = torch.randn((b, heads, s, d) if transposed else (b, s, heads, d), generator=gen, dtype=torch.float16)
            x = x.to(DEVICE)
            return x.transpose(1, 2) if transposed else x
        return make(sq, h), make(sk, hk), make(sk, hk)

    cases = []
    for shapes in [(1, 64, 64, 4, 4, 64), (1, 77, 64, 4, 4, 64), (2, 77, 93, 4, 2, 128), (2, 77, 93, 4, 2, 80)]:
        for transposed in (False, True):
            for causal in (False, True):
                cases.append((dense(*shapes, transposed=transposed), causal, None, {}, None))
    q, k, v = dense(2, 77, 93, 4, 2, 128)
    q_t, k_t, v_t = dense(2, 77, 93, 4, 2, 128, transposed=True)
    cases += [((q_t, k, v), True, None, {}, None), ((q, k_t, v), True, None, {}, None), ((q, k, v_t), True, None, {}, None)]
    cases += [((q, k, v), True, (0.1, 5), {}, None), ((q, k, v), True, (0.25, 9), {}, None),
              ((q, k, v), True, None, dict(sm90_head_splits=2), None),
              ((q, k, v), True, None, dict(sm90_fwd=configs.KernelConfig(64, 64, 4, 2)), None)]
    cu = torch.tensor([0, 30, 30, 77], dtype=torch.int32, device=DEVICE)
    meta = SeqMeta.from_cu_seqlens(cu, cu)
    cases.append(((q[0], k[0, :77], v[0, :77]), True, None, {}, meta))

    def run(case):
        (q, k, v), causal, dropout, forced, meta = case
        if meta is None:
            prob = make_problem(q, k, None, q.shape[1], k.shape[1], q.shape[-1] ** -0.5, causal, -1, -1, 0.0)
        else:
            prob = make_problem(q, k, meta, 77, 77, q.shape[-1] ** -0.5, causal, -1, -1, 0.0)
        start = len(launches)
        with configs.override(**forced):
            out, lse = sm90.attention_forward_sm90(q, k, v, prob, dropout=dropout, meta=meta)
            sm90.attention_backward_sm90(torch.randn_like(q), q, k, v, out, lse, prob,
                                         dropout=dropout, meta=meta)
        return launches[start:]

    fresh = []
    for case in cases:
        L.clear()  # every plan table
        fresh.append(run(case))
    L.clear()
    for _ in range(2):  # plans made by earlier cases, then all of them reused
        for case, want in zip(cases, fresh):
            assert run(case) == want
    from ringflash.kernels import bwd
    assert [launch[0] for launch in fresh[0]] == [sm90._fwd_sm90_kernel, bwd._bwd_preprocess_kernel,
                                                  sm90._bwd_dkdv_sm90_kernel, sm90._bwd_dq_sm90_kernel]


def test_dkdv_row_statistics_by_tma_only_where_each_head_starts_aligned(monkeypatch):
    """The dK/dV kernel's loader brings lse2 and delta by TMA (STATS_TMA) only where every
    (sequence, head)'s rows start 16 bytes apart: dense calls whose seqlen_q is a multiple
    of 4. Run 54 (H100): seqlen_q = 3001 under TMA gave an illegal instruction; varlen
    sequences start anywhere. The others read them by pointer, through the same launch."""
    from ringflash.kernels.problem import SeqMeta

    if not sm90.AVAILABLE:
        pytest.skip("this Triton has no Gluon Hopper module")
    launches = _record_planned_launches(monkeypatch)
    gen = torch.Generator().manual_seed(5)

    def stats_tma(sq, meta=None):
        q = torch.randn(2, sq, 4, 64, generator=gen, dtype=torch.float16).to(DEVICE)
        k = torch.randn(2, 96, 2, 64, generator=gen, dtype=torch.float16).to(DEVICE)
        v = torch.randn_like(k)
        if meta is not None:
            q, k, v = q[0], k[0, :sq], v[0, :sq]
            prob = make_problem(q, k, meta, sq, sq, 0.125, True, -1, -1, 0.0)
        else:
            prob = make_problem(q, k, None, sq, 96, 0.125, True, -1, -1, 0.0)
        start = len(launches)
        out, lse = sm90.attention_forward_sm90(q, k, v, prob, meta=meta)
        sm90.attention_backward_sm90(torch.randn_like(q), q, k, v, out, lse, prob, meta=meta)
        (dkdv,) = [launch for launch in launches[start:] if launch[0] is sm90._bwd_dkdv_sm90_kernel]
        return dict(dkdv[3])["STATS_TMA"]

    assert stats_tma(64) and stats_tma(1000)
    assert not stats_tma(77) and not stats_tma(3001)
    cu = torch.tensor([0, 32, 64], dtype=torch.int32, device=DEVICE)
    assert not stats_tma(64, SeqMeta.from_cu_seqlens(cu, cu))


def test_forward_refuses_a_one_slot_ring(monkeypatch):
    """The Gluon forward overlaps block j's S MMA with block j-1's P V MMA, so its K/V ring
    needs two slots: with one it would wait forever on a load that waits for that slot. An
    override of one stage is refused before anything launches."""
    from ringflash.kernels import configs

    if not sm90.AVAILABLE:
        pytest.skip("this Triton has no Gluon Hopper module")
    _record_planned_launches(monkeypatch)
    q = torch.randn(1, 300, 2, 64, dtype=torch.float16)
    prob = make_problem(q, q, None, 300, 300, 0.125, True, -1, -1, 0.0)
    with configs.override(sm90_fwd=configs.KernelConfig(128, 128, 4, 1)):
        with pytest.raises(ValueError, match="sm90 forward config: got num_stages=1; expected at least 2"):
            sm90.attention_forward_sm90(q, q, q, prob)


def test_score_scalars_give_the_portable_scores():
    """The Gluon kernels' (qk_scale_log2, softcap_in): tanh(q.k * softcap_in) * qk_scale_log2
    with softcap, q.k * qk_scale_log2 without, must equal the portable kernels' scores in log2
    units (softcap * tanh(q.k * scale / softcap) * log2(e)); a factor off breaks lse's
    agreement between the two families (either backward takes either forward's lse)."""
    import math

    from ringflash.kernels.problem import LOG2E

    q = torch.zeros(1, 10, 2, 64)
    qk = torch.linspace(-400.0, 400.0, 101, dtype=torch.float64)
    for softcap in (0.0, 5.0, 30.0):
        prob = _problem(q, q, softcap=softcap, scale=0.125)
        scale_log2, softcap_in = sm90._score_scalars(prob)
        got = (torch.tanh(qk * softcap_in) if softcap else qk) * scale_log2
        want = (softcap * torch.tanh(qk * 0.125 / softcap) if softcap else qk * 0.125) * LOG2E
        assert torch.allclose(got, want, rtol=1e-12, atol=0), softcap
        assert math.isfinite(scale_log2)


def test_dq_accumulator_layout_round_trips():
    """The atomic backward's tiled dQ accumulator: the offsets ``_add_dq_tile`` writes
    (restated here: the Gluon kernel cannot run on the CPU) put a thread's four registers
    of a warpgroup MMA's 16-row block (rows r and r + 8, columns c and c + 1) in one aligned
    16-byte vector, and ``dq_from_accumulator`` reads every (row, column) back from where
    they were added (red with a permutation or a padding mistake)."""
    batch, seqlen, nheads, headdim, block_d, block_m = 2, 75, 3, 40, 64, 64
    shape = sm90.dq_accumulator_shape(batch, seqlen, nheads, block_d, block_m)
    assert shape == (batch, 128 // 16, nheads, 8, block_d // 8, 4, 2, 2)  # rows to 2 x block_m
    acc = torch.zeros(shape, dtype=torch.float32)
    flat = acc.view(batch, shape[1], nheads, -1)

    def offset(row: int, col: int) -> tuple[int, int]:  # (row block, offset in its head's slab)
        return row // 16, (row % 8) * 2 * block_d + (col // 8) * 16 + (col // 2 % 4) * 4 + (row // 8 % 2) * 2 + col % 2

    rows, cols = torch.meshgrid(torch.arange(shape[1] * 16), torch.arange(block_d), indexing="ij")
    for row, col in zip(rows.flatten().tolist(), cols.flatten().tolist()):
        block, at = offset(row, col)
        flat[:, block, :, at] = row * 1000 + col
        if row % 16 < 8 and col % 2 == 0:
            assert at % 4 == 0 and [offset(r, c)[1] - at for r, c in
                                    ((row, col + 1), (row + 8, col), (row + 8, col + 1))] == [1, 2, 3]
    dq = sm90.dq_from_accumulator(acc, seqlen, headdim)
    assert dq.shape == (batch, seqlen, nheads, headdim)
    want = (torch.arange(seqlen)[:, None] * 1000 + torch.arange(headdim)[None, :]).float()
    assert torch.equal(dq, want[None, :, None, :].expand_as(dq))


def test_tma_dq_writer_plan(on_hopper, monkeypatch):
    """The default dQ writer, "tma": the atomic backward's accumulator is a plain float32
    (batch, rows padded to the dK/dV step, nheads, 128) tensor under a descriptor of
    quarter-head-dim boxes (32 columns: the 128-byte swizzle's width), the dK/dV launch
    takes ATOMIC_DQ=2, and ``dq_from_accumulator`` reads the tensor back as it is;
    RINGFLASH_SM90_DQ_WRITER=red takes the reductions' tiled accumulator (ATOMIC_DQ=1); a
    plan made under one writer is never reused under the other; a bad value is refused by
    name."""
    from ringflash.kernels import configs

    q = torch.zeros(2, 75, 4, 96, dtype=torch.bfloat16)
    lse = torch.zeros(2, 4, 75)
    prob = _problem(q, q)

    def plan():
        return sm90._backward_plan(q, q, q, q, q, lse, (q, q, q), prob, None, True, None)

    monkeypatch.delenv("RINGFLASH_SM90_DQ_WRITER", raising=False)
    tma = plan()
    block_m = configs.sm90_backward_config("dkdv").block_m
    rows = -(-75 // block_m) * block_m
    assert tma.dq_writer == "tma" and tma.dq_accumulator_shape == (2, rows, 4, 128)
    assert tma.dkdv_launch.constexprs["ATOMIC_DQ"] == 2
    assert list(tma.dq_accumulator_template.block_shape) == [1, block_m, 1, 32]
    monkeypatch.setenv("RINGFLASH_SM90_DQ_WRITER", "red")
    red = plan()
    assert red.dq_writer == "red" and red.dq_accumulator_template is None
    assert red.dkdv_launch.constexprs["ATOMIC_DQ"] == 1
    assert red.dq_accumulator_shape == (2, rows // 16, 4, 8, 16, 4, 2, 2)
    acc = torch.arange(2 * rows * 4 * 128, dtype=torch.float32).view(2, rows, 4, 128)
    assert torch.equal(sm90.dq_from_accumulator(acc, 75, 96), acc[:, :75, :, :96])
    monkeypatch.setenv("RINGFLASH_SM90_DQ_WRITER", "bulk")
    with pytest.raises(ValueError, match="RINGFLASH_SM90_DQ_WRITER: got 'bulk'"):
        plan()
    with configs.override(sm90_dq_writer="tma"):
        assert plan().dq_writer == "tma"


def test_overlapped_dq_launch_plan(on_hopper, monkeypatch):
    """RINGFLASH_SM90_BWD_OVERLAP=1 (or ``override(sm90_backward_overlap=True)``) makes the
    two-kernel backward's dQ launch a programmatic dependent of its dK/dV launch: the dQ
    kernel is compiled with ``launch_pdl`` and waits for dK/dV before it exits (AFTER_DKDV),
    and the dK/dV kernel lets it start (OVERLAP_DQ); the atomic backward, one kernel, takes
    neither. On by default (run 56); a plan made under one setting is never reused under the other;
    a bad value is refused by name."""
    from ringflash.kernels import configs

    q = torch.zeros(2, 75, 4, 64, dtype=torch.bfloat16)
    lse = torch.zeros(2, 4, 75)
    prob = _problem(q, q)

    def flags(atomic: bool = False) -> tuple:
        plan = sm90._backward_plan(q, q, q, q, q, lse, (q, q, q), prob, None, atomic, None)
        dq = plan.dq_launch.constexprs
        return plan.dkdv_launch.constexprs["OVERLAP_DQ"], dq["AFTER_DKDV"], dq["launch_pdl"]

    monkeypatch.delenv("RINGFLASH_SM90_BWD_OVERLAP", raising=False)
    assert flags() == (True, True, True)
    monkeypatch.setenv("RINGFLASH_SM90_BWD_OVERLAP", "0")
    assert flags() == (False, False, False)
    monkeypatch.setenv("RINGFLASH_SM90_BWD_OVERLAP", "1")
    assert flags() == (True, True, True)
    assert not flags(atomic=True)[0]
    with configs.override(sm90_backward_overlap=False):
        assert flags() == (False, False, False)
    monkeypatch.setenv("RINGFLASH_SM90_BWD_OVERLAP", "yes")
    with pytest.raises(ValueError, match="RINGFLASH_SM90_BWD_OVERLAP: got 'yes'"):
        flags()


def test_wide_backward_plan_refuses_what_its_consumers_lack(on_hopper):
    """The SPLIT_D dK/dV program (d > 128) has no dropout or softcap and holds only a 64 x 64
    step in shared memory: a direct call with either, or another forced tile, is refused by
    name rather than answered with gradients that leave them out (``supports`` keeps such
    calls on the portable backward)."""
    from ringflash.kernels import configs

    q = torch.zeros(1, 64, 2, 256, dtype=torch.bfloat16)
    lse = torch.zeros(1, 2, 64)
    plan = lambda prob, dropout=None: sm90._backward_plan(q, q, q, q, q, lse, (q, q, q), prob,  # noqa: E731
                                                         dropout, False, None)
    with pytest.raises(ValueError, match="headdim: got 256 with dropout or softcap"):
        plan(_problem(q, q), (0.1, 0))
    with pytest.raises(ValueError, match="headdim: got 256 with dropout or softcap"):
        plan(_problem(q, q, softcap=30.0))
    with configs.override(sm90_dkdv=configs.KernelConfig(64, 128, 4, 2)):
        with pytest.raises(ValueError, match="sm90_dkdv: got 64x128 at d=256"):
            plan(_problem(q, q))

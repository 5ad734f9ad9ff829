"""The issue 15/16 benchmark commands end to end on the CPU (``--device cpu --quick --out``):
``bench kernels --grid wide``, ``bench decode``, ``bench dropout`` and ``bench hf``. Each
writes a CSV with one row per (case, implementation, pass) and a status, a markdown report
and a PNG, and redraws them from the CSV. Spies check that the environment switches reach
the library: ``RINGFLASH_BACKWARD=atomic`` selects the atomic backward for the
``ours_atomic`` rows only, and ``RINGFLASH_DECODE=1`` routes ``func_decode`` to the decode
kernels. The GPU grids are checked for their time budget from FLOP counts."""

import csv

import pytest

from ringflash.bench import decode as decode_bench
from ringflash.bench import dropout as dropout_bench
from ringflash.bench import hf as hf_bench
from ringflash.bench import kernels_wide
from ringflash.bench.common import CPU_TIMER
from ringflash.cli import BENCHMARKS
from ringflash.cli import main as cli_main

from conftest import INTERPRETING, needs_interpreter, run_cpu_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def valid_status(status: str) -> bool:
    return status in ("ok", "oom") or status.startswith(("unsupported: ", "skipped: ", "error: "))


def read_rows(path, columns):
    assert path.is_file(), f"{path} was not written"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == columns
        rows = list(reader)
    assert rows, f"{path} has no rows"
    for r in rows:
        assert valid_status(r["status"]), r
        assert (r["status"] == "ok") == bool(r["ms"]), r
        assert r["timer"] == CPU_TIMER and r["device"].startswith("CPU"), r
    return rows


def assert_png(path):
    assert path.is_file(), f"{path} was not written"
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def tables(path):
    return [line for line in path.read_text().splitlines() if line.startswith("|")]


def assert_redraws(command, out, name, tmp_path):
    """--from-csv rebuilds the same tables (run-time notes are not in the CSV)."""
    redrawn = tmp_path / "redrawn"
    assert cli_main(["bench"] + command + ["--from-csv", str(out / f"{name}.csv"), "--out", str(redrawn),
                                           "--no-plots"]) == 0
    assert tables(redrawn / f"{name}.md") == tables(out / f"{name}.md")


def test_commands_are_registered():
    assert {"hf", "decode", "dropout", "kernels"} <= set(BENCHMARKS)


# --- bench kernels --grid wide ---------------------------------------------------------


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    """One CPU run; a spy records which backward each call chose and under which setting
    (None on a GPU machine, where the run is a child process)."""
    from ringflash.kernels import configs

    out = tmp_path_factory.mktemp("wide")
    args = ["bench", "kernels", "--grid", "wide", "--device", "cpu", "--quick", "--out", str(out)]
    if not INTERPRETING:
        assert run_cpu_cli(args) == 0
        return out, None
    calls = []
    real = configs.use_atomic_dq

    def spy(deterministic):
        import os

        result = real(deterministic)
        calls.append((os.environ.get("RINGFLASH_BACKWARD"), result))
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(configs, "use_atomic_dq", spy)
        assert cli_main(args) == 0
    return out, calls


def test_wide_csv(wide_run):
    out, _ = wide_run
    rows = read_rows(out / "kernels_wide.csv", kernels_wide.COLUMNS)
    families = {r["family"] for r in rows}
    assert families == set(kernels_wide.FAMILIES)
    by = {}
    for r in rows:
        by.setdefault((r["impl"], r["pass"]), []).append(r)
    # Ours runs everywhere (interpreted), forward and both backwards; the atomic rows are backward only.
    for key in (("ours", "fwd"), ("ours", "bwd"), ("ours_atomic", "bwd"), ("ours_split", "bwd")):
        assert by[key] and all(r["status"] == "ok" for r in by[key]), key
    assert ("ours_atomic", "fwd") not in by and ("ours_split", "fwd") not in by
    # SDPA's flash backend has a CPU kernel; cuDNN and the aten varlen kernels do not.
    assert all(r["status"] == "ok" for r in by[("fa2", "fwd")] if r["family"] != "varlen")
    assert all(r["status"].startswith("unsupported: ") for r in by[("cudnn", "fwd")])
    assert all(r["status"].startswith("unsupported: ") for r in by[("fa2", "fwd")] if r["family"] == "varlen")
    # The sanity errors: ours against FA2 and atomic against default, float32.
    errs = [float(r["rel_err"]) for r in rows if r["rel_err"]]
    assert errs and max(errs) < 1e-4


@needs_interpreter
def test_wide_atomic_setting_reaches_the_backward(wide_run):
    _, calls = wide_run
    assert any(result for _, result in calls), "no backward ran the atomic path"
    assert any(not result for _, result in calls), "no backward ran the default path"
    assert all(result == (env == "atomic") for env, result in calls)


def test_wide_report_and_redraw(wide_run, tmp_path):
    out, _ = wide_run
    md = (out / "kernels_wide.md").read_text()
    assert "## Speed ratios" in md and "atomic bwd vs FA2" in md and "split vs default bwd" in md
    assert "## Not measured" in md
    assert md.rstrip().splitlines()[-1].startswith("| underfill")  # the ratio table comes last, in family order
    assert_png(out / "kernels_wide_speed_ratios.png")
    assert_redraws(["kernels", "--grid", "wide"], out, "kernels_wide", tmp_path)
    # Without --grid, a long-format CSV is recognised as the wide grid's.
    assert cli_main(["bench", "kernels", "--from-csv", str(out / "kernels_wide.csv")]) == 0


def test_wide_gpu_grid_fits_its_budget(capsys):
    cases = kernels_wide.build_grid("cuda", quick=False)
    names = {c.name for c in cases}
    assert {c.headdim for c in cases if c.family == "dense"} == {64, 80, 96, 128, 192, 256}
    long = {c.headdim for c in cases if c.family == "dense" and c.seqlen == 65536}
    assert long == set(kernels_wide.LONG_HEADDIMS)
    assert all(c.tokens == kernels_wide.TOKENS for c in cases if c.family in ("dense", "gqa"))
    assert {c.pack for c in cases if c.family == "varlen"} == set(kernels_wide.PACKS)
    assert all(c.tokens == kernels_wide.VARLEN_TOKENS for c in cases if c.family == "varlen")
    assert any(n.startswith("seed3d causal b=4 n=8k d=64") for n in names)
    # The one-sequence GQA family: fewer dK/dV programs than two per SM on an H100/H200.
    under = [c for c in cases if c.family == "underfill"]
    assert under and all(c.batch == 1 and c.nheads_k * c.seqlen // 128 < 2 * 132 for c in under)
    assert "underfill d=128 causal s=4k b=1 16/4" in names
    total, _ = kernels_wide.estimate_seconds(cases)
    assert total < 8 * 60, f"the wide grid is estimated at {total:.0f} s"
    quick, _ = kernels_wide.estimate_seconds(kernels_wide.build_grid("cuda", quick=True))
    assert quick < 120
    assert cli_main(["bench", "kernels", "--grid", "wide", "--estimate"]) == 0
    assert "cases: about" in capsys.readouterr().out


@pytest.mark.parametrize("call_ms", [0.5, 30.0, 104.5])
def test_gpu_medians_come_from_several_calls(monkeypatch, call_ms):
    """bench_ms's median is over at least MIN_TIMED_CALLS timed calls, however long a call:
    do_bench repeats int(rep / its estimate) times, once for a call longer than ``rep``."""
    import triton.testing

    from ringflash.bench import common

    timed = []

    def fake_do_bench(fn, warmup, rep, return_mode):  # do_bench's repeat count, for a call of call_ms
        timed.append(max(1, int(rep / call_ms)))
        return call_ms + 10.0  # an outlier, where do_bench timed too few calls

    def fake_median_of_calls(fn, calls):
        timed.append(calls)
        return call_ms

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(common, "_median_of_calls", fake_median_of_calls)
    got = common.bench_ms(lambda: None)
    assert timed[-1] >= common.MIN_TIMED_CALLS
    assert got == (call_ms + 10.0 if len(timed) == 1 else call_ms)
    assert len(timed) == (1 if call_ms * common.MIN_TIMED_CALLS <= 100 else 2)


@pytest.mark.parametrize("pack", ["llama3", "64x256", "16x1024", "random"])
def test_pack_lengths_fill_the_pack(pack):
    lengths = kernels_wide.pack_lengths(pack, 16384)
    assert sum(lengths) == 16384 and min(lengths) >= 1
    assert kernels_wide.pack_lengths(pack, 16384) == lengths  # seeded
    if pack == "llama3":
        assert lengths == kernels_wide.LLAMA_LENGTHS
    short = kernels_wide.pack_lengths("random", 64, min_len=8)
    assert sum(short) == 64 and min(short) >= 8


# --- bench decode ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def decode_run(tmp_path_factory):
    """One CPU run; a spy counts the dense calls the dispatcher sends to the decode kernels
    (None on a GPU machine, where the run is a child process)."""
    from ringflash.kernels import dispatch

    out = tmp_path_factory.mktemp("decode")
    args = ["bench", "decode", "--device", "cpu", "--quick", "--out", str(out)]
    if not INTERPRETING:
        assert run_cpu_cli(args) == 0
        return out, None
    routed = []
    real = dispatch.decode_forward

    def spy(*args, **kwargs):
        import os

        routed.append(os.environ.get("RINGFLASH_DECODE"))
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dispatch, "decode_forward", spy)
        assert cli_main(args) == 0
    return out, routed


def test_decode_csv_and_report(decode_run, tmp_path):
    out, routed = decode_run
    rows = read_rows(out / "decode.csv", decode_bench.COLUMNS)
    status = {(r["impl"], r["pass"]): r["status"] for r in rows}
    for impl in decode_bench.OURS + ("fa2",):
        assert status[(impl, "call")] == "ok", impl
        assert status[(impl, "graph")].startswith("skipped: CUDA graphs need a GPU")
    assert status[("cudnn", "call")].startswith("unsupported: ")
    assert all(float(r["rel_err"]) < 1e-4 for r in rows if r["rel_err"])
    assert "paged vs contiguous" in (out / "decode.md").read_text()
    assert_png(out / "decode_speed_ratios.png")
    assert_redraws(["decode"], out, "decode", tmp_path)
    # Only the func_decode rows (RINGFLASH_DECODE=1) went through the dispatcher's decode route.
    if routed is not None:
        assert routed and all(env == "1" for env in routed)


def test_decode_headdims_replace_each_cases_own(monkeypatch, capsys):
    """--headdims runs every case at each head dim given (issue 15's d % 16 == 8 check:
    d=72 against d=64), and refuses one outside 1..256 by name."""
    seen = []
    monkeypatch.setattr(decode_bench, "run_case", lambda case, *args, **kwargs: seen.append(case) or [])
    monkeypatch.setattr(decode_bench, "markdown_report", lambda rows, notes=(): "")
    monkeypatch.setattr(decode_bench, "publish", lambda *args, **kwargs: None)
    assert decode_bench.main(["--device", "cpu", "--headdims", "16", "24"]) == 0
    assert [(c.headdim, c.batch) for c in seen] == [(d, c.batch) for c in decode_bench.CPU_CASES for d in (16, 24)]
    with pytest.raises(SystemExit):
        decode_bench.main(["--device", "cpu", "--headdims", "300"])
    assert "--headdims: got [300]; expected head dims from 1 to 256" in capsys.readouterr().err


def test_decode_rounds_take_each_cells_median():
    """With rounds, every implementation is timed once per round and a cell is the median
    of its rounds: with a timer that counts its calls, round r of the k timed cells reads
    r * k + j, so the medians are round 1's, k .. 2k - 1."""
    import torch

    calls = iter(range(10_000))
    rows = decode_bench.run_case(decode_bench.CPU_CASES[0], "cpu", torch.float32, lambda fn: float(next(calls)),
                                 "counting", "cpu", rounds=3)
    timed = sorted(r["ms"] for r in rows if r["status"] == "ok")
    k = len(timed)
    assert k >= len(decode_bench.OURS) and timed == [float(x) for x in range(k, 2 * k)]


# --- bench dropout ---------------------------------------------------------------------


def test_dropout_csv_and_report(tmp_path):
    out = tmp_path / "dropout"
    assert run_cpu_cli(["bench", "dropout", "--device", "cpu", "--quick", "--out", str(out)]) == 0
    rows = read_rows(out / "dropout.csv", dropout_bench.COLUMNS)
    status = {(r["impl"], r["pass"]): r["status"] for r in rows}
    for impl in ("ours", "ours_dropout", "ours_alibi", "fa2"):
        for p in dropout_bench.PASSES:
            assert status[(impl, p)] == "ok", (impl, p)
    assert {r["dropout_p"] for r in rows if r["impl"] == "ours_dropout"} == {str(dropout_bench.DROPOUT_P)}
    md = (out / "dropout.md").read_text()
    assert "ours: dropout 0.1 / none" in md and "issue 16 bar" in md
    assert_png(out / "dropout_overhead.png")
    assert_redraws(["dropout"], out, "dropout", tmp_path)


# --- bench hf --------------------------------------------------------------------------


def test_hf_csv_and_report(tmp_path):
    pytest.importorskip("transformers", minversion="4.53")
    out = tmp_path / "hf"
    assert run_cpu_cli(["bench", "hf", "--device", "cpu", "--quick", "--out", str(out)]) == 0
    rows = read_rows(out / "hf.csv", hf_bench.COLUMNS)
    assert {r["case"] for r in rows} == {c.name for c in hf_bench.build_cases("cpu", quick=True)}
    assert {r["layers"] for r in rows} == {"2"} and {r["tokens"] for r in rows} == {"64"}
    for r in rows:
        assert r["status"] == "ok", r
    loss = {(r["case"], r["impl"]): float(r["loss"]) for r in rows}
    for case in {r["case"] for r in rows}:  # the same model and tokens: the same loss, float32
        assert loss[(case, "ringattn")] == pytest.approx(loss[(case, "sdpa")], rel=1e-4)
    assert "ringattn vs sdpa_fa2" in (out / "hf.md").read_text()
    assert_png(out / "hf_step_time.png")
    assert_redraws(["hf"], out, "hf", tmp_path)


def test_hf_rounds_reverse_the_order_and_keep_each_variants_faster_step(monkeypatch):
    """Run 55: one round's order moved the 4k step's ratio by about 6% (the first variant
    timed ran slow), so a GPU run times every variant twice, the second round backwards."""
    pytest.importorskip("transformers", minversion="4.53")
    from ringflash.bench.progress import progress_bar

    timed: list[str] = []  # the variants in the order their steps were timed
    real_step_fn = hf_bench.step_fn

    def step_fn(model, case, batch, variant, last):
        timed.append(variant)
        return real_step_fn(model, case, batch, variant, last)

    def fake_timed(timer, step, device):  # variant i takes 1 + i ms, but each round's first step is slow
        if len(timed) - 1 in (0, len(hf_bench.VARIANTS)):
            return 9.0, "ok"
        return float(1 + hf_bench.VARIANTS.index(timed[-1])), "ok"

    monkeypatch.setattr(hf_bench, "step_fn", step_fn)
    monkeypatch.setattr(hf_bench, "run_timed", fake_timed)
    case = hf_bench.build_cases("cpu", quick=True)[0]
    with progress_bar(1, "hf") as bar:
        rows = hf_bench.run_all([case], "cpu", None, "fake", "cpu", bar, [], rounds=2)
    assert timed == list(hf_bench.VARIANTS) + list(hf_bench.VARIANTS[::-1])
    assert [r["impl"] for r in rows] == list(hf_bench.VARIANTS)
    # The first variant keeps its second round, the last its first.
    assert [r["ms"] for r in rows] == [1.0 + i for i in range(len(hf_bench.VARIANTS))]


@needs_interpreter
def test_hf_without_transformers_records_unsupported(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    out = tmp_path / "hf"
    assert cli_main(["bench", "hf", "--device", "cpu", "--quick", "--out", str(out), "--csv-only"]) == 0
    rows = read_rows(out / "hf.csv", hf_bench.COLUMNS)
    assert all(r["status"].startswith("unsupported: ") for r in rows)
    assert not (out / "hf.md").exists()  # --csv-only


def test_wide_times_small_cases_twice():
    """The wide grid times a case a second time (reverse order, each cell its faster round)
    when our forward+backward took under SECOND_ROUND_MS, and only then."""
    from ringflash.bench import kernels_wide as kw

    limit = kw.SECOND_ROUND_MS
    assert kw._small({"fwd": (0.2, "ok"), "bwd": (limit / 2, "ok")})
    assert not kw._small({"fwd": (0.2, "ok"), "bwd": (limit, "ok")})
    assert not kw._small({"fwd": (None, "failed"), "bwd": (0.1, "ok")})
    assert not kw._small({})


def test_wide_rounds_option():
    """``--rounds N`` times every case in N rounds; a small case still takes two on a GPU."""
    from ringflash.bench import kernels_wide as kw

    small, large = {"fwd": (0.2, "ok"), "bwd": (0.3, "ok")}, {"fwd": (20.0, "ok"), "bwd": (50.0, "ok")}
    assert [kw._wants_round(i, 1, "cuda", large) for i in range(3)] == [True, False, False]
    assert [kw._wants_round(i, 1, "cuda", small) for i in range(3)] == [True, True, False]
    assert [kw._wants_round(i, 1, "cpu", small) for i in range(3)] == [True, False, False]
    assert [kw._wants_round(i, 3, "cuda", large) for i in range(4)] == [True, True, True, False]
    cases = kw.build_grid("cuda", quick=True)
    assert kw.estimate_seconds(cases, min_rounds=2)[0] > kw.estimate_seconds(cases)[0]
    with pytest.raises(SystemExit):
        kw.main(["--rounds", "0", "--estimate"])


# --- bench tune ------------------------------------------------------------------------


@needs_interpreter
def test_tune_split_sweep_runs(capsys):
    """`bench tune --only-splits` (and the ablations after the winners) imported make_problem
    from kernels.fwd, which has none, and passed it an extra argument: it crashed before
    timing anything. The same path, interpreted at a toy shape."""
    from ringflash.bench import tune

    tune.split_sweep("cpu", shapes=((1, 1, 64),), counts=(1, 2))
    out = capsys.readouterr().out
    assert "split-KV sweep" in out and "| b=1 sq=1 sk=64 " in out


@needs_interpreter
def test_tune_host_overhead_runs(capsys):
    """`bench tune --only-overhead` (interpreted on a CPU-only machine) called
    interface._options without its seqlen_k argument and raised a TypeError at that row."""
    assert cli_main(["bench", "tune", "--only-overhead", "--calls", "1"]) == 0
    out = capsys.readouterr().out
    assert "options (interface._options)" in out and "training step (flash_attn_func fwd+bwd) profile" in out


# --- FLOP counts and baselines on the bottom-right causal mask -------------------------


def _visible_pairs(sq, sk):
    """Query row i sees keys 0 .. i + sk - sq (bottom-right alignment), counted one by one."""
    return sum(max(0, min(sk, i + sk - sq + 1)) for i in range(sq))


@pytest.mark.parametrize("sq,sk", [(1, 4096), (128, 4096), (1000, 3000), (4096, 4096), (3000, 1000)])
def test_attn_flops_count_the_bottom_right_mask(sq, sk):
    """Causal FLOPs with seqlen_q != seqlen_k follow the visible pairs of the bottom-right
    mask (halving sq * sk counted a one-query decode step at half its work, and a few
    queries against a long cache likewise); sq == sk keeps the usual halving."""
    from ringflash.bench.common import attn_flops

    b, h, d = 2, 3, 64
    assert attn_flops(b, h, sq, sk, d, False) == 4.0 * b * h * sq * sk * d
    exact = 4.0 * b * h * d * _visible_pairs(sq, sk)
    assert attn_flops(b, h, sq, sk, d, True) == pytest.approx(exact, rel=2e-3)
    if sq == sk:
        assert attn_flops(b, h, sq, sk, d, True) == 2.0 * b * h * sq * sk * d


def _bottom_right_reference(q, k, v):
    """Causal attention in float64 on (b, s, h, d) tensors, query row i seeing keys up to
    i + sk - sq; K/V heads repeated for GQA."""
    import torch

    sq, sk, group = q.shape[1], k.shape[1], q.shape[2] // k.shape[2]
    k, v = (x.double().repeat_interleave(group, dim=2) for x in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k) * q.shape[-1] ** -0.5
    visible = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
    return torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(~visible, float("-inf")).softmax(-1), v)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_baseline_uses_the_bottom_right_mask(monkeypatch):
    """The FlexAttention baseline's causal block mask was q_idx >= kv_idx (top-left): with
    fewer queries than keys it computed another problem than ours. Eager flex on the CPU."""
    import torch

    from ringflash.bench import common

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    run = common.flex_baseline()
    gen = torch.Generator().manual_seed(0)
    for sq, sk in ((3, 7), (5, 5)):
        q = torch.randn(1, sq, 2, 16, generator=gen)
        k, v = torch.randn(1, sk, 2, 16, generator=gen), torch.randn(1, sk, 2, 16, generator=gen)
        out = run(q, k, v, True)
        torch.testing.assert_close(out.double(), _bottom_right_reference(q, k, v), atol=1e-5, rtol=1e-5)


def test_sdpa_baselines_never_run_a_top_left_mask():
    """SDPA's is_causal is top-left aligned: the baselines drop it for one query row (which
    sees every key under ours) and refuse other seqlen_q != seqlen_k shapes instead of timing
    a different problem; seqlen_q == seqlen_k is unchanged."""
    import torch

    from ringflash.bench import common, harness

    gen = torch.Generator().manual_seed(0)
    calls = {"sdpa_baseline": lambda q, k, v: common.sdpa_baseline("MATH")(q, k, v, True),
             "sdpa_call": lambda q, k, v: harness.sdpa_call(q, k, v, True, "MATH")}
    for name, call in calls.items():
        for sq, sk in ((1, 9), (6, 6)):
            q = torch.randn(2, sq, 4, 16, generator=gen)
            k, v = torch.randn(2, sk, 2, 16, generator=gen), torch.randn(2, sk, 2, 16, generator=gen)
            torch.testing.assert_close(call(q, k, v).double(), _bottom_right_reference(q, k, v), atol=1e-5,
                                       rtol=1e-5, msg=name)
        q, k = torch.randn(1, 3, 2, 16, generator=gen), torch.randn(1, 7, 2, 16, generator=gen)
        with pytest.raises(NotImplementedError, match="top left"):
            call(q, k, k)
        assert harness.classify_failure(NotImplementedError("x")).startswith("unsupported: ")


def test_kernels_sanity_guard_survives_a_refused_fa2():
    """The default grid's check of our output against FA2's ran outside the guard that
    keeps a refused baseline from ending the run: a case FA2 refuses stopped the whole grid."""
    import torch

    from ringflash.bench import kernels

    def refused():
        raise RuntimeError("No available kernel. Aborting execution.")

    assert kernels._sanity(refused) is None
    a = torch.ones(4)
    assert kernels._sanity(lambda: (a, a + 1e-3)) == pytest.approx(1e-3, rel=1e-3)

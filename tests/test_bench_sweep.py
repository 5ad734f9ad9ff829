"""``ringflash bench sweep`` end to end on the CPU (CSV, markdown, PNGs), its failure
handling, and the report/plot functions of ``bench kernels``, ``bench grouped`` and
``bench cp`` on synthetic result rows (those benchmarks need GPUs; their reports do not)."""

import csv
import math

import pytest
import torch

from ringflash.bench import cp as cp_bench
from ringflash.bench import grouped as grouped_bench
from ringflash.bench import kernels as kernels_bench
from ringflash.bench import sweep
from ringflash.bench.common import CPU_TIMER, read_csv_rows, write_csv
from ringflash.cli import main as cli_main

from conftest import run_cpu_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    assert path.is_file(), f"{path} was not written"
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC), f"{path} is not a non-empty PNG"


def valid_status(status: str) -> bool:
    return status in ("ok", "oom") or status.startswith(("unsupported: ", "skipped: ", "error: "))


#: Two of the CPU grid's sequence lengths (CI time: half the cells; the command, its cell
#: statuses and its outputs are what the tests check).
SEQLENS = sweep.CPU_QUICK_SEQLENS[:2]


@pytest.fixture(scope="module")
def sweep_out(tmp_path_factory):
    """One run of the command as a user types it; the tests below read what it wrote."""
    out = tmp_path_factory.mktemp("sweep")
    assert run_cpu_cli(["bench", "sweep", "--device", "cpu", "--quick", "--seqlens", *map(str, SEQLENS),
                        "--out", str(out)]) == 0
    return out


def test_sweep_csv(sweep_out):
    with open(sweep_out / "sweep.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == sweep.CSV_COLUMNS
        rows = list(reader)
    impls, passes = list(sweep.IMPLEMENTATIONS), sweep.PASSES
    expected = {(i, dt, str(d), str(n), p) for i in impls for dt in sweep.DTYPES for d in sweep.QUICK_HEADDIMS
                for n in SEQLENS for p in passes}
    keys = [(r["impl"], r["dtype"], r["headdim"], r["seqlen"], r["pass"]) for r in rows]
    assert len(keys) == len(set(keys)) and set(keys) == expected
    for r in rows:
        assert valid_status(r["status"]), r
        assert r["timer"] == CPU_TIMER and r["device"].startswith("CPU")
        assert (r["status"] == "ok") == bool(r["ms"]), r
        if r["status"] == "ok":
            assert float(r["ms"]) > 0 and math.isfinite(float(r["ms"]))
        if r["impl"] == "triton_fa2":
            # fp32 runs in the interpreter; bf16 is refused because its dots are wrong there.
            expected_status = "ok" if r["dtype"] == "fp32" else "unsupported: bf16 on the CPU interpreter"
            assert r["status"].startswith(expected_status), r
        elif r["impl"] in ("pytorch_fa2", "sdpa"):
            assert r["status"] == "ok", r
    assert any(r["note"].startswith("backend ") for r in rows if r["impl"] == "sdpa")


def test_sweep_markdown_and_plots(sweep_out):
    md = (sweep_out / "sweep.md").read_text()
    for p in sweep.PASSES:
        assert f"## {p} (ms)" in md
    assert "| dtype | d  | n  | pytorch_fa2 | triton_fa2 | sdpa" in md
    assert "CPU wall-clock" in md and "## Not measured" in md and "bf16 on the CPU interpreter" in md
    for p in sweep.PASSES:
        assert_png(sweep_out / f"sweep_time_{p}.png")
        assert_png(sweep_out / f"sweep_speedup_{p}.png")


def test_sweep_redraws_from_csv(sweep_out, tmp_path):
    assert cli_main(["bench", "sweep", "--from-csv", str(sweep_out / "sweep.csv"), "--out", str(tmp_path),
                     "--no-plots"]) == 0
    # The same tables (the run-time notes, such as the length threshold, are not in the CSV).
    def tables(path):
        return [line for line in path.read_text().splitlines() if line.startswith("|")]

    assert tables(tmp_path / "sweep.md") == tables(sweep_out / "sweep.md")


def test_sweep_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "sweep", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--pytorch-max-seqlen" in text and "--quick" in text and "--out DIR" in text


class _BackwardOOM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q):
        return q * 2

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("CUDA error: out of memory")


def test_sweep_records_failures_and_goes_on(tmp_path):
    def oom(q, k, v):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")

    def broken(q, k, v):
        raise ValueError("a long\nmulti-line message " + "x" * 300)

    def unsupported(q, k, v):
        raise NotImplementedError("dropout_p > 0")

    def backward_oom(q, k, v):
        return _BackwardOOM.apply(q) + 0 * (k.sum() + v.sum())

    impls = [sweep.Impl("oom", "oom", oom), sweep.Impl("broken", "broken", broken),
             sweep.Impl("unsupported", "unsupported", unsupported), sweep.Impl("bwd_oom", "bwd_oom", backward_oom),
             sweep.IMPLEMENTATIONS["sdpa"], sweep.IMPLEMENTATIONS["pytorch_fa2"]]
    opts = sweep.SweepOptions(device="cpu", pytorch_max_seqlen=16)
    rows, interrupted = sweep.run_sweep(sweep.grid([16, 32], [16], ["fp32"]), impls, opts)
    assert not interrupted and len(rows) == 2 * len(impls) * len(sweep.PASSES)
    status = {(r["impl"], r["seqlen"], r["pass"]): r["status"] for r in rows}
    assert all(valid_status(s) for s in status.values())
    for p in sweep.PASSES:
        assert status[("oom", 16, p)] == "oom"
        assert status[("broken", 16, p)].startswith("error: ValueError: a long multi-line message")
        assert len(status[("broken", 16, p)]) < 160
        assert status[("unsupported", 16, p)] == "unsupported: dropout_p > 0"
        assert status[("sdpa", 32, p)] == "ok"
        assert status[("pytorch_fa2", 16, p)] == "ok"
        assert status[("pytorch_fa2", 32, p)].startswith("skipped: too slow")
    assert status[("bwd_oom", 16, "forward")] == "ok"
    assert status[("bwd_oom", 16, "backward")] == status[("bwd_oom", 16, "end-to-end")] == "oom"
    md = sweep.markdown_report(rows)
    assert "OOM" in md and "err" in md and "skip" in md and "## Not measured" in md
    paths = sweep.write_report(rows, str(tmp_path), plots=False)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["sweep.csv", "sweep.md"]
    back = read_csv_rows([paths[0]])
    assert [(r["impl"], r["seqlen"], r["pass"], r["status"]) for r in back] == [
        (r["impl"], r["seqlen"], r["pass"], r["status"]) for r in rows]


# --- the other benchmarks' reports, from synthetic rows ---------------------------------


def _cp_rows():
    rows = []
    for world in (2, 4, 8):
        for case in ("mixed", "single"):
            for k, variant in enumerate(("zigzag_llama3 grouped", "ring")):
                eff = 0.9 - 0.1 * k - 0.01 * world
                row = dict(case=case, variant=variant, world=world, fwd_ms=1.0, fwd_bwd_ms=4.0, fwd_eff=eff,
                           fwd_bwd_eff=eff + 0.02, peak_gib=1.5, rel_err_vs_single=0.0, single_fwd_ms=2.0 * world,
                           single_fwd_bwd_ms=8.0 * world)
                if world != 2:  # like the older CSVs, W=2 has no one-call columns
                    row.update(fwd_bwd_cold_eff=eff - 0.05, single_fwd_bwd_cold_ms=8.5 * world, fwd_bwd_cold_ms=5.0)
                rows.append(row)
    return rows


def test_cp_efficiency_plot(tmp_path):
    rows = _cp_rows()
    rows.append(dict(rows[0], fwd_eff=rows[0]["fwd_eff"] + 0.1))  # a second run of W=2: averaged
    series = cp_bench.efficiency_series(rows, "mixed", "fwd_eff")
    assert list(series) == ["zigzag_llama3 grouped", "ring"]
    assert [w for w, _ in series["ring"]] == [2, 4, 8]
    assert series["zigzag_llama3 grouped"][0] == (2, pytest.approx(100 * (0.88 + 0.05)))
    assert [w for w, _ in cp_bench.efficiency_series(rows, "single", "fwd_bwd_cold_eff")["ring"]] == [4, 8]
    path = tmp_path / "cp_efficiency.png"
    assert cp_bench.plot_efficiency(rows, str(path), note="synthetic") == str(path)
    assert_png(path)


def test_cp_report_from_csv(tmp_path):
    rows = _cp_rows()
    keys = sorted({k for r in rows for k in r})
    write_csv(str(tmp_path / "in.csv"), keys, [[r.get(k) for k in keys] for r in rows])
    out = tmp_path / "out"
    assert cli_main(["bench", "cp", "--from-csv", str(tmp_path / "in.csv"), "--out", str(out)]) == 0
    assert "| 8 | single | ring" in (out / "cp.md").read_text().replace("  ", " ").replace("  ", " ")
    assert_png(out / "cp_efficiency.png")


def _kernel_rows():
    rows = []
    for k, case in enumerate(("d=64 causal s=1024", "d=128 full s=16384", "llama3-8b varlen causal")):
        varlen = case.startswith("llama")
        row = dict(case=case, ringflash_fwd_tflops=300.0 + k, ringflash_bwd_tflops=250.0, fa2_fwd_tflops=250.0,
                   fa2_bwd_tflops=200.0, cudnn_fwd_tflops=None if varlen else 400.0,
                   cudnn_bwd_tflops=None if varlen else 300.0, flex_fwd_tflops=None, flex_bwd_tflops=None)
        rows.append(row)
    return rows


def test_kernels_speed_ratio_plot(tmp_path):
    rows = _kernel_rows()
    ratios = kernels_bench.speed_ratios(rows, "fwd")
    assert list(ratios) == ["ours / fa2", "ours / cudnn"]  # flex was not measured: no series
    assert ratios["ours / fa2"][0] == pytest.approx(300 / 250) and ratios["ours / cudnn"][2] is None
    path = tmp_path / "kernels_speed_ratios.png"
    assert kernels_bench.plot_speed_ratios(rows, str(path), note="synthetic") == str(path)
    assert_png(path)
    paths = kernels_bench.write_outputs(rows, str(tmp_path / "out"), "synthetic device")
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["kernels.csv", "kernels.md", "kernels_speed_ratios.png"]
    assert "ours/fa2" in (tmp_path / "out" / "kernels.md").read_text()


def test_grouped_speedup_plot(tmp_path):
    rows = []
    for w in (2, 8):
        for case in ("mixed", "single"):
            row = dict(world_size=w, case=case, design_a_fwd_ms=1.3, design_a_cfg="64x64 w4 s2",
                       grouped_fwd_tflops=400.0, grouped_bwd_tflops=300.0, dense_fwd_tflops=420.0,
                       dense_bwd_tflops=350.0, kv_mb_grouped=64.0, kv_mb_two_calls=80.0)
            for name, fwd in (("grouped", 0.9), ("grouped_head", 0.92), ("grouped_il", 0.95), ("2x_ours", 1.0),
                              ("2x_fa2", 1.4)):
                row[f"{name}_fwd_ms"], row[f"{name}_bwd_ms"] = fwd, 3 * fwd
            rows.append(row)
    fwd = grouped_bench.speedups(rows, "fwd")
    assert fwd["grouped, global order"][0] == pytest.approx(1 / 0.9) and "design a" in fwd
    assert "design a" not in grouped_bench.speedups(rows, "bwd")
    path = tmp_path / "grouped_speedups.png"
    assert grouped_bench.plot_speedups(rows, str(path)) == str(path)
    assert_png(path)


def test_sweep_keeps_its_rows_when_timeout_stops_it():
    """`timeout` sends SIGTERM: the sweep stops there and returns the cells measured so far
    (run 34 lost a cut GPU sweep's cells when only Ctrl-C was caught)."""
    import os
    import signal

    def sdpa_then_terminated(q, k, v):
        if q.shape[-2] == 32:  # the second cell's first call
            os.kill(os.getpid(), signal.SIGTERM)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    impls = [sweep.Impl("sdpa_once", "sdpa_once", sdpa_then_terminated)]
    opts = sweep.SweepOptions(device="cpu", pytorch_max_seqlen=16)
    previous = signal.getsignal(signal.SIGTERM)
    rows, interrupted = sweep.run_sweep(sweep.grid([16, 32, 64], [16], ["fp32"]), impls, opts)
    assert interrupted and signal.getsignal(signal.SIGTERM) is previous
    assert rows and {r["seqlen"] for r in rows} == {16}, rows

"""scripts/ncu_kernels.py's reading of Nsight Compute's raw CSV page (the profiling itself
needs a GPU machine with ncu: ``scripts/device_run.sh ncu``)."""

import importlib.util
import os

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "ncu_kernels.py")


def _module():
    spec = importlib.util.spec_from_file_location("ncu_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _csv(rows):
    return "\n".join(",".join(f'"{cell}"' for cell in row) for row in rows) + "\n"


def test_summary_converts_units_and_ranks_the_stall_reasons():
    stall = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    header = ["ID", "Kernel Name", "gpu__time_duration.sum", "launch__shared_mem_per_block",
              "launch__registers_per_thread", stall.format("long_scoreboard"), stall.format("barrier"),
              stall.format("not_issued"), stall.format("wait"),
              "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
              "sm__pipe_tensor_op_gmma_cycles_active.max.pct_of_peak_sustained_active"]
    units = ["", "", "us", "Kbyte", "register/thread", "", "", "", "", "%", "%"]
    kernels = [["0", "_fwd_kernel", "268.5", "81.92", "168", "3.2", "1.1", "9.9", "0.5", "55.5", "70.0"],
               ["1", "flash_fwd", "1,250", "65.54", "255", "0.4", "2.5", "7.0", "1.5", "61.0", "70.0"]]
    first, second = _module().summarize(_csv([header, units] + kernels))
    assert first["kernel"] == "_fwd_kernel" and first["ms"] == "0.2685" and first["smem KB"] == "80"
    assert first["regs"] == "168"
    # Largest first; not_issued is the sum of the others, not a reason.
    assert first["stalls (cycles per issue)"] == "long_scoreboard=3.20, barrier=1.10, wait=0.50"
    assert first["tensor pipes %"] == "pipe_tensor_op_gmma_cycles_active=55.5"
    assert second["ms"] == "1.2500"
    assert second["stalls (cycles per issue)"].startswith("barrier=2.50, wait=1.50")


def test_summary_of_an_empty_report():
    assert _module().summarize("") == []


def test_an_unknown_implementation_is_refused(capsys):
    import pytest

    with pytest.raises(SystemExit):
        _module().main(["--cases", "varlen-fwd", "--impls", "ours", "cudnn"])
    assert "--impls: got ['cudnn']; expected some of ['fa2', 'ours', 'ours_kvtma']" in capsys.readouterr().err

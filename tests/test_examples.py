"""examples/train_cp.py end to end: torchrun, 2 gloo ranks on the CPU, --check against one
process. A broken context-parallel run (the gradient all-reduce skipped) must fail the check.

Each run starts its own process group under a timeout, so a hang fails the test instead of
blocking CI. They use 96 tokens instead of the CPU default's 160 (still several documents
per rank): the two take about 80 s on 2 CPU cores alone (the passing run 47 s, against 63 s
at 160 tokens)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", minversion="4.53")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_cp.py"
#: Runs the script as __main__ without the interpreter's dead overflow checks (CI time).
RUNNER = ROOT / "tests" / "interpreter_options.py"
TIMEOUT_S = 300


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 examples/train_cp.py --device cpu ARGS`` with
    this interpreter (so it works from any virtualenv). --standalone picks a free port. Each
    rank runs the script through tests/interpreter_options.py (the same script as
    ``__main__``, its interpreted kernels twice as fast)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(RUNNER), str(SCRIPT), "--device", "cpu", *args]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    # A session of its own, so that a timeout kills the workers too, not only torchrun.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {TIMEOUT_S}s (a hang?); output:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def test_train_cp_check_passes():
    run = _torchrun("--steps", "2", "--check", "--tokens", "96")
    assert run.returncode == 0, f"exit code {run.returncode}; output:\n{run.stdout[-4000:]}"
    assert "check passed" in run.stdout, run.stdout[-4000:]
    assert "step 2/2" in run.stdout and "tokens/s" in run.stdout, run.stdout[-4000:]


def test_train_cp_check_catches_a_broken_run():
    """Without the gradient all-reduce each rank holds only its partial gradient: the
    losses still agree, the gradient norms do not, and the check must exit non-zero."""
    run = _torchrun("--steps", "1", "--check", "--break-for-test", "--tokens", "96")
    assert run.returncode != 0, f"the broken run passed the check; output:\n{run.stdout[-4000:]}"
    assert "check FAILED at step 1" in run.stdout, run.stdout[-4000:]
    assert "check passed" not in run.stdout

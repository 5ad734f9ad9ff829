"""examples/train_cp.py end to end: torchrun, 2 gloo ranks on the CPU, --check against one
process. Broken context-parallel runs (the gradient all-reduce skipped; position ids counted
along the local row) must fail the check. Its argument checks run in this process.

Each run starts its own process group under a timeout, so a hang fails the test instead of
blocking CI. They use 96 tokens instead of the CPU default's 160 (still several documents
per rank): the two take about 80 s on 2 CPU cores alone (the passing run 47 s, against 63 s
at 160 tokens)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_train_cp_check_catches_wrong_positions():
    """position_ids counted along the local row (0, 1, 2, ...) instead of the plan's positions
    inside the documents: at random initialisation the attention is nearly uniform, so the
    loss (rel 8e-7) and the gradient norm (rel 5e-4) stayed within their tolerances and the
    check passed. The q/k projections' gradients differ by tens of percent: the per-parameter
    gradient comparison must fail it."""
    run = _torchrun("--steps", "1", "--check", "--break-for-test", "positions", "--tokens", "96")
    assert run.returncode != 0, f"the broken run passed the check; output:\n{run.stdout[-4000:]}"
    assert "check FAILED at step 1" in run.stdout and "gradient of model.layers." in run.stdout, run.stdout[-4000:]
    assert "check passed" not in run.stdout


def test_train_cp_refuses_a_rank_without_tokens():
    """A batch that leaves a rank no tokens (1 token over 2 ranks) stops every rank with a
    message saying so; before, that rank alone died of an IndexError inside transformers'
    mask preparation (an empty row) and the other lost its peer."""
    run = _torchrun("--steps", "1", "--tokens", "1", "--layers", "1")
    assert run.returncode != 0, run.stdout[-4000:]
    assert "a rank holds no tokens of this batch" in run.stdout and "IndexError" not in run.stdout, run.stdout[-4000:]


def _load_example():
    """examples/train_cp.py as a module (its dataclasses need it in sys.modules)."""
    name = "train_cp_example"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.mark.parametrize("args, message", [
    (["--steps", "0", "--check"], "argument --steps: got 0; expected an integer >= 1"),
    (["--tokens", "0"], "argument --tokens: got 0; expected an integer >= 1"),
    (["--short-max", "0"], "argument --short-max: got 0; expected an integer >= 1"),
    (["--heads", "0"], "argument --heads: got 0; expected an integer >= 1"),
    (["--long-frac", "1.5"], "argument --long-frac: got 1.5; expected a probability in [0, 1]"),
    (["--clip", "-1"], "argument --clip: got -1.0; expected a number >= 0"),
    (["--device", "cpu", "--dtype", "bfloat16"], "--dtype bfloat16 needs --device cuda"),
    (["--heads", "4", "--kv-heads", "3"], "--heads 4 must be a multiple of --kv-heads 3"),
])
def test_train_cp_argument_errors(args, message, capsys):
    """Bad arguments stop at parsing with a message naming them. Before, --steps 0 --check
    printed "check passed" having checked nothing, and 0 tokens, heads or short-max failed
    deep inside torch (an empty torch.cat, a modulo by zero, random_'s bounds)."""
    example = _load_example()
    with pytest.raises(SystemExit) as info:
        example.parse_args(["--device", "cpu", *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


# -- ringflash demo (ringflash/demo.py, ringflash/cli.py) ----------------------------------


def test_cli_demo_rejects_a_negative_cp_world_size(capsys):
    """--cp-world-size -1 silently skipped the context-parallel run (and ran the rest)."""
    from ringflash.cli import main as cli_main

    with pytest.raises(SystemExit) as info:
        cli_main(["demo", "--cp-world-size", "-1"])
    assert info.value.code == 2
    assert "argument --cp-world-size: got -1; expected a count >= 0" in capsys.readouterr().err


def test_demo_on_the_cpu_with_compiled_kernels_reruns_interpreted(monkeypatch, capsys):
    """On a GPU machine the kernels are compiled at import, and Triton picks its interpreter
    then: ``ringflash demo --device cpu`` set TRITON_INTERPRET too late, printed
    "interpreted", and its Triton rows failed on CPU tensors. It now reruns itself in a child
    started with TRITON_INTERPRET=1. Simulated here: the kernels reported compiled, the child
    recorded instead of run."""
    import subprocess

    import ringflash.demo as demo
    import ringflash.kernels.common as kernels_common

    calls = []
    monkeypatch.setattr(kernels_common, "_INTERPRETING", False)
    monkeypatch.setattr(subprocess, "call", lambda cmd, env=None: calls.append((cmd, env)) or 0)
    assert demo.run_demo("cpu", 0) == 0
    assert len(calls) == 1, "the demo ran in this process, whose kernels are compiled"
    cmd, env = calls[0]
    assert cmd[1:] == ["-m", "ringflash", "demo", "--device", "cpu", "--cp-world-size", "0",
                       "--cp-strategy", "zigzag_llama3"]
    assert env["TRITON_INTERPRET"] == "1"
    assert "compiled" in "\n".join(demo.describe_environment(torch.device("cpu")))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU demo, in this interpreted process")
def test_demo_on_the_cpu_passes(capsys):
    """``ringflash demo`` on the CPU (about 20 s on 2 cores): every row, the context-parallel
    one at 2 gloo ranks included, within its tolerance of the float64 reference."""
    from ringflash.cli import main as cli_main

    assert cli_main(["demo", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "interpreted" in out
    assert "all 5 rows passed" in out and "FAILED" not in out, out
    assert "context parallel (zigzag_llama3, 2 ranks, gloo on the CPU" in out, out

"""Replay the last example a property-test log names (``RINGFLASH_HYPOTHESIS_ECHO=1`` prints
each example's replay line as it starts), each replay in a fresh process, under several
environments, and print how each ended. For a failure that kills the CUDA context (an
illegal memory access), where hypothesis itself can report nothing:

    RINGFLASH_HYPOTHESIS_ECHO=1 python -m pytest -s ... > log 2>&1
    python scripts/replay_last_example.py log RINGFLASH_HEAD_PARTS=1 RINGFLASH_HEAD_PARTS=0

Each further argument is one environment (VAR=VALUE[,VAR=VALUE...]); every replay also runs
with CUDA_LAUNCH_BLOCKING=1, so that a faulting kernel is named where it is launched.
REPLAY_ONE_STAGE=1 in an environment runs the portable kernels' configurations with one
pipeline stage (Triton's software pipelining off), to tell a pipelining fault from others.
"""

from __future__ import annotations

import os
import subprocess
import sys


def last_replays(log_path: str, count: int = 2) -> list[str]:
    """The examples to replay, oldest first. Where the log has the property tests' outcome
    lines (``outcome: ok`` or an exception's type after each example, ``_echo_outcome``),
    the first ``count`` examples that did not end "ok": the first of them is where a fault
    happened, as each example waits for the GPU before its outcome is printed. Otherwise
    the last ``count`` examples (an asynchronous fault may surface only in the example
    after the one that caused it)."""
    examples: list[list] = []  # [replay call, outcome or None]
    with open(log_path, errors="replace") as f:
        for text in f:
            if text.startswith("replay: "):
                examples.append([text[len("replay: "):].strip(), None])
            elif text.startswith("outcome: ") and examples:
                examples[-1][1] = text[len("outcome: "):].strip()
    if any(outcome is not None for _, outcome in examples):
        return [call for call, outcome in examples if outcome != "ok"][:count]
    return [call for call, _ in examples[-count:]]


#: With REPLAY_ONE_STAGE=1: every portable kernel configuration with num_stages=1.
_ONE_STAGE = """
import dataclasses, os
from ringflash.kernels import configs as _configs
if os.environ.get("REPLAY_ONE_STAGE") == "1":
    _config_for = _configs.config_for
    _configs.config_for = lambda *a, **k: dataclasses.replace(_config_for(*a, **k), num_stages=1)
"""


def main(argv: list[str]) -> int:
    if len(argv) < 1:
        print(__doc__)
        return 2
    calls = last_replays(argv[0])
    if not calls:
        print(f"replay_last_example: no 'replay:' line in {argv[0]}")
        return 1
    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    for call, spec in ((call, spec) for call in calls for spec in argv[1:] or [""]):
        print(f"example: {call}", flush=True)
        code = (f"import torch\nfrom test_properties import *\n{_ONE_STAGE}{call}\n"
                "if torch.cuda.is_available():\n    torch.cuda.synchronize()\nprint('REPLAY OK')")
        env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
        env.update(kv.split("=", 1) for kv in spec.split(",") if kv)
        done = subprocess.run([sys.executable, "-c", code], cwd=tests, env=env, capture_output=True, text=True,
                              timeout=300)
        tail = (done.stdout + done.stderr).strip().splitlines()[-25:]
        print(f"=== {spec or '(as is)'}: rc={done.returncode}")
        print("\n".join(tail), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

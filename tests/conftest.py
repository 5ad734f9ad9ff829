"""Shared test scaffolding: awkward sizes, the gpu marker, the interpreter switch."""

import os

import torch

# Triton kernels run in Triton's interpreter when there is no GPU. It must be chosen
# before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

#: Sequence lengths that are not multiples of any block size, and the degenerate 1.
AWKWARD_SEQLENS = [1, 17, 129]
#: Varlen batches (per-sequence lengths) including a zero-length sequence inside the batch.
AWKWARD_VARLEN_BATCHES = [[17], [5, 0, 33], [1, 129, 0, 16]]

HAS_CUDA = torch.cuda.is_available()
#: Whether this process runs the Triton kernels interpreted (decided before triton's import).
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

if INTERPRETING:  # CI time: the interpreter's overflow checks whose verdict it discards
    from interpreter_options import skip_dead_overflow_checks

    skip_dead_overflow_checks()


def run_cpu_cli(args: list) -> int:
    """``ringflash <args>`` for a ``--device cpu`` smoke run of a command.

    In this process where it runs interpreted (CPU machines: fast, and spies can watch it);
    on a GPU machine in a child with ``TRITON_INTERPRET=1``, as a user there would run it,
    since the interpreter must be chosen before triton is first imported.
    """
    if INTERPRETING:
        from ringflash.cli import main

        return main(args)
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-m", "ringflash", *args], env=env, timeout=900).returncode


#: For tests that watch an interpreted run from inside (spies, a patched import).
needs_interpreter = pytest.mark.skipif(
    not INTERPRETING, reason="watches an in-process interpreted run; this process compiles the kernels (GPU)"
)


#: Test files whose tests each run for minutes (hypothesis examples; whole training runs):
#: they go first, so that pytest-xdist's workers start them at once instead of ending the
#: session on them (run 36: the suite on a GPU ran past its 560 s with six of them not
#: started, while their sum over 14 workers was about 360 s).
LONG_FIRST = ("tests/test_properties.py", "tests/test_examples.py")


def passed_in_log(path: str) -> set[str]:
    """The node ids that a ``RINGFLASH_TEST_LOG`` file records as passed or skipped, less any
    it also records as failed (a teardown, a rerun)."""
    if not os.path.isfile(path):
        raise pytest.UsageError(f"RINGFLASH_TEST_RESUME: got {path!r}; expected a RINGFLASH_TEST_LOG file")
    done, failed = set(), set()
    with open(path) as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 4 or line.startswith(" "):  # a failure's text
                continue
            outcome, nodeid = fields[0], fields[3]
            if outcome == "failed":
                failed.add(nodeid)
            elif outcome in ("passed", "skipped"):
                done.add(nodeid)
    return done - failed


def pytest_collection_modifyitems(config, items):
    # Stable, and the same in every xdist worker (each collects and must agree).
    items.sort(key=lambda item: not item.nodeid.startswith(LONG_FIRST))
    # RINGFLASH_TEST_RESUME=<an earlier RINGFLASH_TEST_LOG file>: leave out what it passed,
    # so that a GPU suite cut by a call's time limit goes on in the next call (run 42).
    resume = os.environ.get("RINGFLASH_TEST_RESUME")
    if resume:
        done = passed_in_log(resume)
        kept = [item for item in items if item.nodeid not in done]
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid in done])
        items[:] = kept
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


#: Fresh random inputs on every run; set RINGFLASH_TEST_SEED to replay a failing run.
#: Drawn once and put in the environment, so that pytest-xdist's workers (which inherit it)
#: agree with the controller: the fuzz cases are parametrized from it, and xdist requires
#: every worker to collect the same tests.
os.environ.setdefault("RINGFLASH_TEST_SEED", str(int.from_bytes(os.urandom(4), "little")))
SESSION_SEED = int(os.environ["RINGFLASH_TEST_SEED"])


def pytest_report_header(config):
    return f"ringflash test seed: RINGFLASH_TEST_SEED={SESSION_SEED}"


@pytest.fixture
def gen(request):
    """A CPU generator seeded from the session seed and the test's id: fresh each run, replayable."""
    import zlib

    return torch.Generator().manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))


def cu_seqlens_from_lengths(lengths, device="cpu"):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


#: RINGFLASH_TEST_LOG=<file>: each test's outcome, duration and failure text appended as it
#: finishes. A run cut off by a time limit (the GPU machine's 10-minute calls) still says
#: what failed, how long each test took and which tests never ran.
_TEST_LOG = os.environ.get("RINGFLASH_TEST_LOG")


def pytest_runtest_logreport(report):
    if not _TEST_LOG or os.environ.get("PYTEST_XDIST_WORKER"):
        return  # under xdist the controller sees every worker's reports
    if report.when != "call" and report.outcome == "passed":
        return
    line = f"{report.outcome}\t{report.when}\t{report.duration:.2f}\t{report.nodeid}\n"
    if report.outcome == "failed":
        # The seed (`pytest -q` prints no header; without it the inputs are lost), then the
        # exception's own line: a long report (hypothesis's, with its example and
        # replay) pushes it out of the last lines (run 36 lost which output differed).
        line += f"    seed: RINGFLASH_TEST_SEED={SESSION_SEED}\n"
        crash = getattr(getattr(report.longrepr, "reprcrash", None), "message", None)
        if crash:
            line += "".join("    E " + s + "\n" for s in crash.splitlines()[:20])
        line += "".join("    " + s + "\n" for s in str(report.longrepr).splitlines()[-25:])
    with open(_TEST_LOG, "a") as f:
        f.write(line)

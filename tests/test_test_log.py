"""The suite's own bookkeeping for GPU runs cut by a call's time limit: the per-test log
(``RINGFLASH_TEST_LOG``) and the resumed run that leaves out what a log says passed
(``RINGFLASH_TEST_RESUME``)."""

import os
import subprocess
import sys

import pytest

from conftest import passed_in_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = "tests/test_configs.py"


def _run(*args, **env) -> subprocess.CompletedProcess:
    # Not an xdist worker's environment (a worker leaves the log to its controller), nor this
    # run's own log or resume file.
    base = {name: value for name, value in os.environ.items()
            if not name.startswith("PYTEST_XDIST") and name not in ("RINGFLASH_TEST_LOG", "RINGFLASH_TEST_RESUME")}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", *args],
                          cwd=ROOT, env=dict(base, **env), capture_output=True, text=True, timeout=300)


def _collected(**env) -> list[str]:
    done = _run("--collect-only", "-q", TARGET, **env)
    assert done.returncode == 0, done.stdout + done.stderr
    return [line for line in done.stdout.splitlines() if line.startswith(TARGET + "::")]


def test_log_records_are_read_back(tmp_path):
    """Passed and skipped tests count as done, a failed one (in any phase) does not, and a
    failure's indented text is not a record."""
    log = tmp_path / "log.tsv"
    log.write_text("passed\tcall\t0.10\ta.py::t1\n"
                   "skipped\tsetup\t0.00\ta.py::t2\n"
                   "failed\tcall\t1.00\ta.py::t3\n"
                   "    seed: RINGFLASH_TEST_SEED=1\n"
                   "    E passed\tcall\t0\ta.py::t5\n"
                   "passed\tcall\t0.20\ta.py::t4\n"
                   "failed\tteardown\t0.00\ta.py::t4\n")
    assert passed_in_log(str(log)) == {"a.py::t1", "a.py::t2"}
    with pytest.raises(pytest.UsageError, match="RINGFLASH_TEST_RESUME: got '/nonexistent'"):
        passed_in_log("/nonexistent")


def test_a_resumed_run_leaves_out_what_passed(tmp_path):
    """A real log of part of a file, then a collection under RINGFLASH_TEST_RESUME: exactly
    the tests that did not pass remain."""
    every = _collected()
    assert len(every) > 3
    log = tmp_path / "log.tsv"
    ran = _run("-q", every[0], every[1], RINGFLASH_TEST_LOG=str(log))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert passed_in_log(str(log)) == set(every[:2])
    assert _collected(RINGFLASH_TEST_RESUME=str(log)) == every[2:]


def test_a_failure_is_logged_with_its_seed(tmp_path):
    """A failing test's record carries the session seed (the GPU calls run `pytest -q`,
    which prints no header) and the exception's line."""
    (tmp_path / "test_fails.py").write_text("def test_fails():\n    assert 1 == 2, 'the planted failure'\n")
    log = tmp_path / "log.tsv"
    tests_dir = os.path.join(ROOT, "tests")
    done = _run("-q", "-p", "conftest", "--rootdir", str(tmp_path), str(tmp_path / "test_fails.py"),
                RINGFLASH_TEST_LOG=str(log), RINGFLASH_TEST_SEED="12345",
                PYTHONPATH=tests_dir + os.pathsep + os.environ.get("PYTHONPATH", ""))
    assert done.returncode == 1, done.stdout + done.stderr
    record = log.read_text()
    assert record.startswith("failed\tcall\t") and "test_fails.py::test_fails\n" in record, record
    assert "    seed: RINGFLASH_TEST_SEED=12345\n" in record and "the planted failure" in record, record
    assert passed_in_log(str(log)) == set()


def test_replays_start_at_the_first_example_that_did_not_end_ok(tmp_path):
    """``scripts/replay_last_example.py`` on a property-test log with outcome lines
    (``RINGFLASH_HYPOTHESIS_ECHO=1``) replays the first examples that did not end "ok",
    where a fault happened; on a log without them, the last examples (run 49's seed 4: its
    log could not say which example had faulted)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("replay_last_example",
                                                  os.path.join(ROOT, "scripts", "replay_last_example.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with_outcomes = tmp_path / "echo.log"
    with_outcomes.write_text("replay: a()\noutcome: ok\nreplay: b()\nnoise\noutcome: AcceleratorError\n"
                             "replay: c()\noutcome: AcceleratorError\nreplay: d()\noutcome: ok\nreplay: e()\n")
    assert tool.last_replays(str(with_outcomes)) == ["b()", "c()"]
    assert tool.last_replays(str(with_outcomes), count=5) == ["b()", "c()", "e()"]
    plain = tmp_path / "plain.log"
    plain.write_text("replay: a()\nreplay: b()\nreplay: c()\n")
    assert tool.last_replays(str(plain)) == ["b()", "c()"]

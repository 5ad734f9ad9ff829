"""Runs that many tests read, done once per pytest session even under pytest-xdist.

A CP test module runs all of its cases of one world size in one spawned process group and
each test reads its own case from that report. In one process a cache suffices; under
``pytest -n N`` every worker that draws one of those tests would repeat the whole run, and
on a 16-core GPU machine fourteen concurrent copies of each CP batch made every CP test
take two to three minutes. pytest-xdist's own ``--dist loadgroup`` cannot be relied on to
keep such tests together (with pytest 9.2 its node-id tagging has no effect), so the
workers share the result through files instead: the first to ask runs it under a file
lock, the others wait on the lock and read the pickled result.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import pickle
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def _session_dir() -> Path | None:
    """A directory private to this pytest-xdist session, or None outside pytest-xdist."""
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run_id:
        return None
    path = Path(tempfile.gettempdir()) / f"ringflash-tests-{run_id}"
    path.mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def exclusive(name: str) -> Iterator[None]:
    """Hold a lock named ``name`` shared by every worker of this session (no-op without xdist)."""
    directory = _session_dir()
    if directory is None:
        yield
        return
    with open(directory / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def once_per_session(fn: Callable) -> Callable:
    """Cache ``fn``'s result per arguments, in this process and across this session's workers.

    The result must pickle. An exception is not cached: the next caller runs it again.
    """

    @functools.lru_cache(maxsize=None)
    @functools.wraps(fn)
    def cached(*args):
        directory = _session_dir()
        if directory is None:
            return fn(*args)
        key = "-".join([fn.__module__, fn.__qualname__, *map(str, args)])
        result_file = directory / f"{key}.pickle"
        with exclusive(key):
            if result_file.exists():
                return pickle.loads(result_file.read_bytes())
            result = fn(*args)
            result_file.write_bytes(pickle.dumps(result))
            return result

    return cached

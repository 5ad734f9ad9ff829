"""CI time: Triton's interpreter computes integer-overflow checks whose verdict it discards.

With ``sanitize_overflow`` on (the interpreter's default), every int32 ``+``, ``-`` and
``*`` inside a kernel is redone in int64 and compared with the type's range, and the result
goes to ``device_assert``, which does nothing unless the interpreter's ``debug`` option is
on. The interpreter never turns it on (``TRITON_DEBUG=1`` does not reach it; Triton 3.9 on
the CI machine), so the checks cannot fail a run, yet they were half of every interpreted
kernel's time (the context-parallel cases at world size 2: 98 s -> 47 s without them).

``skip_dead_overflow_checks()`` turns the option off only after a probe kernel whose int32
product overflows has run without an error, i.e. where the checks are observably dead; a
Triton whose interpreter can fail on them keeps them. Results are unchanged: the checks
never touch a kernel's values. Called by conftest (the pytest processes) and at the import
of the modules whose functions the spawned gloo ranks run (cp_cases, cp_reliability_cases,
hf_cases; the others import conftest). ``python tests/interpreter_options.py SCRIPT ARGS``
runs SCRIPT as ``__main__`` after the change (test_examples: each torchrun rank).
"""

from __future__ import annotations

import os

_done = False


def _overflow_is_reported() -> bool:
    """Whether an int32 overflow inside an interpreted kernel raises (the checks are live)."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def probe(x_ptr, factor):
        x = tl.load(x_ptr)
        tl.store(x_ptr, x * factor)  # 2**30 * 4: past int32's range

    try:
        probe[(1,)](torch.tensor([2**30], dtype=torch.int32), 4)
    except Exception:
        return True
    return False


def skip_dead_overflow_checks() -> bool:
    """Turn the interpreter's overflow checks off where they cannot fail; returns whether it did."""
    global _done
    if _done or os.environ.get("TRITON_INTERPRET") != "1":
        return _done
    import dataclasses

    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if not getattr(options, "sanitize_overflow", False) or not dataclasses.is_dataclass(options):
        return False  # already off, or an interpreter without the option
    if _overflow_is_reported():
        return False
    builder.options = dataclasses.replace(options, sanitize_overflow=False)
    _done = True
    return True


if __name__ == "__main__":
    import runpy
    import sys

    skip_dead_overflow_checks()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as when SCRIPT itself is run
    runpy.run_path(script, run_name="__main__")

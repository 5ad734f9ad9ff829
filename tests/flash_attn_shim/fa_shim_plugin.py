"""pytest plugin for running flash-attn's test file against the shim (``-p fa_shim_plugin``;
``scripts/flash_attn_tests.py`` loads it).

* ``--fa-sample N``: keep N parametrizations of each test function (0: all), picked by a
  seeded shuffle (``--fa-seed``) so every pytest-xdist worker collects the same ones.
* ``--fa-param NAME=V1,V2``: keep the parametrizations whose parameter NAME (e.g. ``d``,
  ``dtype=float16``, ``seqlen_q``) is one of the values; before sampling.
* The kept tests run interleaved across functions (round robin), so a run cut short by a
  time limit still reaches every function.
* ``--fa-results PATH``: one JSON line per test outcome, written as it arrives (a run that
  is killed keeps what it had); without it the per-function summary is printed at the end.
"""

from __future__ import annotations

import collections
import json
import random
import re

import pytest

OUTCOMES = ("passed", "failed", "skipped", "error")
_EXCLUDED = pytest.StashKey[set]()  # node ids of test functions --fa-param left no parametrization


def pytest_addoption(parser):
    group = parser.getgroup("fa_shim", "flash-attn tests through the ringflash shim")
    group.addoption("--fa-sample", type=int, default=0, help="parametrizations kept per test function (0: all)")
    group.addoption("--fa-seed", type=int, default=0, help="seed of the --fa-sample choice")
    group.addoption("--fa-param", action="append", default=[], metavar="NAME=V1,V2",
                    help="keep only parametrizations whose parameter NAME is one of the values (repeatable)")
    group.addoption("--fa-results", default=None, help="append one JSON line per test outcome to this file")


def function_of(nodeid: str) -> str:
    """``path::test_fn[params]`` -> ``test_fn``."""
    return nodeid.split("::")[-1].split("[")[0]


def _keyword_filter(config):
    """A predicate on ``(function, callspec id)`` approximating ``-k`` (pytest's own expression
    parser, names matched as substrings of the test's name and file), or None."""
    expr = config.getoption("keyword", None)
    if not expr:
        return None
    try:
        from _pytest.mark.expression import Expression

        compiled = Expression.compile(expr)
    except Exception:  # a pytest without this (internal) module: leave -k to pytest
        return None

    def keep(name: str, file: str) -> bool:
        hay = (name.lower(), file.lower(), "parametrize")
        return compiled.evaluate(lambda sub, **_: any(sub.lower() in h for h in hay))

    return keep


def _param_filters(config) -> dict[str, set[str]]:
    """``--fa-param d=32,64 --fa-param dtype=float16`` -> {"d": {"32", "64"}, "dtype": {"float16"}}."""
    filters: dict[str, set[str]] = {}
    for spec in config.getoption("fa_param") or []:
        name, sep, values = spec.partition("=")
        if not sep or not name.strip():
            raise pytest.UsageError(f"--fa-param: expected NAME=V1,V2,..., got {spec!r}")
        filters.setdefault(name.strip(), set()).update(v.strip() for v in values.split(","))
    return filters


def _value_matches(value, allowed: set[str]) -> bool:
    text = str(value)
    return text in allowed or text.rsplit(".", 1)[-1] in allowed  # torch.float16 matches float16


@pytest.hookimpl(wrapper=True)
def pytest_generate_tests(metafunc):
    """Thin flash-attn's parametrizations while they are generated (it has about 500k, which
    take a minute and gigabytes to expand into test items).

    Each ``parametrize`` call of a test (one per decorator) multiplies the combinations so far
    by its values. After each call, combinations whose parameters fail ``--fa-param`` are
    dropped, and with ``--fa-sample`` a product past a cap is cut back to a random subset
    (every full combination stays equally likely), so expansion stays small; at the end the
    sample keeps ``--fa-sample`` combinations that ``-k`` selects. This uses
    ``metafunc._calls`` (pytest internals, stable for years); without it ``--fa-param`` does
    nothing and the sample is taken from the collected items instead (slower, same rule)."""
    sample = metafunc.config.getoption("fa_sample")
    filters = _param_filters(metafunc.config)
    if not (sample > 0 or filters) or not isinstance(getattr(metafunc, "_calls", None), list):
        return (yield)
    name, file = metafunc.function.__name__, metafunc.definition.path.name
    rng = random.Random(f"{metafunc.config.getoption('fa_seed')}:{name}")
    cap = max(20 * sample, 1000)
    original = metafunc.parametrize

    emptied = []

    def parametrize(*args, **kwargs):
        original(*args, **kwargs)
        calls = metafunc._calls
        if emptied:  # pytest restarts from scratch on an empty list: keep it empty
            calls = []
        elif filters:
            calls = [c for c in calls if all(_value_matches(c.params[k], allowed) for k, allowed in filters.items()
                                             if k in getattr(c, "params", {}))]
        if sample > 0 and len(calls) > cap:
            calls = rng.sample(calls, cap)
        if not calls:
            emptied.append(True)
        metafunc._calls[:] = calls

    metafunc.parametrize = parametrize
    try:
        result = yield
    finally:
        del metafunc.parametrize
    calls = metafunc._calls
    if emptied:  # --fa-param excluded every combination; pytest will collect the bare function
        metafunc.config.stash.setdefault(_EXCLUDED, set()).add(metafunc.definition.nodeid)
    elif sample > 0:
        keep = _keyword_filter(metafunc.config)
        chosen = []
        for i in rng.sample(range(len(calls)), len(calls)):
            if keep is None or not hasattr(calls[i], "id") or keep(f"{name}[{calls[i].id}]", file):
                chosen.append(i)
                if len(chosen) == sample:
                    break
        # None selected: keep one for -k to deselect (an empty list would make pytest collect
        # the function once without parameters).
        metafunc._calls[:] = [calls[i] for i in sorted(chosen)] if chosen else calls[:1]
    return result


@pytest.hookimpl(trylast=True)  # after -k / -m deselected theirs
def pytest_collection_modifyitems(session, config, items):
    excluded = config.stash.get(_EXCLUDED, set())
    by_function: dict[str, list] = collections.OrderedDict()
    for item in items:
        if item.nodeid in excluded:
            continue
        by_function.setdefault(function_of(item.nodeid), []).append(item)
    sample, seed = config.getoption("fa_sample"), config.getoption("fa_seed")
    kept: dict[str, list] = {}
    for name, group in by_function.items():
        if sample > 0 and len(group) > sample:
            rng = random.Random(f"{seed}:{name}")
            group = sorted(rng.sample(group, sample), key=lambda it: it.nodeid)
        kept[name] = group
    order = [it for column in _round_robin(list(kept.values())) for it in column]
    chosen = {id(it) for it in order}
    dropped = [it for it in items if id(it) not in chosen]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = order


def _round_robin(groups):
    for i in range(max((len(g) for g in groups), default=0)):
        yield [g[i] for g in groups if i < len(g)]


def _reason(report) -> str:
    """One line saying why a test failed or was skipped."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: (path, line, reason)
        return str(longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)
    message = getattr(crash, "message", None)
    if not message:
        text = str(getattr(report, "longreprtext", "") or "")
        lines = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("E ")]
        message = lines[-1] if lines else (text.strip().splitlines() or [""])[-1]
    message = message.strip()
    return message.splitlines()[0][:300] if message else ""


class _Recorder:
    def __init__(self, config):
        self.config = config
        self.path = config.getoption("fa_results")
        self.records: list[dict] = []
        self.seen: set[str] = set()
        if self.path:
            open(self.path, "w").close()

    def pytest_runtest_logreport(self, report):
        outcome = None
        if report.when == "call":
            outcome = report.outcome
        elif report.when == "setup" and not report.passed:
            outcome = "skipped" if report.skipped else "error"
        elif report.when == "teardown" and report.failed:
            outcome = "error"
        elif report.when not in ("setup", "call", "teardown") and report.failed:
            outcome = "failed"  # pytest-xdist's report for a test whose worker crashed (when "???")
        if outcome is None or (report.nodeid in self.seen and outcome != "error"):
            return
        self.seen.add(report.nodeid)
        record = {"nodeid": report.nodeid, "function": function_of(report.nodeid), "outcome": outcome,
                  "reason": "" if outcome == "passed" else _reason(report),
                  "seconds": round(getattr(report, "duration", 0.0), 3)}
        self._record(record)

    def _record(self, record: dict) -> None:
        self.records.append(record)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def pytest_collectreport(self, report):
        if report.failed and report.nodeid not in self.seen:  # e.g. the test file fails to import
            self.seen.add(report.nodeid)
            self._record({"nodeid": report.nodeid or "(collection)", "function": "(collection)", "outcome": "error",
                          "reason": _reason(report), "seconds": 0.0})

    def pytest_terminal_summary(self, terminalreporter):
        if not self.path:
            terminalreporter.write_line("")
            for line in format_summary(self.records).splitlines():
                terminalreporter.write_line(line)


def pytest_configure(config):
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: the controller records
        return
    config.pluginmanager.register(_Recorder(config), "fa_shim_recorder")


def read_results(path: str) -> list[dict]:
    records = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                # An error in teardown overrides the call's outcome.
                if rec["nodeid"] not in records or rec["outcome"] == "error":
                    records[rec["nodeid"]] = rec
    return list(records.values())


def _reason_key(reason: str) -> str:
    """Failure reasons grouped with their numbers blanked (max diffs differ per test)."""
    return re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "#", reason)


def format_summary(records: list[dict], reasons_per_function: int = 3) -> str:
    """A per-function table of outcomes, then the commonest failure reasons of each function."""
    counts: dict[str, collections.Counter] = collections.OrderedDict()
    failures: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    examples: dict[tuple[str, str], dict] = {}
    for rec in records:
        counts.setdefault(rec["function"], collections.Counter())[rec["outcome"]] += 1
        if rec["outcome"] in ("failed", "error"):
            key = _reason_key(rec["reason"])
            failures[rec["function"]][key] += 1
            examples.setdefault((rec["function"], key), rec)
    width = max([len(f) for f in counts] + [len("function"), len("total")])
    head = f"{'function':<{width}}  " + "  ".join(f"{o:>7}" for o in OUTCOMES)
    lines = ["flash-attn tests through the ringflash shim, per test function:", head, "-" * len(head)]
    total = collections.Counter()
    for name, c in counts.items():
        total.update(c)
        lines.append(f"{name:<{width}}  " + "  ".join(f"{c[o]:>7}" for o in OUTCOMES))
    lines.append("-" * len(head))
    lines.append(f"{'total':<{width}}  " + "  ".join(f"{total[o]:>7}" for o in OUTCOMES))
    if not records:
        lines.append("(no test reported an outcome)")
    for name, reasons in failures.items():
        lines.append(f"{name}: failures by reason")
        for key, n in reasons.most_common(reasons_per_function):
            ex = examples[(name, key)]
            lines.append(f"  {n:>5} x {ex['reason']}")
            lines.append(f"          e.g. {ex['nodeid'].split('::')[-1]}")
        rest = sum(reasons.values()) - sum(n for _, n in reasons.most_common(reasons_per_function))
        if rest:
            lines.append(f"  {rest:>5} x (other reasons)")
    return "\n".join(lines)

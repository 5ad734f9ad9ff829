#!/usr/bin/env python3
"""Run flash-attn's own tests (its ``tests/test_flash_attn.py``) against ringflash.

flash-attn's test file is not part of this repo: it is copied at run time into the ignored
``.cache/flash-attn/`` (from a flash-attention git repo or checkout, ``--flash-attn-repo`` or
``$FLASH_ATTN_REPO``, default the local mirror), or given as a path. ``tests/flash_attn_shim``
goes first on ``PYTHONPATH``, so the file's ``import flash_attn`` resolves to ringflash.
The tests hard-code ``device = "cuda"``: run this on a GPU machine.

    scripts/flash_attn_tests.py --prepare              # with network: copy the test file, unpack einops
    python3 scripts/flash_attn_tests.py -n 16 --sample 40 --time-limit 400   # GPU machine

The default selection (``-k``) is the test functions of the features ringflash has (dense,
varlen, packed, causal, split-KV, KV cache and paged KV, dropout, ALiBi, determinism);
``--only EXPR`` narrows it further (a pytest ``-k`` expression, e.g. ``"dtype0 and not
2048"``), ``--param NAME=V1,V2`` keeps parametrizations by value (``dtype=float16``,
``d=32,64``), and ``--sample N`` then runs N random ones per function (the file has about
500k). ``--time-limit`` interrupts pytest and still summarises what ran; ``--results``
keeps one JSON line per outcome. Arguments after ``--`` go to pytest unchanged.
flash-attn's tests import ``einops``: where it is not installed, point ``EINOPS_PATH`` at an
unpacked einops wheel (``--prepare`` makes ``.cache/einops``, used by default when present).
At the end a table gives passed/failed/skipped counts per test function and the commonest
failure reasons.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "tests" / "flash_attn_shim"
CACHE = ROOT / ".cache"
CACHED_TEST = CACHE / "flash-attn" / "test_flash_attn.py"
DEFAULT_REPO = "/work/.mirror/Dao-AILab+flash-attention/repo"
TEST_IN_REPO = "tests/test_flash_attn.py"

#: The test functions of features ringflash has. Left out: test_flash_attn_varlen_paged_kv_num_splits
#: (calls flash-attn's private _flash_attn_varlen_forward), test_flash_attn_generator_arg_must_be_none
#: (flash-attn's compiled extension), and test_flash_attn_kvcache_paged_block_table_bounds: it
#: expects an error for a device-side cache_seqlens past the block table's capacity, which needs a
#: host sync; ringflash stays inside the cache and returns NaN for that sequence instead
#: (tests/test_kvcache.py), so this test's pytest.raises fails by design.
FUNCTIONS = [
    "test_flash_attn_qkvpacked",
    "test_flash_attn_varlen_qkvpacked",
    "test_flash_attn_output",
    "test_flash_attn_varlen_output",
    "test_flash_attn_causal",
    "test_flash_attn_varlen_causal",
    "test_flash_attn_splitkv",
    "test_flash_attn_kvcache",
    "test_flash_attn_race_condition",
    "test_flash_attn_bwd_overflow",
    "test_flash_attn_bwd_transpose",
    "test_flash_attn_bwd_varlen_overflow",
    "test_flash_attn_deterministic",
    "test_flash_attn_varlen_deterministic",
]
#: Matched by the names above (-k matches substrings), so excluded by name.
EXCLUDED = ["test_flash_attn_kvcache_paged_block_table_bounds"]


def fetch_test_file(repo: str) -> Path:
    """Copy flash-attn's test file from a git repo (bare or not) or a checkout into the cache."""
    CACHED_TEST.parent.mkdir(parents=True, exist_ok=True)
    checkout = Path(repo) / TEST_IN_REPO
    if checkout.is_file():
        shutil.copyfile(checkout, CACHED_TEST)
        return CACHED_TEST
    try:
        text = subprocess.run(["git", "-C", repo, "show", f"HEAD:{TEST_IN_REPO}"], check=True,
                              capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.decode().strip() if isinstance(e, subprocess.CalledProcessError) else str(e)
        sys.exit(f"flash_attn_tests: cannot read {TEST_IN_REPO} from {repo!r} ({detail}); give the test file's "
                 "path, or --flash-attn-repo / $FLASH_ATTN_REPO (a flash-attention git repo or checkout)")
    CACHED_TEST.write_bytes(text)
    return CACHED_TEST


def unpack_einops() -> Path:
    """Download the einops wheel (pip) into .cache/wheels and unpack it into .cache/einops."""
    wheels, target = CACHE / "wheels", CACHE / "einops"
    subprocess.run([sys.executable, "-m", "pip", "download", "einops", "--no-deps", "--only-binary=:all:",
                    "-d", str(wheels)], check=True)
    wheel = sorted(wheels.glob("einops-*.whl"))[-1]
    shutil.rmtree(target, ignore_errors=True)
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    return target


def python_path(einops_path: str | None) -> str:
    parts = [str(SHIM)]
    if einops_path:
        parts.append(einops_path)
    parts.append(str(ROOT))
    if os.environ.get("PYTHONPATH"):
        parts.append(os.environ["PYTHONPATH"])
    return os.pathsep.join(parts)


def check_environment(env: dict, workers: int | None) -> None:
    probe = ("import importlib.util, sys\n"
             "try:\n    import einops\nexcept ImportError as e:\n    print('einops:', e); sys.exit(3)\n"
             "import torch, flash_attn, ringflash\n"
             "if not torch.cuda.is_available():\n"
             "    print('warning: no CUDA GPU here; flash-attn\\'s tests hard-code device=\"cuda\" and will fail',"
             " file=sys.stderr)\n"
             f"if {bool(workers)} and importlib.util.find_spec('xdist') is None:\n"
             "    print('pytest-xdist is not installed: drop -n'); sys.exit(4)\n"
             "print('flash_attn ->', flash_attn.flash_attn_func.__wrapped__.__module__, torch.__version__)\n")
    rc = subprocess.run([sys.executable, "-c", probe], env=env).returncode
    if rc == 3:
        sys.exit("flash_attn_tests: flash-attn's tests need einops, which cannot be imported. Install it, or set "
                 "EINOPS_PATH to a directory holding an unpacked einops wheel (`scripts/flash_attn_tests.py "
                 "--prepare` makes .cache/einops; carry .cache to a machine without network)")
    if rc != 0:
        sys.exit(f"flash_attn_tests: the environment check failed (exit {rc})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Arguments after -- go to pytest.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("test_file", nargs="?", help="flash-attn's tests/test_flash_attn.py (default: the cached "
                    f"copy in {CACHED_TEST.relative_to(ROOT)}, else copied from --flash-attn-repo)")
    ap.add_argument("--flash-attn-repo", default=os.environ.get("FLASH_ATTN_REPO", DEFAULT_REPO),
                    help="flash-attention git repo (bare or not) or checkout to copy the test file from")
    ap.add_argument("--prepare", action="store_true",
                    help="only copy the test file into the cache and unpack einops into .cache/einops")
    ap.add_argument("-n", "--workers", type=int, default=None, help="pytest-xdist workers (default: none)")
    ap.add_argument("--sample", type=int, default=0, help="parametrizations kept per test function (0: all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the --sample choice")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=V1,V2",
                    help="keep parametrizations whose parameter NAME is one of the values, e.g. dtype=float16, "
                    "d=32,64 (repeatable; applied before --sample)")
    ap.add_argument("--only", default=None, help="a pytest -k expression ANDed with the default selection")
    ap.add_argument("-k", dest="select", default=None, help="replace the default selection (a pytest -k expression)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds; then pytest is interrupted and the summary covers what ran")
    ap.add_argument("--results", default=None, help="JSON-lines file of outcomes (default: in .cache/flash-attn)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # after --: arguments for pytest
    args = ap.parse_args(argv[:len(argv) - len(extra) - 1] if "--" in argv else argv)

    if args.prepare:
        print("test file:", fetch_test_file(args.flash_attn_repo))
        print("einops:", unpack_einops(), "(EINOPS_PATH defaults to it)")
        return 0
    if args.test_file:
        test_file = Path(args.test_file).resolve()
        if not test_file.is_file():
            sys.exit(f"flash_attn_tests: {test_file} is not a file")
    else:
        test_file = CACHED_TEST if CACHED_TEST.is_file() else fetch_test_file(args.flash_attn_repo)

    einops_path = os.environ.get("EINOPS_PATH") or (str(CACHE / "einops") if (CACHE / "einops").is_dir() else None)
    if einops_path:
        einops_path = str(Path(einops_path).resolve())
    env = dict(os.environ, PYTHONPATH=python_path(einops_path), PYTHONUNBUFFERED="1")
    check_environment(env, args.workers)

    # Our own ini (not the repo's pyproject.toml, whose testpaths and addopts are for our suite).
    ini = CACHE / "flash-attn" / "pytest.ini"
    ini.parent.mkdir(parents=True, exist_ok=True)
    ini.write_text("[pytest]\n")
    results = Path(args.results or CACHE / "flash-attn" / "results.jsonl").resolve()
    select = args.select or f"({' or '.join(FUNCTIONS)}) and not ({' or '.join(EXCLUDED)})"
    if args.only:
        select = f"({select}) and ({args.only})"
    # -q with a running count for progress; failures are summarised at the end (--tb=no -rN),
    # which `-- --tb=short -rf` overrides.
    cmd = [sys.executable, "-m", "pytest", str(test_file), "-c", str(ini), "--rootdir", str(test_file.parent),
           "-p", "fa_shim_plugin", "-p", "no:cacheprovider", "-q", "-o", "console_output_style=count",
           "--tb=no", "-rN", "--disable-warnings", "-k", select,
           "--fa-sample", str(args.sample), "--fa-seed", str(args.seed), "--fa-results", str(results)]
    for spec in args.param:
        cmd += ["--fa-param", spec]
    if args.workers:
        cmd += ["-n", str(args.workers)]
    cmd += extra
    print("running:", shlex.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True)
    try:
        rc = proc.wait(timeout=args.time_limit)
    except subprocess.TimeoutExpired:
        print(f"\nflash_attn_tests: time limit {args.time_limit:.0f}s reached; interrupting pytest", flush=True)
        _stop(proc)
        rc = 124
    except KeyboardInterrupt:
        _stop(proc)
        rc = 130

    sys.path.insert(0, str(SHIM))
    from fa_shim_plugin import format_summary, read_results

    print()
    print(format_summary(read_results(str(results)) if results.is_file() else []))
    print(f"(outcomes: {results}; pytest exit {rc})")
    return rc


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT to pytest's process group (its summary still prints), then SIGKILL after 30 s."""
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


if __name__ == "__main__":
    sys.exit(main())

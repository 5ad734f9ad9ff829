"""Compile ringflash's kernels for Hopper (sm_90) on a machine without a GPU, and report each
compiled kernel's registers and spills.

Triton's interpreter accepts programs that its compiler rejects, and the CPU CI runs only the
interpreter, so a kernel change can pass every CPU test and fail to compile on the GPU. This
script runs the real host launchers on CPU tensors with every Triton launch turned into a
compile for sm_90 (Triton's bundled ptxas; nothing is launched), using the sm_90 entries of
``configs.TABLE`` as a GPU would. The numbers come from the installed Triton, which may differ
from the GPU machine's (Triton 3.9 gave the d=256 dK/dV tile 592 bytes of stack, 3.6 576):
for the GPU machine's figures run it from a virtual environment with that Triton
(``pip install torch==2.13.0 triton==3.6.0 numpy``); compare variants within one run, and
confirm speed on the GPU.

    python scripts/compile_sm90.py                       # d=64/128/256, causal and full, dropout on and off
    python scripts/compile_sm90.py --headdims 128 --dropout on

Prints one row per compiled kernel: registers per thread, stack bytes (spills and local
arrays), the SASS spill stores/loads (STL/LDL), and the static counts of SASS instructions,
of shared-memory stores/loads (STS/LDS), of warpgroup and warp MMAs (HGMMA/HMMA) and of
global loads and stores of single 2-byte elements (G16: unvectorized tile rows). Exit
status 1 if any launch failed to compile.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import types

os.environ["TRITON_INTERPRET"] = "0"  # before ringflash (which defaults it to 1 without a GPU) and triton
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
#: What the fake device reports: an H100 SXM.
SM_COUNT, SHARED_MEMORY_OPTIN = 132, 232448


class CompileOnlyDriver(DriverBase):
    """A Triton driver for a GPU that is not there: it names the sm_90 target, and nothing
    else is asked of it because every launch below stops after compiling."""

    @classmethod
    def is_active(cls) -> bool:
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("compile_sm90: nothing is timed")

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_device_interface(self):
        return torch.cuda


compiled: list[tuple[str, object]] = []


def _install() -> None:
    """Route Triton and ringflash's device queries to the fake sm_90 device."""
    triton_driver.set_active(CompileOnlyDriver())
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    JITFunction.run = compile_only
    props = types.SimpleNamespace(multi_processor_count=SM_COUNT, shared_memory_per_block_optin=SHARED_MEMORY_OPTIN,
                                  name="compile-only sm_90", major=9, minor=0)
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    torch.cuda.get_device_properties = lambda *a, **k: props
    torch.cuda.current_device = lambda: 0

    import importlib

    from ringflash.kernels import configs

    # The launchers check that tensors are on a GPU (they are CPU tensors here, never read).
    for name in ("common", "fwd", "bwd", "decode", "dropout_mask", "sm90"):
        module = importlib.import_module(f"ringflash.kernels.{name}")
        if hasattr(module, "check_device"):
            module.check_device = lambda *a, **k: None

    class OnGpu:
        """q as config_for sees it: on CUDA device 0 (so it reads the sm_90 table)."""

        def __init__(self, q):
            self.q, self.device, self.dtype = q, torch.device("cuda", 0), q.dtype

        def element_size(self) -> int:
            return self.q.element_size()

    config_for = configs.config_for
    configs.config_for = lambda kind, q, prob, run=None, dropout=False, atomic_dq=False: config_for(
        kind, OnGpu(q), prob, None, dropout, atomic_dq)
    configs._capability = lambda device: (9, 0)
    configs._device_index = lambda device: 0
    fwd_kv_tma = configs.fwd_kv_tma  # RINGFLASH_FWD_KV_TMA, as on the sm_90 device
    configs.fwd_kv_tma = lambda device, wanted=False: fwd_kv_tma(torch.device("cuda", 0), wanted)


def resource_usage(kernel) -> dict:
    """Registers and stack from cuobjdump's resource usage; spill stores/loads counted in SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        res = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    field = lambda name: int(m.group(1)) if (m := re.search(name + r":(\d+)", res)) else -1  # noqa: E731
    count = lambda op: len(re.findall(rf"\b{op}\b", sass))  # noqa: E731
    # Static instruction counts (every loop phase once, not executed counts): a variant's
    # added work, and its shared-memory round trips (STS/LDS: layout conversions among them).
    instructions = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", sass, re.M))
    return dict(regs=field("REG"), stack=field("STACK"), stl=count("STL"), ldl=count("LDL"),
                sass=instructions, sts=count("STS"), lds=count("LDS"),
                # Hopper's warpgroup MMAs against the older per-warp ones (tiles too small
                # for a warpgroup fall back to HMMA, at a fraction of the throughput).
                hgmma=len(re.findall(r"\bHGMMA\.", sass)), hmma=len(re.findall(r"\bHMMA\.", sass)),
                # Global loads and stores of single 2-byte elements: a tile's rows the compiler
                # could not prove aligned (``problem.stride_unit``; run 51's d=72).
                g16=len(re.findall(r"\b(?:LDG|STG)\.E\.U16\b", sass)),
                warps=kernel.metadata.num_warps, stages=kernel.metadata.num_stages)


def collect() -> list[tuple[str, dict]]:
    """(kernel, usage) of every launch compiled since the last call; raises if one did not."""
    rows = [(name, resource_usage(kernel)) for name, kernel in compiled if kernel is not None]
    failed = [name for name, kernel in compiled if kernel is None]
    compiled.clear()
    if failed:
        raise RuntimeError(f"did not compile: {failed}")
    return rows


def run_case(headdim: int, causal: bool, dropout_p: float, seqlen: int = 512, softcap: float = 0.0) -> list[tuple[str, dict]]:
    """Compile the forward and backward of one bf16 dense call; returns (kernel, usage) rows."""
    from ringflash import flash_attn_func

    q, k, v = (torch.randn(1, seqlen, 4, headdim, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = flash_attn_func(q, k, v, dropout_p=dropout_p, causal=causal, softcap=softcap)
    out.sum().backward()
    return collect()


def run_extras(decode_headdim: int = 128) -> list[tuple[str, dict]]:
    """Compile the kernels outside the dense training path: the decode family (a paged KV
    cache with new keys appended, head dim ``decode_headdim``: the append and decode
    kernels), the S_dmask kernel (with the forward) at a dropout threshold of 1, and the
    Gluon Hopper kernels."""
    from ringflash import flash_attn_func, flash_attn_with_kvcache

    d = decode_headdim
    q = torch.randn(2, 1, 8, d, dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(8, 256, 2, d, dtype=torch.bfloat16) for _ in range(2))
    block_table = torch.arange(8, dtype=torch.int32).reshape(2, 4)
    new_kv = [torch.randn(2, 1, 2, d, dtype=torch.bfloat16) for _ in range(2)]
    flash_attn_with_kvcache(q, k_cache, v_cache, *new_kv, cache_seqlens=torch.tensor([5, 700], dtype=torch.int32),
                            block_table=block_table, causal=True)
    # dropout_p = 2**-16 makes the threshold argument 1, which Triton specializes into a
    # constexpr: the mask must compile with it (a `.to()` on it did not).
    x = torch.randn(1, 256, 2, 64, dtype=torch.bfloat16)
    flash_attn_func(x, x, x, dropout_p=2.0**-16, return_attn_probs=True)
    collect_sm90()
    return collect()


def collect_sm90(headdims=(128,), causals=(True,)) -> None:
    """Compile the Gluon Hopper kernels (``kernels.sm90``): the forward and both backward
    kernels, with and without dropout, and the atomic backward; lengths off their tiles, GQA;
    and past d=128 (d=256: the forward, the SPLIT_D dK/dV kernel, dQ's 256-column tiles)."""
    from ringflash.kernels import configs, sm90
    from ringflash.kernels.problem import SeqMeta, make_problem

    if not sm90.AVAILABLE:
        return
    q = torch.randn(2, 300, 4, 256, dtype=torch.bfloat16)
    k = torch.randn(2, 500, 2, 256, dtype=torch.bfloat16)
    for causal in causals:
        wide = make_problem(q, k, None, 300, 500, 256**-0.5, causal, -1, -1, 0.0)
        sm90.attention_forward_sm90(q, k, k, wide)
        sm90.attention_backward_sm90(q, q, k, k, q, torch.zeros(2, 4, 300), wide)
    for d in headdims:
        for causal in causals:
            q = torch.randn(2, 300, 4, d, dtype=torch.bfloat16)
            k = torch.randn(2, 500, 2, d, dtype=torch.bfloat16)
            prob = make_problem(q, k, None, 300, 500, d**-0.5, causal, -1, -1, 0.0)
            sm90.attention_forward_sm90(q, k, k, prob)
            sm90.attention_backward_sm90(q, q, k, k, q, torch.zeros(2, 4, 300), prob)
            with configs.override(sm90_head_splits=2):  # the underfilled launch's float32 partials
                sm90.attention_backward_sm90(q, q, k, k, q, torch.zeros(2, 4, 300), prob)
            # With dropout (and its Philox-words kernel): both backwards; the atomic 5-GEMM one.
            sm90.attention_forward_sm90(q, k, k, prob, dropout=(0.1, 5))
            sm90.attention_backward_sm90(q, q, k, k, q, torch.zeros(2, 4, 300), prob, dropout=(0.1, 5))
            sm90.attention_backward_sm90(q, q, k, k, q, torch.zeros(2, 4, 300), prob, dropout=(0.1, 5), atomic_dq=True)
            # The varlen forward (per-sequence K/V descriptors made in the kernel), GQA and MQA.
            cu = torch.tensor([0, 100, 250, 300], dtype=torch.int32)
            meta = SeqMeta.from_cu_seqlens(cu, cu)
            for kv_heads in (2, 1):
                qv, kv = q[0], k[0, :300, :kv_heads]
                vprob = make_problem(qv, kv, meta, 150, 150, d**-0.5, causal, -1, -1, 0.0)
                sm90.attention_forward_sm90(qv, kv, kv, vprob, meta=meta)
                sm90.attention_backward_sm90(qv, qv, kv, kv, qv, torch.zeros(4, 300), vprob, meta=meta)


def compile_sm90_backward(headdim: int, causal: bool, atomic: bool) -> list[tuple[str, dict]]:
    """One Gluon backward without dropout, deterministic or the atomic 5-GEMM one
    (``collect_sm90`` compiles the atomic one only with dropout): their dK/dV kernels'
    spills side by side (docs/benchmarks.md, run 50)."""
    from ringflash.kernels import sm90
    from ringflash.kernels.problem import make_problem

    q = torch.randn(2, 300, 4, headdim, dtype=torch.bfloat16)
    k = torch.randn(2, 500, 2, headdim, dtype=torch.bfloat16)
    prob = make_problem(q, k, None, 300, 500, headdim**-0.5, causal, -1, -1, 0.0)
    sm90.attention_backward_sm90(q, q, k, k, q, torch.zeros(2, 4, 300), prob, atomic_dq=atomic)
    return collect()


def host_time(calls: int = 300, repeats: int = 5) -> None:
    """Host time per call (us) of the training path on this CPU, every launch but the driver's
    own: each kernel compiles once for sm_90, is kept as ``launch`` keeps it, and later
    launches call a no-op in place of Triton's launcher. Layers from the launchers up to
    ``flash_attn_func`` with autograd, on the Gluon and the portable kernels, at transformers'
    batch-1 Llama step (4k tokens, 16/4 heads, d=128, causal), seed 004's one-head 3-D call
    (4 x 8k, d=64), a varlen pack of 64 documents of 256 (32/8 heads) and a decode step
    (``flash_attn_with_kvcache``, b=8, 8k keys, 32/8 heads, d=64 and 72). Best of
    ``repeats`` rounds of ``calls``. At batch 1 and 4k tokens an H200 training step was
    bound by host time (docs/benchmarks.md, run 39); CPU tensors stand in for the GPU's,
    so large allocations cost more here than in a GPU's caching allocator."""
    import time

    from ringflash import (FlashAttentionTritonFunc, flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache,
                           validation)
    from ringflash.kernels import bwd, fwd, guard, launch, sm90
    from ringflash.kernels.problem import make_problem

    def keep_noop(full_key, kernel, grid, args, constexprs):
        kernel[grid](*args, **constexprs)  # compiles (compile_only)
        launch._COMPILED[full_key] = (lambda *a: None, None, None, launch._constexpr_tail(kernel, len(args), constexprs))

    launch._launch_and_keep = keep_noop
    launch._raw_stream = lambda device: 0
    torch.Tensor.is_cuda = property(lambda self: True)  # the launchers' device checks
    torch.cuda.is_current_stream_capturing = lambda: False
    guard.check_device = lambda *a, **k: None
    # As on a GPU, cu_seqlens values a call has already checked are not read again.
    validation.value_checks_enabled = lambda t: False
    in_scope = sm90.supports
    sm90.supports = lambda q, *a, **k: in_scope(_OnGpu(q), *a, **k) if q.dim() == 4 else in_scope(q, *a, **k)

    def timed(fn) -> float:
        for _ in range(5):
            fn()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - start) / calls * 1e6)
        return best

    gen = torch.Generator().manual_seed(0)
    leaf = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.bfloat16).requires_grad_()  # noqa: E731
    q, k, v = leaf(1, 4096, 16, 128), leaf(1, 4096, 4, 128), leaf(1, 4096, 4, 128)
    dout = torch.randn(q.shape, generator=gen, dtype=torch.bfloat16)
    qd, kd, vd = q.detach(), k.detach(), v.detach()
    prob = make_problem(qd, kd, None, 4096, 4096, 128**-0.5, True, -1, -1, 0.0)
    out, lse = flash_attn_func(qd, kd, vd, causal=True, return_attn_probs=True)[:2]
    seed_q, seed_k, seed_v = leaf(4, 8192, 64), leaf(4, 8192, 64), leaf(4, 8192, 64)
    seed_do = torch.randn(4, 8192, 64, generator=gen, dtype=torch.bfloat16)
    cu = torch.arange(0, 64 * 256 + 1, 256, dtype=torch.int32)
    vq, vk, vv = leaf(64 * 256, 32, 128), leaf(64 * 256, 8, 128), leaf(64 * 256, 8, 128)
    vdo = torch.randn(vq.shape, generator=gen, dtype=torch.bfloat16)

    def dense_fwd_bwd():
        flash_attn_func(q, k, v, causal=True).backward(dout)
        q.grad = k.grad = v.grad = None

    def dense_fwd():
        with torch.no_grad():
            flash_attn_func(qd, kd, vd, causal=True)

    def seed_fwd_bwd():
        FlashAttentionTritonFunc.apply(seed_q, seed_k, seed_v, True).backward(seed_do)
        seed_q.grad = seed_k.grad = seed_v.grad = None

    def varlen_fwd():
        with torch.no_grad():
            flash_attn_varlen_func(vq.detach(), vk.detach(), vv.detach(), cu, cu, 256, 256, causal=True)

    def varlen_fwd_bwd():
        flash_attn_varlen_func(vq, vk, vv, cu, cu, 256, 256, causal=True).backward(vdo)
        vq.grad = vk.grad = vv.grad = None

    rows = []
    for backend in ("sm90", "portable"):
        os.environ["RINGFLASH_BACKEND"] = backend
        if backend == "sm90":
            rows += [("Gluon forward launcher", lambda: sm90.attention_forward_sm90(qd, kd, vd, prob)),
                     ("Gluon backward launcher", lambda: sm90.attention_backward_sm90(dout, qd, kd, vd, out, lse, prob))]
        else:
            rows += [("portable forward launcher", lambda: fwd.attention_forward(qd, kd, vd, prob)),
                     ("portable backward launcher", lambda: bwd.attention_backward(dout, qd, kd, vd, out, lse, prob))]
        rows += [(f"flash_attn_func forward, no grad ({backend})", dense_fwd),
                 (f"flash_attn_func forward+backward ({backend})", dense_fwd_bwd),
                 (f"seed 004 3-D forward+backward, one head ({backend})", seed_fwd_bwd)]
        for name, fn in rows:
            print(f"{name:52s} {timed(fn):8.1f} us per call", flush=True)
        rows = []
    del os.environ["RINGFLASH_BACKEND"]
    rows = [("varlen forward, 64 x 256, no grad (portable)", varlen_fwd),
            ("varlen forward+backward, 64 x 256 (portable)", varlen_fwd_bwd)]
    # Decode, b=8 sk=8k 32/8 heads (bench decode's first case), at d=64 and at d=72, whose
    # strides go to the kernel in units of 8 (problem.stride_unit): a decode step's host work.
    for d in (64, 72):
        step_q = torch.randn(8, 1, 32, d, generator=gen, dtype=torch.bfloat16)
        cache = torch.randn(2, 8, 8192, 8, d, generator=gen, dtype=torch.bfloat16)
        rows.append((f"flash_attn_with_kvcache, b=8 sk=8k d={d}",
                     lambda step_q=step_q, cache=cache: flash_attn_with_kvcache(step_q, cache[0], cache[1],
                                                                                 causal=True)))
    for name, fn in rows:
        print(f"{name:52s} {timed(fn):8.1f} us per call", flush=True)
    compiled.clear()


class _OnGpu:
    """A CPU tensor as ``sm90.supports`` sees it on the fake sm_90 device."""

    def __init__(self, t):
        self.t, self.device = t, torch.device("cuda", 0)

    def __getattr__(self, name):
        return getattr(self.t, name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="compile_sm90.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--headdims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--causal", choices=["both", "causal", "full"], default="both")
    parser.add_argument("--dropout", choices=["both", "on", "off"], default="both")
    parser.add_argument("--no-extras", action="store_true", help="skip the decode, S_dmask and Gluon kernels")
    parser.add_argument("--decode-headdim", type=int, default=128, metavar="D",
                        help="the extras' decode call's head dim (e.g. 72: a head stride that is not a multiple "
                             "of 16)")
    parser.add_argument("--softcap", type=float, default=0.0, help="the dense cases' softcap (0: off)")
    parser.add_argument("--sm90", action="store_true",
                        help="also the Gluon Hopper kernels at d=64/128 (and 256), causal and full, and the "
                             "Gluon backward of each --headdims and --causal without dropout, deterministic "
                             "and atomic")
    parser.add_argument("--host-time", action="store_true",
                        help="only time the host work per call of the training path, launchers to flash_attn_func "
                             "(no compiling report)")
    parser.add_argument("--config", action="append", default=[], metavar="KIND=BMxBNxWARPSxSTAGES[xPASSES]",
                        help="a kernel's config instead of the table's, e.g. dkdv=64x64x8x2x2 (two passes); "
                             "repeatable")
    args = parser.parse_args(argv)
    if not os.path.exists(CUOBJDUMP):
        print(f"compile_sm90: {CUOBJDUMP} is missing (this Triton has no NVIDIA backend tools)", file=sys.stderr)
        return 2
    _install()
    if args.host_time:
        host_time()
        return 0
    import contextlib
    import warnings

    from ringflash.kernels import configs
    chosen = {}
    for spec in args.config:
        kind, _, tiles = spec.partition("=")
        try:
            bm, bn, warps, stages, *passes = (int(x) for x in tiles.split("x"))
            if kind not in configs.KINDS or len(passes) > 1:
                raise ValueError(spec)
            chosen[kind] = configs.KernelConfig(bm, bn, warps, stages, dkdv_passes=passes[0] if passes else 1)
        except ValueError:
            parser.error(f"--config: got {spec!r}; expected KIND=BMxBNxWARPSxSTAGES[xPASSES], KIND one of "
                         f"{', '.join(configs.KINDS)}, PASSES 1 or 2 (dkdv)")
    forced = (lambda: configs.override(**chosen)) if chosen else contextlib.nullcontext

    warnings.simplefilter("ignore")
    causals = {"both": (False, True), "causal": (True,), "full": (False,)}[args.causal]
    dropouts = {"both": (0.0, 0.1), "on": (0.1,), "off": (0.0,)}[args.dropout]
    print(f"triton {triton.__version__}, target sm_90 (compile only)")
    print(f"| {'case':28s} | {'kernel':24s} | warps | stages | regs | stack | STL | LDL |  SASS |  STS |  LDS "
          f"| HGMMA | HMMA | G16 |")
    print(f"|{'-' * 30}|{'-' * 26}|-------|--------|------|-------|-----|-----|-------|------|------|-------|------"
          f"|-----|")
    status = 0
    cases = [(f"d={d} {'causal' if causal else 'full'}{' dropout' if p else ''}{' softcap' if args.softcap else ''}",
              (lambda d=d, c=causal, p=p: run_case(d, c, p, softcap=args.softcap)))
             for d in args.headdims for causal in causals for p in dropouts]
    if not args.no_extras:
        cases.append(("decode, S_dmask, sm90", lambda: run_extras(args.decode_headdim)))
    if args.sm90:
        cases.append(("sm90 d=64/128/256, both", lambda: (collect_sm90((64, 128), (False, True)), collect())[1]))
        cases += [(f"sm90 bwd d={d} {'causal' if c else 'full'}{' atomic' if a else ''}",
                   (lambda d=d, c=c, a=a: compile_sm90_backward(d, c, a)))
                  for d in args.headdims for c in causals for a in (False, True)]
    for case, compile_case in cases:
        try:
            with forced():
                rows = compile_case()
        except Exception as exc:  # report every case, then fail
            print(f"| {case:28s} | FAILED: {type(exc).__name__}: {str(exc)[:200]}")
            status = 1
            continue
        for name, u in rows:
            print(f"| {case:28s} | {name:24s} | {u['warps']:5d} | {u['stages']:6d} | {u['regs']:4d} | "
                  f"{u['stack']:5d} | {u['stl']:3d} | {u['ldl']:3d} | {u['sass']:5d} | {u['sts']:4d} | {u['lds']:4d} | "
                  f"{u['hgmma']:5d} | {u['hmma']:4d} | {u['g16']:3d} |",
                  flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())

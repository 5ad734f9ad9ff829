"""Launching a Triton kernel again without Triton's per-call work.

``kernel[grid](*args, **constexprs)`` binds every argument by name, specializes each one (its
type, whether an integer is 1 or a multiple of 16, whether a pointer is 16-byte aligned),
hashes the result and looks the compiled kernel up: about 10-20 us a launch on an H200's
host, as much as a whole decode step's kernel (docs/benchmarks.md, runs 33-34). A caller
that already knows the answer, because its own cache key fixes every non-tensor argument,
can launch the compiled kernel directly: ``cached_launch`` does that from the second call with a
given key on. ``fast_launch`` reads the key off the arguments instead, for the training kernels,
whose integer arguments change with every shape: a training step at batch 1 and 4k tokens
was bound by host time on an H200 (run 39). Triton versions whose compiled-kernel object
lacks that launch form, the interpreter, and an installed launch hook (a profiler) take
Triton's own path."""

from __future__ import annotations

from typing import Any, Callable, Hashable, Optional, Sequence

import torch

from .common import interpreting

#: (kernel, key, device, pointer alignment) from ``cached_launch``, or (kernel, argument
#: key, constexprs, device) from ``fast_launch`` -> (launcher, function, metadata, constexpr values).
_COMPILED: dict[tuple, tuple] = {}
#: Entries kept before the table is dropped and refilled (a decode loop uses one or two keys
#: a kernel; a key names a shape, so a stream of new shapes must not grow it forever).
MAX_ENTRIES = 512

try:
    from triton import knobs as _knobs
except ImportError:  # an older Triton: its own launch path always
    _knobs = None

try:
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
except ImportError:
    def _raw_stream(device: int) -> int:
        return torch.cuda.current_stream(device).cuda_stream


def _hook_set(hook) -> bool:
    """Triton 3.6 keeps launch hooks in a chain (empty: none); older ones use None."""
    if hook is None:
        return False
    return bool(getattr(hook, "calls", True))


def _hooked() -> bool:
    """A launch hook (e.g. proton's) wants the metadata Triton's own path builds."""
    if _knobs is None:
        return True
    runtime = _knobs.runtime
    return _hook_set(runtime.launch_enter_hook) or _hook_set(runtime.launch_exit_hook)


def _alignment(args: Sequence[Any], pointers: Optional[int] = None) -> Hashable:
    """What Triton's specialization reads of the tensor arguments beyond their dtypes: which
    are 16-byte aligned (True in the usual case of all of them, else a tuple of flags).
    ``pointers``: the tensors are exactly the first ``pointers`` arguments (else all are
    looked at: an isinstance test each, a third of a decode step's launch on the host)."""
    tensors = args[:pointers] if pointers is not None else [a for a in args if isinstance(a, torch.Tensor)]
    bits = 0
    for t in tensors:
        bits |= t.data_ptr()
    if bits & 15 == 0:
        return True
    return tuple(t.data_ptr() % 16 == 0 for t in tensors)


def cached_launch(kernel, key: Hashable, grid: tuple, args: Sequence[Any], constexprs: dict,
                  pointers: Optional[int] = None) -> None:
    """``kernel[grid](*args, **constexprs)`` on the current device and stream.

    ``key`` must fix everything Triton specializes ``kernel`` on except the tensors'
    alignment and the device (both read here): each tensor argument's dtype, each integer
    argument's value up to whether it is 1, a multiple of 16 or beyond int32, and every
    value in ``constexprs`` (``num_warps`` and ``num_stages`` included). The first launch
    with a key goes through Triton (compiling if need be) and keeps the compiled kernel it
    returns; later ones call its launcher with the same arguments, skipping Triton's
    binding and lookup. ``args`` are the kernel's leading positional parameters;
    ``constexprs`` name all the others. ``grid`` has three entries. ``pointers``: the
    number of leading arguments that are tensors, when no later one is (saves a type test
    per argument)."""
    if interpreting():
        _check_pointers(args, pointers)  # the interpreted tests check every caller's count
        kernel[grid](*args, **constexprs)
        return
    device = torch.cuda.current_device()
    full_key = (kernel, key, device, _alignment(args, pointers))
    if not _launch_kept(full_key, grid, args, device):
        _check_pointers(args, pointers)
        _launch_and_keep(full_key, kernel, grid, args, constexprs)


def fast_launch(kernel, grid: tuple, args: Sequence[Any], constexprs: dict,
           other_key: Optional[Callable[[Any], Hashable]] = None) -> None:
    """``kernel[grid](*args, **constexprs)`` through ``cached_launch``'s table, its key read
    off the arguments (``specialization_key``) instead of given by the caller: for the
    training kernels, whose dozens of integer arguments change with every shape. Costs a
    pass over the arguments (a few us on the host) against Triton's binding (about 20 us a
    launch on a CPU where a decode step's took 10-20 us on an H200's host)."""
    if interpreting():
        # The interpreted tests see every call site: one that leaves a parameter to its
        # default would never be kept on a GPU (``_constexpr_tail``), so it is refused here.
        names = getattr(kernel, "arg_names", None)
        if names is not None and _constexpr_tail(kernel, len(args), constexprs) is None:
            raise ValueError(f"fast_launch: {len(args)} positional arguments and constexprs {sorted(constexprs)} "
                             f"do not name every parameter of {names}")
        kernel[grid](*args, **constexprs)
        return
    arg_key = specialization_key(args, other_key)
    if arg_key is None:
        kernel[grid](*args, **constexprs)
        return
    device = torch.cuda.current_device()
    full_key = (kernel, arg_key, tuple(constexprs.items()), device)
    if not _launch_kept(full_key, grid, args, device):
        _launch_and_keep(full_key, kernel, grid, args, constexprs)


class PlanTable(dict):
    """A launcher's plans (its host work for one call signature: shapes, strides, grid,
    constexprs, ``PlannedLaunch`` sites) by key. A training step or a decode loop repeats
    each signature every layer and step, so the work is done once; a stream of new shapes
    must not grow the table forever, so it is dropped whole when full. ``clear`` empties
    every table."""

    def __init__(self, limit: int = 256) -> None:
        super().__init__()
        self.limit = limit
        _PLAN_TABLES.append(self)

    def keep(self, key: Hashable, plan):
        """Keep ``plan`` under ``key``; returns it."""
        if len(self) >= self.limit:
            self.clear()
        self[key] = plan
        return plan


_PLAN_TABLES: list[PlanTable] = []


class PlannedLaunch:
    """One launch of a launcher's plan (its host work for one call signature, done once):
    the kernel, its constexprs, and after the first launch the compiled kernel Triton
    returned, which later launches call directly, without building a key.

    The contract, which the plan's key must guarantee: every launch through one instance
    passes arguments that Triton specializes alike (tensors of the same dtypes and 16-byte
    alignment, integers of the same ``int_class``, descriptors of the same dtype and block
    shape). Under the interpreter (the CPU tests) each launch checks it. The first launch
    goes through ``fast_launch``, as does a launch on another device or under a launch hook."""

    __slots__ = ("kernel", "constexprs", "other_key", "entry", "device")

    def __init__(self, kernel, constexprs: dict, other_key: Optional[Callable[[Any], Hashable]] = None) -> None:
        self.kernel, self.constexprs, self.other_key = kernel, constexprs, other_key
        self.entry: Optional[tuple] = None
        self.device = -1

    def __call__(self, grid: tuple, args: Sequence[Any]) -> None:
        if interpreting():
            # The interpreted tests hold every plan to the contract: one specialization per site.
            arg_key = specialization_key(args, self.other_key)
            if self.entry is None:
                self.entry = arg_key
            elif self.entry != arg_key:
                raise RuntimeError(f"PlannedLaunch: {getattr(self.kernel, '__name__', self.kernel)} was launched "
                                   f"with arguments specialized as {arg_key}; expected {self.entry} (the plan's key "
                                   "misses something Triton specializes on)")
            fast_launch(self.kernel, grid, args, self.constexprs, self.other_key)
            return
        entry = self.entry
        if entry is not None and not _hooked():
            device = torch.cuda.current_device()
            if device == self.device:
                run, function, metadata, tail = entry
                run(grid[0], grid[1], grid[2], _raw_stream(device), function, metadata, None, None, None, *args, *tail)
                return
        fast_launch(self.kernel, grid, args, self.constexprs, self.other_key)
        arg_key = specialization_key(args, self.other_key)
        if arg_key is not None:
            self.device = torch.cuda.current_device()
            self.entry = _COMPILED.get((self.kernel, arg_key, tuple(self.constexprs.items()), self.device))


class ArgTemplate:
    """A launch's arguments with its tensors left out, made once per plan: ``fill`` puts a
    call's tensors back, in the order they held in the arguments the template was made
    from. For kernels whose pointers and integers interleave (the portable ones), where
    building the arguments per call would redo the plan's work."""

    __slots__ = ("values", "slots")

    def __init__(self, args: Sequence[Any]) -> None:
        self.slots = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
        values = list(args)
        for i in self.slots:
            values[i] = None  # a plan holds no tensor alive
        self.values = values

    def fill(self, tensors: Sequence[torch.Tensor]) -> list:
        if len(tensors) != len(self.slots):
            raise ValueError(f"ArgTemplate.fill: got {len(tensors)} tensors; expected {len(self.slots)}")
        args = self.values.copy()
        for i, t in zip(self.slots, tensors):
            args[i] = t
        return args


def descriptor_key(descriptor: Any) -> tuple:
    """``other_key`` for launches with TMA descriptor arguments (``triton.tools``' or Gluon's
    ``TensorDescriptor``): what Triton specializes one on, its dtype and block shape (the
    descriptors the launchers make have zero padding, and a Gluon one's shared layout follows
    from the other two), and its class, which Triton tells apart."""
    kind = type(descriptor)
    if kind.__name__ != "TensorDescriptor" or not hasattr(descriptor, "block_shape"):
        raise TypeError(f"descriptor_key: got a {kind.__name__}; expected a TensorDescriptor")
    return kind, descriptor.base.dtype, tuple(descriptor.block_shape)


def specialization_key(args: Sequence[Any],
                       other_key: Optional[Callable[[Any], Hashable]] = None) -> Optional[tuple]:
    """Per argument, what Triton specializes it on: a tensor's dtype and whether it is
    16-byte aligned, an integer's ``int_class``, a float's type, None and bools by value;
    any other argument (a TMA descriptor) through ``other_key``, which must return what
    Triton specializes that argument on (or raise TypeError for one it does not know).
    None when an argument is of another type (``fast_launch`` then takes Triton's path)."""
    parts = []
    for a in args:
        kind = type(a)
        if kind is int:
            parts.append(int_class(a))
        elif kind is float:
            parts.append(float)
        elif a is None or kind is bool:
            parts.append(a)
        elif isinstance(a, torch.Tensor):
            parts.append((a.dtype, a.data_ptr() % 16 == 0))
        elif other_key is not None:
            parts.append(other_key(a))
        else:  # a numpy scalar or the like: Triton's own launch decides
            return None
    return tuple(parts)


def _launch_kept(full_key: tuple, grid: tuple, args: Sequence[Any], device: int) -> bool:
    """Launch the compiled kernel kept under ``full_key``; False if there is none (or a
    launch hook wants Triton's own path)."""
    entry = _COMPILED.get(full_key)
    if entry is None or _hooked():
        return False
    run, function, metadata, tail = entry
    run(grid[0], grid[1], grid[2], _raw_stream(device), function, metadata, None, None, None, *args, *tail)
    return True


def _launch_and_keep(full_key: tuple, kernel, grid: tuple, args: Sequence[Any], constexprs: dict) -> None:
    """Triton's own launch (compiling if need be); keeps the compiled kernel under ``full_key``."""
    compiled = kernel[grid](*args, **constexprs)
    tail = _constexpr_tail(kernel, len(args), constexprs)
    # Kept only when it is Triton's CompiledKernel, loaded (an async compile returns a
    # future; other versions may return something else).
    run = getattr(compiled, "run", None) if hasattr(compiled, "packed_metadata") else None
    if tail is None or run is None or not hasattr(compiled, "function"):
        return
    if len(_COMPILED) >= MAX_ENTRIES:
        _COMPILED.clear()
    _COMPILED[full_key] = (run, compiled.function, compiled.packed_metadata, tail)


def _check_pointers(args: Sequence[Any], pointers: Optional[int]) -> None:
    """A wrong ``pointers`` count would leave a tensor's alignment out of the key."""
    if pointers is None:
        return
    if not all(isinstance(a, torch.Tensor) for a in args[:pointers]) or \
            any(isinstance(a, torch.Tensor) for a in args[pointers:]):
        raise ValueError(f"cached_launch: pointers={pointers}, but the tensors are at arguments "
                         f"{[i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]}")


def _constexpr_tail(kernel, n_args: int, constexprs: dict) -> Optional[tuple]:
    """The values of ``kernel``'s parameters after the first ``n_args``, in its signature's
    order, from ``constexprs``; None if one is left to its default (then not cached)."""
    names = getattr(kernel, "arg_names", None)
    if names is None:
        return None
    rest = names[n_args:]
    if any(n not in constexprs for n in rest):
        return None
    return tuple(constexprs[n] for n in rest)


def clear() -> None:
    """Forget the compiled kernels kept (tests; a changed Triton knob), with every plan."""
    _COMPILED.clear()
    for table in _PLAN_TABLES:
        table.clear()


def int_class(n: int) -> int:
    """What Triton specializes an integer argument on, as one small int (keys are built per
    argument of every launch): whether it is 1, else whether it is a multiple of 16, and
    its type (int32, int64 or uint64). A key holding this instead of the value lets a
    per-call number (a cache length) reuse the compiled kernel."""
    code = 1 if n == 1 else 2 if n % 16 == 0 else 3
    return code if -2**31 <= n < 2**31 else code + 4 if n < 2**63 else code + 8

"""Two changes to Triton's interpreter (CPU runs: CI, the demo, gloo CP ranks).

* A fix before Triton 3.7 under NumPy 2. The interpreter holds a scalar as a NumPy array
  of shape (1,), and older Triton turns it into a Python int with ``int(array)``, which
  NumPy 2 refuses ("only 0-dimensional arrays can be converted to Python scalars"). Every
  ``range(lo, hi)`` over tensor bounds in a kernel then fails. The GPU image's Triton 3.6
  with NumPy 2.5 is such a pair, and its CPU (gloo) context-parallel ranks run
  interpreted. Later Triton squeezes the array first; the fix gives older versions the
  same conversion, and does nothing on newer ones.
* Speed. The interpreter re-patches ``triton.language`` (every builtin of the module, its
  tensor class and math) at each call of a ``@triton.jit`` helper from inside a kernel,
  about a millisecond each time, though the kernel's launch has already patched the same
  module objects. Our kernels call helpers in their loops, so that was about a third of
  the interpreted time (profile of the CP tests). While a launch's patch is in place, a
  helper whose language modules it already covers is not patched again. Results are the
  same: the patched attributes are identical, and the launch's restore undoes them all
  (also those of a helper that reached another module, e.g. ``triton.language.core``
  from ``triton.language.random``, which the interpreter itself leaves patched).
"""

import inspect


def _scalar_index(self) -> int:
    return int(self.handle.data.reshape(-1)[0])


def apply() -> None:
    try:
        from triton.runtime import interpreter
    except ImportError:  # a Triton without the interpreter module: nothing to fix
        return
    _skip_nested_patches(interpreter)
    _fix_scalar_index(interpreter)


def _skip_nested_patches(interpreter) -> None:
    original = getattr(interpreter, "_patch_lang", None)
    if original is None or getattr(original, "_ringflash_fast", False) or not hasattr(interpreter, "tl"):
        return
    try:
        params = list(inspect.signature(original).parameters)
    except (TypeError, ValueError):
        return
    if params != ["fn"]:  # another interpreter than the one this was written against
        return
    lang_modules = (interpreter.tl, interpreter.tl.core)
    patched: list = []  # the language modules (ids) the running launch has patched
    nested_scopes: list = []  # patches of modules a helper added (the interpreter never restores these)
    langs_of: dict = {}

    def langs(fn) -> frozenset:
        key = id(fn)
        found = langs_of.get(key)
        if found is None or found[0] is not fn:
            ids = frozenset(id(v) for v in fn.__globals__.values()
                            if inspect.ismodule(v) and any(v is m for m in lang_modules))
            found = langs_of[key] = (fn, ids)
        return found[1]

    class _LaunchScope:
        """The launch's scope: its restore also ends the skipping."""

        def __init__(self, scope) -> None:
            self.scope = scope

        def restore(self) -> None:
            patched.clear()
            while nested_scopes:
                nested_scopes.pop().restore()
            self.scope.restore()

    def patch_lang(fn):
        needed = langs(fn)
        if patched:  # a helper called from inside a running kernel
            if needed <= patched[0]:
                return None  # nested calls ignore the returned scope
            patched[0] = patched[0] | needed
            scope = original(fn)
            nested_scopes.append(scope)
            return scope
        scope = original(fn)
        patched.append(needed)
        return _LaunchScope(scope)

    patch_lang._ringflash_fast = True
    patch_lang._ringflash_original = original
    interpreter._patch_lang = patch_lang


def _fix_scalar_index(interpreter) -> None:
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_ringflash_fixed", False):
        return
    try:
        source = inspect.getsource(original)
    except (OSError, TypeError):
        return
    if "__index__" not in source or "squeeze" in source:
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # Recorded in the same scope, so the interpreter's restore undoes it too.
        scope.set_attr(tensor, "__index__", _scalar_index)

    patch_lang_tensor._ringflash_fixed = True
    interpreter._patch_lang_tensor = patch_lang_tensor

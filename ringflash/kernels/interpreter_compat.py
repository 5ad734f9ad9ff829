"""A fix for Triton's interpreter before 3.7 under NumPy 2.

The interpreter holds a scalar as a NumPy array of shape (1,), and older Triton turns it
into a Python int with ``int(array)``, which NumPy 2 refuses ("only 0-dimensional arrays
can be converted to Python scalars"). Every ``range(lo, hi)`` over tensor bounds in a
kernel then fails. The GPU image's Triton 3.6 with NumPy 2.5 is such a pair, and its
CPU (gloo) context-parallel ranks run interpreted. Later Triton squeezes the array
first; ``apply()`` gives older versions the same conversion, and does nothing on newer ones.
"""

import inspect


def _scalar_index(self) -> int:
    return int(self.handle.data.reshape(-1)[0])


def apply() -> None:
    try:
        from triton.runtime import interpreter
    except ImportError:  # a Triton without the interpreter module: nothing to fix
        return
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

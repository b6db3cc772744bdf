"""The compiled integer kernels (`_kernels.c`), through ctypes.

Built at install when a C compiler is there (the extension is optional). Each kernel has an
AVX-512 VNNI version, used where the CPU has those instructions, and a portable C version with
the same integer results, which the tests run on any CPU but nothing uses by default: it is
slower than FAISS's float32 kernels (the certified search of the 14,000 seed test digits took
about 8 times as long on it as on FAISS). Without VNNI, or without the extension, `kernels()`
is None and the callers compute with FAISS and numpy instead.
"""

from __future__ import annotations

import ctypes
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

_pointer, _int, _int64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
_SIGNATURES = {
    "list_maxima": ([_pointer, _pointer, _int, _pointer, _int, _pointer, _int, _int, _pointer,
                     _int, _int], None),
    "nearest_in_lists": ([_pointer, _pointer, _int, _pointer, _pointer, _int, _int, _pointer,
                          _int, _int, _pointer, _int, _int], None),
    "cascade": ([_pointer, _pointer, _int, _int64, _int64, _pointer, _int, _pointer, _int,
                 _pointer, _pointer, _int, _pointer, _pointer, _int64], _int64),
    "pixel_distances": ([_pointer, _int64, _pointer, _pointer, _int64, _int64, _int64, _pointer],
                        None),
}
INSTRUCTION_SETS = ("vnni", "portable")


@cache
def _library() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("mnist_ann._kernels")
    if spec is None or not spec.origin:
        return None
    try:
        return ctypes.CDLL(spec.origin)
    except OSError:
        return None


@dataclass(frozen=True)
class Kernels:
    """The compiled functions of one instruction set."""

    name: str
    list_maxima: Callable
    nearest_in_lists: Callable
    cascade: Callable
    pixel_distances: Callable


@cache
def kernels(instruction_set: str | None = None) -> Kernels | None:
    """The kernels of `instruction_set` ("vnni" or "portable"; by default "vnni"), or None when
    the extension is not built or the CPU lacks the instructions."""
    library = _library()
    if library is None:
        return None
    instruction_set = instruction_set or "vnni"
    if instruction_set not in INSTRUCTION_SETS:
        raise ValueError(f"unknown instruction set {instruction_set!r}: {INSTRUCTION_SETS}")
    if instruction_set == "vnni" and not library.mnist_ann_vnni_supported():
        return None
    functions = {}
    for name, (arguments, result) in _SIGNATURES.items():
        function = getattr(library, f"{name}_{instruction_set}")
        function.argtypes, function.restype = arguments, result
        functions[name] = function
    return Kernels(instruction_set, **functions)

"""The per-step check of a :class:`~waveguard_optim.kernels.plan.StepPlan` in C++: the same
answer as the plan's Python check, at a few nanoseconds per tensor instead of about a hundred.

A planned step must confirm that every tensor it points at (11-14 per parameter) is still the
cached object with the same data pointer and byte count. In Python that is two attribute calls
per tensor, more than torch's whole fused step costs per parameter; here it is one pass over
the lists that reads each tensor's ``at::Tensor`` directly (``THPVariable_Unpack``). The library
is compiled against the running torch's headers with the system's C++ compiler (``$CXX``, else
``c++``, ``g++``, ``clang++``), in a background thread started by the first plan, so that no step
waits for it: until it is loaded, or where it cannot be built (no compiler, no Python headers),
plans use the Python check. It is cached and loaded as the C kernels are (``cpu_c``: a folder
private to the user, checksummed bytes, a sealed memory file), keyed by the torch build it was
compiled against, since it depends on torch's C++ ABI.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import shlex
import shutil
import sys
import sysconfig
import threading
from pathlib import Path
from typing import Any

import torch

from waveguard_optim.kernels import cpu_c

SOURCE = r"""
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

namespace {

bool same_memory(PyObject* o, int64_t ptr, int64_t nbytes) {
  if (!THPVariable_Check(o)) return false;
  const at::Tensor& t = THPVariable_Unpack(o);
  return reinterpret_cast<int64_t>(t.const_data_ptr()) == ptr && static_cast<int64_t>(t.nbytes()) == nbytes;
}

}  // namespace

// 1 when params[i] is cached[i], states[i] is a dict (or a subclass) whose value under keys[k] is
// cached[rows + i * len(keys) + k], and every cached tensor has the data pointer ptrs[j] and the
// byte count nbytes[j]; else 0. The caller passes lists, a tuple of str keys and int64 arrays.
extern "C" int wg_same_state(PyObject* params, PyObject* states, PyObject* keys, PyObject* cached,
                             const int64_t* ptrs, const int64_t* nbytes) noexcept {
  try {
    if (!PyList_CheckExact(params) || !PyList_CheckExact(states) || !PyTuple_CheckExact(keys) || !PyList_CheckExact(cached)) return 0;
    const Py_ssize_t rows = PyList_GET_SIZE(params), width = PyTuple_GET_SIZE(keys);
    const Py_ssize_t count = PyList_GET_SIZE(cached);
    if (PyList_GET_SIZE(states) != rows || count != rows * (1 + width)) return 0;
    for (Py_ssize_t i = 0; i < rows; ++i) {
      if (PyList_GET_ITEM(params, i) != PyList_GET_ITEM(cached, i)) return 0;
      PyObject* state = PyList_GET_ITEM(states, i);
      if (!PyDict_Check(state)) return 0;
      for (Py_ssize_t k = 0; k < width; ++k) {
        PyObject* value = PyDict_GetItemWithError(state, PyTuple_GET_ITEM(keys, k));
        if (value == nullptr) {
          PyErr_Clear();
          return 0;
        }
        if (value != PyList_GET_ITEM(cached, rows + i * width + k)) return 0;
      }
    }
    for (Py_ssize_t j = 0; j < count; ++j) {
      if (!same_memory(PyList_GET_ITEM(cached, j), ptrs[j], nbytes[j])) return 0;
    }
    return 1;
  } catch (...) {  // a tensor without data (a wrapper subclass): not the cached memory
    return 0;
  }
}

// 1 when every grads[i] is a dense, contiguous tensor of like's dtype and device with numels[i]
// elements; their data pointers are then in out[i]. Else 0.
extern "C" int wg_grads(PyObject* grads, PyObject* like, const int64_t* numels, int64_t* out) noexcept {
  try {
    if (!PyList_CheckExact(grads) || !THPVariable_Check(like)) return 0;
    const at::Tensor& ref = THPVariable_Unpack(like);
    const Py_ssize_t rows = PyList_GET_SIZE(grads);
    for (Py_ssize_t i = 0; i < rows; ++i) {
      PyObject* o = PyList_GET_ITEM(grads, i);
      if (!THPVariable_Check(o)) return 0;
      const at::Tensor& g = THPVariable_Unpack(o);
      if (g.layout() != c10::kStrided || g.device() != ref.device() || g.scalar_type() != ref.scalar_type()) return 0;
      if (!g.is_contiguous() || g.numel() != numels[i]) return 0;
      out[i] = reinterpret_cast<int64_t>(g.const_data_ptr());
    }
    return 1;
  } catch (...) {
    return 0;
  }
}
"""

_OBJECTS = [ctypes.py_object] * 4


@dataclasses.dataclass(frozen=True)
class NativeCheck:
    """The loaded library: ``same_state`` is ``wg_same_state``, ``grads`` is ``wg_grads`` (see
    ``SOURCE``); ``fd`` the sealed memory file it was loaded from, kept open, or -1."""

    same_state: Any
    grads: Any
    fd: int


def find_compiler() -> str | None:
    """``$CXX`` if set (a command line), else the first of c++, g++, clang++ on the PATH."""
    cxx = os.environ.get("CXX")
    if cxx:
        return cxx
    return next(filter(None, map(shutil.which, ("c++", "g++", "clang++"))), None)


LIBRARIES = ("-ltorch_python", "-ltorch", "-lc10")  # already loaded in this process


def missing() -> str | None:
    """What this machine lacks to build the native check (a C++ compiler, Python's headers), or None."""
    if find_compiler() is None:
        return "no C++ compiler found (set CXX, or install c++, g++ or clang++)"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        return f"no Python.h in {sysconfig.get_paths()['include']} (install Python's development headers)"
    return None


def _flags() -> list[str]:
    """What the library is compiled with: torch's and Python's headers, torch's C++ ABI, and
    where torch's libraries (``LIBRARIES``) are."""
    from torch.utils import cpp_extension

    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return ["-O2", "-fPIC", "-shared", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in includes), f"-L{cpp_extension.library_paths()[0]}"]


def _load(data: bytes, path: Path) -> NativeCheck:
    library, fd = cpu_c._dlopen(data, path, ctypes.PyDLL)
    library.wg_same_state.argtypes, library.wg_same_state.restype = [*_OBJECTS, ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
    library.wg_grads.argtypes, library.wg_grads.restype = [*_OBJECTS[:2], ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int
    return NativeCheck(library.wg_same_state, library.wg_grads, fd)


def build() -> NativeCheck:
    """The library, loaded from the cache or compiled now (RuntimeError when it cannot be)."""
    compiler, lacking = find_compiler(), missing()
    if compiler is None or lacking is not None:
        raise RuntimeError(str(lacking))
    flags = _flags()
    version = cpu_c._run([*shlex.split(compiler), "--version"], 30.0)[1]
    build_id = "\n".join([compiler, version, torch.__version__, str(torch.version.git_version), sys.version, *flags, *LIBRARIES, SOURCE])
    path = cpu_c.cache_dir() / f"wg_check_{hashlib.sha256(build_id.encode()).hexdigest()[:16]}.so"
    loaded = cpu_c._verified_bytes(path)
    if loaded is not None:
        try:
            return _load(loaded, path)
        except (OSError, AttributeError):
            pass  # damaged or foreign: rebuilt below
    commands = [[*shlex.split(compiler), std, *flags] for std in ("-std=c++20", "-std=c++17")]
    return cpu_c.build_library(SOURCE, path, "check.cpp", commands, _load, "the C++ compiler", LIBRARIES)


class _Job:
    """One background build per process (a forked child starts its own)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.check: NativeCheck | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="waveguard-native-check", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.check = build()
        except Exception as err:  # noqa: BLE001 - any failure means: use the Python check
            self.error = err


_LOCK = threading.Lock()
_JOB: _Job | None = None


def _job() -> _Job:
    global _JOB
    job = _JOB
    if job is None or job.pid != os.getpid():
        with _LOCK:
            job = _JOB
            if job is None or job.pid != os.getpid():
                job = _JOB = _Job()
    return job


def native_check(wait: bool = False) -> NativeCheck | None:
    """The native check, or None while it is being built (the first call starts the build) or
    where it cannot be (``native_check_error`` says why). ``wait``: until the build is done."""
    job = _job()
    if wait:
        job.thread.join()
    return job.check


def native_check_error() -> BaseException | None:
    """Why the native check could not be built in this process (after ``native_check(wait=True)``)."""
    return _job().error

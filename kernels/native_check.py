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
#include <algorithm>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

namespace {

bool same_memory(PyObject* o, int64_t ptr, int64_t nbytes) {
  if (!THPVariable_Check(o)) return false;
  const at::Tensor& t = THPVariable_Unpack(o);
  return reinterpret_cast<int64_t>(t.const_data_ptr()) == ptr && static_cast<int64_t>(t.nbytes()) == nbytes;
}

// Whether state (a dict or a subclass) holds cached[0 .. len(keys)) under keys, in order.
bool same_row(PyObject* state, PyObject* keys, PyObject* const* cached) {
  if (state == nullptr || !PyDict_Check(state)) return false;
  for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(keys); ++k) {
    PyObject* value = PyDict_GetItemWithError(state, PyTuple_GET_ITEM(keys, k));
    if (value == nullptr) {
      PyErr_Clear();
      return false;
    }
    if (value != cached[k]) return false;
  }
  return true;
}

bool same_memory_all(PyObject* cached, const int64_t* ptrs, const int64_t* nbytes) {
  const Py_ssize_t count = PyList_GET_SIZE(cached);
  PyObject* const* items = &PyList_GET_ITEM(cached, 0);
  for (Py_ssize_t j = 0; j < count; ++j) {
    // Each check reads three objects (the Python tensor, its TensorImpl, its StorageImpl): fetch
    // those of the tensors a few ahead while this one is checked (only pointers already read).
    if (j + 16 < count) __builtin_prefetch(items[j + 16]);
    if (j + 8 < count && THPVariable_Check(items[j + 8])) __builtin_prefetch(THPVariable_Unpack(items[j + 8]).unsafeGetTensorImpl());
    if (!same_memory(items[j], ptrs[j], nbytes[j])) return false;
  }
  return true;
}

// state_map[p], or nullptr. A tensor's hash is its id (torch.Tensor.__hash__): passing it saves
// a Python call per parameter. Were the hash another, the lookup would miss and the caller take
// the Python path: a wrong answer is impossible, only a slower one.
PyObject* state_of(PyObject* state_map, PyObject* p) {
#if PY_VERSION_HEX < 0x030D0000
  PyObject* state = _PyDict_GetItem_KnownHash(state_map, p, static_cast<Py_hash_t>(reinterpret_cast<intptr_t>(p)));
#else
  PyObject* state = PyDict_GetItemWithError(state_map, p);
#endif
  if (state == nullptr) PyErr_Clear();
  return state;
}

// Whether g is a dense, contiguous tensor of ref's dtype and device with numel elements that
// shares no byte with the cached spans [starts[j], ends[j]) (sorted, disjoint); its address in *out.
bool grad_ok(const at::Tensor& g, const at::Tensor& ref, int64_t numel, const int64_t* starts, const int64_t* ends,
             Py_ssize_t spans, int64_t* out) {
  if (!g.defined() || g.layout() != c10::kStrided || g.device() != ref.device() || g.scalar_type() != ref.scalar_type()) return false;
  if (!g.is_contiguous() || g.numel() != numel) return false;
  const int64_t start = reinterpret_cast<int64_t>(g.const_data_ptr());
  const int64_t end = start + numel * static_cast<int64_t>(g.element_size());
  // The last cached span that starts below the gradient's end must end at or before its start.
  const int64_t* after = std::lower_bound(starts, starts + spans, end);
  if (end > start && after != starts && ends[after - starts - 1] > start) return false;
  *out = start;
  return true;
}

}  // namespace

// 1 when params[i] is cached[i], states[i] holds cached[rows + i * len(keys) + k] under keys[k],
// and every cached tensor has the data pointer ptrs[j] and the byte count nbytes[j]; else 0.
// The caller passes lists, a tuple of str keys and int64 arrays.
extern "C" int wg_same_state(PyObject* params, PyObject* states, PyObject* keys, PyObject* cached,
                             const int64_t* ptrs, const int64_t* nbytes) noexcept {
  try {
    if (!PyList_CheckExact(params) || !PyList_CheckExact(states) || !PyTuple_CheckExact(keys) || !PyList_CheckExact(cached)) return 0;
    const Py_ssize_t rows = PyList_GET_SIZE(params), width = PyTuple_GET_SIZE(keys);
    if (PyList_GET_SIZE(states) != rows || PyList_GET_SIZE(cached) != rows * (1 + width)) return 0;
    PyObject* const* items = &PyList_GET_ITEM(cached, 0);
    for (Py_ssize_t i = 0; i < rows; ++i) {
      if (PyList_GET_ITEM(params, i) != items[i]) return 0;
      if (!same_row(PyList_GET_ITEM(states, i), keys, items + rows + i * width)) return 0;
    }
    return same_memory_all(cached, ptrs, nbytes);
  } catch (...) {  // a tensor without data (a wrapper subclass): not the cached memory
    return 0;
  }
}

// 1 when every grads[i] passes grad_ok with numels[i] (their addresses then in out); else 0.
extern "C" int wg_grads(PyObject* grads, PyObject* like, const int64_t* numels, int64_t* out,
                        const int64_t* starts, const int64_t* ends, Py_ssize_t spans) noexcept {
  try {
    if (!PyList_CheckExact(grads) || !THPVariable_Check(like)) return 0;
    const at::Tensor& ref = THPVariable_Unpack(like);
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(grads); ++i) {
      PyObject* o = PyList_GET_ITEM(grads, i);
      if (!THPVariable_Check(o) || !grad_ok(THPVariable_Unpack(o), ref, numels[i], starts, ends, spans, out + i)) return 0;
    }
    return 1;
  } catch (...) {
    return 0;
  }
}

// wg_same_state and wg_grads of a whole param group in one pass: params are the group's (every
// one a plain Tensor or Parameter, exactly, with a gradient), their states those under them in
// state_map (a dict or a subclass; nothing is created), their gradients read as p.grad reads them.
extern "C" int wg_group(PyObject* params, PyObject* state_map, PyObject* keys, PyObject* cached, const int64_t* ptrs,
                        const int64_t* nbytes, const int64_t* numels, int64_t* out, const int64_t* starts,
                        const int64_t* ends, Py_ssize_t spans) noexcept {
  try {
    if (!PyList_CheckExact(params) || !PyDict_Check(state_map) || !PyTuple_CheckExact(keys) || !PyList_CheckExact(cached)) return 0;
    const Py_ssize_t rows = PyList_GET_SIZE(params), width = PyTuple_GET_SIZE(keys);
    if (rows == 0 || PyList_GET_SIZE(cached) != rows * (1 + width)) return 0;
    PyObject* const* items = &PyList_GET_ITEM(cached, 0);
    if (!THPVariable_Check(items[0])) return 0;
    const at::Tensor& ref = THPVariable_Unpack(items[0]);
    for (Py_ssize_t i = 0; i < rows; ++i) {
      PyObject* p = PyList_GET_ITEM(params, i);
      if (p != items[i] || !THPVariable_CheckExact(p)) return 0;
      if (!same_row(state_of(state_map, p), keys, items + rows + i * width)) return 0;
      if (!grad_ok(THPVariable_Unpack(p).grad(), ref, numels[i], starts, ends, spans, out + i)) return 0;
    }
    return same_memory_all(cached, ptrs, nbytes);
  } catch (...) {
    PyErr_Clear();
    return 0;
  }
}

// torch.autograd.graph.increment_version(tensors) of a list of tensors (1; inference tensors have
// no version to bump), or 0 with none bumped where an item is not a tensor.
extern "C" int wg_bump(PyObject* tensors) noexcept {
  try {
    if (!PyList_CheckExact(tensors)) return 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(tensors); ++i) {
      if (!THPVariable_Check(PyList_GET_ITEM(tensors, i))) return 0;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(tensors); ++i) {
      const at::Tensor& t = THPVariable_Unpack(PyList_GET_ITEM(tensors, i));
      if (!t.is_inference()) torch::autograd::impl::bump_version(t);
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
    """The loaded library: ``same_state``, ``grads``, ``group``, ``bump`` are ``wg_same_state``,
    ``wg_grads``, ``wg_group``, ``wg_bump`` (see ``SOURCE``); ``fd`` the sealed memory file it was
    loaded from, kept open, or -1."""

    same_state: Any
    grads: Any
    group: Any
    bump: Any
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
    pointer, spans = ctypes.c_void_p, ctypes.c_ssize_t
    signatures = dict(
        wg_same_state=[*_OBJECTS, pointer, pointer],
        wg_grads=[*_OBJECTS[:2], pointer, pointer, pointer, pointer, spans],
        wg_group=[*_OBJECTS, *[pointer] * 6, spans],
        wg_bump=_OBJECTS[:1],
    )
    for name, argtypes in signatures.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, ctypes.c_int
    return NativeCheck(library.wg_same_state, library.wg_grads, library.wg_group, library.wg_bump, fd)


def build() -> NativeCheck:
    """The library, loaded from the cache or compiled now (RuntimeError when it cannot be)."""
    lacking = missing()
    if lacking is not None:
        raise RuntimeError(lacking)
    compiler, flags = str(find_compiler()), _flags()
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

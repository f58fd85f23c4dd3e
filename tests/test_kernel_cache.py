"""The C kernels' disk cache and compiler runs (issue 11, items 2-4): the cache loads only
private files of this user, verifies an entry before ``dlopen``, cleans up after dead builds,
and a missing, broken or hanging compiler falls back (default) or raises (``fused=True``,
``WAVEGUARD_CPU_BACKEND=c``).

As root (CI containers), "another user" is a forked child that switches to an unused uid and
makes folders or symlinks where the victim will look (issue 17); otherwise it is simulated with
group/other-writable modes, or by a stubbed ``stat`` result / ``geteuid``.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from waveguard_optim import WaveSGD
from waveguard_optim.kernels import cpu_c, cpu_step

needs_cc = pytest.mark.skipif(cpu_c.find_compiler() is None, reason="no C compiler (cc, gcc, clang or $CC)")
VARIANT = ("sgd", 2, "f32", "f32", ("momentum", "gate"))  # what WaveSGD(momentum=0.9, buffer_size=2) runs


@pytest.fixture(autouse=True)
def _fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache of this test's own, no kernel loaded, no warning given yet, temp dir inside tmp_path."""
    monkeypatch.setenv("WAVEGUARD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("WAVEGUARD_CPU_BACKEND", raising=False)
    monkeypatch.delenv("WAVEGUARD_CC_TIMEOUT", raising=False)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(cpu_c, "_LOADED", {})
    monkeypatch.setattr(cpu_c, "_warned_cache", set(), raising=False)
    monkeypatch.setattr(cpu_step, "_broken_variants", set())
    if hasattr(cpu_c, "_fresh_folder"):  # one fresh folder per test, not per process
        monkeypatch.setattr(cpu_c, "_fresh_folder", functools.lru_cache(cpu_c._fresh_folder.__wrapped__))


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _library(folder: Path) -> Path:
    (library,) = folder.glob("*.so")
    return library


# --- item 2: a cache private to the user -----------------------------------------------------


def test_cache_folder_is_created_private(tmp_path: Path) -> None:
    folder = cpu_c.cache_dir()
    assert folder.parent == tmp_path / "cache" and _mode(folder) == 0o700


@pytest.mark.parametrize(
    "uid_delta,mode,private",
    [(0, 0o700, True), (0, 0o755, True), (0, 0o775, False), (0, 0o757, False), (0, 0o1777, False), (1, 0o700, False)],
)
def test_private_means_owned_by_this_user_and_writable_by_no_one_else(uid_delta: int, mode: int, private: bool) -> None:
    """The decision, on a stubbed stat result (a file of another user cannot be made without root)."""
    info = os.stat_result((stat.S_IFDIR | mode, 0, 0, 1, os.geteuid() + uid_delta, 0, 0, 0, 0, 0))
    assert cpu_c._private(info) is private


def test_a_folder_writable_by_others_is_not_used_and_the_move_is_warned_once(tmp_path: Path) -> None:
    configured = tmp_path / "cache" / cpu_c.cache_dir().name
    configured.chmod(0o777)  # what another user could write into
    with pytest.warns(UserWarning, match="not a private writable folder") as caught:
        folder = cpu_c.cache_dir()
        assert cpu_c.cache_dir() == folder
    assert len(caught) == 1
    assert folder.parent == tmp_path / "tmp" and folder.name.startswith("waveguard_optim-") and _mode(folder) == 0o700
    assert folder.name != f"waveguard_optim-{os.geteuid()}"  # mkdtemp's unpredictable name, not one another user can make first


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o757])
def test_a_folder_above_the_cache_that_others_can_write_makes_it_untrusted(mode: int, tmp_path: Path) -> None:
    """Another user who can write a parent folder can rename the cache folder away and put their
    own (or a symlink) in its place: the whole path is judged, as ssh judges a key's folders."""
    configured = cpu_c.cache_dir()
    (tmp_path / "cache").chmod(mode)
    with pytest.warns(UserWarning, match="not a private writable folder"):
        assert cpu_c.cache_dir() != configured


def test_a_sticky_folder_above_the_cache_is_trusted_only_when_roots(tmp_path: Path) -> None:
    """Like /tmp: in a sticky folder others cannot rename what is ours, if root owns the folder."""
    configured = cpu_c.cache_dir()
    (tmp_path / "cache").chmod(0o1777)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = cpu_c.cache_dir()
    assert (folder == configured) is (os.geteuid() == 0) and bool(caught) is (os.geteuid() != 0)


def test_a_symlink_of_this_user_is_followed_to_its_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    monkeypatch.setenv("WAVEGUARD_CACHE_DIR", str(tmp_path / "link"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_c.cache_dir().parent == real


# --- playing another local user (a child process that switches to an unused uid) -----------

ATTACKER = 12345
SYSTEM_TMP = tempfile.gettempdir()  # before the fixture points tempfile at tmp_path
needs_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="playing another user needs root (os.setuid in a child)")


def _as_attacker(action: Callable[[], None]) -> None:
    """Run ``action`` in a forked child as the user ATTACKER (umask 0)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgid(ATTACKER)
            os.setuid(ATTACKER)
            os.umask(0)
            action()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder like /tmp (root's, sticky, writable by all) that another user can reach."""
    folder = Path(tempfile.mkdtemp(dir=SYSTEM_TMP))
    folder.chmod(0o1777)
    yield folder
    shutil.rmtree(folder)


@needs_root
def test_a_fallback_name_made_first_by_another_user_is_never_used(shared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17, attack 1: the attacker makes ``<tmp>/waveguard_optim-<uid>`` (0777) before the
    victim needs a fallback; the victim's private folder must not end up inside it."""
    squatted = shared / f"waveguard_optim-{os.geteuid()}"
    _as_attacker(lambda: squatted.mkdir(mode=0o777))
    monkeypatch.setattr("tempfile.tempdir", str(shared))
    (tmp_path / "cache").mkdir(mode=0o777)
    (tmp_path / "cache").chmod(0o777)  # the configured cache is unusable
    with pytest.warns(UserWarning, match="not a private writable folder"):
        folder = cpu_c.cache_dir()
    assert folder.parent == shared and folder != squatted and _mode(folder) == 0o700
    assert os.stat(folder).st_uid == os.geteuid() and not any(squatted.iterdir())


@needs_root
@pytest.mark.parametrize("mode", [0o755, 0o700])
def test_a_folder_of_another_user_above_the_cache_is_not_trusted(mode: int, shared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even not writable by us, a folder the attacker owns is theirs to rename and replace."""
    theirs = shared / "theirs"
    _as_attacker(lambda: theirs.mkdir(mode=mode))
    monkeypatch.setenv("WAVEGUARD_CACHE_DIR", str(theirs / "cache"))
    with pytest.warns(UserWarning, match="not a private writable folder"):
        folder = cpu_c.cache_dir()
    assert theirs not in folder.parents


@needs_root
def test_a_symlink_of_another_user_is_not_followed(shared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The attacker's symlink (in a sticky folder) points at the victim's own private folder:
    they can re-point it at any time, so it is not followed."""
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    link = shared / "link"
    _as_attacker(lambda: link.symlink_to(mine))
    monkeypatch.setenv("WAVEGUARD_CACHE_DIR", str(link))
    with pytest.warns(UserWarning, match="not a private writable folder"):
        folder = cpu_c.cache_dir()
    assert mine not in folder.parents and not any(mine.iterdir())


def test_files_of_another_user_are_not_trusted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    library = tmp_path / "x.so"
    library.write_bytes(b"\x7fELF")
    cpu_c._checksum_path(library).write_text(cpu_c._digest(library.read_bytes()))
    assert cpu_c._verified_bytes(library) == b"\x7fELF"
    monkeypatch.setattr(os, "geteuid", lambda: 12345)
    assert cpu_c._verified_bytes(library) is None


def _evil_library(tmp_path: Path, path: Path) -> Path:
    """A library at ``path`` whose constructor creates the returned marker file."""
    marker = tmp_path / "planted-code-ran"
    source = tmp_path / "evil.c"
    source.write_text(f'#include <stdio.h>\n__attribute__((constructor)) static void f(void) {{ fclose(fopen("{marker}", "w")); }}\n')
    subprocess.run([cpu_c.find_compiler(), "-shared", "-fPIC", str(source), "-o", str(path)], check=True)
    return marker


@needs_cc
def test_a_library_planted_in_a_shared_folder_is_never_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user plants a library under the kernel's (computable) name, with a matching
    checksum file, in a world-writable cache folder: its constructor must not run."""
    cpu_c.get_kernel(*VARIANT)
    name = _library(cpu_c.cache_dir()).name
    shared = tmp_path / "shared"
    folder = shared / cpu_c.cache_dir().name
    folder.mkdir(parents=True)
    marker = _evil_library(tmp_path, folder / name)
    cpu_c._checksum_path(folder / name).write_text(cpu_c._digest((folder / name).read_bytes()))
    folder.chmod(0o777)
    monkeypatch.setenv("WAVEGUARD_CACHE_DIR", str(shared))
    monkeypatch.setattr(cpu_c, "_LOADED", {})
    with pytest.warns(UserWarning, match="not a private writable folder"):
        kernel = cpu_c.get_kernel(*VARIANT)
    assert not marker.exists() and kernel.run is not None


@needs_cc
def test_a_library_writable_by_others_is_rebuilt(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu_c.get_kernel(*VARIANT)
    library = _library(cpu_c.cache_dir())
    library.chmod(0o666)
    monkeypatch.setattr(cpu_c, "_LOADED", {})
    builds = _count_builds(monkeypatch)
    cpu_c.get_kernel(*VARIANT)
    assert builds == [library.name] and not _mode(library) & 0o022


@needs_cc
def test_a_library_swapped_between_its_check_and_its_load_is_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Right after the cached bytes are hashed, the file is replaced by another library: what is
    loaded must be the bytes that were hashed, not whatever the path names by then."""
    cpu_c.get_kernel(*VARIANT)
    # A copy under a path this process has not loaded yet (dlopen would return the loaded one).
    shutil.copytree(tmp_path / "cache", tmp_path / "copy")
    monkeypatch.setenv("WAVEGUARD_CACHE_DIR", str(tmp_path / "copy"))
    library = _library(cpu_c.cache_dir())
    good = library.read_bytes()
    evil = tmp_path / "evil.so"
    marker = _evil_library(tmp_path, evil)
    real = cpu_c.hashlib.sha256

    def sha256_then_swap(data: bytes = b"") -> Any:
        digest = real(data)
        if bytes(data) == good and evil.exists():
            os.replace(evil, library)
        return digest

    monkeypatch.setattr(cpu_c.hashlib, "sha256", sha256_then_swap)
    monkeypatch.setattr(cpu_c, "_LOADED", {})
    kernel = cpu_c.get_kernel(*VARIANT)
    assert not evil.exists() and library.read_bytes() != good  # the swap happened
    assert not marker.exists() and kernel.parallel in (True, False)


def _garbage_then_real_compiler(tmp_path: Path) -> tuple[str, Path]:
    """A compiler that exits 0 after writing garbage while the returned flag file exists, and
    is the real compiler otherwise."""
    flag = tmp_path / "write-garbage"
    flag.touch()
    script = _fake_compiler(tmp_path, f'if [ -e {flag} ] && [ "$1" != --version ]; then for a; do out=$a; done; echo garbage > "$out"; exit 0; fi\nexec {cpu_c.find_compiler()} "$@"')
    return script, flag


@needs_cc
def test_a_compiler_that_writes_garbage_leaves_no_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17, item 7: the entry is loaded before it is published; garbage is never cached,
    so a later process (the compiler fixed) builds the kernel."""
    compiler, flag = _garbage_then_real_compiler(tmp_path)
    monkeypatch.setenv("CC", compiler)
    with pytest.raises(RuntimeError, match="exited 0, but its library does not load"):
        cpu_c.get_kernel(*VARIANT)
    assert not list(cpu_c.cache_dir().glob("*.so*"))
    flag.unlink()
    assert cpu_c.get_kernel(*VARIANT).run is not None and len(list(cpu_c.cache_dir().glob("*.so"))) == 1


@needs_cc
def test_a_published_entry_that_does_not_load_is_rebuilt(monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry with a matching checksum that is not a library (published by an older version
    after a bad compile) is rebuilt, not a failure in every later process."""
    cpu_c.get_kernel(*VARIANT)
    library = _library(cpu_c.cache_dir())
    garbage = library.with_name("garbage")
    garbage.write_bytes(b"garbage\n")
    os.replace(garbage, library)
    cpu_c._checksum_path(library).write_text(cpu_c._digest(b"garbage\n"))
    monkeypatch.setattr(cpu_c, "_LOADED", {})
    builds = _count_builds(monkeypatch)
    assert cpu_c.get_kernel(*VARIANT).run is not None and builds == [library.name]
    assert library.read_bytes() != b"garbage\n"


def _count_builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    built: list[str] = []
    real = cpu_c._build

    def build(source: str, target: Path, compiler: str) -> cpu_c.Kernel:
        built.append(target.name)
        return real(source, target, compiler)

    monkeypatch.setattr(cpu_c, "_build", build)
    return built


# --- item 3: damaged entries and dead builds -------------------------------------------------


def _damage(library: Path, how: str) -> None:
    """Damage the cache entry as a new file: this process has the library mapped, and changing
    that file in place would crash it (the very SIGBUS the check prevents)."""
    data = library.read_bytes()
    middle = len(data) // 2
    if how == "no checksum":  # an entry of a version that wrote no checksum
        cpu_c._checksum_path(library).unlink()
        return
    if how == "truncated":
        data = data[:middle]
    else:
        data = data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64]) + data[middle + 64 :]
    damaged = library.with_name("damaged")
    damaged.write_bytes(data)
    os.replace(damaged, library)


@needs_cc
@pytest.mark.parametrize("how", ["truncated", "flipped", "no checksum"])
def test_a_damaged_cache_entry_is_rebuilt_not_loaded(how: str, tmp_path: Path) -> None:
    """Loading a truncated library kills the process with SIGBUS inside dlopen (flipped bytes:
    SIGILL or worse), so the load runs in a fresh process: it must rebuild the entry and step."""
    cpu_c.get_kernel(*VARIANT)
    library = _library(cpu_c.cache_dir())
    _damage(library, how)
    code = textwrap.dedent(
        f"""
        from waveguard_optim.kernels import cpu_c
        built = []
        real = cpu_c._build
        cpu_c._build = lambda *args: (built.append(1), real(*args))[1]
        cpu_c.get_kernel(*{VARIANT!r})
        assert built == [1], built
        """
    )
    env = {**os.environ, "WAVEGUARD_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert cpu_c._verified_bytes(library) is not None


@needs_cc
def test_build_folders_of_dead_builds_are_removed() -> None:
    folder = cpu_c.cache_dir()
    dead = folder / "build-999999999-x"  # above any pid_max: no such process
    live = folder / f"build-{os.getppid()}-x"
    old = folder / f"build-{os.getppid()}-y"
    for leftover in (dead, live, old):
        leftover.mkdir()
        (leftover / "kernel.c").write_text("")
    past = time.time() - 2 * cpu_c.STALE_BUILD_AGE
    os.utime(old, (past, past))
    cpu_c.get_kernel(*VARIANT)
    assert not dead.exists() and not old.exists() and live.exists()
    assert not [entry for entry in folder.iterdir() if entry.name.startswith("build-") and entry != live]


# --- item 4: missing, broken and hanging compilers -------------------------------------------


def _fake_compiler(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-cc"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


COMPILERS = {
    "hangs": lambda tmp_path: _fake_compiler(tmp_path, "sleep 60"),
    "fails": lambda tmp_path: _fake_compiler(tmp_path, "echo 'cc: internal error' >&2; exit 1"),
    "missing": lambda tmp_path: str(tmp_path / "no-such-cc"),
}


def _sgd_steps(p: torch.nn.Parameter, **options: Any) -> WaveSGD:
    opt = WaveSGD([p], lr=0.1, momentum=0.9, buffer_size=2, **options)
    for step in range(3):
        p.grad = torch.randn(64, generator=torch.Generator().manual_seed(step))
        opt.step()
    return opt


@pytest.mark.parametrize("compiler", list(COMPILERS))
def test_by_default_an_unusable_compiler_falls_back_to_the_torch_back_end(compiler: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step happens, once warned, with the torch back end's numbers (the same operations)."""
    monkeypatch.setenv("CC", COMPILERS[compiler](tmp_path))
    monkeypatch.setenv("WAVEGUARD_CC_TIMEOUT", "0.5")
    p = torch.nn.Parameter(torch.zeros(64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _sgd_steps(p)
    messages = [str(w.message) for w in caught if "waveguard_optim" in str(w.message)]
    expected = {"hangs": "did not finish within 0.5 s", "fails": "internal error", "missing": "no-such-cc"}[compiler]
    assert len(messages) == 1 and expected in messages[0], messages
    monkeypatch.setenv("WAVEGUARD_CPU_BACKEND", "torch")
    q = torch.nn.Parameter(torch.zeros(64))
    _sgd_steps(q)
    assert torch.equal(p, q)


@pytest.mark.parametrize("compiler", list(COMPILERS))
@pytest.mark.parametrize("insist", ["fused=True", "WAVEGUARD_CPU_BACKEND=c"])
def test_an_unusable_compiler_raises_when_the_c_kernel_is_required(compiler: str, insist: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", COMPILERS[compiler](tmp_path))
    monkeypatch.setenv("WAVEGUARD_CC_TIMEOUT", "0.5")
    options: dict[str, Any] = {}
    if insist == "fused=True":
        options["fused"] = True
    else:
        monkeypatch.setenv("WAVEGUARD_CPU_BACKEND", "c")
    p = torch.nn.Parameter(torch.zeros(64))
    opt = WaveSGD([p], lr=0.1, momentum=0.9, buffer_size=2, **options)
    p.grad = torch.ones(64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="fused CPU kernel .* cannot be built"):
            opt.step()
    assert torch.equal(p, torch.zeros(64)) and not opt.state[p]


@pytest.mark.parametrize("value", ["soon", "inf", "nan", "-1", "0"])
def test_an_invalid_compiler_timeout_is_named(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """inf used to pass the check and make every compile raise OverflowError."""
    monkeypatch.setenv("WAVEGUARD_CC_TIMEOUT", value)
    with pytest.raises(ValueError, match=f"WAVEGUARD_CC_TIMEOUT: '{value}'"):
        cpu_c._cc_timeout()
    if cpu_c.find_compiler() is not None:
        with pytest.raises(ValueError, match=f"WAVEGUARD_CC_TIMEOUT: '{value}'"):
            cpu_c.get_kernel(*VARIANT)


@needs_cc
def test_an_invalid_compiler_timeout_fails_the_step_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    """A setting to fix, not a compiler failure to fall back from: the step raises, changing nothing."""
    monkeypatch.setenv("WAVEGUARD_CC_TIMEOUT", "inf")
    p = torch.nn.Parameter(torch.zeros(64))
    opt = WaveSGD([p], lr=0.1, momentum=0.9, buffer_size=2)
    p.grad = torch.ones(64)
    with pytest.raises(ValueError, match="WAVEGUARD_CC_TIMEOUT: 'inf'"):
        opt.step()
    assert torch.equal(p, torch.zeros(64)) and not opt.state[p]

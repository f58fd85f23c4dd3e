"""Nothing in the checkout shadows an installed distribution.

``python -m pytest``, ``python -c`` and a script in the clone all put the repo root first on
``sys.path``. A top-level folder with an ``__init__.py`` (or a top-level ``.py`` file) would then
hide any installed package of that name: it happened with ``kernels/`` and Hugging Face's
``kernels``, which ``transformers`` imports. The top-level folders stay namespace portions, which
every regular package on the path outranks.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = "waveguard_optim"


def _importable_top_level_names() -> list[str]:
    names = []
    for entry in ROOT.iterdir():
        name = entry.stem if entry.suffix == ".py" else entry.name
        if name.isidentifier() and name != OURS and (entry.is_dir() or entry.suffix == ".py"):
            names.append(name)
    return sorted(names)


def _resolve_from_root(name: str, pythonpath: str | None = None) -> str:
    """Where ``import name`` lands for ``python -c`` run in the repo root."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    code = f"import importlib.util as u; s = u.find_spec({name!r}); print(s.origin or list(s.submodule_search_locations)[0])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_the_repo_root_has_the_folders_this_test_guards() -> None:
    """The guard below must see the folders that once shadowed (``kernels``) and the others."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: an sdist has no top-level kernels/ (its copy is inside the package)")
    assert {"kernels", "bench", "tests"} <= set(_importable_top_level_names())


@pytest.mark.parametrize("name", _importable_top_level_names())
def test_an_installed_package_outranks_the_top_level_entry(name: str, tmp_path: Path) -> None:
    """A regular package named like a top-level entry, installed elsewhere on the path, is what
    ``import <name>`` finds from the repo root."""
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    found = _resolve_from_root(name, pythonpath=str(tmp_path))
    assert Path(found).resolve() == (tmp_path / name / "__init__.py").resolve(), f"{ROOT / name} shadows an installed {name!r}"


def test_installed_kernels_distribution_is_what_the_tests_import() -> None:
    """Hugging Face's ``kernels`` (pulled in by transformers), both in this pytest process and
    for ``python -c`` in the repo root."""
    try:
        installed = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the 'kernels' distribution is not installed (it comes with the frameworks extra)")
    for origin in (importlib.util.find_spec("kernels").origin, _resolve_from_root("kernels")):
        assert origin is not None and Path(origin).resolve() == Path(installed).resolve(), origin


def test_the_library_reaches_its_kernels_through_its_own_package() -> None:
    """``waveguard_optim.kernels`` is the checkout's own (in a clone, the link to ``kernels/``),
    not the installed ``kernels``."""
    from waveguard_optim.kernels import dispatch

    assert Path(dispatch.__file__).resolve() == (ROOT / "waveguard_optim" / "kernels" / "dispatch.py").resolve()

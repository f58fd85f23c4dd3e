"""Every code block in the README runs as written.

Python blocks run as scripts in a fresh process (in an empty folder, so they cannot lean on files
of the clone). Shell blocks install and run things, which a test cannot redo here; what is
checked instead is everything they name: the extras exist in pyproject.toml, the files exist, and
the test command is the one CI runs.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```$", README, flags=re.S | re.M)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
SHELL = [code for lang, code in BLOCKS if lang in ("bash", "sh", "shell")]


def _top_level_imports(code: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_readme_has_the_blocks_this_test_runs() -> None:
    assert len(PYTHON) >= 3 and len(SHELL) >= 2, (len(PYTHON), len(SHELL))


@pytest.mark.parametrize("code", PYTHON, ids=[f"python-{i}" for i in range(len(PYTHON))])
def test_python_block_runs(code: str, tmp_path: Path) -> None:
    missing = sorted(m for m in _top_level_imports(code) if importlib.util.find_spec(m) is None)
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (installed by the frameworks extra)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README block failed:\n{code}\n--- stderr ---\n{done.stderr[-4000:]}"


def _commands(block: str) -> list[list[str]]:
    """The simple commands of a shell block (comments dropped, split at && and newlines)."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        for part in re.split(r"&&", line.split(" #")[0] if not line.lstrip().startswith("#") else ""):
            words = shlex.split(part)
            while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
                words = words[1:]
            if words:
                out.append(words)
    return out


def test_shell_blocks_name_only_what_exists() -> None:
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    seen = 0
    for words in (w for block in SHELL for w in _commands(block)):
        for i, word in enumerate(words):
            for group in re.findall(r"\[([\w,]+)\]", word):
                assert set(group.split(",")) <= extras, f"{word}: unknown extra (have {sorted(extras)})"
                seen += 1
            if word in ("-c", "-r") and words[0] == "pip":
                assert (ROOT / words[i + 1]).is_file(), words[i + 1]
            if word.endswith(".py"):
                assert (ROOT / word).is_file(), word
                seen += 1
    assert seen >= 4


def test_the_readme_test_command_is_what_ci_runs() -> None:
    """CI runs the README's test command verbatim (the line after '# 2. install and run the tests')."""
    if not (ROOT / ".ci" / "run").is_file():
        pytest.skip("no .ci/run here (an sdist carries the README, not the CI script)")
    block = next(b for b in SHELL if "python -m pytest" in b)
    command = next(line for line in block.splitlines() if "python -m pytest" in line)
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()

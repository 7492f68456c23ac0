"""Every ```python block of README.md and every Python code block of the docs' quickstart
(docs/install.rst, "Install and first steps") and landing page (docs/index.rst) runs as written.

Each block runs alone in a fresh interpreter, in an empty directory, so a block that needs
names from elsewhere fails: a user copies one block. ``XLA_FLAGS`` is removed from the
environment, so a block that needs several JAX devices must set it itself, before importing
JAX. A block that imports an optional framework that is not installed is skipped.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RST_PAGES = [ROOT / "docs" / "install.rst", ROOT / "docs" / "index.rst"]

# top-level module (or kernelattn module) -> the extra that installs what it needs
EXTRAS = {"torch": "torch", "jax": "jax", "flax": "flax", "optax": "flax", "dask": "dask",
          "cupy": "cupy", "triton": "triton", "matplotlib": "test"}
NEEDS = {"kernelattn.backends.torch_nn": ("torch",), "kernelattn.backends.jax": ("jax",),
         "kernelattn.backends.jax_nn": ("jax", "flax")}


def markdown_blocks(path: pathlib.Path):
    """(first line number, code) of every ```python fence."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, body = i + 2, []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            blocks.append((start, "\n".join(body) + "\n"))
        i += 1
    return blocks


def rst_blocks(path: pathlib.Path):
    """(first line number, code) of every ``.. code-block:: python`` (or ``python3``, ``py``)
    and of every ``::`` literal block when the page's highlight language is Python."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    default_python = True  # Sphinx's default highlight language
    for i, line in enumerate(lines):
        m = re.match(r"\s*\.\. highlight::\s*(\S+)", line)
        if m:
            default_python = m.group(1) in ("python", "python3", "py", "default")
            continue
        directive = re.match(r"(\s*)\.\. (?:code-block|code|sourcecode)::\s*(\S*)", line)
        literal = (line.rstrip().endswith("::") and not line.lstrip().startswith("..")
                   and default_python)
        if directive and directive.group(2) not in ("python", "python3", "py"):
            continue
        if not directive and not literal:
            continue
        indent = len(line) - len(line.lstrip())
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or lines[j].lstrip().startswith(":")
                                  and directive):
            j += 1  # blank lines and the directive's options
        body_start, body = j, []
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
            body.append(lines[j])
            j += 1
        code = textwrap.dedent("\n".join(body)).strip("\n") + "\n"
        if code.strip():
            blocks.append((body_start + 1, code))
    return blocks


def all_blocks():
    out = [pytest.param(code, id=f"README.md:{line}") for line, code in markdown_blocks(README)]
    for page in RST_PAGES:
        out += [pytest.param(code, id=f"docs/{page.name}:{line}") for line, code in rst_blocks(page)]
    return out


def imported_modules(code: str) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            mods.add(node.module)
    return mods


def skip_unless_installed(code: str) -> None:
    mods = imported_modules(code)
    needed = {m.split(".")[0] for m in mods} | {n for m in mods for n in NEEDS.get(m, ())}
    for name in sorted(needed & set(EXTRAS)):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"needs {name}: pip install \"kernelattn[{EXTRAS[name]}]\"")


def test_blocks_found():
    ids = [p.id for p in all_blocks()]
    assert sum(i.startswith("README.md") for i in ids) >= 4, ids
    assert sum(i.startswith("docs/install.rst") for i in ids) >= 3, ids
    assert sum(i.startswith("docs/index.rst") for i in ids) >= 1, ids


def _slow_if_heavy(p):
    """Quick tier (-m "not slow"): a block that imports torch, JAX or Flax in a fresh interpreter is
    slow; the NumPy blocks stay quick."""
    code = p.values[0]
    heavy = {m.split(".")[0] for m in imported_modules(code)} & {"torch", "jax", "flax"}
    return pytest.param(*p.values, id=p.id, marks=[*p.marks, pytest.mark.slow] if heavy else p.marks)


@pytest.mark.parametrize("code", [_slow_if_heavy(p) for p in all_blocks()])
def test_block_runs(code, tmp_path):
    skip_unless_installed(code)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(MPLBACKEND="Agg", PYTHONHASHSEED="0")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"block failed:\n{code}\n--- stderr ---\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("code", [p for p in all_blocks() if "xla_force_host_platform_device_count" in p.values[0]])
def test_xla_flags_set_before_jax_import(code):
    """A block that asks for simulated devices sets XLA_FLAGS before its first JAX import."""
    lines = code.splitlines()
    flag = next(i for i, l in enumerate(lines) if "xla_force_host_platform_device_count" in l)
    first_jax = next((i for i, l in enumerate(lines) if re.match(r"\s*(import|from)\s+(jax|flax)\b", l)
                      or re.match(r"\s*import .*\bjax\b", l)), len(lines))
    assert "os.environ" in lines[flag] and flag < first_jax

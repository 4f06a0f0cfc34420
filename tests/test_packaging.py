"""What a non-editable install ships: setuptools' build_py (the step ``pip install .`` and a wheel build run) copies
every Python module of ckpt_ext/ and of kernels/ (as ckpt_ext/kernels/).

An editable install and the in-tree checkout import straight from the source, so a package folder missing from
pyproject's ``packages`` list only shows once someone installs a wheel: ``import ckpt_ext`` then fails with
ModuleNotFoundError. This test copies the sources to a fresh folder (no egg-info: setuptools would otherwise ship
whatever an earlier editable install's SOURCES.txt lists, hiding the gap), runs build_py there (about 2 s, no
compiler) and compares the copied .py files with the tree.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _source_modules() -> set[str]:
    """Paths the installed package must hold, relative to site-packages."""
    found = set()
    for path in (ROOT / "ckpt_ext").rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[:2] == ("ckpt_ext", "kernels"):
            continue  # a worktree's link to kernels/, counted from kernels/ below
        found.add(rel.as_posix())
    for path in (ROOT / "kernels").rglob("*.py"):
        found.add(("ckpt_ext" / path.relative_to(ROOT)).as_posix())
    return found


def test_build_py_ships_every_module(tmp_path):
    src, lib = tmp_path / "src", tmp_path / "lib"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "kernels")
    for folder in ("ckpt_ext", "csrc"):
        shutil.copytree(ROOT / folder, src / folder, ignore=ignore)
    shutil.copytree(ROOT / "kernels", src / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)],
        cwd=src,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    shipped = {p.relative_to(lib).as_posix() for p in lib.rglob("*.py")}
    source = _source_modules()
    missing = sorted(source - shipped)
    assert not missing, f"modules a wheel would lack (add their package to pyproject's packages): {missing}"
    assert shipped == source, f"shipped but not in the tree: {sorted(shipped - source)}"

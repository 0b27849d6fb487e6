"""The package's layers (docs/architecture.md) hold: import-linter's contracts in pyproject.toml
pass on the package as it is, and the same contracts fail on a copy of the package into which one
forbidden import was written (so the check can fail)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).with_name("lint-imports"))


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    # lint-imports reads pyproject.toml in cwd and imports the package found first on sys.path
    env = {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(cwd), "HOME": str(cwd)}
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_the_contracts_hold():
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_a_runtime_import_of_export_code_breaks_them(tmp_path):
    shutil.copytree(ROOT / "eclipse_export", tmp_path / "eclipse_export",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    images = tmp_path / "eclipse_export" / "runtime" / "images.py"
    images.write_text(images.read_text() + "\nfrom eclipse_export.export import exporter  # noqa\nimport torch  # noqa\n")
    done = _lint(tmp_path)
    assert done.returncode != 0
    assert "eclipse_export.runtime is not allowed to import eclipse_export.export" in done.stdout
    assert "eclipse_export.runtime.images -> torch" in done.stdout

"""The layers of docs/ARCHITECTURE.md, checked by import-linter against the real imports.

The contracts live in pyproject.toml ([tool.importlinter]); these tests run them on the tree
as it is, and on a copy with a wrong import added, to show that the check catches one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """Run ``lint-imports`` on the packages under ``root`` with their pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_every_contract_is_kept() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_wrong_import_breaks_the_contracts(tmp_path: Path) -> None:
    for name in ("appliance", "ui"):
        shutil.copytree(ROOT / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with (tmp_path / "appliance" / "scoring" / "score.py").open("a") as f:
        f.write("\nfrom ..casework import cases  # noqa: E402,F401\n")
    with (tmp_path / "ui" / "queue_page.py").open("a") as f:
        f.write("\nfrom appliance.scoring import features  # noqa: E402,F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "appliance.scoring.score -> appliance.casework.cases" in result.stdout
    assert "ui.queue_page -> appliance.scoring.features" in result.stdout
    assert "2 broken" in result.stdout

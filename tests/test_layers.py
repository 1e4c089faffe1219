"""The layers (ARCHITECTURE.md), enforced by the import contracts in pyproject.toml: the core imports neither
align nor evals (only the orchestration sub-package minitron.pipeline does), and align and evals are independent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"


def lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LINT, "--config", str(ROOT / "pyproject.toml")], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(pythonpath)})


def test_the_project_keeps_its_import_contracts():
    res = lint(ROOT, ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken" in res.stdout


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


LEGAL = {"minitron/__init__.py": "", "minitron/scoring.py": "", "minitron/pipeline/__init__.py": "",
         "minitron/pipeline/recipe.py": "import align.pipeline\nimport evals.harness\n",
         "align/__init__.py": "", "align/pipeline.py": "import minitron.scoring\n",
         "evals/__init__.py": "", "evals/harness.py": "import minitron.scoring\n"}


def test_a_wrong_arrow_fails_the_contract(tmp_path):
    assert lint(tmp_path, _tree(tmp_path / "ok", LEGAL)).returncode == 0
    core_up = lint(tmp_path, _tree(tmp_path / "core", {**LEGAL, "minitron/scoring.py": "import evals.harness\n"}))
    assert core_up.returncode != 0 and "minitron.scoring -> evals.harness" in core_up.stdout
    sideways = lint(tmp_path, _tree(tmp_path / "side", {**LEGAL, "evals/harness.py": "import align.pipeline\n"}))
    assert sideways.returncode != 0 and "evals.harness -> align.pipeline" in sideways.stdout

"""The notebooks in notebooks/ run top to bottom (nbclient, the venv's python3 kernel) in small mode.

The three share one small run in a temporary folder (MINITRON_NB_RUN), in order: notebook 1 builds the world,
teacher and students, notebook 2 aligns the width student, notebook 3 evaluates them; each also works alone.
Every cell must run without error, and each notebook must show its figures and tables.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
# notebook -> (timeout per cell in seconds, images it must show at least, tables it must show at least,
#              texts its outputs must contain)
NOTEBOOKS = {
    "01_prune_and_distill.ipynb": (600, 3, 3, ["dropped layers", "final_val_kl", "width distilled", "depth distilled"]),
    "02_alignment.ipynb": (600, 2, 3, ["held-out loss", "pairwise accuracy", "<|im_start|>assistant", "rejected"]),
    "03_evaluation_report.ipynb": (600, 2, 2, ["width distilled", "mmlu acc", "bfcl accuracy", "rag f1"]),
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, monkeypatch_module):
    """One small run shared by the notebooks (the kernel inherits these variables)."""
    path = tmp_path_factory.mktemp("nbrun")
    for k, v in {"MINITRON_NB_RUN": str(path), "MINITRON_NB_SMALL": "1", "HF_HUB_OFFLINE": "1",
                 "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}.items():
        monkeypatch_module.setenv(k, v)
    return path


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def execute(name: str, timeout: int) -> tuple[nbformat.NotebookNode, float]:
    """Run a notebook in a fresh kernel from notebooks/ (as Jupyter would); fail on the first error."""
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    t0 = time.time()
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    return nb, time.time() - t0


def outputs(nb: nbformat.NotebookNode, mime: str) -> list[str]:
    """Every output of type ``mime`` (``stream`` for printed text)."""
    outs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    if mime == "stream":
        return [o["text"] for o in outs if o["output_type"] == "stream"]
    return [o["data"][mime] for o in outs if mime in o.get("data", {})]


def check_outputs(name: str, nb: nbformat.NotebookNode) -> None:
    """Every cell ran without error and the notebook showed its figures, tables and key numbers."""
    _, n_images, n_tables, texts = NOTEBOOKS[name]
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o["output_type"] == "error"]
    assert not errors
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code"), "a cell did not run"
    images = outputs(nb, "image/png")
    assert len(images) >= n_images and all(len(i) > 1000 for i in images), f"{name}: {len(images)} figures"
    tables = [t for t in outputs(nb, "text/html") if "<table" in t] + \
             [t for t in outputs(nb, "text/markdown") if "|---" in t]
    assert len(tables) >= n_tables, f"{name}: {len(tables)} tables"
    shown = "\n".join(outputs(nb, "stream") + outputs(nb, "text/html") + outputs(nb, "text/markdown"))
    assert not [t for t in texts if t not in shown], f"{name}: missing {[t for t in texts if t not in shown]}"


def test_notebooks_are_stored_without_outputs():
    for name in NOTEBOOKS:
        nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code), name
        assert 'os.environ.get("MINITRON_NB_RUN"' in code[0].source, f"{name}: the first cell sets the parameters"


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_runs_top_to_bottom(name, run_dir):
    nb, seconds = execute(name, NOTEBOOKS[name][0])
    print(f"{name}: {seconds:.0f} s")
    check_outputs(name, nb)

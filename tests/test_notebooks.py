"""The notebooks: committed clean, and each one runs end to end in its smallest setting.

`run_notebook` loads a notebook, adds a cell after its `parameters` cell (the papermill
convention) that sets small values, and executes it with nbclient in a fresh kernel of this
interpreter (a kernel spec written for the test, so the venv's python runs it on any machine).
A cell that raises fails the test.
"""

import json
import os
import sys
import time
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
MAX_BYTES = 200_000
KERNEL = "cgdiff-notebook-test"


def parameters_index(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{len(tagged)} cells tagged 'parameters'"
    return tagged[0]


@pytest.fixture(scope="session")
def kernel_name(tmp_path_factory):
    """A kernel spec for this interpreter, found first through JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "cgdiff tests", "language": "python",
    }))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", os.pathsep.join(filter(None, [str(root), os.environ.get("JUPYTER_PATH")])))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
        mp.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        yield KERNEL


def run_notebook(name: str, parameters: dict, workdir: Path, kernel: str, timeout: int = 600):
    """Execute notebooks/NAME in `workdir` with `parameters` overriding its parameter cell;
    returns the executed notebook and the seconds it took."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    source = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    nb.cells.insert(parameters_index(nb) + 1,
                    nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name=kernel, resources={"metadata": {"path": str(workdir)}}).execute()
    return nb, time.perf_counter() - start


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") or "".join(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def images_shown(nb) -> int:
    return sum("image/png" in out.get("data", {}) for c in nb.cells for out in c.get("outputs", []))


# ----------------------------------------------------------------------------- committed state


def test_the_four_notebooks_are_there():
    assert NAMES == ["01_quickstart.ipynb", "02_train.ipynb", "03_reproduce_table.ipynb", "04_ablation.ipynb"]


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_is_clean_and_parameterised(name):
    path = NOTEBOOKS / name
    assert path.stat().st_size < MAX_BYTES
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "outputs must be cleared"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    # Colab: a badge to this very file, and a setup cell that installs from REPO_URL there.
    assert f"/blob/main/notebooks/{name}" in nb.cells[0].source
    setup = code[0].source
    assert "REPO_URL" in setup and '"google.colab" in sys.modules' in setup.replace("not in", "in")
    # The parameter cell holds plain settings only.
    params = nb.cells[parameters_index(nb)].source
    assert "import " not in params and "def " not in params


# ----------------------------------------------------------------------------- execution


@pytest.mark.slow
def test_quickstart_runs_on_a_bundled_checkpoint(kernel_name, tmp_path):
    from cgdiff.registry import known_checkpoints

    entries = [e for e in known_checkpoints() if e.bundled and e.examples()]
    if not entries:
        pytest.skip("no bundled checkpoint with examples (checkpoints/registry.json)")
    nb, seconds = run_notebook("01_quickstart.ipynb", {
        "CHECKPOINT": entries[0].name, "N_IMAGES": 2, "STEPS": 2, "DEVICE": "cpu",
        "T0_VALUES": [250, 1000], "W_VALUES": [0.0, 3.0], "S_VALUES": [0.0, 1.0],
    }, tmp_path, kernel_name)
    text = outputs_text(nb)
    assert "x threshold" in text and "t0 = 1000" in text and "model calls" in text
    assert images_shown(nb) >= 5
    print(f"01_quickstart: {seconds:.0f} s")


SMALL_TRAINING = {"IMAGE_SIZE": 64, "CROP_SIZE": 32, "PRESET": "tiny", "BATCH_SIZE": 4, "MAX_STEPS": 4,
                  "MAX_TEST_IMAGES": 3, "EVAL_STEPS": 2, "MASK_SIZE": 64}


@pytest.mark.slow
def test_train_notebook_trains_calibrates_and_evaluates_on_leather(kernel_name, leather_root, tmp_path):
    nb, seconds = run_notebook("02_train.ipynb", {"DATA_ROOT": str(leather_root), "PREVIEWS": 1, **SMALL_TRAINING},
                               tmp_path, kernel_name)
    text = outputs_text(nb)
    assert "s/epoch" in text and "training:" in text  # time per epoch and the progress bar
    assert "pixel_auroc" in text and "threshold" in text and "PUSH is False" in text
    assert (tmp_path / "runs" / "02_train" / "checkpoint" / "cgdiff.json").is_file()
    assert images_shown(nb) >= 5  # data, preview, loss, calibration, scores, examples
    print(f"02_train: {seconds:.0f} s")


@pytest.mark.slow
def test_reproduce_notebook_prints_table1_beside_one_local_class(kernel_name, leather_root, tmp_path):
    nb, seconds = run_notebook("03_reproduce_table.ipynb", {
        "MVTEC_ROOT": str(leather_root.parent), "CLASSES": ["leather"], "W_SOURCE": "tune", "TUNE_MINUTES": 0.05,
        **SMALL_TRAINING,
    }, tmp_path, kernel_name)
    text = outputs_text(nb)
    assert "label-free tuning:" in text and "held out of training" in text  # tuned on the stripe, not the test
    table = text[text.index("reproduced (AUPRO)"):]
    assert "carpet" in table and "Blotchy_099" in table and "100.0 / 99.3" in table  # the paper's rows
    leather = next(line for line in table.splitlines() if line.startswith("leather"))
    assert leather.count("/") == 3 and "only 3 test images" in text  # reproduced numbers, flagged as partial
    results = json.loads((tmp_path / "runs" / "03_reproduce" / "results.json").read_text())
    assert set(results) == {"leather"} and 0 <= results["leather"]["image_auroc"] <= 1
    assert images_shown(nb) == 1
    print(f"03_reproduce_table: {seconds:.0f} s")


@pytest.mark.slow
def test_ablation_notebook_runs_on_a_bundled_checkpoint_and_its_texture_set(kernel_name, tmp_path):
    from cgdiff.data import TEXTURES
    from cgdiff.registry import known_checkpoints

    entries = [e for e in known_checkpoints() if e.bundled and e.name in TEXTURES]
    if not entries:
        pytest.skip("no bundled texture checkpoint (checkpoints/registry.json)")
    nb, seconds = run_notebook("04_ablation.ipynb", {
        "CHECKPOINT": entries[0].name, "MAX_TEST_IMAGES": 3, "STEPS": 2, "T0_VALUES": [250, 1000],
        "W_VALUES": [0.0, 3.0], "S_VALUES": [0.0, 1.0], "MASK_SIZE": 64, "DEVICE": "cpu",
    }, tmp_path, kernel_name)
    text = outputs_text(nb)
    for row in ("full method", "no partial start", "no conditioning", "no blur guidance", "pixel term only",
                "w = 3", "t0 = 1000"):
        assert row in text, row
    assert (tmp_path / "data" / "textures" / entries[0].name / "dataset.json").is_file()
    assert images_shown(nb) == 2
    print(f"04_ablation: {seconds:.0f} s")

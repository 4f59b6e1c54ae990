"""The walkthrough notebook runs headlessly from top to bottom, so it cannot rot, and the copy in
the repository carries the outputs of a real run of its current cells."""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = (
    Path(__file__).resolve().parents[1] / "experiments/notebooks/fed_avg_w_prune_walkthrough.ipynb"
)


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def stream_text(notebook, name="stdout") -> str:
    return "".join(
        output.get("text", "")
        for cell in code_cells(notebook)
        for output in cell.get("outputs", [])
        if output.get("output_type") == "stream" and output.get("name") == name
    )


def kept_table(text: str):
    """The (epoch, alice kept, bob kept, schedule) rows of the per-epoch table (accuracy aside)."""
    rows = re.findall(r"^\s+(\d+)\s+[0-9.]+\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)$", text, re.M)
    return [tuple(row) for row in rows]


def test_committed_notebook_has_outputs_of_a_full_run():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    counts = [cell.execution_count for cell in code_cells(notebook)]
    assert counts == list(range(1, len(counts) + 1)), "run every cell once, top to bottom"
    outputs = [o for cell in code_cells(notebook) for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert len(kept_table(stream_text(notebook))) == 3
    assert "USING 'digits' INSTEAD" not in stream_text(notebook)  # recorded on Fashion-MNIST


@pytest.mark.secretflow
@pytest.mark.needs_data
@pytest.mark.slow
def test_walkthrough_notebook_executes_and_matches_the_committed_run(tmp_path):
    committed = nbformat.read(NOTEBOOK, as_version=4)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Runs in a fresh kernel (its own process), so the session's SecretFlow state is untouched.
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    outputs = [o for cell in code_cells(notebook) for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = stream_text(notebook)
    # One torch thread: sf-ext's default, or OMP_NUM_THREADS=1 inherited from this test process.
    assert text.startswith("SecretFlow 1.11.0b1 | torch threads: (1, '")
    assert "\nfashion-mnist {'alice': (4800, 1, 28, 28), 'bob': (7200, 1, 28, 28)}\n" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plot rendered
    assert (
        "kept after one epoch: {'alice': 0.7, 'bob': 0.7}" in text
    )  # sf_ext.strategies.kept_fraction
    # The pruning schedule is exact, so the committed table must be the one this run printed.
    assert kept_table(text) == kept_table(stream_text(committed))
    assert kept_table(text)[-1] == ("3", "0.343", "0.343", "0.343")

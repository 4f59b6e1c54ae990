"""The walkthrough notebook runs headlessly from top to bottom, so it cannot rot."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = [pytest.mark.secretflow, pytest.mark.needs_data, pytest.mark.slow]

NOTEBOOK = (
    Path(__file__).resolve().parents[1] / "experiments/notebooks/fed_avg_w_prune_walkthrough.ipynb"
)


def test_walkthrough_notebook_executes(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Runs in a fresh kernel (its own process), so the session's SecretFlow state is untouched.
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    outputs = [
        o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
    ]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "alice kept" in text  # the per-epoch table printed
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plot rendered

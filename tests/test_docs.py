"""The API reference builds from the docstrings with warnings as errors and covers every module."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"


def public_modules():
    """sf_ext's modules, from the files (importing them would load SecretFlow), except private
    ones and ``__main__``."""
    names = set()
    for path in (REPO_ROOT / "sf_ext").rglob("*.py"):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not any(p.startswith("_") for p in parts):
            names.add(".".join(parts))
    return names


@pytest.mark.secretflow  # autodoc imports the strategies and SecretFlow aggregators
@pytest.mark.slow
def test_docs_build_without_warnings_and_cover_every_module(tmp_path):
    out = tmp_path / "html"
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html"]
        + ["-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"the docs build warned or failed:\n{done.stderr[-5000:]}"

    def page(module: str) -> str:
        return (out / "generated" / f"{module}.html").read_text()

    modules = public_modules()
    assert {"sf_ext", "sf_ext.threads", "sf_ext.data.loaders", "sf_ext.dlg.cli"} <= modules
    for module in modules:
        assert f'id="module-{module}"' in page(module), module
    assert not (out / "generated" / "sf_ext.dlg.__main__.html").exists()
    for module, anchor in [
        ("sf_ext", "sf_ext.check_secretflow"),
        ("sf_ext.threads", "sf_ext.threads.set_threads"),
        ("sf_ext.data.loaders", "sf_ext.data.loaders.resolve_dataset"),
        # Classes that exist only once SecretFlow is imported: nothing is mocked.
        ("sf_ext.strategies.fed_avg_w_prune", "sf_ext.strategies.fed_avg_w_prune.FedAvgWPrune"),
        (
            "sf_ext.aggregators.secure_prune",
            "sf_ext.aggregators.secure_prune.SecurePruneAggregator",
        ),
        (
            "sf_ext.aggregators.robust_secretflow",
            "sf_ext.aggregators.robust_secretflow.KrumAggregator",
        ),
    ]:
        assert f'id="{anchor}"' in page(module), anchor
    # Each object once, where it is defined: the re-export in sf_ext is not documented again.
    assert 'id="sf_ext.set_threads"' not in page("sf_ext")
    # Google-style sections are rendered as fields, not left as text.
    assert "Raises:" not in page("sf_ext") and "field-list" in page("sf_ext")

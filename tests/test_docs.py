"""The API reference builds from the docstrings with warnings as errors, and covers every module."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"


def public_modules():
    """Dotted names of sf_ext's modules, found from the files (importing would load SecretFlow)."""
    names = set()
    for path in (REPO_ROOT / "sf_ext").rglob("*.py"):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] == "__main__" or any(p.startswith("_") for p in parts):
            continue
        names.add(".".join(parts))
    return names


def documented_modules():
    names = set()
    for page in (DOCS / "api").glob("*.rst"):
        names.update(re.findall(r"^\.\. automodule:: (\S+)$", page.read_text(), re.MULTILINE))
    return names


def test_every_public_module_is_in_the_reference():
    modules = public_modules()
    assert {"sf_ext", "sf_ext.threads", "sf_ext.inspect", "sf_ext.data.loaders"} <= modules
    assert "sf_ext.aggregators._linalg" not in modules and "sf_ext.dlg.__main__" not in modules
    missing = sorted(modules - documented_modules())
    assert not missing, f"add these modules to a page in docs/api/: {missing}"
    stale = sorted(documented_modules() - modules)
    assert not stale, f"docs/api/ names modules that do not exist: {stale}"


@pytest.mark.secretflow  # autodoc imports the strategies and SecretFlow aggregators
@pytest.mark.slow
def test_docs_build_without_warnings(tmp_path):
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
    package_page = (out / "api" / "package.html").read_text()
    for anchor in (
        "sf_ext.set_threads",
        "sf_ext.check_secretflow",
        "sf_ext.threads.apply_default_threads",
        "sf_ext.inspect.kept_fraction",
    ):
        assert f'id="{anchor}"' in package_page
    # Objects that only exist once SecretFlow is imported are documented too (nothing mocked).
    assert (
        'id="sf_ext.strategies.fed_avg_w_prune.FedAvgWPrune"'
        in (out / "api" / "strategies.html").read_text()
    )
    aggregators = (out / "api" / "aggregators.html").read_text()
    assert 'id="sf_ext.aggregators.secure_prune.SecurePruneAggregator"' in aggregators
    assert 'id="sf_ext.aggregators.robust_secretflow.FlameAggregator"' in aggregators
    # Google-style sections are rendered as fields, not left as plain text.
    assert "Raises:" not in package_page and "field-list" in package_page

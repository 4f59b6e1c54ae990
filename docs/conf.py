"""Sphinx configuration of sf-ext's API reference (built by `make docs`, checked by the tests).

autodoc imports the real package, SecretFlow included (the strategies and SecretFlow aggregators
subclass SecretFlow classes); nothing is mocked. That import costs about 10-15 s of the build.
"""

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import sf_ext  # noqa: E402


def public_modules():
    """Dotted names of every sf_ext module, from the files: names starting with ``_`` and
    ``__main__`` (which runs a command line when imported) are left out."""
    names = []
    for path in sorted((DOCS.parent / "sf_ext").rglob("*.py")):
        parts = path.relative_to(DOCS.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not any(part.startswith("_") for part in parts):
            names.append(".".join(parts))
    return sorted(names)


def write_module_pages(folder: Path) -> None:
    """One page per module (autodoc, each object where it is defined) and their index.

    The pages are generated at every build into docs/generated/ (not committed), so a new module
    is documented without editing anything here.
    """
    folder.mkdir(exist_ok=True)
    for stale in folder.glob("*.rst"):
        stale.unlink()
    modules = public_modules()
    for name in modules:
        title = f"``{name}``"
        page = [title, "=" * len(title), "", f".. automodule:: {name}"]
        page += ["   :members:", "   :ignore-module-all:", "   :show-inheritance:", ""]
        (folder / f"{name}.rst").write_text("\n".join(page))
    index = ["Modules", "=======", "", ".. toctree::", "   :maxdepth: 1", ""]
    index += [f"   {name}" for name in modules]
    (folder / "index.rst").write_text("\n".join(index) + "\n")


write_module_pages(DOCS / "generated")

project = "sf-ext"
author = "sf-ext contributors"
release = version = sf_ext.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
exclude_patterns = ["_build", "DESIGN.md"]
source_suffix = {".rst": "restructuredtext"}

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "description"
autodoc_class_signature = "separated"

html_theme = "alabaster"
html_title = f"sf-ext {release}"

# SimulationConfig groups its fields under these headings; render them like "Args".
napoleon_custom_sections = [
    (heading, "params_style")
    for heading in ("Data and model", "Federation", "Aggregation", "Attack", "Run")
]

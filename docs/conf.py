"""Sphinx configuration of sf-ext's API reference (built by `make docs`, checked by the tests).

autodoc imports the real package, SecretFlow included (the strategies and SecretFlow aggregators
subclass SecretFlow classes); nothing is mocked. That import costs about 10-15 s of the build.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import sf_ext  # noqa: E402

project = "sf-ext"
author = "sf-ext contributors"
release = version = sf_ext.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
exclude_patterns = ["_build", "DESIGN.md"]
source_suffix = {".rst": "restructuredtext"}

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": True}
autodoc_typehints = "description"
autodoc_class_signature = "separated"

html_theme = "alabaster"
html_title = f"sf-ext {release}"

# SimulationConfig groups its fields under these headings; render them like "Args".
napoleon_custom_sections = [
    (heading, "params_style")
    for heading in ("Data and model", "Federation", "Aggregation", "Attack", "Run")
]

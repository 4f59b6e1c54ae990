# sf-ext: the two commands a newcomer needs are `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
UV_VERSION := 0.13.9
STAMP := $(VENV)/.sf-ext-installed
# Datasets live outside the repository; the shared folder beside the checkout is the default.
export SF_EXT_DATA ?= $(abspath ../shared/data)
OUT ?= runs/demo

.PHONY: setup demo test test-fast docs bench lock clean

setup: $(STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)

# Installs the pinned lock without dependency resolution (secretflow's own pins cannot resolve
# from the index; requirements.lock was resolved once with overrides, see `make lock`).
$(STAMP): requirements.lock pyproject.toml | $(VPY)
	$(VPY) -m pip --version >/dev/null 2>&1 || $(VPY) -m ensurepip
	$(VPY) -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(VPY) -m uv pip install -q --python $(VPY) --no-deps --compile-bytecode -r requirements.lock
	$(VPY) -m uv pip install -q --python $(VPY) --no-deps -e .
	touch $(STAMP)

demo: setup
	$(VPY) -m sf_ext.demo --out $(OUT)

test: setup
	$(VPY) -m pytest tests -q

# The pure core alone (no SecretFlow, nothing slow): seconds instead of minutes.
test-fast: setup
	$(VPY) -m pytest tests -q -m "not secretflow and not slow"

# API reference from the docstrings; warnings are errors. Open docs/_build/html/index.html.
docs: setup
	$(VPY) -m sphinx -W --keep-going -b html docs docs/_build/html

bench: setup
	$(VPY) benchmarks/bench_prune.py

# Regenerates requirements.lock from requirements.in + overrides.txt (needs the package index).
lock: | $(VPY)
	$(VPY) -m pip install -q uv==$(UV_VERSION)
	$(VPY) -m uv pip compile requirements.in --override overrides.txt --python-version 3.11 \
		--prerelease if-necessary-or-explicit -o requirements.lock

clean:
	rm -rf $(VENV) build *.egg-info docs/_build

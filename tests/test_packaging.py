"""sf-ext installs with pip into an environment that already has SecretFlow 1.11 with FL.

The environment is a fresh virtualenv holding exactly the pinned lock (SecretFlow 1.11.0b1 and
its set, without sf-ext), filled by uv from its cache. The wheel is built from this checkout and
installed with pip, offline and with dependency resolution on: pip must be satisfied by what is
present, which fails as soon as sf-ext asks pip to resolve SecretFlow's unreachable sdc-* pins.
"""

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

import sf_ext

REPO_ROOT = Path(__file__).resolve().parents[1]


def clean_env(**extra) -> dict:
    """This environment without pip configuration, Python paths or thread settings."""
    drop = ("PYTHONPATH", "PIP_", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "SF_EXT_THREADS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def run(args, cwd, **extra_env) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=clean_env(**extra_env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def build_wheel(tmp_path: Path) -> Path:
    """Build the wheel from a copy of the sources (a build writes egg-info next to them)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, source / name)
    shutil.copytree(
        REPO_ROOT / "sf_ext", source / "sf_ext", ignore=shutil.ignore_patterns("__pycache__")
    )
    dist = tmp_path / "dist"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["-w", dist, source],
        cwd=tmp_path,
    )
    [wheel] = dist.glob("sf_ext-*.whl")
    return wheel


def wheel_metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        [name] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return Parser().parsestr(archive.read(name).decode())


INSTALLED_CHECK = """
import json, sys
import secretflow as sf
import sf_ext
from secretflow_fl.ml.nn.fl.strategy_dispatcher import _strategy_dispatcher
from sf_ext.data import checkout_data_root
import torch

registered = sorted(k for k in _strategy_dispatcher._ops if k.startswith(("fed_avg_w_prune",
                                                                        "fed_avg_w_attack")))
print(json.dumps({
    "file": sf_ext.__file__, "version": sf_ext.__version__, "registered": registered,
    "threads": list(sf_ext.threads.current_threads()), "torch_threads": torch.get_num_threads(),
    "checkout_data_root": checkout_data_root() and str(checkout_data_root()),
    "secretflow": sf_ext.check_secretflow(),
}))
"""


@pytest.mark.secretflow
@pytest.mark.slow
def test_wheel_installs_with_pip_beside_the_locked_secretflow(tmp_path):
    import json

    wheel = build_wheel(tmp_path)
    metadata = wheel_metadata(wheel)
    assert metadata["Version"] == sf_ext.__version__
    assert SpecifierSet(metadata["Requires-Python"]) == SpecifierSet(">=3.11,<3.12")
    requires = metadata.get_all("Requires-Dist")
    # SecretFlow is named only under the extra, with the range sf-ext checks at run time.
    secretflow_lines = [r for r in requires if r.startswith("secretflow")]
    assert secretflow_lines == ['secretflow<1.12,>=1.11.0b1; extra == "secretflow"']

    # A fresh virtualenv with exactly the lock's packages (no sf-ext), from uv's cache.
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    run(
        [sys.executable, "-m", "uv", "pip", "install", "--offline", "--no-deps", "--python"]
        + [python, "-r", REPO_ROOT / "requirements.lock"],
        cwd=tmp_path,
    )
    # pip from this venv drives the new one (--python), offline, resolving sf-ext's requirements
    # against what is installed.
    pip = [sys.executable, "-m", "pip", "--python", python]
    installed = run(pip + ["install", "--no-index", wheel], cwd=tmp_path)
    assert "Successfully installed sf-ext-" in installed.stdout

    result = json.loads(run([python, "-c", INSTALLED_CHECK], cwd=tmp_path).stdout.splitlines()[-1])
    assert Path(result["file"]).is_relative_to(env_dir)  # the installed copy, not the checkout
    assert result["version"] == sf_ext.__version__
    assert result["registered"] == [
        "fed_avg_w_attack_torch",
        "fed_avg_w_prune_attack_torch",
        "fed_avg_w_prune_torch",
    ]
    assert result["threads"] == [1, "sf-ext default"] and result["torch_threads"] == 1
    assert result["checkout_data_root"] is None  # an installed wheel is not a checkout
    assert result["secretflow"] == "1.11.0b1"

    # The console script is installed and dispatches.
    help_text = run([env_dir / "bin" / "sf-ext", "--help"], cwd=tmp_path).stdout
    assert "demo" in help_text and "simulate" in help_text

    # The only unmet requirements in the environment are SecretFlow's own sdc-* pins.
    check = subprocess.run(
        [str(a) for a in pip + ["check"]], cwd=tmp_path, env=clean_env(), capture_output=True
    )
    problems = [line for line in check.stdout.decode().splitlines() if line.strip()]
    assert problems and all(line.startswith("secretflow ") and "sdc-" in line for line in problems)


@pytest.mark.secretflow
def test_unsupported_secretflow_is_named_with_the_supported_range(tmp_path):
    # Metadata of SecretFlow 1.14 (which has no FL) ahead of the real one on sys.path.
    info = tmp_path / "shadow" / "secretflow-1.14.0b0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: secretflow\nVersion: 1.14.0b0\n")
    shadow = {"PYTHONPATH": str(tmp_path / "shadow")}
    expected = (
        "SecretFlow 1.14.0b0 is installed, which sf-ext does not support. sf-ext needs "
        "SecretFlow >=1.11.0b1,<1.12 with FL (verified: 1.11.0b1)."
    )
    explicit = subprocess.run(
        [sys.executable, "-c", "import sf_ext; sf_ext.register_strategies()"],
        cwd=tmp_path,
        env={**clean_env(), **shadow},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert explicit.returncode == 1
    assert f"sf_ext.UnsupportedSecretFlowError: {expected}" in explicit.stderr
    # Imported after secretflow, sf-ext warns instead, so its pure parts stay usable.
    code = (
        "import warnings; warnings.simplefilter('always')\n"
        "import secretflow, sf_ext\n"
        "from secretflow_fl.ml.nn.fl.strategy_dispatcher import _strategy_dispatcher\n"
        "print('fed_avg_w_prune_torch' in _strategy_dispatcher._ops)"
    )
    implicit = run([sys.executable, "-c", code], cwd=tmp_path, **shadow)
    assert implicit.stdout.strip().splitlines()[-1] == "False"
    assert f"sf-ext strategies not registered: {expected}" in implicit.stderr

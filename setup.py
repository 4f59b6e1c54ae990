"""Installer for sf-ext, the SecretFlow extension for pruning, gradient-inversion audits and
robust aggregation. The pinned environment lives in requirements.lock (see the Makefile)."""

from setuptools import find_packages, setup

setup(
    name="sf-ext",
    version="0.1.0",
    description=(
        "SecretFlow extensions: federated pruning with secure aggregation, "
        "gradient-inversion audits and Byzantine-robust aggregators"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9,<3.12",
    packages=find_packages(include=["sf_ext", "sf_ext.*"]),
    install_requires=[
        "secretflow==1.11.0b1",
        "torch",
        "torchmetrics",
        "hdbscan",
        "matplotlib",
        "tqdm",
        "scikit-learn",
    ],
    entry_points={"console_scripts": ["sf-ext=sf_ext.cli:main"]},
)

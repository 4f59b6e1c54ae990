"""sf-ext: SecretFlow extensions for federated pruning, gradient-inversion audits and robust
aggregation.

``import sf_ext`` registers the torch strategies ``fed_avg_w_prune`` and ``fed_avg_w_attack``
with SecretFlow when SecretFlow is already imported (the usual ``import secretflow as sf; import
sf_ext``), and gives torch one thread unless you chose a count (see :mod:`sf_ext.threads`). The
pure parts (aggregation core, attacks, DLG, simulator) never import SecretFlow, so they stay fast
to load; call :func:`register_strategies` to register explicitly in any import order.

SecretFlow is not a dependency pip resolves for sf-ext (SecretFlow 1.11 pins packages the index
does not have); it must already be installed. :data:`SUPPORTED_SECRETFLOW` is the range checked
when the strategies are registered.
"""

import sys
import warnings
from importlib import metadata

from sf_ext import threads  # noqa: F401  (light: imports neither SecretFlow nor torch)
from sf_ext.threads import apply_default_threads, set_threads

__version__ = "0.1.0"

#: SecretFlow versions sf-ext's strategies and aggregators work with (FL lives in
#: ``secretflow_fl`` from 1.11; 1.14 has no FL; 1.12 and 1.13 cannot be installed from the index).
SUPPORTED_SECRETFLOW = ">=1.11.0b1,<1.12"
#: The versions the test suite has run against.
VERIFIED_SECRETFLOW = ("1.11.0b1",)

__all__ = [
    "SUPPORTED_SECRETFLOW",
    "UnsupportedSecretFlowError",
    "VERIFIED_SECRETFLOW",
    "apply_default_threads",
    "check_secretflow",
    "register_strategies",
    "set_threads",
]


class UnsupportedSecretFlowError(ImportError):
    """SecretFlow is missing, has no FL package, or its version is outside the supported range."""


def _install_hint() -> str:
    return (
        f"sf-ext needs SecretFlow {SUPPORTED_SECRETFLOW} with FL (verified: "
        f"{', '.join(VERIFIED_SECRETFLOW)}). Install sf-ext into an environment that already has "
        "it (pip install sf-ext), or create one with `make setup` from the sf-ext checkout."
    )


def check_secretflow() -> str:
    """Check that an installed SecretFlow can run sf-ext's strategies.

    Returns:
        The installed SecretFlow version.

    Raises:
        UnsupportedSecretFlowError: SecretFlow is not installed, its version is outside
            :data:`SUPPORTED_SECRETFLOW`, or its FL package ``secretflow_fl`` is missing. The
            message names the version found and the supported range.
    """
    from packaging.specifiers import SpecifierSet

    try:
        version = metadata.version("secretflow")
    except metadata.PackageNotFoundError:
        raise UnsupportedSecretFlowError(
            f"SecretFlow is not installed. {_install_hint()}"
        ) from None
    if not SpecifierSet(SUPPORTED_SECRETFLOW, prereleases=True).contains(version):
        raise UnsupportedSecretFlowError(
            f"SecretFlow {version} is installed, which sf-ext does not support. {_install_hint()}"
        )
    try:
        import secretflow_fl  # noqa: F401
    except ImportError as missing:
        raise UnsupportedSecretFlowError(
            f"SecretFlow {version} is installed but its FL package secretflow_fl cannot be "
            f"imported ({missing}). {_install_hint()}"
        ) from missing
    return version


def register_strategies() -> None:
    """Register sf-ext's strategies with SecretFlow (idempotent) and apply the thread default.

    Raises:
        UnsupportedSecretFlowError: See :func:`check_secretflow`.
    """
    check_secretflow()
    apply_default_threads()
    from sf_ext import strategies  # noqa: F401  (registration happens on import)


if "secretflow" in sys.modules or "secretflow_fl" in sys.modules:
    try:
        register_strategies()
    except UnsupportedSecretFlowError as unsupported:
        # The pure parts still work; FLModel(strategy="fed_avg_w_prune") will not.
        warnings.warn(f"sf-ext strategies not registered: {unsupported}", stacklevel=2)

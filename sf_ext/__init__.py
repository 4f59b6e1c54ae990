"""sf-ext: SecretFlow extensions for federated pruning, gradient-inversion audits and robust
aggregation.

``import sf_ext`` registers the torch strategy ``fed_avg_w_prune`` with SecretFlow when SecretFlow
is already imported (the usual ``import secretflow as sf; import sf_ext``). The pure parts
(aggregation core, attacks, DLG, simulator) never import SecretFlow, so they stay fast to load;
call :func:`register_strategies` to register explicitly in any import order.
"""

import sys

__version__ = "0.1.0"


def register_strategies() -> None:
    """Register sf-ext's strategies with SecretFlow (idempotent)."""
    from sf_ext import strategies  # noqa: F401  (registration happens on import)


if "secretflow" in sys.modules or "secretflow_fl" in sys.modules:
    register_strategies()

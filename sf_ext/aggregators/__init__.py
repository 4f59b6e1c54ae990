"""Aggregation: a pure robust-aggregation core and SecretFlow aggregators.

The core (FedAvg, Krum, Multi-Krum, median, trimmed mean, NDC, RFA, RSA, FLAME, matrix mapping,
XMAM, Bulyan, centered clipping, DnC, SignGuard, FoolsGold, FLTrust) works on a stacked
``[n_clients, n_params]`` float32 update matrix, never imports SecretFlow and is exported here
directly. Rules are registered with their contracts in an open registry
(:func:`register_aggregator`) and called with the server's context (:class:`ServerContext`,
:func:`call_rule`). SecretFlow ``Aggregator`` subclasses import SecretFlow and are resolved lazily
on first attribute access.
"""

import importlib

from sf_ext.aggregators.bulyan import bulyan
from sf_ext.aggregators.centered_clipping import centered_clipping
from sf_ext.aggregators.core import (
    AGGREGATORS,
    ALIASES,
    aggregate,
    call_rule,
    get_aggregator,
    get_rule,
    register_aggregator,
)
from sf_ext.aggregators.dnc import dnc
from sf_ext.aggregators.fedavg import fedavg
from sf_ext.aggregators.flame import flame
from sf_ext.aggregators.fltrust import fltrust
from sf_ext.aggregators.foolsgold import foolsgold
from sf_ext.aggregators.geometric_median import geometric_median
from sf_ext.aggregators.krum import krum, multi_krum
from sf_ext.aggregators.matrix_mapping import map_updates, matrix_mapping, xmam_select
from sf_ext.aggregators.median import coordinate_median, trimmed_mean
from sf_ext.aggregators.norm_clipping import norm_clipping
from sf_ext.aggregators.registry import RuleSpec
from sf_ext.aggregators.report import AggregationReport, detection_rates
from sf_ext.aggregators.server import ServerContext
from sf_ext.aggregators.shield import shield
from sf_ext.aggregators.sign import rsa_step, sign_aggregate
from sf_ext.aggregators.signguard import signguard

# SecretFlow-backed names -> the submodule defining them (imported on first use only).
_ROBUST = "sf_ext.aggregators.robust_secretflow"
_LAZY = {
    "SecurePruneAggregator": "sf_ext.aggregators.secure_prune",
    "RobustAggregator": _ROBUST,
    "FedAvgAggregator": _ROBUST,
    "KrumAggregator": _ROBUST,
    "MultiKrumAggregator": _ROBUST,
    "MedianAggregator": _ROBUST,
    "TrimmedMeanAggregator": _ROBUST,
    "NormClippingAggregator": _ROBUST,
    "GeometricMedianAggregator": _ROBUST,
    "SignAggregator": _ROBUST,
    "FlameAggregator": _ROBUST,
    "MatrixMappingAggregator": _ROBUST,
    "XmamAggregator": _ROBUST,
    "BulyanAggregator": _ROBUST,
    "CenteredClippingAggregator": _ROBUST,
    "DncAggregator": _ROBUST,
    "SignGuardAggregator": _ROBUST,
    "FoolsGoldAggregator": _ROBUST,
    "FLTrustAggregator": _ROBUST,
    "ShieldAggregator": _ROBUST,
    "ROBUST_AGGREGATORS": _ROBUST,
    "SecureFlameAggregator": "sf_ext.aggregators.secure_flame",
    "SecureFilterAggregator": "sf_ext.aggregators.secure_flame",
    "spu_runtime_config": "sf_ext.aggregators.secure_flame",
    "SecureClippingAggregator": "sf_ext.aggregators.secure_clipping",
}

__all__ = [
    "AGGREGATORS",
    "ALIASES",
    "AggregationReport",
    "RuleSpec",
    "ServerContext",
    "aggregate",
    "bulyan",
    "call_rule",
    "centered_clipping",
    "coordinate_median",
    "detection_rates",
    "dnc",
    "fedavg",
    "flame",
    "fltrust",
    "foolsgold",
    "geometric_median",
    "get_aggregator",
    "get_rule",
    "krum",
    "map_updates",
    "matrix_mapping",
    "multi_krum",
    "norm_clipping",
    "register_aggregator",
    "rsa_step",
    "shield",
    "sign_aggregate",
    "signguard",
    "trimmed_mean",
    "xmam_select",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The built-in rules of the aggregation core, registered with their contracts.

Every entry is ``fn(updates, num_samples=None, **options) -> (aggregated_update, report)`` with
``updates`` the ``[n_clients, n_params]`` float32 matrix of client updates (client weights minus
the previous global model) and the result a float32 ``[n_params]`` update plus an
:class:`~sf_ext.aggregators.report.AggregationReport`. The math lives in one file per rule; this
module only states each rule's contract (see :mod:`sf_ext.aggregators.registry`).
"""

from functools import partial
from typing import Any, Mapping

from sf_ext.aggregators.bulyan import bulyan, bulyan_tolerates
from sf_ext.aggregators.centered_clipping import centered_clipping
from sf_ext.aggregators.dnc import dnc
from sf_ext.aggregators.fedavg import fedavg
from sf_ext.aggregators.flame import flame, noise_lambda_default
from sf_ext.aggregators.fltrust import fltrust
from sf_ext.aggregators.foolsgold import foolsgold
from sf_ext.aggregators.geometric_median import geometric_median
from sf_ext.aggregators.krum import krum, max_tolerated_f, multi_krum
from sf_ext.aggregators.matrix_mapping import matrix_mapping
from sf_ext.aggregators.median import coordinate_median, trimmed_mean
from sf_ext.aggregators.norm_clipping import norm_clipping
from sf_ext.aggregators.registry import (
    AGGREGATORS,
    ALIASES,
    aggregate,
    call_rule,
    get_aggregator,
    get_rule,
    register_aggregator,
)
from sf_ext.aggregators.shield import shield
from sf_ext.aggregators.sign import sign_aggregate
from sf_ext.aggregators.signguard import signguard

__all__ = [
    "AGGREGATORS",
    "ALIASES",
    "aggregate",
    "call_rule",
    "get_aggregator",
    "get_rule",
    "register_aggregator",
]


def _minority(n: int, options: Mapping[str, Any]) -> int:
    """Rules whose design holds while attackers are a strict minority."""
    return max((n - 1) // 2, 0)


def _krum_f(n: int, options: Mapping[str, Any]) -> int:
    f = options.get("f")
    return max_tolerated_f(n) if f is None else min(int(f), max_tolerated_f(n))


def _trimmed(n: int, options: Mapping[str, Any]) -> int:
    if options.get("f") is not None:
        return min(int(options["f"]), _minority(n, options))
    return int(float(options.get("trim_ratio", 0.1)) * n)


def _dnc_f(n: int, options: Mapping[str, Any]) -> int:
    f = options.get("f")
    return min(int(f), _minority(n, options)) if f is not None else _minority(n, options)


def _flame_needs(options: Mapping[str, Any]):
    noise = options.get("noise", "relative")
    lam = options.get("noise_lambda")
    noisy = float(noise_lambda_default(noise) if lam is None else lam) > 0
    needs = []
    if options.get("cluster_on", "models") == "models" or (noisy and noise == "relative"):
        needs.append("global_params")
    if noisy:
        needs.append("layout")
    return needs


register_aggregator("fedavg")(fedavg)  # no defence, so no claim to warn about
register_aggregator("krum", selects=True, tolerates=_krum_f)(krum)
register_aggregator("multi_krum", selects=True, tolerates=_krum_f)(multi_krum)
register_aggregator("median", tolerates=_minority, aliases=("coordinate_median",), linear=False)(
    coordinate_median
)
register_aggregator("trimmed_mean", tolerates=_trimmed, linear=False)(trimmed_mean)
register_aggregator("ndc", aliases=("norm_clipping",))(norm_clipping)
register_aggregator("rfa", tolerates=_minority, aliases=("geometric_median",))(geometric_median)
register_aggregator("rsa", needs=("round_index",), aliases=("sign",), linear=False)(sign_aggregate)
register_aggregator(
    "flame", needs=_flame_needs, uses=("generator",), selects=True, tolerates=_minority
)(flame)
register_aggregator(
    "matrix_mapping", needs=("model", "input_shape"), uses=("layout",), selects=True
)(matrix_mapping)
register_aggregator(
    "xmam",
    needs=("model", "input_shape"),
    uses=("layout",),
    selects=True,
    description="Matrix mapping with the XMAM public code's selection (PCA(3) + HDBSCAN)",
)(partial(matrix_mapping, variant="xmam"))
register_aggregator("bulyan", selects=True, tolerates=bulyan_tolerates, linear=False)(bulyan)
register_aggregator("centered_clipping", needs=("state",), aliases=("cc",), tolerates=_minority)(
    centered_clipping
)
register_aggregator("dnc", uses=("generator",), selects=True, tolerates=_dnc_f)(dnc)
register_aggregator("signguard", uses=("generator",), selects=True, tolerates=_minority)(signguard)
register_aggregator("foolsgold", needs=("client_ids", "state"), selects=True)(foolsgold)
register_aggregator("fltrust", needs=("root_update",), selects=True)(fltrust)
register_aggregator("shield", selects=True, tolerates=_minority)(shield)

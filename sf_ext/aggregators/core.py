"""Registry of the aggregation core: one name per rule, one call signature for all.

Every entry is ``fn(updates, num_samples=None, **options) -> (aggregated_update, report)`` with
``updates`` the ``[n_clients, n_params]`` float32 matrix of client updates (client weights minus
the previous global model) and the result a float32 ``[n_params]`` update plus an
:class:`~sf_ext.aggregators.report.AggregationReport`.
"""

from functools import partial
from typing import Callable, Dict, Tuple

import torch

from sf_ext.aggregators.fedavg import fedavg
from sf_ext.aggregators.flame import flame
from sf_ext.aggregators.geometric_median import geometric_median
from sf_ext.aggregators.krum import krum, multi_krum
from sf_ext.aggregators.matrix_mapping import matrix_mapping
from sf_ext.aggregators.median import coordinate_median, trimmed_mean
from sf_ext.aggregators.norm_clipping import norm_clipping
from sf_ext.aggregators.report import AggregationReport
from sf_ext.aggregators.sign import sign_aggregate

AggregatorFn = Callable[..., Tuple[torch.Tensor, AggregationReport]]

AGGREGATORS: Dict[str, AggregatorFn] = {
    "fedavg": fedavg,
    "krum": krum,
    "multi_krum": multi_krum,
    "median": coordinate_median,
    "trimmed_mean": trimmed_mean,
    "ndc": norm_clipping,
    "rfa": geometric_median,
    "rsa": sign_aggregate,
    "flame": flame,
    "matrix_mapping": matrix_mapping,
    "xmam": partial(matrix_mapping, variant="xmam"),
}

# Descriptive spellings of the paper's abbreviations.
ALIASES: Dict[str, str] = {
    "norm_clipping": "ndc",
    "geometric_median": "rfa",
    "sign": "rsa",
    "coordinate_median": "median",
}


def get_aggregator(name: str) -> AggregatorFn:
    """The aggregator registered under ``name`` (or one of its aliases)."""
    key = ALIASES.get(name, name)
    if key not in AGGREGATORS:
        known = sorted(set(AGGREGATORS) | set(ALIASES))
        raise ValueError(f"unknown aggregator {name!r}; known: {known}")
    return AGGREGATORS[key]


def aggregate(
    name: str, updates, num_samples=None, **options
) -> Tuple[torch.Tensor, AggregationReport]:
    """Run the aggregator ``name`` on one round's updates (see the module docstring)."""
    return get_aggregator(name)(updates, num_samples, **options)

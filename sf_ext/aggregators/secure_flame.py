"""FLAME under secure multi-party computation: the server never sees a client's model.

:class:`SecureFlameAggregator` runs the FLAME filter of :mod:`sf_ext.aggregators.flame` (cosine
clustering of the clients' models, median-norm clipping, Gaussian noise) inside SecretFlow's SPU,
the secret-sharing MPC device, as FLAME's paper proposes for its secure deployment. It is a
SecretFlow ``Aggregator``: ``FLModel(aggregator=SecureFlameAggregator(charlie, clients, spu))``.

One round, for clients ``1..n`` and the previous global model ``G`` (public: every client
received it):

1. Each client flattens its weights ``W_i`` and secret-shares them into the SPU. No party of the
   SPU (the server among them) holds more than a random-looking share.
2. Inside the SPU: every entry is clamped to ``[-input_bound, input_bound]`` (a malicious client
   could otherwise pick ring elements whose squares overflow the fixed-point ring and wrap to a
   small, innocent-looking norm); ``u_i = W_i - G``; the Gram matrix of the updates and ``u_i.G``
   give the pairwise cosine distances of the *models* and the update norms ``e_i = |u_i|``;
   ``S_t = median(e)``; the clip factors ``min(1, S_t / e_i)``.
3. Opened to the server (and only to it): what HDBSCAN needs, and ``S_t``. By default
   (``reveal="mst"``) that is not the ``n x n`` distance matrix but the ``n - 1`` edges Prim's
   algorithm adds to the minimum spanning tree of HDBSCAN's mutual-reachability graph, in the
   order it adds them (node pairs and edge weights). HDBSCAN's result is a function of exactly this
   list (``hdbscan`` builds its single-linkage tree from it and nothing else), so the server gets
   the same clusters as from the full matrix while learning ``n - 1`` numbers instead of
   ``n (n - 1) / 2``: the order in which Prim's algorithm attaches the clients and the
   mutual-reachability distance (a cosine distance raised to the two clients' nearest-neighbour
   distances) at which each is attached. ``reveal="distances"``
   opens the full matrix instead (the plaintext rule's input; useful to audit the clustering).
   With fewer than three clients nothing is clustered and nothing of this is opened.
4. The server runs HDBSCAN (``min_cluster_size = n // 2 + 1``, ``min_samples = 1``,
   ``allow_single_cluster=True``, as the plaintext rule) and publishes the kept set to the SPU.
5. Inside the SPU: ``sum over kept i of clip_i * u_i / |kept|`` plus the noise party's Gaussian
   draws scaled by ``lambda * S_t`` (``noise="paper"``) or by ``lambda * S_t * std(tensor of the
   new global model)`` (``noise="relative"``, the plaintext default). The noise party is an SPU
   party other than the server; it secret-shares standard normal draws into the SPU: the server
   never sees the noise, the noise party never sees the aggregate. Only the noised aggregate is
   opened, to the server, which adds it to ``G``.

What the server learns per round: the Prim edge list (or the distance matrix), ``S_t``, the kept
set (it computes it) and the noised aggregate, besides the public ``G``, the parties' names and
the tensor shapes. It does not learn any client's model, update, norm or clip factor, nor the
un-noised aggregate. The other SPU parties learn ``G`` (public inside the SPU) and the kept set.
Sample counts are not used (FLAME averages the kept clients equally) and go nowhere.

Threat model and protocol. The SPU parties must not collude; the guarantee is that of the SPU
protocol against semi-honest parties. Clients may be malicious in what they upload (that is what
the filter is for; crafted ring elements are caught by the clamp); a client that sends different
SPU parties inconsistent shares is outside this model (SPU does not check input consistency).
:func:`spu_runtime_config` gives the two sound choices: ``"ABY3"`` (three SPU parties, e.g. the
server and two helpers; secure while no two of them collude; fast) and ``"CHEETAH"`` (two parties,
the server and one helper, FLAME's two-server setting; secure against either alone; several times
slower). SecretFlow's default two-party ``SEMI2K`` uses a *trusted first party* that generates
every Beaver triple and can therefore unmask every value the protocol opens: that party sees all
clients' models. It is refused when that party is the server, and otherwise only accepted with
``allow_trusted_dealer=True`` (a warning names the party); ``REF2K`` computes in the clear and is
always refused.

Precision. The ring is FM128 with 40 fraction bits (:func:`spu_runtime_config`): client weights
(float32) are encoded to 2^-40 (exactly above 2^-17 in magnitude), sums and products carry one
truncation each (2^-40), and the
kernels below avoid the cancellation in ``1 - cos`` between nearly parallel models. The kept sets
equal the plaintext rule's on the same inputs and the aggregates agree to float32 rounding
(``tests/test_secure_flame.py``). FM64 (18 fraction bits) is refused: update entries around 1e-3
would keep only about eight significant bits.

The starting model. ``FLModel`` opens every ``fit`` with one ``average`` of the clients' initial
weights. They are secret-shared like every upload and the SPU computes their coordinate-wise
lower median (``torch.median``, as the plaintext adapters' fallback) through a sorting network;
only that median is opened. When every client starts from the same model it is that model; in
any case a minority of clients cannot choose it, and no client's initial weights reach the
server. ``initial="server"`` with a ``model_fn`` makes the server start from its own model.

Cost: the SPU work is dominated by the clamp (two comparisons per uploaded entry) and the
``n x n`` Gram matrix over ``d`` parameters; ``benchmarks/bench_secure_flame.py`` measures it
against the plaintext rule (``input_bound=None`` drops the clamp and its protection).

Not mask-aware: pruned uploads (``fed_avg_w_prune``) would be averaged with their zeros.
SecretFlow's SPU writes ``spu.log`` into the working directory unless
``sf.SPU(..., log_options=...)`` names another place. In Ray simulation every actor holds one
unit of its party's resource for its lifetime: give ``sf.init`` a ``num_cpus`` well above the
actors per party (32 works), or the run waits forever.
"""

import logging
import secrets
import warnings
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np
import torch
from jax import lax
from secretflow.device import (
    PYU,
    SPU,
    DeviceObject,
    PYUObject,
    SPUCompilerNumReturnsPolicy,
    proxy,
    reveal,
)
from secretflow.security.aggregation import Aggregator

from sf_ext.aggregators.flame import _noised_tensor, majority_cluster, noise_lambda_default
from sf_ext.aggregators.report import AggregationReport
from sf_ext.aggregators.robust_secretflow import INITIAL_MODES, _build_model
from sf_ext.params import ParamLayout

#: Default clamp on every uploaded entry (model weights beyond +-100 do not occur in practice).
DEFAULT_INPUT_BOUND = 100.0
#: Fraction bits of the FM128 ring (2^-40 resolution, 2^47 range for products).
DEFAULT_FRACTION_BITS = 40
#: SPU protocols that keep every single party blind (see the module docstring).
SOUND_PROTOCOLS = ("ABY3", "CHEETAH")
REVEAL_MODES = ("mst", "distances")
NOISE_MODES = ("relative", "paper")

logger = logging.getLogger(__name__)


def spu_runtime_config(
    protocol: str = "ABY3", fxp_fraction_bits: int = DEFAULT_FRACTION_BITS
) -> Dict[str, Any]:
    """The SPU ``runtime_config`` the secure filters are built for (FM128, 40 fraction bits).

    Args:
        protocol: ``"ABY3"`` (3 SPU parties), ``"CHEETAH"`` (2 parties) or ``"SEMI2K"`` (fast,
            but its trusted first party sees everything; see the module docstring).
        fxp_fraction_bits: Fraction bits of the fixed-point encoding.

    Returns:
        A dict for ``cluster_def["runtime_config"]``, e.g.
        ``sf.SPU(sf.utils.testing.cluster_def(["charlie", "hugo", "ivy"], spu_runtime_config()))``.
    """
    import spu

    names = ("ABY3", "CHEETAH", "SEMI2K")
    if protocol not in names:
        raise ValueError(f"protocol must be one of {names}, got {protocol!r}")
    return {
        "protocol": getattr(spu.spu_pb2, protocol),
        "field": spu.spu_pb2.FM128,
        "fxp_fraction_bits": int(fxp_fraction_bits),
    }


def check_spu_for_filter(
    conf, spu_parties: Sequence[str], server_party: str, allow_trusted_dealer: bool
) -> str:
    """Refuse SPU configurations under which the server (or any one party) could read the
    clients' models, or the filter would compute garbage; returns the protocol's name.

    Args:
        conf: The SPU's ``RuntimeConfig`` (``spu_device.conf``).
        spu_parties: The SPU's parties in rank order (SecretFlow sorts them by name).
        server_party: The aggregation server's party.
        allow_trusted_dealer: Accept SEMI2K's trusted first party when it is not the server.

    Raises:
        ValueError: ``REF2K``, a field other than FM128, fraction bits outside [32, 48], or
            ``SEMI2K`` whose trusted first party is the server (or any party, unless
            ``allow_trusted_dealer``).
    """
    import spu

    protocol = spu.spu_pb2.ProtocolKind.Name(conf.protocol)
    if protocol == "REF2K":
        raise ValueError("REF2K computes in the clear on every SPU party; use ABY3 or CHEETAH")
    if conf.field != spu.spu_pb2.FM128:
        raise ValueError(
            "the secure filter needs the FM128 field (got "
            f"{spu.spu_pb2.FieldType.Name(conf.field)}): FM64 keeps too few significant bits of "
            "small updates; use spu_runtime_config()"
        )
    if not 32 <= conf.fxp_fraction_bits <= 48:
        raise ValueError(
            f"fxp_fraction_bits must lie in [32, 48] for FM128, got {conf.fxp_fraction_bits}"
        )
    trusted_first = spu.spu_pb2.RuntimeConfig.BeaverType.Value("TrustedFirstParty")
    if protocol == "SEMI2K" and conf.beaver_type == trusted_first:
        dealer = spu_parties[0]
        if dealer == server_party:
            raise ValueError(
                f"SEMI2K's trusted first party ({dealer}, the first SPU party by name) generates "
                "every Beaver triple and can unmask all shared values: it must not be the server. "
                "Use ABY3 or CHEETAH (spu_runtime_config)"
            )
        if not allow_trusted_dealer:
            raise ValueError(
                f"SEMI2K's trusted first party {dealer!r} could read every client's model; use "
                "ABY3 or CHEETAH, or pass allow_trusted_dealer=True if you trust that party"
            )
        warnings.warn(
            f"SEMI2K with a trusted first party: {dealer} can read every client's model",
            stacklevel=3,
        )
    return protocol


# --------------------------------------------------------------------------------------------
# Kernels: traced by JAX and compiled by the SPU compiler. Every input that is not a static
# Python value is secret-shared (weights, clip factors, noise) or public to the SPU parties only
# (the previous global model, the kept set). Nothing here opens a value.
#
# Fixed-point care: sums and products are exact up to one 2^-f truncation, but division, square
# root and reciprocal square root are approximations (relative error ~1e-5). FLAME's distances
# between *models* are tiny (1 - cos ~ 1e-4: local models differ by far less than their norm),
# so ``1 - <W_i, W_j> / (|W_i| |W_j|)`` would lose most digits. The kernels compute the Gram
# matrix of the *updates* (small numbers) and ``u_i . G``, form
# ``|W_i|^2 = |G|^2 + 2 u_i.G + |u_i|^2`` and use the identity
# ``1 - cos = (|W_i - W_j|^2 - (|W_i| - |W_j|)^2) / (2 |W_i| |W_j|)``, which has no cancellation of
# the large ``|G|^2`` term; every reciprocal (square root) is refined by Newton steps that use
# multiplications only.

#: A distance no cosine distance reaches (they lie in [0, 2]): marks nodes already in the tree.
_FAR = 8.0


def refined_rsqrt(x, steps: int = 2):
    """``1 / sqrt(x)`` for positive ``x``: the SPU's approximation, then Newton steps
    ``y <- y (3 - x y^2) / 2`` (multiplications only, each doubling the correct digits)."""
    y = lax.rsqrt(x)
    for _ in range(steps):
        y = y * (1.5 - 0.5 * x * y * y)
    return y


def refined_reciprocal(x, steps: int = 2):
    """``1 / x`` for positive ``x``: the SPU's approximation, then Newton steps
    ``y <- y (2 - x y)`` (multiplications only)."""
    y = 1.0 / x
    for _ in range(steps):
        y = y * (2.0 - x * y)
    return y


def first_min_onehot(values):
    """One-hot (bool) of the smallest entry of a 1-D vector, the lowest index among ties (as
    ``numpy.argmin``), from one matrix of pairwise comparisons."""
    n = values.shape[0]
    less = values[:, None] < values[None, :]  # less[j, k]: v_j < v_k
    idx = jnp.arange(n)
    before = idx[None, :] < idx[:, None]  # k < j: v_j must be strictly smaller
    after = idx[None, :] > idx[:, None]  # k > j: v_j must not be larger
    wins = jnp.where(before, less, jnp.where(after, jnp.logical_not(less.T), True))
    return jnp.all(wins, axis=1)


def mutual_reachability(dist, min_samples: int):
    """HDBSCAN's mutual reachability ``max(d_ij, core_i, core_j)``, ``core_i`` the
    ``min_samples``-th smallest distance of point ``i`` counting itself (as ``hdbscan``)."""
    n = dist.shape[0]
    k = min(n - 1, int(min_samples))
    if k == 1:
        off = jnp.where(jnp.eye(n, dtype=bool), _FAR, dist)
        core = jnp.min(off, axis=1)
    else:
        core = jnp.sort(dist, axis=1)[:, k]
    return jnp.maximum(jnp.maximum(dist, core[:, None]), core[None, :])


def prim_edges(weights):
    """HDBSCAN's ``mst_linkage_core`` (Prim's algorithm from node 0) on a secret ``n x n``
    matrix, obliviously: ``[n - 1, 3]`` rows ``(current node, new node, distance)`` in the order
    the algorithm adds them, the node indices as numbers."""
    n = weights.shape[0]
    idx = jnp.arange(n, dtype=weights.dtype)
    in_tree = jnp.arange(n) == 0
    current = in_tree.astype(weights.dtype)
    current_index = jnp.zeros((), dtype=weights.dtype)
    best = jnp.full((n,), _FAR, dtype=weights.dtype)
    rows = []
    for _ in range(n - 1):
        best = jnp.minimum(best, current @ weights)
        candidates = jnp.where(in_tree, _FAR, best)
        chosen = first_min_onehot(candidates)
        chosen_f = chosen.astype(weights.dtype)
        new_index = chosen_f @ idx
        rows.append(jnp.stack([current_index, new_index, chosen_f @ candidates]))
        in_tree = jnp.logical_or(in_tree, chosen)
        current, current_index = chosen_f, new_index
    return jnp.stack(rows)


def clamp_rows(rows: Sequence, bound: Optional[float]):
    """Stack the clients' vectors; clamp every entry to ``[-bound, bound]`` (no-op when None).

    The clamp is what keeps a malicious client's shares from overflowing the fixed-point ring:
    any ring element, however crafted, comes out inside the bound, so every later sum of squares
    stays far below the ring's range."""
    rows = list(rows)
    if bound is not None:  # row by row: a smaller peak of comparison intermediates in the SPU
        rows = [jnp.clip(row, -bound, bound) for row in rows]
    return jnp.stack(rows)


def update_statistics(rows: Sequence, global_params, bound: Optional[float]):
    """Updates ``U = clamp(W) - G``, their Gram matrix and ``U @ G``."""
    updates = clamp_rows(rows, bound) - global_params[None, :]
    gram = updates @ updates.T
    towards_global = updates @ global_params
    return updates, gram, towards_global


def model_cosine_distances(gram, towards_global, global_sq):
    """Cosine distances between the models ``W_i = G + u_i`` from the update Gram matrix (see
    the module docstring for the identity); ``1`` from and to an all-zero model, ``0`` on the
    diagonal."""
    n = gram.shape[0]
    sq = jnp.diagonal(gram)
    model_sq = global_sq + 2.0 * towards_global + sq
    nonzero = model_sq > 0
    inv = refined_rsqrt(jnp.where(nonzero, model_sq, 1.0))
    norm = model_sq * inv
    diff_sq = sq[:, None] + sq[None, :] - 2.0 * gram  # |W_i - W_j|^2 = |u_i - u_j|^2
    radial = norm[:, None] - norm[None, :]
    dist = (diff_sq - radial * radial) * (0.5 * inv[:, None] * inv[None, :])
    both = jnp.logical_and(nonzero[:, None], nonzero[None, :])
    dist = jnp.where(both, jnp.clip(dist, 0.0, 2.0), 1.0)
    return jnp.where(jnp.eye(n, dtype=bool), 0.0, dist)


def median(values):
    """Median of a secret vector (midpoint of the two middle values for even length, as
    ``numpy.median`` and ``torch.quantile(., 0.5)``)."""
    n = values.shape[0]
    ordered = jnp.sort(values)
    return 0.5 * (ordered[(n - 1) // 2] + ordered[n // 2])


def norms_from_squares(sq):
    """``sqrt`` of non-negative squared norms (0 stays 0)."""
    positive = sq > 0
    return jnp.where(positive, sq * refined_rsqrt(jnp.where(positive, sq, 1.0)), 0.0)


def clip_factors(sq_norms, threshold):
    """``min(1, threshold / |u_i|)`` from squared norms; exactly 1 at or below the threshold."""
    safe = jnp.where(sq_norms > 0, sq_norms, 1.0)
    return jnp.where(sq_norms > threshold * threshold, threshold * refined_rsqrt(safe), 1.0)


def flame_filter(
    *rows, global_params, bound: Optional[float], reveal: str, min_samples: int
) -> Tuple:
    """FLAME's filter up to the clustering, in SPU.

    Returns ``(clustering_input, median_norm, clip, updates)``: the first is what the server's
    HDBSCAN needs (``reveal="mst"``: the ``[n - 1, 3]`` Prim edges of the mutual-reachability
    graph; ``"distances"``: the ``n x n`` cosine distances); the others stay secret-shared for
    :func:`clipped_sum` (the aggregators open only the median norm).
    """
    updates, gram, towards_global = update_statistics(rows, global_params, bound)
    dist = model_cosine_distances(gram, towards_global, global_params @ global_params)
    sq = jnp.diagonal(gram)
    median_norm = median(norms_from_squares(sq))
    clip = clip_factors(sq, median_norm)
    if reveal == "mst":
        opened = prim_edges(mutual_reachability(dist, min_samples))
    else:
        opened = dist
    return opened, median_norm, clip, updates


def clipping_filter(*rows, global_params, bound: Optional[float], threshold: Optional[float]):
    """Norm clipping, in SPU: returns ``(threshold_used, clip, updates)``; the threshold is the
    given one, or the median update norm (FLAME's ``S_t``) when ``threshold`` is None."""
    updates = clamp_rows(rows, bound) - global_params[None, :]
    sq = jnp.sum(updates * updates, axis=1)
    if threshold is None:
        used = median(norms_from_squares(sq))
    else:
        used = jnp.asarray(threshold, dtype=updates.dtype)
    return used, clip_factors(sq, used), updates


def _tensor_std(values):
    """Unbiased standard deviation of one tensor (``torch.std``), 0 for fewer than 2 entries."""
    m = values.shape[0]
    if m < 2:
        return jnp.zeros((), dtype=values.dtype)
    mean = jnp.sum(values) / m
    centered = values - mean
    var = jnp.sum(centered * centered) / (m - 1)
    positive = var > 0
    return jnp.where(positive, var * refined_rsqrt(jnp.where(positive, var, 1.0)), 0.0)


def clipped_sum(
    updates,
    clip,
    coefficients,
    noise,
    noise_scale,
    global_params,
    *,
    noise_mode: str,
    noise_spans: Tuple[Tuple[int, int], ...],
):
    """``sum_i coefficients_i * clip_i * u_i`` plus the noise party's standard normal draws.

    Args:
        updates, clip: From :func:`flame_filter` / :func:`clipping_filter` (secret).
        coefficients: ``[n]`` share of each client (public kept set / count, or secret sample
            shares).
        noise: ``[d]`` standard normal draws of the noise party (secret), or None.
        noise_scale: ``lambda * S_t`` (secret); for ``noise_mode="relative"`` it is further
            multiplied by the standard deviation of each tensor of the new global model.
        global_params: The previous global model (public), for the relative noise.
        noise_mode: ``"paper"`` or ``"relative"``.
        noise_spans: ``(start, stop)`` of every tensor that gets noise, in order.
    """
    aggregate = (coefficients * clip) @ updates
    if noise is None or not noise_spans:
        return aggregate
    pieces, cursor = [], 0
    for start, stop in noise_spans:
        if start > cursor:
            pieces.append(aggregate[cursor:start])
        layer = aggregate[start:stop]
        sigma = noise_scale
        if noise_mode == "relative":
            sigma = sigma * _tensor_std(global_params[start:stop] + layer)
        pieces.append(layer + sigma * noise[start:stop])
        cursor = stop
    if cursor < aggregate.shape[0]:
        pieces.append(aggregate[cursor:])
    return jnp.concatenate(pieces)


def sorting_network(n: int) -> List[List[Tuple[int, int]]]:
    """Batcher's odd-even merge sort for ``n`` items as layers of ``(low, high)`` comparators
    (built for the next power of two; comparators reaching past ``n`` are dropped, which is exact
    when the missing items are taken as +infinity)."""
    size = 1
    while size < n:
        size *= 2
    layers = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            layer = []
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and b < n:
                        layer.append((a, b))
            if layer:
                layers.append(layer)
            k //= 2
        p *= 2
    return layers


def lower_median_rows(*rows, bound: Optional[float]):
    """Coordinate-wise lower median of the clients' vectors (``torch.median``), through a
    sorting network over the client axis: one comparison per comparator and coordinate, all
    comparators of a layer in one vectorized comparison."""
    items = list(clamp_rows(rows, bound))
    for layer in sorting_network(len(items)):
        x = jnp.stack([items[a] for a, _ in layer])
        y = jnp.stack([items[b] for _, b in layer])
        in_order = x < y
        smaller = jnp.where(in_order, x, y)
        larger = jnp.where(in_order, y, x)
        for position, (a, b) in enumerate(layer):
            items[a], items[b] = smaller[position], larger[position]
    return items[(len(items) - 1) // 2]


# --------------------------------------------------------------------------------------------
# The SPU entry points (static options as keyword arguments).


def _flame_stage(*rows, global_params, bound, reveal, min_samples):
    if reveal == "none":
        updates, gram, _ = update_statistics(rows, global_params, bound)
        sq = jnp.diagonal(gram)
        median_norm = median(norms_from_squares(sq))
        return jnp.zeros(()), median_norm, clip_factors(sq, median_norm), updates
    return flame_filter(
        *rows, global_params=global_params, bound=bound, reveal=reveal, min_samples=min_samples
    )


def _clipping_stage(*rows, global_params, bound, threshold):
    return clipping_filter(*rows, global_params=global_params, bound=bound, threshold=threshold)


def _sum_stage(updates, clip, coefficients, noise, scale, global_params, *, lam, mode, spans):
    noise_scale = None
    if noise is not None:
        # Nobody kept (all coefficients 0): the global model stays, without noise (as plaintext).
        noise_scale = lam * scale * (jnp.sum(coefficients) > 0)
    return clipped_sum(
        updates,
        clip,
        coefficients,
        noise,
        noise_scale,
        global_params,
        noise_mode=mode,
        noise_spans=spans,
    )


def _weighted_sum_stage(updates, clip, counts, noise, scale, global_params, *, lam, mode, spans):
    counts = jnp.stack(list(counts)).reshape(-1).astype(updates.dtype)
    shares = counts * refined_reciprocal(jnp.sum(counts))
    return _sum_stage(
        updates, clip, shares, noise, scale, global_params, lam=lam, mode=mode, spans=spans
    )


def _initial_stage(*rows, bound):
    return lower_median_rows(*rows, bound=bound)


def _sum_rows_stage(*rows):
    return jnp.sum(jnp.stack(list(rows)), axis=0)


# --------------------------------------------------------------------------------------------
# Server side: HDBSCAN on what was opened.


def labels_from_prim_edges(edges: np.ndarray, min_cluster_size: int) -> np.ndarray:
    """HDBSCAN's cluster labels from the Prim edge list of its mutual-reachability graph.

    This is the second half of ``hdbscan.HDBSCAN(metric="precomputed").fit`` (sort the edges by
    weight, build the single-linkage tree, condense it, select clusters by excess of mass), run on
    the edges :func:`prim_edges` computed in the SPU; ``allow_single_cluster=True``.
    """
    from hdbscan._hdbscan_linkage import label
    from hdbscan.hdbscan_ import _tree_to_labels

    edges = np.array(edges, dtype=np.float64).reshape(-1, 3)
    edges[:, :2] = np.rint(edges[:, :2])
    ordered = edges[np.argsort(edges.T[2]), :]
    tree = label(ordered)
    return _tree_to_labels(None, tree, max(int(min_cluster_size), 2), "eom", True)[0]


def _majority(labels: np.ndarray) -> Optional[int]:
    sizes = Counter(int(label) for label in labels if label >= 0)
    if not sizes:
        return None
    return min(sizes, key=lambda label: (-sizes[label], label))


# --------------------------------------------------------------------------------------------
# Client and noise-party side.


def _client_vector(weights, cap: float) -> np.ndarray:
    """A client's weights as one float32 vector; NaN becomes 0 and +-inf +-cap (the SPU cannot
    encode them; the server cannot screen what it cannot see, so they enter the filter as the
    extreme values they stand for)."""
    parts = [np.asarray(w, dtype=np.float32).reshape(-1) for w in weights]
    vector = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return np.nan_to_num(vector, nan=0.0, posinf=cap, neginf=-cap).astype(np.float32)


def _weight_shapes(weights) -> List[Tuple[int, ...]]:
    return [tuple(int(s) for s in np.shape(w)) for w in weights]


def _as_count(count) -> np.ndarray:
    value = float(count)
    if not value >= 0:
        raise ValueError(f"a client's sample count must be >= 0, got {count}")
    return np.asarray(value, dtype=np.float32)


@proxy(PYUObject)
class _NoiseSource:
    """Standard normal draws on the noise party, one stream per aggregator (the server never
    sees the seed; pass one only to reproduce a run)."""

    def __init__(self, seed: Optional[int]):
        self.generator = torch.Generator()
        self.generator.manual_seed(secrets.randbits(63) if seed is None else int(seed))

    def draw(self, spans: Sequence[Tuple[int, int]], total: int) -> np.ndarray:
        """Per tensor, in order, ``torch.randn`` as the plaintext FLAME draws it."""
        noise = np.zeros(total, dtype=np.float32)
        for start, stop in spans:
            noise[start:stop] = torch.randn(
                stop - start, generator=self.generator, dtype=torch.float32
            ).numpy()
        return noise


@proxy(PYUObject)
class _SecureFilterServer:
    """Server-side state: previous global model, layout, round counter and reports."""

    def __init__(self, method: str, model_fn, initial: str, selects: bool):
        self.method = method
        self.model = _build_model(model_fn)
        self.initial = initial
        self.selects = selects
        self.layout: Optional[ParamLayout] = None
        self.global_vector: Optional[torch.Tensor] = None
        self.round = 0
        self.pending: Dict[str, Any] = {}
        self.history: List[Dict[str, Any]] = []

    def set_layout(self, names: Sequence[str], shapes: Sequence[Tuple[int, ...]]) -> None:
        self.layout = ParamLayout(tuple(names), tuple(tuple(s) for s in shapes))

    def own_start(self) -> List[np.ndarray]:
        """``initial="server"``: the server's freshly built model is the starting model."""
        self.global_vector = self.layout.flatten(self.model.state_dict())
        return self.layout.unflatten_numpy(self.global_vector)

    def start(self, median_vector) -> List[np.ndarray]:
        """The opened coordinate-wise median of the clients' initial weights."""
        vector = torch.from_numpy(np.array(median_vector, dtype=np.float32)).reshape(-1)
        if vector.numel() != self.layout.num_params:
            raise ValueError(
                f"initial model has {vector.numel()} values, expected {self.layout.num_params}"
            )
        self.global_vector = vector.clone()
        return self.layout.unflatten_numpy(self.global_vector)

    def public_global(self) -> np.ndarray:
        return self.global_vector.numpy().astype(np.float32)

    def select(
        self,
        opened,
        median_norm,
        parties: Sequence[str],
        reveal_mode: str,
        min_cluster_size: Optional[int],
        min_samples: int,
    ) -> np.ndarray:
        """FLAME's clustering on what the SPU opened; returns each client's share (1/|kept| for
        the kept clients, 0 for the others), which the SPU multiplies by the secret clip
        factors."""
        n = len(parties)
        mcs = n // 2 + 1 if min_cluster_size is None else int(min_cluster_size)
        scores = None
        if n < 3:
            labels = np.zeros(n, dtype=int)
        elif reveal_mode == "mst":
            labels = labels_from_prim_edges(opened, mcs)
        else:
            distances = np.asarray(opened, dtype=np.float64)
            labels, _ = majority_cluster(distances, mcs, min_samples)
            off = distances.copy()
            np.fill_diagonal(off, np.nan)
            scores = np.nanmedian(off, axis=1) if n > 1 else np.zeros(1)
        majority = _majority(labels)
        kept = labels == majority if majority is not None else np.zeros(n, dtype=bool)
        shares = kept.astype(np.float64) / max(int(kept.sum()), 1)
        details = {
            "reveal": reveal_mode,
            "cluster_labels": [int(x) for x in labels],
            "majority_label": majority,
            "min_cluster_size": mcs,
            "median_norm": float(np.asarray(median_norm)),
            "kept_fraction": float(kept.mean()),
            "weights_meaning": "share of each kept client before clipping "
            "(the clip factors stay secret in the SPU)",
        }
        if reveal_mode == "mst" and n >= 3:
            details["prim_edges"] = np.asarray(opened, dtype=np.float64).tolist()
        if majority is None:
            details["no_majority_cluster"] = True
        self.pending = {"weights": shares, "scores": scores, "details": details}
        return shares.astype(np.float32)

    def note_threshold(self, threshold, parties: Sequence[str], details: Dict[str, Any]):
        """Norm clipping keeps everyone; records the opened threshold (median mode) if any."""
        details = dict(details)
        if threshold is not None:
            details["threshold"] = float(np.asarray(threshold))
        self.pending = {"weights": np.ones(len(parties)), "scores": None, "details": details}

    def finish(self, aggregate, parties: Sequence[str], extra: Dict[str, Any]) -> List[np.ndarray]:
        """Adds the opened (noised) aggregate to the global model and records the round."""
        update = torch.from_numpy(np.array(aggregate, dtype=np.float32)).reshape(-1)
        new_global = self.global_vector + update
        if not bool(torch.isfinite(new_global).all()):
            raise ValueError(f"{self.method} produced a non-finite global model")
        self.global_vector = new_global
        pending = self.pending
        report = AggregationReport(
            method=self.method,
            weights=torch.as_tensor(pending["weights"], dtype=torch.float64),
            scores=pending["scores"],
            non_finite=torch.zeros(len(parties), dtype=torch.bool),
            details={**pending["details"], **extra},
            selects=self.selects,
        )
        entry = {"round": self.round, "parties": list(parties), **report.to_dict()}
        self.history.append(entry)
        dropped = [p for p, kept in zip(parties, report.kept.tolist()) if not kept]
        logger.info("%s round %d: dropped %s", self.method, self.round, dropped or "nobody")
        self.round += 1
        self.pending = {}
        return self.layout.unflatten_numpy(self.global_vector)

    def reports(self) -> List[Dict[str, Any]]:
        return list(self.history)


class SecureFilterAggregator(Aggregator):
    """Shared machinery of the SPU filters (FLAME and norm clipping); use a subclass.

    Args:
        device: The server PYU (receives what is opened and keeps the global model).
        participants: The client PYUs.
        spu: The SPU device (see :func:`spu_runtime_config`).
        noise_party: PYU of an SPU party other than the server that contributes the noise
            (default: the first such party by name).
        noise_lambda: Noise level (None: the default of ``noise``; 0 disables the noise).
        noise: ``"relative"`` or ``"paper"`` (see :mod:`sf_ext.aggregators.flame`).
        noise_on: ``"parameters"`` or ``"weights"``.
        noise_seed: Seed of the noise party's generator; None (the default) draws a fresh one
            there. Set it only to reproduce a run: whoever knows it can remove the noise.
        input_bound: Clamp on every uploaded entry inside the SPU (None: no clamp, faster, but a
            malicious client can then overflow the fixed-point ring).
        model_fn: Model class/factory or ``TorchModel``: gives the tensor names (BatchNorm
            statistics get no noise) and the server's own model for ``initial="server"``.
        initial: ``"median"`` (coordinate-wise median of the clients' initial weights, in SPU)
            or ``"server"`` (the server's ``model_fn()``).
        allow_trusted_dealer: Accept SEMI2K with a trusted first party other than the server.
    """

    method = "secure_filter"
    selects = False

    def __init__(
        self,
        device: PYU,
        participants: List[PYU],
        spu: SPU,
        *,
        noise_party: Optional[PYU] = None,
        noise_lambda: Optional[float] = None,
        noise: str = "relative",
        noise_on: str = "parameters",
        noise_seed: Optional[int] = None,
        input_bound: Optional[float] = DEFAULT_INPUT_BOUND,
        model_fn=None,
        initial: str = "median",
        allow_trusted_dealer: bool = False,
    ):
        if not participants:
            raise ValueError("participants must name at least one client PYU")
        if not isinstance(device, PYU):
            raise ValueError(f"device must be the server's PYU, got {type(device).__name__}")
        if not isinstance(spu, SPU):
            raise ValueError(f"spu must be an SPU device, got {type(spu).__name__}")
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
        if noise_on not in ("parameters", "weights"):
            raise ValueError(f"noise_on must be 'parameters' or 'weights', got {noise_on!r}")
        if initial not in INITIAL_MODES:
            raise ValueError(f"initial must be one of {INITIAL_MODES}, got {initial!r}")
        if initial == "server" and model_fn is None:
            raise ValueError("initial='server' needs model_fn (the server builds the model)")
        if input_bound is not None and not float(input_bound) > 0:
            raise ValueError(f"input_bound must be positive or None, got {input_bound}")
        lam = self._default_lambda(noise) if noise_lambda is None else float(noise_lambda)
        if not lam >= 0:
            raise ValueError(f"noise_lambda must be >= 0, got {noise_lambda}")
        spu_parties = [node["party"] for node in spu.cluster_def["nodes"]]
        self.protocol = check_spu_for_filter(
            spu.conf, spu_parties, device.party, allow_trusted_dealer
        )
        if noise_party is None and lam > 0:
            others = [p for p in spu_parties if p != device.party]
            noise_party = PYU(others[0])
        if noise_party is not None:
            if noise_party.party == device.party:
                raise ValueError("the noise party must not be the server (it would know the noise)")
            if noise_party.party not in spu_parties:
                raise ValueError(
                    f"the noise party {noise_party.party!r} is not an SPU party {spu_parties}"
                )
        self._device = device
        self._participants = list(participants)
        self._spu = spu
        self._lambda = lam
        self._noise = noise
        self._noise_on = noise_on
        self._bound = None if input_bound is None else float(input_bound)
        self._cap = self._bound if self._bound is not None else 1e6
        self._initial = initial
        self._names = None
        if model_fn is not None:
            self._names = list(_build_model(model_fn).state_dict())
        self._layout: Optional[ParamLayout] = None
        self._started = False
        self._server = _SecureFilterServer(
            self.method, model_fn, initial, self.selects, device=device
        )
        self._noise_source = _NoiseSource(noise_seed, device=noise_party) if lam > 0 else None

    @staticmethod
    def _default_lambda(noise: str) -> float:
        return noise_lambda_default(noise)

    # -- helpers ------------------------------------------------------------------------------

    def _check(self, data: List[DeviceObject]) -> List[str]:
        if not data:
            raise ValueError("no client data to aggregate")
        parties = [d.device.party for d in data]
        known = {d.party for d in self._participants}
        unknown = [p for p in parties if p not in known]
        if unknown:
            raise ValueError(f"data from {unknown}, which are not participants of this aggregator")
        if len(set(parties)) != len(parties):
            raise ValueError(f"a party sent twice: {parties}")
        return parties

    def _ensure_layout(self, data: List[DeviceObject]) -> None:
        """Tensor shapes (public: the architecture) from every client, checked to agree."""
        if self._layout is not None:
            return
        shapes = reveal([d.device(_weight_shapes)(d) for d in data])
        for party, theirs in zip([d.device.party for d in data], shapes):
            if theirs != shapes[0]:
                raise ValueError(
                    f"{party} sent tensors of shapes {theirs}, {data[0].device.party} {shapes[0]}"
                )
        if self._names is not None and len(self._names) != len(shapes[0]):
            raise ValueError(
                f"model_fn builds a model with {len(self._names)} tensors, the clients send "
                f"{len(shapes[0])}"
            )
        layout = ParamLayout.from_arrays([np.zeros(s) for s in shapes[0]], self._names)
        if self._bound is not None:
            self._check_capacity(layout.num_params)
        self._layout = layout
        self._server.set_layout(layout.names, layout.shapes)

    def _check_capacity(self, num_params: int) -> None:
        """The clamp bounds every update entry by 2 * bound; the Gram matrix's entries (before
        truncation, 2f fraction bits) must stay inside the signed 128-bit ring."""
        f = self._spu.conf.fxp_fraction_bits
        worst = num_params * (2.0 * self._bound) ** 2
        if np.log2(worst) + 2 * f >= 125:
            raise ValueError(
                f"{num_params} parameters with input_bound={self._bound} can overflow the FM128 "
                f"ring at {f} fraction bits; lower input_bound or fxp_fraction_bits"
            )

    def _noise_spans(self) -> Tuple[Tuple[int, int], ...]:
        spans = []
        for (name, span), shape in zip(self._layout.slices().items(), self._layout.shapes):
            if _noised_tensor(name, shape, self._noise_on) and span.stop > span.start:
                spans.append((span.start, span.stop))
        return tuple(spans)

    def _shares(self, data: List[DeviceObject]):
        vectors = [d.device(_client_vector)(d, self._cap) for d in data]
        return [v.to(self._spu) for v in vectors]

    def _begin(self, data: List[DeviceObject], parties: List[str]) -> PYUObject:
        """The first call: the starting model (see the module docstring)."""
        self._started = True
        if self._initial == "server":
            return self._server.own_start()
        median_vector = self._spu(_initial_stage, static_argnames=("bound",))(
            *self._shares(data), bound=self._bound
        )
        return self._server.start(median_vector.to(self._device))

    def _noised_sum(self, updates, clip, coefficients, scale, global_spu, weighted: bool):
        spans = self._noise_spans() if self._lambda > 0 else ()
        noise = None
        if spans:
            noise = self._noise_source.draw(spans, self._layout.num_params).to(self._spu)
        stage = _weighted_sum_stage if weighted else _sum_stage
        return self._spu(stage, static_argnames=("lam", "mode", "spans"))(
            updates,
            clip,
            coefficients,
            noise,
            scale,
            global_spu,
            lam=self._lambda,
            mode=self._noise,
            spans=spans,
        )

    def _noise_details(self) -> Dict[str, Any]:
        return {
            "noise": self._noise if self._lambda > 0 else "off",
            "noise_lambda": self._lambda,
            "protocol": self.protocol,
            "input_bound": self._bound,
        }

    def _four(self, fn, statics, *args, **kwargs):
        return self._spu(
            fn,
            static_argnames=statics,
            num_returns_policy=SPUCompilerNumReturnsPolicy.FROM_USER,
            user_specified_num_returns=4,
        )(*args, **kwargs)

    # -- the Aggregator interface --------------------------------------------------------------

    def average(self, data: List[DeviceObject], axis=0, weights=None) -> PYUObject:
        """The filtered aggregate of the clients' weight lists, as weights on the server PYU."""
        if axis not in (0, None):
            raise ValueError(f"{type(self).__name__} aggregates over clients (axis=0), got {axis}")
        parties = self._check(data)
        if weights is not None and len(weights) != len(data):
            raise ValueError(f"{len(weights)} weights for {len(data)} clients")
        self._ensure_layout(data)
        if not self._started:
            return self._begin(data, parties)
        shares = self._shares(data)
        global_spu = self._server.public_global().to(self._spu, spu_vis="public")
        return self._round(shares, global_spu, parties, data, weights)

    def _round(self, shares, global_spu, parties, data, weights) -> PYUObject:
        raise NotImplementedError

    def sum(self, data: List[DeviceObject], axis=0) -> PYUObject:
        """Element-wise sum of the clients' weight lists, computed in SPU; only the sum is
        opened, to the server (no filter: part of the ``Aggregator`` interface)."""
        if axis not in (0, None):
            raise ValueError(f"{type(self).__name__} sums over clients (axis=0), got {axis}")
        self._check(data)
        self._ensure_layout(data)
        total = self._spu(_sum_rows_stage)(*self._shares(data)).to(self._device)
        layout = self._layout
        return self._device(lambda v: layout.unflatten_numpy(torch.as_tensor(v)))(total)

    def reports(self) -> List[Dict[str, Any]]:
        """Every filtered round so far: parties, kept flags, shares, what was opened."""
        return reveal(self._server.reports())


class SecureFlameAggregator(SecureFilterAggregator):
    """FLAME's filter in SecretFlow's SPU; the server sees no client's model (module docstring).

    Args:
        device, participants, spu: The server PYU, the client PYUs, the SPU device.
        reveal: ``"mst"`` (default: open only the ``n - 1`` Prim edges HDBSCAN needs) or
            ``"distances"`` (open the ``n x n`` cosine-distance matrix).
        min_cluster_size: HDBSCAN's minimum cluster size (default ``n // 2 + 1``).
        min_samples: HDBSCAN's ``min_samples`` (default 1, as the paper's code).
        **kwargs: Noise, clamp, starting-model and protocol options of
            :class:`SecureFilterAggregator`.

    Example::

        spu = sf.SPU(sf.utils.testing.cluster_def(["charlie", "hugo", "ivy"],
                                                  spu_runtime_config("ABY3")))
        FLModel(server=charlie, device_list=clients, strategy="fed_avg_w", backend="torch",
                aggregator=SecureFlameAggregator(charlie, clients, spu), model=model_def)
    """

    method = "secure_flame"
    selects = True

    def __init__(
        self,
        device: PYU,
        participants: List[PYU],
        spu: SPU,
        reveal: str = "mst",
        min_cluster_size: Optional[int] = None,
        min_samples: int = 1,
        **kwargs,
    ):
        if reveal not in REVEAL_MODES:
            raise ValueError(f"reveal must be one of {REVEAL_MODES}, got {reveal!r}")
        if min_cluster_size is not None and int(min_cluster_size) < 1:
            raise ValueError(f"min_cluster_size must be >= 1, got {min_cluster_size}")
        if int(min_samples) < 1:
            raise ValueError(f"min_samples must be >= 1, got {min_samples}")
        super().__init__(device, participants, spu, **kwargs)
        self._reveal = reveal
        self._min_cluster_size = min_cluster_size
        self._min_samples = int(min_samples)

    def _round(self, shares, global_spu, parties, data, weights) -> PYUObject:
        mode = self._reveal if len(parties) >= 3 else "none"
        opened, median_norm, clip, updates = self._four(
            _flame_stage,
            ("bound", "reveal", "min_samples"),
            *shares,
            global_params=global_spu,
            bound=self._bound,
            reveal=mode,
            min_samples=self._min_samples,
        )
        shares.clear()  # the uploads' shares are no longer needed: let the SPU parties free them
        shares_out = self._server.select(
            opened.to(self._device) if mode != "none" else None,
            median_norm.to(self._device),
            parties,
            self._reveal,
            self._min_cluster_size,
            self._min_samples,
        )
        coefficients = shares_out.to(self._spu, spu_vis="public")
        aggregate = self._noised_sum(
            updates, clip, coefficients, median_norm, global_spu, weighted=False
        )
        return self._server.finish(aggregate.to(self._device), parties, self._noise_details())

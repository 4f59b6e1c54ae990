"""FLAME and XMAM against test-local re-derivations of their published selection rules.

The re-derivations below follow the papers' and the public code's calls literally (clustering of
float64 local models with ``hdbscan.HDBSCAN(metric="cosine", algorithm="generic")``; XMAM's
``PCA(n_components=3)`` + ``hdbscan.HDBSCAN(min_cluster_size=2)`` with a ``Counter`` majority that
lets the noise label vote) and are compared with the package's implementation on constructed sets:
random rounds, identical rows, and tied distances.
"""

import copy
import math
from collections import Counter

import hdbscan
import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from torch import nn

from sf_ext.aggregators import aggregate, map_updates, matrix_mapping, xmam_select


def flame_reference(models: np.ndarray, global_model: np.ndarray):
    """FLAME's selection and (noise-free) aggregate, written from the paper's Algorithm 1."""
    n = models.shape[0]
    labels = (
        hdbscan.HDBSCAN(
            metric="cosine",
            algorithm="generic",
            min_cluster_size=n // 2 + 1,
            min_samples=1,
            allow_single_cluster=True,
        )
        .fit(models.astype(np.float64))
        .labels_
    )
    admitted = [i for i in range(n) if labels[i] == 0]
    deltas = models - global_model
    norms = np.linalg.norm(deltas, axis=1)
    bound = np.median(norms)
    clipped = [deltas[i] * min(1.0, bound / norms[i]) for i in admitted]
    aggregate_ = global_model + np.mean(clipped, axis=0) if admitted else global_model
    return admitted, aggregate_


def _ours(models, global_model):
    updates = torch.tensor(models - global_model, dtype=torch.float32)
    result, report = aggregate(
        "flame",
        updates,
        global_params=torch.tensor(global_model, dtype=torch.float32),
        noise_lambda=0.0,
    )
    return report.kept.nonzero().flatten().tolist(), global_model + result.double().numpy()


def _random_round(seed, n, d=300, n_attack=0, kind="flip"):
    rng = np.random.default_rng(seed)
    global_model = rng.normal(0, 1, d)
    direction = rng.normal(0, 1, d) * 0.05
    deltas = direction + rng.normal(0, 0.04, (n, d))
    for i in range(n_attack):
        if kind == "flip":
            deltas[i] *= -4
        elif kind == "scale":
            deltas[i] *= 10
        else:
            deltas[i] = rng.normal(0, 0.3, d)
    return (global_model + deltas).astype(np.float32).astype(np.float64), global_model.astype(
        np.float32
    ).astype(np.float64)


@pytest.mark.parametrize(
    "seed,n,n_attack,kind",
    [
        (s, n, a, k)
        for s in range(3)
        for n, a in ((5, 1), (8, 3), (11, 4), (20, 8))
        for k in ("flip", "scale", "random")
    ]
    + [(7, 10, 0, "flip"), (8, 20, 0, "flip")],
)
def test_flame_matches_the_published_selection(seed, n, n_attack, kind):
    models, global_model = _random_round(seed, n, n_attack=n_attack, kind=kind)
    kept_ref, agg_ref = flame_reference(models, global_model)
    kept, agg = _ours(models, global_model)
    assert kept == kept_ref
    np.testing.assert_allclose(agg, agg_ref, rtol=0, atol=2e-6)


def test_flame_identical_rows_and_tied_distances():
    rng = np.random.default_rng(0)
    d = 64
    global_model = rng.normal(0, 1, d)
    base = rng.normal(0, 0.05, d)
    # Four benign clients sending the very same model, three attackers sending the very same
    # (flipped) one, and a symmetric pair tied in distance to the benign copies.
    benign = np.tile(global_model + base, (4, 1))
    attackers = np.tile(global_model - 4 * base, (3, 1))
    offset = rng.normal(0, 0.01, d)
    pair = np.stack([global_model + base + offset, global_model + base - offset])
    models = np.concatenate([benign, pair, attackers]).astype(np.float32).astype(np.float64)
    g = global_model.astype(np.float32).astype(np.float64)
    kept_ref, agg_ref = flame_reference(models, g)
    kept, agg = _ours(models, g)
    assert kept == kept_ref
    assert set(kept).isdisjoint({6, 7, 8})
    np.testing.assert_allclose(agg, agg_ref, rtol=0, atol=2e-6)


# ------------------------------------------------------------------------------------------ XMAM


def xmam_reference(outputs: np.ndarray):
    """XMAM's selection as its public code runs it: PCA(3), default HDBSCAN(min_cluster_size=2),
    and the most common label, noise included."""
    coords = PCA(n_components=3).fit_transform(list(outputs))
    labels = hdbscan.HDBSCAN(min_cluster_size=2).fit_predict(coords)
    majority = Counter(labels).most_common()[0][0]
    return [i for i in range(len(outputs)) if labels[i] == majority], labels


def _slpds(seed, n, classes=10, groups=3, spread=0.02):
    rng = np.random.default_rng(seed)
    centres = rng.dirichlet(np.ones(classes), size=groups)
    which = rng.integers(0, groups, size=n)
    rows = centres[which] + rng.normal(0, spread, (n, classes))
    rows = np.abs(rows) / np.abs(rows).sum(axis=1, keepdims=True)
    return rows.astype(np.float32)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("n", [5, 9, 20])
def test_xmam_exact_selection_matches_the_public_code(seed, n):
    outputs = _slpds(seed, n, spread=[0.002, 0.02, 0.2][seed % 3])
    kept_ref, labels_ref = xmam_reference(outputs)
    mask, info = xmam_select(outputs, exact=True)
    assert np.flatnonzero(mask).tolist() == kept_ref
    assert info["labels"] == labels_ref.tolist()


def test_xmam_identical_rows_and_the_noise_vote():
    outputs = np.concatenate([np.tile(_slpds(1, 1), (4, 1)), _slpds(2, 6, groups=6, spread=0.3)])
    kept_ref, labels = xmam_reference(outputs)
    mask, info = xmam_select(outputs, exact=True)
    assert np.flatnonzero(mask).tolist() == kept_ref
    # The default differs only when there is no cluster at all: it keeps nobody.
    default, info_default = xmam_select(outputs, exact=False)
    if (labels == -1).all():
        assert not default.any() and info_default["majority"] is None
    else:
        assert np.flatnonzero(default).tolist() == kept_ref
    all_noise = np.eye(6, dtype=np.float32)  # six mutually equidistant points
    exact_mask, exact_info = xmam_select(all_noise, exact=True)
    ref_kept, ref_labels = xmam_reference(all_noise)
    assert np.flatnonzero(exact_mask).tolist() == ref_kept
    if (ref_labels == -1).all():
        assert exact_mask.all() and not xmam_select(all_noise)[0].any()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def _reference_slpds(model, updates, input_shape):
    """The public code's mapping: a copy of the network with the update as its parameters."""
    out = []
    for row in updates:
        net = copy.deepcopy(model)
        offset = 0
        for p in net.parameters():
            p.data = row[offset : offset + p.numel()].view(p.shape).clone()
            offset += p.numel()
        out.append(torch.softmax(net(torch.ones(1, *input_shape)), dim=1).detach().numpy()[0])
    return np.array(out)


def test_xmam_exact_end_to_end_matches_the_public_code():
    model = _cnn()
    d = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(3)
    for trial in range(6):
        updates = 0.05 * torch.randn(12, d, generator=gen)
        updates[:4] = -4 * updates[:4] if trial % 2 else 30 * torch.randn(4, d, generator=gen)
        ref = _reference_slpds(model, updates, (1, 8, 8))
        np.testing.assert_array_equal(map_updates(model, updates, (1, 8, 8)).numpy(), ref)
        kept_ref, _ = xmam_reference(ref)
        result, report = matrix_mapping(
            updates, model=model, input_shape=(1, 8, 8), variant="xmam", exact=True
        )
        assert report.kept.nonzero().flatten().tolist() == kept_ref
        expected = updates[kept_ref].double().mean(dim=0)
        torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-5)
        assert math.isclose(float(report.weights.sum()), 1.0, rel_tol=1e-9)


def test_xmam_default_does_not_hand_the_round_to_a_tight_attacker_group():
    """Eight identical attacker outputs form XMAM's only cluster while twelve scattered honest
    outputs are noise: the reference's vote (noise included) keeps the honest clients, and the
    default keeps that vote (excluding noise from it handed the round to the attackers)."""
    rng = np.random.default_rng(23)  # a draw where nine of the twelve honest outputs are noise
    honest = rng.dirichlet(np.ones(10) * 0.3, size=12).astype(np.float32)
    attackers = np.tile(np.full(10, 0.1, np.float32), (8, 1))
    outputs = np.concatenate([honest, attackers])
    kept_ref, labels = xmam_reference(outputs)
    mask, info = xmam_select(outputs)
    assert (labels[12:] == labels[12]).all() and labels[12] >= 0  # the attackers' cluster
    assert np.flatnonzero(mask).tolist() == kept_ref
    assert (labels[:12] == -1).sum() > 8  # noise outvotes the attackers' cluster
    assert not mask[12:].any() and mask[:12].sum() == 9

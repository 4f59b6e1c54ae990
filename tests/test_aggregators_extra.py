"""Bulyan, centered clipping, DnC, SignGuard, FoolsGold and FLTrust: planted attackers where the
theory says the rule rejects them, and reference computations written out in numpy."""

import numpy as np
import pytest
import torch
from _rounds import cosine, planted_round, run_rule  # noqa: E402  (tests/ is on sys.path)

from sf_ext.aggregators import (
    AggregationReport,
    bulyan,
    centered_clipping,
    detection_rates,
    dnc,
    fltrust,
    foolsgold,
    signguard,
)
from sf_ext.aggregators.foolsgold import foolsgold_weights

# ---------------------------------------------------------------- Bulyan


def bulyan_reference(x: np.ndarray, f: int) -> np.ndarray:
    """El Mhamdi et al.: iterated Krum picks theta = n - 2f, then per coordinate the mean of the
    beta = theta - 2f values closest to the median."""
    n = x.shape[0]
    remaining, chosen = list(range(n)), []
    for _ in range(n - 2 * f):
        sub = x[remaining]
        dist = ((sub[:, None] - sub[None]) ** 2).sum(-1)
        k = len(remaining) - f - 2
        scores = [np.sort(np.delete(dist[i], i))[: max(k, 1)].sum() for i in range(len(remaining))]
        pick = remaining[int(np.argmin(scores))]
        chosen.append(pick)
        remaining.remove(pick)
    sel = x[sorted(chosen)]
    beta = len(chosen) - 2 * f
    med = np.median(sel, axis=0)
    order = np.argsort(np.abs(sel - med), axis=0, kind="stable")[:beta]
    return np.take_along_axis(sel, order, axis=0).mean(axis=0), sorted(chosen)


@pytest.mark.parametrize("attack", ["sign_flip", "same_value", "scaled"])
def test_bulyan_matches_its_definition_and_rejects_attackers(attack):
    rnd = planted_round(attack, n_benign=15, n_attack=4, dim=200)
    result, report = bulyan(rnd.updates, f=4)
    expected, chosen = bulyan_reference(rnd.updates.double().numpy(), 4)
    np.testing.assert_allclose(result.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert report.details["selected"] == chosen and report.details["beta"] == 19 - 8 - 8
    assert not bool(report.kept[rnd.is_attacker].any())
    low, high = rnd.benign.min(dim=0).values, rnd.benign.max(dim=0).values
    assert bool(((result >= low - 1e-6) & (result <= high + 1e-6)).all())
    assert float(report.weights.sum()) == pytest.approx(1.0)


def test_bulyan_needs_4f_plus_3_clients_and_defaults_to_the_largest_f():
    with pytest.raises(ValueError, match=r"n >= 4f \+ 3 clients \(n >= 11 for f=2\), got n=10"):
        bulyan(torch.randn(10, 5), f=2)
    _, report = bulyan(torch.randn(11, 5))
    assert report.details["f"] == 2 and report.details["theta"] == 7


# ---------------------------------------------------------------- centered clipping


def test_centered_clipping_iterates_around_the_remembered_center():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 30, generator=gen)
    x[0] = 1000.0
    state = {}
    out1, report = centered_clipping(x, state=state, tau=2.0, iterations=2)
    v = np.zeros(30)
    xs = x.double().numpy()
    for _ in range(2):
        offsets = xs - v
        norms = np.linalg.norm(offsets, axis=1)
        v = v + (offsets * np.minimum(1.0, 2.0 / norms)[:, None]).mean(axis=0)
    np.testing.assert_allclose(out1.double().numpy(), v, rtol=1e-5, atol=1e-6)
    # The attacker moved the center by at most tau / n per iteration.
    honest_only, _ = centered_clipping(x[1:], state={}, tau=2.0, iterations=2)
    assert float((out1 - honest_only).norm()) < 2 * 2.0 / 6 + float(honest_only.norm())
    assert torch.equal(state["centered_clipping_center"], out1)
    out2, _ = centered_clipping(x, state=state, tau=2.0, iterations=1)
    offsets = xs - v
    clip = np.minimum(1.0, 2.0 / np.linalg.norm(offsets, axis=1))
    np.testing.assert_allclose(
        out2.double().numpy(), v + (offsets * clip[:, None]).mean(axis=0), rtol=1e-5, atol=1e-6
    )
    assert report.selects is False and report.details["tau"] == 2.0
    assert centered_clipping(x, state={})[1].details["tau"] == 100.0  # the official default


# ---------------------------------------------------------------- DnC


def test_dnc_removes_the_spectral_outliers():
    rnd = planted_round("sign_flip", n_benign=12, n_attack=4, dim=300)
    result, report = dnc(rnd.updates, f=4, niters=1, subsample=300)
    x = rnd.updates.double().numpy()
    centered = x - x.mean(axis=0)
    v = np.linalg.svd(centered, full_matrices=False)[2][0]
    scores = (centered @ v) ** 2
    removed = set(np.argsort(-scores, kind="stable")[:4].tolist())
    assert set(np.flatnonzero(~report.kept.numpy()).tolist()) == removed
    assert detection_rates(report, rnd.is_attacker)["tpr"] == 1.0
    np.testing.assert_allclose(
        result.double().numpy(), x[report.kept.numpy()].mean(axis=0), rtol=1e-5, atol=1e-6
    )


def test_dnc_keeps_only_clients_that_survive_every_iteration():
    rnd = planted_round("scaled", n_benign=12, n_attack=4, dim=500)
    g = torch.Generator().manual_seed(5)
    _, report = dnc(rnd.updates, f=4, niters=5, subsample=100, generator=g)
    assert report.num_kept <= 12 and not bool(report.kept[rnd.is_attacker].any())
    again = dnc(
        rnd.updates, f=4, niters=5, subsample=100, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(report.kept, again[1].kept)
    # The FLPoison defaults: 20 % of the coordinates, 5 iterations, c = 1.
    _, default = dnc(rnd.updates, f=4)
    assert default.details["subsample"] == 100 and default.details["niters"] == 5


# ---------------------------------------------------------------- SignGuard


def test_signguard_norm_filter_and_clipping():
    rnd = planted_round("scaled", n_benign=12, n_attack=4, dim=400)
    result, report = signguard(rnd.updates, generator=torch.Generator().manual_seed(0))
    norms = rnd.updates.double().norm(dim=1)
    med = float(norms.median())  # lower median, as the official code
    assert report.details["median_norm"] == pytest.approx(med)
    assert report.details["passed_norm"] == ((norms / med > 0.1) & (norms / med < 3.0)).tolist()
    assert not bool(report.kept[rnd.is_attacker].any())
    kept = report.kept
    clipped = rnd.updates.double()[kept] * torch.clamp(med / norms[kept], max=1.0)[:, None]
    torch.testing.assert_close(result.double(), clipped.mean(dim=0), rtol=1e-5, atol=1e-6)


def test_signguard_sign_clustering_separates_a_flipped_sign_profile():
    gen = torch.Generator().manual_seed(1)
    benign = torch.rand(14, 1000, generator=gen) - 0.3  # about 70 % positive entries
    attackers = -(torch.rand(6, 1000, generator=gen) - 0.3)  # about 70 % negative, same norms
    updates = torch.cat([benign, attackers])
    _, report = signguard(updates, generator=torch.Generator().manual_seed(0))
    assert all(report.details["passed_norm"])  # norms alone cannot tell them apart
    assert report.kept[:14].all() and not report.kept[14:].any()


# ---------------------------------------------------------------- FoolsGold


def foolsgold_reference(histories: np.ndarray, kappa: float = 1.0) -> np.ndarray:
    """The original FoolsGold weights, loops as in the paper's pseudo-code."""
    n = histories.shape[0]
    unit = histories / np.linalg.norm(histories, axis=1, keepdims=True)
    cs = unit @ unit.T - np.eye(n)
    maxcs = cs.max(axis=1)
    for i in range(n):
        for j in range(n):
            if i != j and maxcs[i] < maxcs[j]:
                cs[i, j] = cs[i, j] * maxcs[i] / maxcs[j]
    wv = np.clip(1 - cs.max(axis=1), 0, 1)
    wv = wv / wv.max()
    wv[wv == 1] = 0.99
    with np.errstate(divide="ignore"):
        wv = kappa * (np.log(wv / (1 - wv)) + 0.5)
    wv[np.isinf(wv) & (wv > 0)] = 1
    wv[np.isinf(wv)] = 0
    return np.clip(wv, 0, 1)


def test_foolsgold_weights_match_the_paper():
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(9, 40, generator=gen, dtype=torch.float64)
    h[6:] = h[6] + 0.01 * torch.randn(3, 40, generator=gen, dtype=torch.float64)  # sybils
    np.testing.assert_allclose(
        foolsgold_weights(h).numpy(), foolsgold_reference(h.numpy()), rtol=1e-9, atol=1e-12
    )


def test_foolsgold_zeroes_sybils_and_keeps_history_per_client():
    gen = torch.Generator().manual_seed(3)
    state = {}
    ids = ["a", "b", "c", "d", "e", "s1", "s2", "s3"]
    for round_index in range(3):
        benign = torch.randn(5, 60, generator=gen)
        sybil = torch.randn(60, generator=gen)
        updates = torch.cat([benign, sybil.expand(3, -1)])
        result, report = foolsgold(updates, client_ids=ids, state=state)
    assert not bool(report.kept[5:].any()) and bool(report.kept[:5].all())
    history = state["foolsgold_history"]
    assert set(history) == set(ids)
    assert float(report.weights.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(result.double(), (report.weights[:, None] * updates.double()).sum(0))
    # A client seen in one round only keeps its own history when it returns.
    before = history["a"].clone()
    foolsgold(torch.randn(2, 60, generator=gen), client_ids=["a", "new"], state=state)
    assert not torch.equal(history["a"], before) and "new" in history
    _, raw = foolsgold(updates, client_ids=ids, state={}, normalize=False)
    assert float(raw.weights.max()) == pytest.approx(1.0)  # the original's unnormalized weights
    with pytest.raises(ValueError, match="distinct"):
        foolsgold(updates[:2], client_ids=["x", "x"], state={})


# ---------------------------------------------------------------- FLTrust


def test_fltrust_trust_scores_and_rescaling_match_the_paper():
    rnd = planted_round("mixed", n_benign=12, n_attack=8, dim=300)
    result, report = fltrust(rnd.updates, root_update=rnd.root_update)
    g0 = rnd.root_update.double().numpy()
    x = rnd.updates.double().numpy()
    finite = np.isfinite(x).all(axis=1)
    num = np.zeros(300)
    total = 0.0
    for i in np.flatnonzero(finite):
        cos = x[i] @ g0 / (np.linalg.norm(x[i]) * np.linalg.norm(g0))
        ts = max(cos, 0.0)
        num += ts * x[i] * np.linalg.norm(g0) / np.linalg.norm(x[i])
        total += ts
    np.testing.assert_allclose(result.double().numpy(), num / total, rtol=1e-5, atol=1e-7)
    for row, kind in enumerate(rnd.kinds):
        if kind in ("sign_flip", "nan"):
            assert not bool(report.kept[row]), kind
    assert float(result.norm()) <= float(rnd.root_update.norm()) * (1 + 1e-5)
    assert cosine(result, rnd.benign_mean) > 0.9


def test_fltrust_with_every_client_distrusted_moves_nothing():
    root = torch.ones(10)
    result, report = fltrust(-torch.rand(4, 10), root_update=root)
    assert bool((result == 0).all()) and report.num_kept == 0
    assert report.details["all_distrusted"]
    with pytest.raises(ValueError, match="root_update has 9 values"):
        fltrust(torch.rand(4, 10), root_update=torch.ones(9))


def test_every_new_rule_reports_through_the_common_builder():
    rnd = planted_round("sign_flip", n_benign=12, n_attack=4, dim=100)
    for name in ("bulyan", "centered_clipping", "dnc", "signguard", "foolsgold", "fltrust"):
        _, report = run_rule(name, rnd.updates, None, rnd)
        assert isinstance(report, AggregationReport) and report.method == name
        assert torch.equal(report.kept, report.weights > 0)


# ---------------------------------------------------------------- Shield (sf-ext's own rule)


@pytest.mark.parametrize("attack", ["sign_flip", "same_value", "scaled", "nan", "mixed"])
def test_shield_drops_or_bounds_planted_attackers(attack):
    rnd = planted_round(attack)
    result, report = run_rule("shield", rnd.updates, None, rnd)
    norms = rnd.updates.double().norm(dim=1)
    usable = ~report.non_finite
    median = float(torch.quantile(norms[usable], 0.5))
    assert report.details["median_norm"] == pytest.approx(median)
    assert float(result.norm()) <= median * (1 + 1e-6)
    assert cosine(result, rnd.benign_mean) > 0.95
    for row, kind in enumerate(rnd.kinds):
        if kind in ("sign_flip", "same_value", "scaled"):  # 4x, 100x, 10x the median norm
            assert not bool(report.kept[row]), kind
            assert "norm above bound" in report.details["dropped_by"][row]
        elif kind == "nan":
            assert bool(report.non_finite[row])
    # Without the norm bound the x10-scaled rows (same direction as the benign) stay, clipped.
    if attack == "scaled":
        _, loose = run_rule("shield", rnd.updates, None, rnd, norm_bound=float("inf"))
        assert bool(loose.kept[rnd.is_attacker].all())
        assert max(loose.details["clip_factors"][i] for i in range(20) if rnd.is_attacker[i]) < 0.15
    benign_kept = detection_rates(report, rnd.is_attacker)["benign_kept_fraction"]
    assert benign_kept >= 11 / 12


def test_shield_drops_identical_rows_that_fool_distance_rules():
    """IPM at 40 %: eight identical copies of -0.5 x the benign mean."""
    from sf_ext.attacks import inner_product_manipulation

    rnd = planted_round("none", n_benign=20, n_attack=0)
    attackers = torch.zeros(20, dtype=torch.bool)
    attackers[:8] = True
    updates = inner_product_manipulation(rnd.updates, attackers, eps=0.5)
    _, report = run_rule("shield", updates, None, rnd)
    assert report.kept.tolist() == (~attackers).tolist()
    assert all("near-duplicate" in report.details["dropped_by"][i] for i in range(8))


def test_shield_keeps_heterogeneous_benign_clients():
    """Benign updates from five 'label groups' pointing in different directions: a majority
    cluster would drop most groups; Shield keeps every client."""
    gen = torch.Generator().manual_seed(4)
    common = torch.randn(500, generator=gen)
    groups = torch.randn(5, 500, generator=gen)
    updates = torch.cat(
        [common + 1.5 * groups[g] + 1.2 * torch.randn(4, 500, generator=gen) for g in range(5)]
    )
    _, report = run_rule("shield", updates)
    assert report.num_kept == 20 and not report.details["fallback"]
    assert report.details["max_pairwise_cosine_kept"] < 0.9
    _, flame = run_rule("flame", updates, noise_lambda=0.0)
    assert flame.num_kept < 20  # what the card shows at scale


def test_shield_fallback_keeps_a_direction_majority_and_never_everyone():
    gen = torch.Generator().manual_seed(5)
    updates = torch.randn(10, 300, generator=gen)  # no consensus at all: every check fires
    _, report = run_rule("shield", updates, min_cosine=0.9)
    assert report.details["fallback"] and report.num_kept == 10 // 2 + 1
    assert "opposes consensus" in sum(report.details["dropped_by"].values(), [])
    cos = torch.tensor(report.details["cosine"])
    kept_cos = cos[report.kept]
    assert float(kept_cos.min()) >= float(cos[~report.kept].max())
    _, strict = run_rule("shield", updates, min_cosine=0.9, fallback=False)
    assert strict.num_kept < 10 // 2 + 1


def test_shield_consensus_is_the_geometric_median_of_the_clipped_updates():
    from sf_ext.aggregators.shield import _geometric_median_weights

    gen = torch.Generator().manual_seed(6)
    points = torch.randn(9, 12, generator=gen, dtype=torch.float64)
    beta = _geometric_median_weights(points @ points.T)
    z = beta @ points

    def objective(v):
        return float((points - v).norm(dim=1).sum())

    for _ in range(30):
        step = torch.randn(12, generator=gen, dtype=torch.float64)
        assert objective(z) <= objective(z + 1e-3 * step / step.norm()) + 1e-9

"""Robust-aggregation core on update sets whose right answer is known.

Synthetic rounds (``tests/_rounds.py``): 12 benign updates scattered around one direction plus 8
planted attackers (40 %): sign-flipped x4, all-100, scaled x10 along the benign direction, NaN/inf,
or a mix of all four. Matrix mapping needs updates with real structure, so its round trains a
small MLP on scikit-learn's digits (offline) for a few steps per client.
"""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from _rounds import (  # noqa: E402  (tests/ is on sys.path under pytest)
    ATTACKS,
    DIM,
    N_ATTACK,
    N_BENIGN,
    Round,
    cosine,
    full_context,
    planted_round,
    run_rule,
)
from torch import nn

from sf_ext.aggregators import (
    AGGREGATORS,
    AggregationReport,
    ServerContext,
    _linalg,
    aggregate,
    call_rule,
    detection_rates,
    geometric_median,
    get_aggregator,
    map_updates,
    matrix_mapping,
)
from sf_ext.aggregators import median as median_module
from sf_ext.aggregators import register_aggregator, rsa_step
from sf_ext.aggregators import sign as sign_module
from sf_ext.params import ParamLayout

# Everything except the rules that map updates through a network (tested on their own below).
SYNTHETIC = [name for name in AGGREGATORS if name not in ("matrix_mapping", "xmam")]
ROBUST = [name for name in SYNTHETIC if name != "fedavg"]
NO_NOISE = {"flame": {"noise_lambda": 0.0}}


def max_score(report: AggregationReport, rows: torch.Tensor) -> float:
    return float(report.scores[rows].max())


def min_score(report: AggregationReport, rows: torch.Tensor) -> float:
    return float(report.scores[rows].min())


# ---------------------------------------------------------------- contract and bad input


def test_fedavg_equals_numpy_weighted_mean():
    gen = torch.Generator().manual_seed(1)
    updates = torch.randn(7, 300, generator=gen)
    counts = np.array([5, 1, 30, 7, 0, 12, 3])
    result, report = aggregate("fedavg", updates, counts)
    expected = np.average(updates.numpy().astype(np.float64), axis=0, weights=counts)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert report.weights.sum().item() == pytest.approx(1.0)
    assert report.kept.tolist() == [c > 0 for c in counts]


def test_fedavg_names_the_non_finite_client():
    updates = torch.randn(5, 40)
    updates[3, 7] = float("nan")
    with pytest.raises(ValueError, match="client update 3"):
        aggregate("fedavg", updates)


@pytest.mark.parametrize("name", SYNTHETIC)
def test_float32_in_float32_out(name):
    rnd = planted_round("sign_flip", n_benign=6, n_attack=2, dim=64)
    updates = rnd.updates.double()
    result, report = run_rule(name, updates, torch.arange(1, 9), rnd, **NO_NOISE.get(name, {}))
    assert result.dtype == torch.float32 and result.shape == (64,)
    assert isinstance(report, AggregationReport) and report.method
    assert report.kept.dtype == torch.bool and report.kept.shape == (8,)
    assert report.weights.shape == (8,) and report.non_finite.shape == (8,)
    assert bool(torch.isfinite(result).all())


@pytest.mark.parametrize("name", SYNTHETIC)
def test_bad_input_raises_clear_errors(name):
    context = full_context(5, 10)
    with pytest.raises(ValueError, match="empty client list"):
        run_rule(name, [], context=context)
    with pytest.raises(ValueError, match="empty client list"):
        run_rule(name, torch.zeros(0, 10), context=context)
    with pytest.raises(ValueError, match="n_clients, n_params"):
        run_rule(name, torch.zeros(10), context=context)
    with pytest.raises(ValueError, match="mismatched shapes"):
        run_rule(name, [torch.zeros(10), torch.zeros(11)], context=context)
    with pytest.raises(TypeError, match="floating point"):
        run_rule(name, torch.zeros(5, 10, dtype=torch.int64), context=context)
    with pytest.raises(ValueError, match="num_samples has 3 entries"):
        run_rule(name, torch.zeros(5, 10), [1, 2, 3], context=context)
    with pytest.raises(ValueError, match="non-negative"):
        run_rule(name, torch.zeros(5, 10), [1, 2, 3, -4, 5], context=context)


def test_too_few_clients_for_f():
    updates = torch.randn(6, 20)
    for name in ("krum", "multi_krum"):
        with pytest.raises(ValueError, match=r"n > 2f \+ 2 clients \(n >= 7 for f=2\), got n=6"):
            aggregate(name, updates, f=2)
        aggregate(name, updates, f=1)  # 6 > 4
        with pytest.raises(ValueError, match="f must be an integer"):
            aggregate(name, updates, f=-1)
    with pytest.raises(ValueError, match=r"n > 2f clients"):
        aggregate("trimmed_mean", updates, f=3)


def test_krum_hint_never_contradicts_itself():
    with pytest.raises(ValueError, match="needs at least 3 clients, whatever f") as err:
        aggregate("krum", torch.randn(2, 5), f=0)
    assert "at most f=0" not in str(err.value)
    with pytest.raises(ValueError, match="with 5 clients f can be at most 1"):
        aggregate("krum", torch.randn(5, 5), f=2)


def test_registry_and_aliases():
    assert get_aggregator("geometric_median") is AGGREGATORS["rfa"]
    assert get_aggregator("norm_clipping") is AGGREGATORS["ndc"]
    assert get_aggregator("sign") is AGGREGATORS["rsa"]
    with pytest.raises(ValueError, match="unknown aggregator 'bogus'"):
        aggregate("bogus", torch.zeros(3, 3))
    with pytest.raises(ValueError, match="did you mean 'multi_krum'"):
        aggregate("multi_krun", torch.zeros(3, 3))


def test_a_missing_declared_need_is_an_error_not_a_default():
    updates = torch.randn(6, 20)
    with pytest.raises(ValueError, match=r"'rsa' needs the server context \['round_index'\]"):
        aggregate("rsa", updates)
    with pytest.raises(ValueError, match=r"'flame' needs the server context \['global_params'"):
        aggregate("flame", updates, noise_lambda=0.0)
    with pytest.raises(ValueError, match=r"needs the server context \['layout'\]"):
        aggregate("flame", updates, global_params=torch.zeros(20))  # noise on by default
    with pytest.raises(ValueError, match="'fltrust' needs the server context"):
        aggregate("fltrust", updates)
    with pytest.raises(ValueError, match="server context, not options"):
        call_rule("rsa", updates, None, ServerContext(round_index=0), round_index=3)
    # With the need met, the value given is the one used (not a default of the function).
    _, report = aggregate("rsa", updates, round_index=7)
    assert report.details["round_index"] == 7


def test_rules_receive_exactly_the_context_they_declare():
    seen = {}

    @register_aggregator("_probe_rule", needs=("round_index",), uses=("client_ids",), replace=True)
    def probe(updates, num_samples=None, **kwargs):
        seen.update(kwargs)
        n = updates.shape[0]
        report = AggregationReport(
            "_probe_rule", torch.ones(n) / n, None, torch.zeros(n, dtype=bool)
        )
        return updates.mean(dim=0), report

    try:
        context = full_context(4, 3)
        call_rule("_probe_rule", torch.randn(4, 3), None, context, alpha=2)
        assert set(seen) == {"round_index", "client_ids", "alpha"}
        assert seen["client_ids"] == [0, 1, 2, 3] and seen["round_index"] == 0
        seen.clear()
        call_rule("_probe_rule", torch.randn(4, 3), None, ServerContext(round_index=5))
        assert seen == {"round_index": 5}  # an optional field the caller lacks is left out
        with pytest.raises(ValueError, match="already registered"):
            register_aggregator("_probe_rule")(probe)
        with pytest.raises(ValueError, match="unknown server context \\['weather'\\]"):
            register_aggregator("_bad_rule", needs=("weather",))
    finally:
        AGGREGATORS.pop("_probe_rule", None)


@pytest.mark.parametrize("name", SYNTHETIC)
def test_kept_means_positive_weight_in_every_rule(name):
    """One report builder: ``kept`` is derived from the weights, for every rule."""
    rnd = planted_round("sign_flip", n_benign=8, n_attack=4, dim=64)
    counts = torch.tensor([0.0] + [10.0] * 11)  # a client with no samples at all
    _, report = run_rule(name, rnd.updates, counts, rnd, **NO_NOISE.get(name, {}))
    assert torch.equal(report.kept, report.weights > 0)
    with pytest.raises(TypeError):  # nobody can hand the report a "kept" of their own
        AggregationReport("x", torch.zeros(2), None, torch.zeros(2, dtype=bool), kept=None)
    with pytest.raises(ValueError, match="screened"):  # nor give weight to a screened client
        AggregationReport("x", torch.ones(2), None, torch.tensor([True, False]))


def test_multi_krum_does_not_report_a_weightless_client_as_kept():
    updates = torch.randn(7, 30, generator=torch.Generator().manual_seed(0)) * 0.1
    updates[0] = updates[1:].mean(dim=0)  # the most central client: Krum selects it first
    counts = torch.tensor([0.0, 5, 5, 5, 5, 5, 5])
    _, report = aggregate("multi_krum", updates, counts, f=1)
    assert 0 in report.details["selected"]  # Krum-selected ...
    assert not bool(report.kept[0]) and report.weights[0] == 0  # ... but weightless: not kept
    assert report.num_kept == len(report.details["selected"]) - 1


def test_detection_rates_only_for_rules_that_select():
    rnd = planted_round("sign_flip", n_benign=8, n_attack=4, dim=64)
    for name in SYNTHETIC:
        _, report = run_rule(name, rnd.updates, None, rnd, **NO_NOISE.get(name, {}))
        rates = detection_rates(report, rnd.is_attacker)
        assert rates["applicable"] == AGGREGATORS[name].selects == report.selects, name
        if not report.selects:
            assert math.isnan(rates["tpr"]) and math.isnan(rates["fpr"]) and rates["tp"] is None
    assert {n for n in SYNTHETIC if not AGGREGATORS[n].selects} == {
        "fedavg",
        "median",
        "trimmed_mean",
        "ndc",
        "rfa",
        "rsa",
        "centered_clipping",
    }


def test_core_does_not_import_secretflow():
    code = "import sys, sf_ext.aggregators; sys.exit('secretflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


# ---------------------------------------------------------------- NaN/inf screening


@pytest.mark.parametrize("name", ROBUST)
def test_non_finite_updates_are_screened_and_reported(name):
    rnd = planted_round("nan")
    result, report = run_rule(name, rnd.updates, None, rnd, **NO_NOISE.get(name, {}))
    assert report.non_finite.tolist() == rnd.is_attacker.tolist()
    assert not bool(report.kept[rnd.is_attacker].any())
    assert bool((report.weights[rnd.is_attacker] == 0).all())
    assert bool(torch.isinf(report.scores[rnd.is_attacker]).all())
    assert bool(torch.isfinite(result).all())


@pytest.mark.parametrize("name", ROBUST)
def test_all_screened_gives_zero_update(name):
    updates = torch.full((5, 30), float("nan"))
    result, report = run_rule(name, updates, **NO_NOISE.get(name, {}))
    assert bool((result == 0).all()) and report.details["all_screened"]
    assert bool(report.non_finite.all()) and not bool(report.kept.any())


def test_float32_overflow_rows_are_screened():
    updates = planted_round("none", n_benign=6, n_attack=0, dim=100).updates
    updates[2] = 3e37  # finite values whose squared norm overflows float32
    result, report = aggregate("multi_krum", updates, f=1)
    assert report.details["overflow_rows"] == [2] and bool(report.non_finite[2])
    assert bool(torch.isfinite(result).all())


# ---------------------------------------------------------------- Krum / Multi-Krum


@pytest.mark.parametrize("attack", ATTACKS)
def test_krum_and_multi_krum_keep_only_benign(attack):
    rnd = planted_round(attack)
    _, krum_report = aggregate("krum", rnd.updates, f=N_ATTACK)
    (chosen,) = krum_report.details["selected"]
    assert not bool(rnd.is_attacker[chosen])
    result, report = aggregate("multi_krum", rnd.updates, f=N_ATTACK)
    assert report.kept.tolist() == (~rnd.is_attacker).tolist()
    torch.testing.assert_close(result, rnd.benign_mean, rtol=1e-5, atol=1e-6)
    rates = detection_rates(report, rnd.is_attacker)
    assert rates["tpr"] == 1.0 and rates["fpr"] == 0.0


def test_krum_scores_match_brute_force():
    gen = torch.Generator().manual_seed(3)
    updates = torch.randn(9, 50, generator=gen)
    f = 2
    points = updates.double().numpy()
    dist = ((points[:, None] - points[None]) ** 2).sum(-1)
    expected = np.array(
        [np.sort(np.delete(row, i))[: 9 - f - 2].sum() for i, row in enumerate(dist)]
    )
    result, report = aggregate("krum", updates, f=f)
    np.testing.assert_allclose(report.scores.numpy(), expected, rtol=1e-4)
    assert torch.equal(result, updates[int(np.argmin(expected))])


# ---------------------------------------------------------------- median / trimmed mean


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("name,options", [("median", {}), ("trimmed_mean", {"f": N_ATTACK})])
def test_coordinate_rules_stay_within_the_benign_range(attack, name, options):
    rnd = planted_round(attack)
    result, report = aggregate(name, rnd.updates, **options)
    low, high = rnd.benign.min(dim=0).values, rnd.benign.max(dim=0).values
    assert bool(((result >= low - 1e-6) & (result <= high + 1e-6)).all())
    assert report.weights.sum().item() == pytest.approx(1.0)
    assert max_score(report, ~rnd.is_attacker) < min_score(report, rnd.is_attacker)


def test_median_and_trimmed_mean_match_references(monkeypatch):
    # Tiny blocks: several column blocks, and a screened row inside them.
    monkeypatch.setattr(median_module, "SELECT_BLOCK_ELEMENTS", 64)
    gen = torch.Generator().manual_seed(5)
    updates = torch.randn(9, 101, generator=gen)
    updates[4, 10] = float("nan")
    finite = np.delete(updates.numpy(), 4, axis=0)  # 8 usable rows: even

    lower, report = aggregate("median", updates)
    np.testing.assert_array_equal(lower.numpy(), np.sort(finite, axis=0)[3])
    assert report.weights.sum().item() == pytest.approx(1.0) and report.weights[4] == 0
    middle, _ = aggregate("median", updates, midpoint=True)
    np.testing.assert_allclose(middle.numpy(), np.median(finite, axis=0), rtol=1e-6)
    trimmed, report = aggregate("trimmed_mean", updates, f=3)  # 3 - 1 screened = 2 per side
    assert report.details["trim"] == 2
    expected = np.sort(finite, axis=0)[2:6].mean(axis=0)
    np.testing.assert_allclose(trimmed.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert report.weights.sum().item() == pytest.approx(1.0)


# ---------------------------------------------------------------- NDC


@pytest.mark.parametrize("attack", ATTACKS)
def test_norm_clipping_bounds_every_update(attack):
    rnd = planted_round(attack)
    result, report = aggregate("ndc", rnd.updates, threshold=2.0)
    clip = torch.tensor(report.details["clip_factors"])
    assert float(result.norm()) <= 2.0 + 1e-5
    assert bool((clip[~rnd.is_attacker] == 1.0).all())  # benign norms are ~1.1 < 2
    attackers_used = rnd.is_attacker & ~report.non_finite
    assert bool((clip[attackers_used] < 1.0).all())
    clipped = rnd.updates.double() * clip[:, None]
    expected = clipped[~report.non_finite].mean(dim=0)
    torch.testing.assert_close(result.double(), expected, rtol=1e-4, atol=1e-6)
    if attack == "scaled":
        assert cosine(result, rnd.benign_mean) > 0.95


# ---------------------------------------------------------------- RFA


@pytest.mark.parametrize("attack", ATTACKS)
def test_geometric_median_resists_40_percent(attack):
    rnd = planted_round(attack)
    result, report = aggregate("rfa", rnd.updates)
    assert report.details["converged"] and 1 <= report.details["iterations"] <= 500
    assert float(report.weights[rnd.is_attacker].sum()) < 0.1
    # A 40 % group 100x further away moves the median by about the benign spread (~0.5), far
    # below what it does to the mean; the breakdown bound allows 2(1-p)/(1-2p) = 6x at p = 0.4.
    assert float((result - rnd.benign_mean).norm()) < 1.0
    if attack not in ("nan", "mixed"):  # the attack is strong: the plain mean lands far away
        assert float((rnd.updates.mean(dim=0) - rnd.benign_mean).norm()) > 1


def test_geometric_median_minimizes_sum_of_distances():
    gen = torch.Generator().manual_seed(7)
    points = torch.randn(15, 40, generator=gen) * torch.linspace(0.5, 3, 40)
    counts = torch.randint(1, 10, (15,), generator=gen)
    alpha = counts.double() / counts.sum()

    def objective(z):
        return float((alpha * (points.double() - z.double()).norm(dim=1)).sum())

    results = {}
    for solver in ("gram", "direct"):
        z, report = geometric_median(
            points, counts, nu=1e-9, eps=1e-12, max_iter=5000, solver=solver
        )
        assert report.details["iterations"] > 1
        results[solver] = z
        best = objective(z)
        for _ in range(40):
            step = torch.randn(40, generator=gen)
            assert best <= objective(z + 1e-2 * step / step.norm()) + 1e-9
    torch.testing.assert_close(results["gram"], results["direct"], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- RSA


@pytest.mark.parametrize("attack", ATTACKS)
def test_sign_aggregation_neutralizes_magnitude(attack, monkeypatch):
    monkeypatch.setattr(sign_module, "SIGN_BLOCK_ELEMENTS", 4000)  # several blocks
    rnd = planted_round(attack)
    result, report = aggregate("rsa", rnd.updates, round_index=10)
    assert report.details["step"] != aggregate("rsa", rnd.updates, round_index=0)[1].details["step"]
    step = 5e-5 * 0.998**10
    assert report.details["step"] == pytest.approx(step) == rsa_step(10)
    usable = int((~report.non_finite).sum())
    assert float(result.abs().max()) <= usable * step * (1 + 1e-6)
    expected = torch.sign(rnd.updates[~report.non_finite]).sum(dim=0) * step
    torch.testing.assert_close(result, expected.float())
    if attack in ("sign_flip", "scaled", "nan"):
        agreement = float((torch.sign(result) == torch.sign(rnd.benign_mean)).double().mean())
        assert agreement > 0.75
    if attack == "sign_flip":
        assert max_score(report, ~rnd.is_attacker) < min_score(report, rnd.is_attacker)


# ---------------------------------------------------------------- FLAME


@pytest.mark.parametrize("attack", ATTACKS)
def test_flame_drops_or_bounds_attackers(attack):
    rnd = planted_round(attack)
    result, report = aggregate(
        "flame", rnd.updates, global_params=rnd.global_params, noise_lambda=0.0
    )
    details = report.details
    usable = int((~report.non_finite).sum())
    assert details["min_cluster_size"] == usable // 2 + 1 and details["cluster_on"] == "models"
    assert report.num_kept >= details["min_cluster_size"]
    assert details["kept_fraction"] == pytest.approx(report.num_kept / usable)
    # The average of updates clipped to the median norm cannot exceed the median norm.
    assert float(result.norm()) <= details["median_norm"] * (1 + 1e-5)
    assert cosine(result, rnd.benign_mean) > 0.95
    for row, kind in enumerate(rnd.kinds):
        if kind != "benign":
            # Models (global + update) separate even the x10-scaled attackers by direction.
            assert not bool(report.kept[row]), kind


def test_flame_median_is_over_all_usable_clients_and_the_mean_is_unweighted():
    rnd = planted_round("sign_flip")
    counts = torch.arange(1, 21, dtype=torch.float64)
    result, report = aggregate(
        "flame", rnd.updates, counts, global_params=rnd.global_params, noise_lambda=0.0
    )
    norms = rnd.updates.double().norm(dim=1)
    assert report.details["median_norm"] == pytest.approx(float(np.median(norms.numpy())))
    clip = torch.clamp(report.details["median_norm"] / norms, max=1.0)
    kept = report.kept
    expected = (rnd.updates.double()[kept] * clip[kept, None]).mean(dim=0)
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-7)
    weighted, _ = aggregate(
        "flame",
        rnd.updates,
        counts,
        global_params=rnd.global_params,
        noise_lambda=0.0,
        weight_by_samples=True,
    )
    share = counts[kept] / counts[kept].sum()
    expected_w = (rnd.updates.double()[kept] * (clip[kept] * share)[:, None]).sum(dim=0)
    torch.testing.assert_close(weighted.double(), expected_w, rtol=1e-5, atol=1e-7)


def test_flame_update_clustering_is_an_option_that_misses_scaled_attackers():
    rnd = planted_round("scaled")
    _, by_model = aggregate("flame", rnd.updates, global_params=rnd.global_params, noise_lambda=0.0)
    _, by_update = aggregate("flame", rnd.updates, cluster_on="updates", noise_lambda=0.0)
    assert detection_rates(by_model, rnd.is_attacker)["tpr"] == 1.0
    # Scaled updates point where the benign ones do: cosine on updates cannot see them.
    assert detection_rates(by_update, rnd.is_attacker)["tpr"] <= 0.5


def test_flame_reports_its_benign_cost():
    """FLAME's known cost: a strict-majority cluster drops benign clients even with no attack."""
    rnd = planted_round("none", n_benign=20, n_attack=0)
    _, report = aggregate("flame", rnd.updates, global_params=rnd.global_params, noise_lambda=0.0)
    rates = detection_rates(report, rnd.is_attacker)
    assert report.details["kept_fraction"] == pytest.approx(rates["benign_kept_fraction"])
    # Only the definitional bound is asserted: the kept cluster is a strict majority.
    assert 0.5 < report.details["kept_fraction"] <= 1.0


def _flame_layout():
    return ParamLayout(
        names=(
            "conv.weight",
            "conv.bias",
            "bn.weight",
            "bn.bias",
            "bn.running_mean",
            "bn.running_var",
            "fc.weight",
            "fc.bias",
        ),
        shapes=((8, 1, 3, 3), (8,), (8,), (8,), (8,), (8,), (10, 72), (10,)),
    )


@pytest.mark.parametrize("noise_on", ["parameters", "weights"])
def test_flame_relative_noise_per_tensor(noise_on):
    layout = _flame_layout()
    rnd = planted_round("none", n_benign=10, n_attack=0, dim=layout.num_params)
    global_params = torch.randn(layout.num_params, generator=torch.Generator().manual_seed(2))
    clean, _ = aggregate("flame", rnd.updates, global_params=global_params, noise_lambda=0.0)

    def noised(seed, **extra):
        return aggregate(
            "flame",
            rnd.updates,
            global_params=global_params,
            layout=layout,
            generator=torch.Generator().manual_seed(seed),
            noise_on=noise_on,
            **extra,
        )

    result, report = noised(0, noise_lambda=0.05)
    assert torch.equal(result, noised(0, noise_lambda=0.05)[0])
    assert not torch.equal(result, noised(1, noise_lambda=0.05)[0])
    assert noised(0)[1].details["noise_lambda"] == 1.2e-5  # FLPoison's default level
    median_norm = report.details["median_norm"]
    for (name, span), shape in zip(layout.slices().items(), layout.shapes):
        diff = result[span] - clean[span]
        noised_here = "running" not in name and (noise_on == "parameters" or len(shape) > 1)
        if not noised_here:
            assert bool((diff == 0).all()), name
            assert name not in report.details["noise_std"]
        else:
            expected = 0.05 * median_norm * float((global_params[span] + clean[span]).std())
            assert report.details["noise_std"][name] == pytest.approx(expected, rel=1e-5)
            if span.stop - span.start > 50:
                assert float(diff.std()) == pytest.approx(expected, rel=0.25)


def test_flame_paper_noise_is_absolute():
    layout = _flame_layout()
    rnd = planted_round("none", n_benign=10, n_attack=0, dim=layout.num_params)
    _, report = aggregate(
        "flame",
        rnd.updates,
        global_params=torch.zeros(layout.num_params),
        layout=layout,
        noise="paper",
    )
    assert report.details["noise_lambda"] == 0.001  # the paper's lambda for images
    sigma = 0.001 * report.details["median_norm"]
    assert set(report.details["noise_std"]) == {n for n in layout.names if "running" not in n}
    assert all(v == pytest.approx(sigma) for v in report.details["noise_std"].values())


# ---------------------------------------------------------------- helpers


def test_weighted_row_sum_reads_only_weighted_rows():
    updates = torch.randn(7, 33)
    updates[[1, 4]] = float("nan")
    coeffs = torch.tensor([0.5, 0.0, 0.25, 1.0, 0.0, 0.0, 2.0], dtype=torch.float64)
    assert _linalg.contiguous_runs([0, 2, 3, 6]) == [(0, 1), (2, 4), (6, 7)]
    expected = (coeffs[:, None] * updates.double().nan_to_num(0.0)).sum(dim=0)
    result = _linalg.weighted_row_sum(updates, coeffs).double()
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6)


def test_detection_rates():
    report = AggregationReport(
        method="x",
        weights=torch.tensor([0.5, 0.0, 0.5, 0.0], dtype=torch.float64),
        scores=None,
        non_finite=torch.zeros(4, dtype=torch.bool),
        selects=True,
    )
    assert report.kept.tolist() == [True, False, True, False]
    rates = detection_rates(report, [False, True, True, False])
    assert (rates["tp"], rates["fp"], rates["fn"], rates["tn"]) == (1, 1, 1, 1)
    assert rates["tpr"] == 0.5 and rates["fpr"] == 0.5
    assert math.isnan(detection_rates(report, [False] * 4)["tpr"])


# ---------------------------------------------------------------- matrix mapping (real training)


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def digits_clients():
    """20 clients, each with 400 random digits, training a shared initial MLP for 20 steps."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.data / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    labels = torch.tensor(digits.target)
    torch.manual_seed(0)
    start = _mlp()
    layout = ParamLayout.from_module(start)
    start_flat = layout.flatten(start.state_dict())
    gen = torch.Generator().manual_seed(0)
    shards = [torch.randperm(len(images), generator=gen)[:400] for _ in range(20)]

    def local_update(client: int, flip_labels: bool = False) -> torch.Tensor:
        model = _mlp()
        model.load_state_dict(start.state_dict())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        x, y = images[shards[client]], labels[shards[client]]
        y = 9 - y if flip_labels else y
        for _ in range(20):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        return layout.flatten(model.state_dict()) - start_flat

    honest = torch.stack([local_update(i) for i in range(20)])
    return honest, local_update


def _attacked(honest, local_update, attack, n_attack):
    updates = honest.clone()
    attackers = torch.arange(len(updates)) >= len(updates) - n_attack
    for row in attackers.nonzero().flatten().tolist():
        if attack == "sign_flip":
            updates[row] = -4.0 * honest[row]
        elif attack == "same_value":
            updates[row] = 100.0
        elif attack == "label_flip":
            updates[row] = local_update(row, flip_labels=True)
        elif attack == "nan":
            updates[row, row] = float("nan")
    return updates, attackers


@pytest.mark.parametrize(
    "attack,n_attack",
    [("sign_flip", 5), ("label_flip", 5), ("nan", 8)],
)
def test_matrix_mapping_drops_attackers(digits_clients, attack, n_attack):
    updates, attackers = _attacked(*digits_clients, attack, n_attack)
    counts = torch.arange(20) + 50
    result, report = matrix_mapping(updates, counts, model=_mlp(), input_shape=(1, 8, 8))
    rates = detection_rates(report, attackers)
    assert rates["tpr"] == 1.0, rates
    expected = (report.weights[:, None] * updates.double().nan_to_num(0.0)).sum(dim=0)
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-7)
    if attack == "nan":
        assert report.non_finite.tolist() == attackers.tolist()
        # What remains is one homogeneous benign group, about half of which scores below the mean.
        assert rates["benign_kept_fraction"] >= 0.25, rates
    else:
        assert rates["benign_kept_fraction"] >= 0.75, rates


def test_matrix_mapping_reports_its_benign_cost(digits_clients):
    """Keeping scores below the mean drops part of a benign-only round, like FLAME's majority."""
    honest, _ = digits_clients
    _, report = matrix_mapping(honest, model=_mlp(), input_shape=(1, 8, 8))
    kept = report.num_kept / 20
    assert 0.0 < kept < 1.0
    print(f"matrix mapping kept {kept:.0%} of 20 benign clients")


@pytest.mark.parametrize("attack", ["sign_flip", "same_value"])
def test_xmam_variant_drops_40_percent_attackers(digits_clients, attack):
    updates, attackers = _attacked(*digits_clients, attack, 8)
    result, report = aggregate("xmam", updates, model=_mlp(), input_shape=(1, 8, 8))
    assert report.method == "xmam"
    rates = detection_rates(report, attackers)
    assert rates["tpr"] == 1.0 and rates["benign_kept_fraction"] >= 0.75, rates
    # XMAM averages the kept updates without sample weights.
    torch.testing.assert_close(result, updates[report.kept].mean(dim=0), rtol=1e-5, atol=1e-6)
    if attack == "same_value":
        # All-equal weights give equal logits: the output is exactly uniform.
        outputs = torch.tensor([report.details["outputs"][i] for i in range(20) if attackers[i]])
        torch.testing.assert_close(outputs, torch.full_like(outputs, 0.1))


def test_identical_updates_map_to_identical_outputs_wherever_they_sit(digits_clients):
    honest, _ = digits_clients
    extreme = torch.full((honest.shape[1],), 100.0)
    # Identical extreme rows at different offsets of a larger buffer (different alignment).
    buffer = torch.randn(honest.shape[1] * 6 + 3)
    rows = torch.stack([honest[0], honest[1], extreme, honest[2], extreme, extreme])
    strided = buffer[3:].view(6, -1)
    strided.copy_(rows)
    outputs = map_updates(_mlp(), strided[[2, 4, 5]], (1, 8, 8))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[1], outputs[2])
    again = map_updates(_mlp(), rows, (1, 8, 8))
    assert torch.equal(again[2], outputs[0]) and torch.equal(again[4], again[5])


def test_paper_rule_weights_by_samples_and_xmam_does_not(digits_clients):
    honest, _ = digits_clients
    counts = torch.arange(20, dtype=torch.float64) + 1
    _, paper = matrix_mapping(honest, counts, model=_mlp(), input_shape=(1, 8, 8))
    kept = paper.kept
    torch.testing.assert_close(paper.weights[kept], counts[kept] / counts[kept].sum())
    _, unweighted = matrix_mapping(
        honest, counts, model=_mlp(), input_shape=(1, 8, 8), weight_by_samples=False
    )
    assert torch.allclose(
        unweighted.weights[kept],
        torch.full((int(kept.sum()),), 1 / int(kept.sum()), dtype=torch.float64),
    )
    with pytest.raises(ValueError, match="exact=True"):
        matrix_mapping(honest, model=_mlp(), input_shape=(1, 8, 8), exact=True)


def test_apply_softmax_false_maps_the_raw_logits(digits_clients):
    honest, _ = digits_clients
    logits = map_updates(_mlp(), honest[:3], (1, 8, 8), apply_softmax=False)
    probs = map_updates(_mlp(), honest[:3], (1, 8, 8))
    torch.testing.assert_close(torch.softmax(logits, dim=1), probs)
    assert not torch.allclose(logits.sum(dim=1), torch.ones(3))


def test_mapping_equals_loading_the_update_into_the_model(digits_clients):
    honest, _ = digits_clients
    model = _mlp()
    outputs = map_updates(model, honest[:4], (1, 8, 8))
    assert outputs.shape == (4, 10) and outputs.dtype == torch.float32
    layout = ParamLayout.from_module(model)
    for row in range(4):
        reference = _mlp()
        reference.load_state_dict(layout.unflatten(honest[row]))
        expected = torch.softmax(reference(torch.ones(1, 1, 8, 8)), dim=1)[0]
        torch.testing.assert_close(outputs[row].float(), expected, rtol=1e-5, atol=1e-6)


def _batch_norm_mlp():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)
    )


def test_mapping_keeps_the_module_buffers_and_mode():
    model = _batch_norm_mlp()
    model.train()
    layout = ParamLayout.from_module(model)
    updates = torch.randn(5, layout.num_params, generator=torch.Generator().manual_seed(4))
    outputs = map_updates(model, updates, (16,))
    assert model.training and bool(torch.isfinite(outputs).all())
    reference = _batch_norm_mlp()
    state = layout.unflatten(updates[2])
    for name in ("2.running_mean", "2.running_var", "2.num_batches_tracked"):
        state[name] = model.state_dict()[name]
    reference.load_state_dict(state)
    expected = torch.softmax(reference.eval()(torch.ones(1, 16)), dim=1)[0]
    torch.testing.assert_close(outputs[2].float(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="layout has"):
        matrix_mapping(updates[:, :-1], model=model, input_shape=(16,))


# ---------------------------------------------------------------- option defaults, by value


def test_trimmed_mean_default_trims_ten_percent_per_side():
    gen = torch.Generator().manual_seed(8)
    updates = torch.randn(20, 50, generator=gen)
    result, report = aggregate("trimmed_mean", updates)
    assert report.details["trim"] == 2  # int(0.1 * 20)
    expected = np.sort(updates.numpy(), axis=0)[2:18].mean(axis=0)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_multi_krum_default_m_is_n_minus_f_and_m_is_honoured():
    gen = torch.Generator().manual_seed(9)
    updates = torch.randn(11, 30, generator=gen)
    _, report = aggregate("multi_krum", updates, f=3)
    assert report.details["m"] == 8 and report.num_kept == 8
    _, three = aggregate("multi_krum", updates, f=3, m=3)
    assert three.details["m"] == 3 and three.num_kept == 3
    # The three kept are the three lowest Krum scores.
    order = torch.argsort(report.scores)[:3].sort().values.tolist()
    assert three.kept.nonzero().flatten().tolist() == order


def test_rfa_stops_at_max_iter_and_says_it_did_not_converge():
    rnd = planted_round("sign_flip")
    _, capped = geometric_median(rnd.updates, max_iter=1, eps=1e-12)
    assert capped.details["iterations"] == 1 and capped.details["converged"] is False
    _, full = geometric_median(rnd.updates, eps=1e-12, max_iter=500)
    assert full.details["iterations"] > 1 and full.details["converged"] is True


def test_mean_over_keepers_is_the_weighted_mean_of_the_clients_that_kept_each_coordinate():
    from sf_ext.aggregators.masking import mean_over_keepers

    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(5, 4, 3, generator=gen, dtype=torch.float64)
    masks = torch.rand(5, 4, 3, generator=gen) > 0.5
    masks[:, 0, 0] = False  # nobody kept it
    shares = torch.tensor([1.0, 3.0, 0.5, 2.0, 7.0])
    out = mean_over_keepers(rows * masks, masks, shares)
    for j in range(4):
        for k in range(3):
            keepers = masks[:, j, k]
            if not keepers.any():
                assert out[j, k] == 0
                continue
            s = shares[keepers].double()
            expected = (s * rows[keepers, j, k]).sum() / s.sum()
            assert out[j, k] == pytest.approx(float(expected), rel=1e-12)
    # No masks: the weighted mean; no shares: equal weights.
    assert torch.allclose(
        mean_over_keepers(rows, None, shares),
        (shares[:, None, None].double() * rows).sum(0) / shares.sum(),
    )
    assert torch.allclose(mean_over_keepers(rows, None), rows.mean(0))

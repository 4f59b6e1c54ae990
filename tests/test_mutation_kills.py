"""Behaviour the mutation check found unpinned: each test fails on a planted bug that the other
fast tests let through (``benchmarks/mutation_check.py``; the mutants are those of
``experiments/mutation/before/report.md`` and ``after/results.csv``, referred to here as
``file:line  old -> new``; ``experiments/mutation/README.md`` explains the ones left).

The tests assert what the code promises (values from definitions, closed forms or a direct
computation), not how it is written.
"""

import math
import statistics

import numpy as np
import pytest
import torch
from _rounds import (  # noqa: E402  (tests/ on sys.path)
    adaptive_mm_case,
    full_context,
    planted_round,
    run_rule,
)

from sf_ext.aggregators import (
    AGGREGATORS,
    AggregationReport,
    _linalg,
    aggregate,
    get_rule,
    register_aggregator,
)
from sf_ext.aggregators._linalg import weighted_row_sum
from sf_ext.aggregators.flame import flame, majority_cluster
from sf_ext.aggregators.foolsgold import foolsgold_weights
from sf_ext.aggregators.masking import (
    coordinatewise_over_keepers,
    effective_shares,
    mask_aware_update,
)
from sf_ext.aggregators.matrix_mapping import anomaly_scores, map_updates, xmam_select
from sf_ext.aggregators.sign import rsa_step, sign_aggregate
from sf_ext.aggregators.signguard import sign_features
from sf_ext.attacks.adaptive import adaptive_matrix_mapping
from sf_ext.attacks.fang import fang_krum, fang_trim
from sf_ext.attacks.untargeted import (
    _search_gamma,
    gaussian_noise,
    inner_product_manipulation,
    lie_z_max,
    little_is_enough,
    min_max,
    min_sum,
    same_value,
    sign_flip,
)
from sf_ext.params import ParamLayout
from sf_ext.pruning import magnitude_prune, masked_tensors, validate_prune_params

SYNTHETIC = [name for name in AGGREGATORS if name not in ("matrix_mapping", "xmam")]
NO_NOISE = {"flame": {"noise_lambda": 0.0}}


def _reference_cosine_distances(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    n = x.shape[0]
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            ni, nj = float(x[i].norm()), float(x[j].norm())
            if i != j:
                out[i, j] = 1.0 if ni == 0 or nj == 0 else 1.0 - float(x[i] @ x[j]) / (ni * nj)
    return out


# ---------------------------------------------------------------------------------------------
# Shared linear algebra and input checks


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_cosine_distances_do_not_depend_on_the_vectors_lengths(scale):
    """_linalg.py:46 ``denom > 0 -> denom > 1`` (short vectors), :47 ``clamp(0, 2) -> (0, 1.6)``."""
    x = torch.tensor([[3.0, 4.0], [-3.0, -4.0], [4.0, -3.0], [0.0, 0.0], [1.0, 1.0]]) * scale
    dist = _linalg.cosine_distances(_linalg.gram_matrix(x))
    torch.testing.assert_close(dist, _reference_cosine_distances(x), rtol=0, atol=1e-6)
    assert float(dist[0, 1]) == pytest.approx(2.0)  # opposite directions
    assert float(dist[0, 2]) == pytest.approx(1.0)  # orthogonal
    assert float(dist[0, 3]) == 1.0  # a zero vector has no direction


def test_blocked_float64_gram_matches_a_direct_product(monkeypatch):
    """The column-blocked Gram matrix of the models equals the one-shot float64 product."""
    gen = torch.Generator().manual_seed(3)
    updates = torch.randn(6, 101, generator=gen)
    offset = torch.randn(101, generator=gen) * 5
    rows = torch.tensor([0, 2, 3, 5])
    models = (updates[rows] + offset).double()
    expected = models @ models.T
    monkeypatch.setattr(_linalg, "GRAM64_BLOCK_ELEMENTS", 4 * 7)  # blocks of 7 columns
    torch.testing.assert_close(_linalg.gram_matrix64(updates, rows, offset), expected)
    monkeypatch.undo()
    torch.testing.assert_close(_linalg.gram_matrix64(updates, rows, offset), expected)


def test_a_list_of_client_vectors_is_the_same_round_as_their_matrix():
    """_validate.py:42 ``rows[0].dim() != 1 -> != 2`` refused every list of flat vectors."""
    gen = torch.Generator().manual_seed(0)
    matrix = torch.randn(5, 12, generator=gen)
    counts = [1, 2, 3, 4, 5]
    for rows in ([r for r in matrix], [r.numpy() for r in matrix]):
        for name in ("fedavg", "median", "multi_krum"):
            expected, _ = aggregate(name, matrix, counts)
            result, _ = aggregate(name, rows, counts)
            torch.testing.assert_close(result, expected)
    with pytest.raises(ValueError, match="flat vector"):
        aggregate("fedavg", [torch.zeros(2, 3), torch.zeros(2, 3)])


@pytest.mark.parametrize("name", ["fedavg", "multi_krum", "ndc", "rfa", "flame", "shield"])
def test_fractional_sample_counts_weigh_like_the_integers_they_scale(name):
    """Sample weights that sum to less than one (fractions, as SecretFlow's weights can be) are
    accepted and weigh exactly like integer counts in the same ratio.

    _validate.py:84 ``counts.sum() <= 0 -> <= 1`` refused them; :120 ``total > 0 -> > 1`` gave
    equal shares instead of the weighted ones.
    """
    rnd = planted_round("sign_flip", n_benign=8, n_attack=3, dim=64)
    counts = torch.arange(1.0, 12.0)
    options = {"weight_by_samples": True} if name in ("flame", "shield") else {}
    options.update(NO_NOISE.get(name, {}))
    whole, whole_report = run_rule(name, rnd.updates, counts, rnd, **options)
    fraction, fraction_report = run_rule(name, rnd.updates, counts / 1000.0, rnd, **options)
    torch.testing.assert_close(fraction, whole)
    torch.testing.assert_close(fraction_report.weights, whole_report.weights)
    if name == "rfa":
        return  # Weiszfeld coefficients: not proportional to the counts
    # The weights really follow the counts: kept clients' weights are in their ratio (clip
    # factors aside).
    clip = torch.as_tensor(
        whole_report.details.get("clip_factors", [1.0] * 11), dtype=torch.float64
    )
    kept = whole_report.kept.nonzero().flatten()
    share = whole_report.weights[kept] / clip[kept]
    torch.testing.assert_close(share / share.sum(), counts[kept].double() / counts[kept].sum())


def test_equal_shares_when_every_selected_client_has_no_samples():
    """Multi-Krum whose selected clients all report 0 samples averages them equally (the
    documented fallback), rather than scaling the result by the number selected.

    _validate.py:123 ``mask / max(count, 1) -> mask * max(count, 1)`` and ``-> / max(count, 2)``.
    """
    gen = torch.Generator().manual_seed(1)
    updates = torch.randn(7, 20, generator=gen) * 0.1
    updates[5:] += 50.0  # two far-away clients, the only ones with samples
    counts = torch.tensor([0.0, 0, 0, 0, 0, 9, 9])
    for m in (1, 3):
        result, report = aggregate("multi_krum", updates, counts, f=1, m=m)
        chosen = report.details["selected"]
        assert len(chosen) == m and max(chosen) < 5
        torch.testing.assert_close(report.weights[chosen], torch.full((m,), 1.0 / m).double())
        torch.testing.assert_close(result, updates[chosen].mean(dim=0))


@pytest.mark.parametrize("bad", [1.5, True, 2.0, "1"])
def test_integer_options_refuse_floats_and_booleans(bad):
    """_validate.py:127 ``isinstance(bool) or not isinstance(int) -> and``: 1.5 passed as f=1."""
    with pytest.raises((ValueError, TypeError), match="must be an integer"):
        aggregate("krum", torch.randn(9, 4), f=bad)
    with pytest.raises((ValueError, TypeError), match="must be an integer"):
        aggregate("multi_krum", torch.randn(9, 4), m=bad)


@pytest.mark.parametrize("name", SYNTHETIC)
def test_reports_say_whether_the_rule_selects_even_when_all_is_screened(name):
    """The report's ``selects`` is the registered contract, also for a round of NaN updates.

    _validate.py:138 ``nothing_usable(selects=False) -> True``: the blending rules' all-screened
    reports claimed to select.
    """
    rnd = planted_round("sign_flip", n_benign=6, n_attack=2, dim=32)
    _, report = run_rule(name, rnd.updates, None, rnd, **NO_NOISE.get(name, {}))
    assert report.selects == AGGREGATORS[name].selects
    if name == "fedavg":
        return  # no screening: NaN is an error
    nan_round = torch.full((8, 32), float("nan"))
    _, report = run_rule(name, nan_round, None, rnd, **NO_NOISE.get(name, {}))
    assert report.details.get("all_screened") is True
    assert report.selects == AGGREGATORS[name].selects


@pytest.mark.parametrize(
    "weights", [[-0.1, 1.1], [float("nan"), 1.0], [float("inf"), 0.0], [-1.0, float("nan")]]
)
def test_a_report_refuses_negative_or_non_finite_weights(weights):
    """report.py:47 ``not finite or negative -> and`` let a negative weight through."""
    with pytest.raises(ValueError, match="finite and >= 0"):
        AggregationReport("x", torch.tensor(weights), None, torch.zeros(2, dtype=torch.bool))


def test_registering_a_taken_name_is_an_error_unless_replacing():
    """registry.py:107 ``replace=False -> True`` let a plugin silently replace a built-in rule."""
    before = AGGREGATORS["fedavg"]
    with pytest.raises(ValueError, match="already registered"):
        register_aggregator("fedavg")(lambda updates, num_samples=None: None)
    with pytest.raises(ValueError, match="already registered"):
        register_aggregator("my_rule", aliases=("cc",))(lambda updates, num_samples=None: None)
    assert AGGREGATORS["fedavg"] is before and "my_rule" not in AGGREGATORS


def test_linear_is_declared_exactly_by_the_rules_whose_result_is_weights_times_updates():
    """``linear`` (what mask-aware callers renormalize by) holds for a rule iff its result is
    ``report.weights @ updates``; registering without ``linear=`` means linear.

    registry.py:105 ``linear: bool = True -> False`` made every rule registered without the
    flag non-linear.
    """
    rnd = planted_round("sign_flip", n_benign=8, n_attack=3, dim=64)
    counts = torch.arange(1.0, 12.0)
    for name in SYNTHETIC:
        context = full_context(11, 64, rnd)  # fresh state: centered clipping starts at 0
        result, report = run_rule(
            name, rnd.updates, counts, context=context, **NO_NOISE.get(name, {})
        )
        combination = report.weights.float() @ rnd.updates
        is_combination = bool(torch.allclose(result, combination, rtol=1e-4, atol=1e-6))
        assert get_rule(name).linear == is_combination, name
    assert {n for n in SYNTHETIC if not get_rule(n).linear} == {
        "median",
        "trimmed_mean",
        "rsa",
        "bulyan",
    }


# ---------------------------------------------------------------------------------------------
# Krum


def _brute_force_krum_scores(updates: torch.Tensor, f: int) -> np.ndarray:
    points = updates.double().numpy()
    n = points.shape[0]
    dist = ((points[:, None] - points[None]) ** 2).sum(-1)
    return np.array([np.sort(np.delete(row, i))[: n - f - 2].sum() for i, row in enumerate(dist)])


@pytest.mark.parametrize("n,f", [(3, 0), (4, 0), (5, 1), (6, 1), (7, 2)])
def test_krum_scores_are_the_definition_down_to_three_clients(n, f):
    """Scores sum the ``n - f - 2`` nearest squared distances, also when that is 1 neighbour.

    krum.py:72 ``neighbours < 1 -> <= 1`` summed two neighbours for n = 3.
    """
    updates = torch.randn(n, 6, generator=torch.Generator().manual_seed(n))
    expected = _brute_force_krum_scores(updates, f)
    result, report = aggregate("krum", updates, f=f)
    np.testing.assert_allclose(report.scores.numpy(), expected, rtol=1e-5)
    assert torch.equal(result, updates[int(np.argmin(expected))])


@pytest.mark.parametrize("n", [3, 4])
def test_krum_default_f_for_three_and_four_clients_is_zero(n):
    """The default ``f`` is the most Krum tolerates: ``(n - 3) // 2``, i.e. 0 below 5 clients.

    krum.py:34 ``max(..., 0) -> max(..., 1)`` made the default refuse 3 and 4 clients.
    """
    updates = torch.randn(n, 6, generator=torch.Generator().manual_seed(0))
    for name in ("krum", "multi_krum"):
        _, report = aggregate(name, updates)
        assert report.details["f"] == 0
    _, report = aggregate("multi_krum", updates)
    assert report.num_kept == n  # m = n - f = n


# ---------------------------------------------------------------------------------------------
# Median and trimmed mean


@pytest.mark.parametrize(
    "name,options",
    [
        ("median", {}),
        ("median", {"midpoint": True}),
        ("trimmed_mean", {}),
        ("trimmed_mean", {"f": 2}),
    ],
)
def test_coordinate_rules_score_each_client_by_its_distance_to_the_result(name, options):
    """``scores[i] = |u_i - result|`` and the weights (coordinate shares) sum to one.

    median.py:47 ``- 2.0 * dots -> + / 1.6 * / 2.0 /`` in the distance; :107 ``picks / (2.0 *
    d) -> / (2.0 / d)`` in the midpoint median's shares.
    """
    gen = torch.Generator().manual_seed(4)
    updates = torch.randn(10, 40, generator=gen) + 0.5
    result, report = aggregate(name, updates, **options)
    expected = (updates.double() - result.double()).norm(dim=1)
    torch.testing.assert_close(report.scores, expected, rtol=1e-5, atol=1e-6)
    assert float(report.weights.sum()) == pytest.approx(1.0)


def test_midpoint_median_is_the_textbook_median():
    updates = torch.tensor([[1.0, 8.0], [2.0, 6.0], [4.0, 2.0], [10.0, 0.0]])
    result, report = aggregate("median", updates, midpoint=True)
    torch.testing.assert_close(result, torch.tensor([3.0, 4.0]))
    # Each coordinate's value comes from two clients, half each.
    torch.testing.assert_close(report.weights, torch.tensor([0.0, 0.5, 0.5, 0.0]).double())


def test_trim_ratio_zero_is_the_plain_mean():
    """median.py:144 ``0.0 <= trim_ratio -> 0.0 < trim_ratio`` refused a ratio of 0."""
    updates = torch.randn(6, 9, generator=torch.Generator().manual_seed(2))
    result, report = aggregate("trimmed_mean", updates, trim_ratio=0.0)
    torch.testing.assert_close(result, updates.mean(dim=0))
    assert report.details["trim"] == 0
    with pytest.raises(ValueError, match="trim_ratio"):
        aggregate("trimmed_mean", updates, trim_ratio=0.5)


def test_krum_refuses_too_many_byzantine_clients_and_accepts_the_most_it_tolerates():
    """``n > 2f + 2`` is the bound: 7 clients tolerate f = 2, not f = 3.

    krum.py:41 ``2 * f + 2 -> 2 * f - 2`` accepted f = 3 for 7 clients.
    """
    updates = torch.randn(7, 5, generator=torch.Generator().manual_seed(5))
    for name in ("krum", "multi_krum"):
        _, report = aggregate(name, updates, f=2)
        assert report.details["f"] == 2
        with pytest.raises(ValueError, match=r"n > 2f \+ 2"):
            aggregate(name, updates, f=3)


@pytest.mark.parametrize("bad", [-1, -3])
def test_krum_refuses_a_negative_f(bad):
    """_validate.py:127 ``or value < minimum -> and``: a negative integer passed the check."""
    with pytest.raises(ValueError, match="must be an integer"):
        aggregate("krum", torch.randn(9, 4), f=bad)


def test_krum_result_is_one_update_with_all_the_weight():
    """Krum returns one client's update unchanged and reports a one-hot weight vector.

    krum.py:106 ``weights[chosen] = 1.0 -> 0.8``.
    """
    gen = torch.Generator().manual_seed(6)
    updates = torch.randn(9, 8, generator=gen)
    updates[7:] *= 40.0
    result, report = aggregate("krum", updates, f=2)
    (chosen,) = report.details["selected"]
    assert chosen < 7
    expected = torch.zeros(9, dtype=torch.float64)
    expected[chosen] = 1.0
    torch.testing.assert_close(report.weights, expected)
    torch.testing.assert_close(result, updates[chosen])
    torch.testing.assert_close(report.weights.float() @ updates, result)


def test_multi_krum_averages_n_minus_f_updates_by_default():
    """``m`` defaults to ``n - f``: 9 clients, f = 3 -> the 6 best-scored updates.

    krum.py:145 ``n_usable - f_eff -> n_usable + f_eff`` averaged every client.
    """
    gen = torch.Generator().manual_seed(7)
    updates = torch.randn(9, 10, generator=gen)
    updates[[2, 5, 8]] += 30.0  # three far-away clients
    result, report = aggregate("multi_krum", updates, f=3)
    assert report.details["m"] == 6
    assert report.details["selected"] == [0, 1, 3, 4, 6, 7]
    torch.testing.assert_close(result, updates[[0, 1, 3, 4, 6, 7]].mean(dim=0))
    # With two screened (NaN) clients f_effective = 1 and m = 7 - 1 over the usable ones.
    updates[[2, 5], 0] = float("nan")
    _, report = aggregate("multi_krum", updates, f=3)
    assert report.details["f_effective"] == 1
    assert report.details["m"] == 6


# ---------------------------------------------------------------------------------------------
# Median and trimmed mean (continued)


def test_median_default_takes_the_lower_middle_value():
    """Documented default: with an even count, ``torch.median``'s lower middle value.

    median.py:81 ``midpoint=False -> True``; :103 ``midpoint and even -> or``.
    """
    updates = torch.tensor([[1.0, 8.0], [2.0, 6.0], [4.0, 2.0], [10.0, 0.0]])
    result, report = aggregate("median", updates)
    torch.testing.assert_close(result, torch.tensor([2.0, 2.0]))
    assert report.details["midpoint"] is False
    # Odd count with midpoint=True: the middle value, each coordinate from one client.
    result, report = aggregate("median", updates[:3], midpoint=True)
    torch.testing.assert_close(result, torch.tensor([2.0, 6.0]))
    torch.testing.assert_close(report.weights, torch.tensor([0.0, 1.0, 0.0]).double())


def test_median_ignores_screened_clients():
    """median.py:40 ``usable == all -> !=`` let a NaN row into the median."""
    updates = torch.tensor([[1.0, 1.0], [2.0, 3.0], [float("nan"), 0.0], [3.0, 5.0]])
    result, report = aggregate("median", updates)
    torch.testing.assert_close(result, torch.tensor([2.0, 3.0]))
    assert report.non_finite.tolist() == [False, False, True, False]


def _trimmed(updates: torch.Tensor, k: int) -> torch.Tensor:
    values = updates.sort(dim=0).values
    return values[k : updates.shape[0] - k].mean(dim=0)


def test_trimmed_mean_default_trims_ten_percent_from_each_end():
    """Documented default ``trim_ratio=0.1``: 10 clients -> 1 value trimmed per end, 20 -> 2.

    median.py:122 ``0.1 -> 0.05``; :151 ``trim_ratio * n -> trim_ratio / n``.
    """
    gen = torch.Generator().manual_seed(8)
    for n, k in ((10, 1), (20, 2), (9, 0)):
        updates = torch.randn(n, 7, generator=gen)
        result, report = aggregate("trimmed_mean", updates)
        assert report.details["trim"] == k
        torch.testing.assert_close(result, _trimmed(updates, k))


def test_trimmed_mean_with_f_counts_screened_clients_and_accepts_f_zero():
    """``f`` values per end, minus the clients already screened; ``f = 0`` is the plain mean.

    median.py:149 ``max(f - screened, 0) -> max(..., 1)``; :144 ``< 0.5 -> < 0.4`` refused 0.45.
    """
    gen = torch.Generator().manual_seed(9)
    updates = torch.randn(8, 5, generator=gen)
    result, report = aggregate("trimmed_mean", updates, f=0)
    assert report.details["trim"] == 0
    torch.testing.assert_close(result, updates.mean(dim=0))
    with_nan = updates.clone()
    with_nan[[1, 4], 2] = float("nan")
    result, report = aggregate("trimmed_mean", with_nan, f=2)
    assert report.details["trim"] == 0
    keep = [0, 2, 3, 5, 6, 7]
    torch.testing.assert_close(result, updates[keep].mean(dim=0))
    result, report = aggregate("trimmed_mean", updates, trim_ratio=0.45)
    assert report.details["trim"] == 3
    torch.testing.assert_close(result, _trimmed(updates, 3))


# ---------------------------------------------------------------------------------------------
# Norm clipping


def test_norm_clipping_default_threshold_is_two():
    """Documented default: updates longer than 2 are scaled to norm 2, shorter ones kept.

    norm_clipping.py:31 ``threshold=2.0 -> 1.0``.
    """
    updates = torch.tensor([[3.0, 4.0], [0.6, 0.8], [0.0, -1.5]])  # norms 5, 1, 1.5
    result, report = aggregate("ndc", updates)
    clip = torch.tensor([0.4, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(report.details["clip_factors"]).double(), clip)
    torch.testing.assert_close(result, (clip.float()[:, None] * updates).mean(dim=0))


def test_norm_clipping_threshold_must_be_positive_and_may_be_below_one():
    """norm_clipping.py:45 ``not threshold > 0 -> >= 0`` accepted 0; ``-> > 1`` refused 0.5."""
    updates = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    with pytest.raises(ValueError, match="threshold must be positive"):
        aggregate("ndc", updates, threshold=0.0)
    result, report = aggregate("ndc", updates, threshold=0.5)
    torch.testing.assert_close(result, torch.tensor([0.3, 0.4]))  # both end at norm 0.5
    assert report.details["num_clipped"] == 1


# ---------------------------------------------------------------------------------------------
# Geometric median (RFA)


def test_rfa_direct_solver_matches_the_gram_solver_also_with_screened_clients():
    """The two solvers compute the same Weiszfeld iterations.

    geometric_median.py:50 ``scatter(..., 0.0) -> 1.0`` let screened rows into the direct
    solver's point; :52 ``2.0 * dots -> 2.0 / dots``.
    """
    gen = torch.Generator().manual_seed(10)
    updates = torch.randn(7, 30, generator=gen)
    updates[6] += 25.0
    for rows in (updates, torch.cat([updates, torch.full((1, 30), float("nan"))])):
        gram_result, gram_report = aggregate("rfa", rows, solver="gram")
        direct_result, direct_report = aggregate("rfa", rows, solver="direct")
        assert bool(torch.isfinite(direct_result).all())
        torch.testing.assert_close(direct_result, gram_result, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(direct_report.weights, gram_report.weights, rtol=1e-4, atol=1e-6)
        assert direct_report.details["iterations"] == gram_report.details["iterations"]


@pytest.mark.parametrize(
    "options",
    [{"nu": 0.0}, {"nu": -1.0}, {"eps": 0.0}, {"max_iter": 0}],
)
def test_rfa_refuses_non_positive_settings(options):
    """geometric_median.py:89 (``>`` -> ``>=``, ``or`` -> ``and``, ``< 1`` -> ``<= 1``)."""
    with pytest.raises(ValueError, match="need nu > 0"):
        aggregate("rfa", torch.randn(5, 4), **options)


def test_rfa_accepts_small_and_large_settings_and_caps_the_iterations():
    """nu and eps may be any positive number; ``max_iter`` caps the iterations exactly.

    geometric_median.py:89 ``nu > 0 -> nu > 1`` / ``eps > 0 -> eps > 1`` / ``< 1 -> < 2``
    refused valid settings; :114 ``iterations < max_iter -> <=`` ran one more.
    """
    gen = torch.Generator().manual_seed(11)
    updates = torch.randn(6, 12, generator=gen)
    _, report = aggregate("rfa", updates, nu=2.0, eps=2.0)
    assert report.details["converged"] and report.details["iterations"] == 1
    for cap in (1, 3):
        _, report = aggregate("rfa", updates, eps=1e-300, max_iter=cap)
        assert report.details["iterations"] == cap and not report.details["converged"]


def test_rfa_stops_at_once_when_every_update_is_the_same():
    """A zero objective is converged (``0 <= eps * 0``): a round of all-zero updates (nobody
    trained) stops after one iteration.

    geometric_median.py:120 ``<= eps * F -> < eps * F`` ran to the cap on a zero objective.
    """
    for solver in ("gram", "direct"):
        result, report = aggregate("rfa", torch.zeros(5, 3), solver=solver)
        torch.testing.assert_close(result, torch.zeros(3))
        assert report.details["converged"] and report.details["iterations"] == 1
        updates = torch.tensor([[1.0, -2.0, 3.0]]).repeat(5, 1)
        result, report = aggregate("rfa", updates, solver=solver)
        torch.testing.assert_close(result, updates[0])
        assert report.details["converged"]


def test_rfa_convergence_test_is_relative_to_the_objective():
    """Scaling the updates (and nu) by s scales the median by s and keeps the iteration count.

    geometric_median.py:120 ``eps * F -> eps / F`` made the stopping rule depend on the scale.
    """
    gen = torch.Generator().manual_seed(12)
    updates = torch.randn(9, 20, generator=gen)
    updates[:3] += 4.0
    base, base_report = aggregate("rfa", updates)
    for scale in (1e-3, 1e3):
        result, report = aggregate("rfa", updates * scale, nu=0.1 * scale)
        assert report.details["iterations"] == base_report.details["iterations"]
        torch.testing.assert_close(result, base * scale, rtol=1e-4, atol=1e-6 * scale)


# ---------------------------------------------------------------------------------------------
# RSA (sign aggregation)


def test_rsa_step_follows_the_papers_schedule():
    """``step_t = 5e-5 * 0.998^t`` (module docstring) and the result is ``step * sum sign(u)``.

    sign.py:32/62/63 the defaults ``5e-5`` and ``0.998``; :34 ``* decay ** t -> / decay ** t``;
    :60 ``round_index=0 -> 1``.
    """
    assert rsa_step(0) == pytest.approx(5e-5, rel=1e-12)
    assert rsa_step(7) == pytest.approx(5e-5 * 0.998**7, rel=1e-12)
    updates = torch.tensor([[1.0, -2.0, 0.0], [3.0, -1.0, 2.0], [-1.0, -4.0, 5.0]])
    signs = torch.sign(updates).sum(dim=0)
    result, report = sign_aggregate(updates)
    assert report.details["step"] == pytest.approx(5e-5, rel=1e-12)
    torch.testing.assert_close(result, 5e-5 * signs)
    result, report = aggregate("rsa", updates, round_index=7)
    torch.testing.assert_close(result, 5e-5 * 0.998**7 * signs)
    torch.testing.assert_close(report.weights, torch.full((3,), 5e-5 * 0.998**7).double())


def test_rsa_step_must_be_positive_and_may_exceed_one():
    """sign.py:85 ``not step > 0 -> >= 0`` accepted 0; ``-> > 1`` refused a step of 0.5."""
    updates = torch.tensor([[1.0, -2.0], [3.0, 1.0]])
    with pytest.raises(ValueError, match="step must be positive"):
        sign_aggregate(updates, step=0.0)
    result, _ = sign_aggregate(updates, step=0.5)
    torch.testing.assert_close(result, torch.tensor([1.0, 0.0]))


def test_rsa_scores_are_the_fraction_of_opposed_signs():
    """``scores[i]`` = share of coordinates where sign(u_i) opposes the result's, zeros half.

    sign.py:101 ``(1.0 - agreement / d) / 2 -> (0.8 - ...)``.
    """
    updates = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0],
            [2.0, 1.0, 3.0, 1.0],
            [-1.0, -1.0, -1.0, -1.0],
            [1.0, 0.0, -1.0, 1.0],
            [0.5, 0.5, 0.5, 0.5],
        ]
    )
    _, report = sign_aggregate(updates)  # result's signs: + + + +
    expected = torch.tensor([0.0, 0.0, 1.0, 0.375, 0.0]).double()
    torch.testing.assert_close(report.scores, expected)


def test_rsa_leaves_screened_clients_out():
    """A NaN client neither votes nor gets weight; the others' signs are summed."""
    updates = torch.tensor([[1.0, -2.0], [float("nan"), 1.0], [3.0, -1.0]])
    result, report = sign_aggregate(updates, step=1.0)
    torch.testing.assert_close(result, torch.tensor([2.0, -2.0]))
    torch.testing.assert_close(report.weights, torch.tensor([1.0, 0.0, 1.0]).double())


# ---------------------------------------------------------------------------------------------
# FLAME


def _flame_round(seed=0, n=8, dim=40, spread=0.05):
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(dim, generator=gen)
    return direction + spread * torch.randn(n, dim, generator=gen)


def test_flame_keeps_everyone_when_all_updates_agree():
    """HDBSCAN may return the whole round as one cluster, whose label is 0.

    flame.py:77 ``allow_single_cluster=True -> False`` made every client noise; :93
    ``label >= 0 -> >= 1`` dropped cluster 0.
    """
    labels, majority = majority_cluster(np.zeros((6, 6)), 4)
    assert majority == 0 and labels.tolist() == [0] * 6
    updates = _flame_round(n=1).repeat(6, 1)
    result, report = flame(updates, global_params=torch.zeros(40), noise_lambda=0.0)
    assert report.num_kept == 6
    torch.testing.assert_close(result, updates[0])


def test_flame_with_two_or_three_clients():
    """Two clients form one cluster as they are; three go through HDBSCAN, which drops an
    opposite one.

    flame.py:83 ``return zeros, 0 -> 1`` kept nobody; :82 ``count < 3 -> <= 3`` kept the
    sign-flipped third client; :248 ``num_usable > 1 -> > 2`` zeroed two clients' scores.
    """
    updates = _flame_round(n=3)
    updates[2] = -updates[2]
    zeros = torch.zeros(40)
    _, report = flame(updates[:2], global_params=zeros, noise_lambda=0.0)
    assert report.num_kept == 2
    cos = float(torch.nn.functional.cosine_similarity(updates[0], updates[1], dim=0))
    torch.testing.assert_close(
        report.scores, torch.full((2,), 1.0 - cos).double(), atol=1e-6, rtol=0
    )
    _, report = flame(updates, global_params=zeros, noise_lambda=0.0)
    assert report.kept.tolist() == [True, True, False]


def test_flame_with_one_usable_client():
    """flame.py:248 ``torch.zeros(1) -> zeros(2)`` broke a round with one usable client."""
    updates = torch.tensor([[1.0, 2.0], [float("nan"), 0.0]])
    result, report = flame(updates, global_params=torch.zeros(2), noise_lambda=0.0)
    torch.testing.assert_close(result, updates[0])
    assert report.scores.tolist() == [0.0, float("inf")]


def test_flame_clusters_like_the_reference_hdbscan_call():
    """FLAME's reference clustering: HDBSCAN(min_cluster_size=n//2+1, min_samples=1,
    allow_single_cluster=True) on the cosine distances of the models.

    flame.py:76 and :145 ``min_samples=1 -> 2`` kept a different set in this round.
    """
    import hdbscan

    updates = _flame_round(seed=0, n=8, dim=50, spread=0.3)
    distances = _linalg.cosine_distances(_linalg.gram_matrix(updates)).numpy().astype(np.float64)
    labels = (
        hdbscan.HDBSCAN(
            metric="precomputed", min_cluster_size=5, min_samples=1, allow_single_cluster=True
        )
        .fit(distances)
        .labels_
    )
    values, counts = np.unique(labels[labels >= 0], return_counts=True)
    expected = labels == values[np.argmax(counts)]
    _, report = flame(updates, global_params=torch.zeros(50), noise_lambda=0.0)
    assert report.kept.tolist() == expected.tolist()
    got, majority = majority_cluster(distances, 5)
    assert (got == majority).tolist() == expected.tolist()
    # The check can fail: min_samples=2 keeps another set of clients here.
    _, other = flame(updates, global_params=torch.zeros(50), noise_lambda=0.0, min_samples=2)
    assert other.kept.tolist() != expected.tolist()


def test_flame_default_averages_equally_and_uses_counts_only_when_asked():
    """flame.py:146 ``weight_by_samples=False -> True`` (the paper averages equally)."""
    updates = _flame_round(n=6)
    counts = torch.tensor([1.0, 50.0, 2.0, 3.0, 4.0, 5.0])
    _, report = flame(updates, counts, global_params=torch.zeros(40), noise_lambda=0.0)
    kept = report.kept
    assert kept[1]  # the client with most samples is admitted
    share = effective_shares(report)[kept]
    torch.testing.assert_close(share, torch.full_like(share, 1.0 / int(kept.sum())))
    _, report = flame(
        updates, counts, global_params=torch.zeros(40), noise_lambda=0.0, weight_by_samples=True
    )
    assert torch.equal(report.kept, kept)
    expected = counts[kept].double() / counts[kept].sum()
    torch.testing.assert_close(effective_shares(report)[kept], expected)


def test_flame_without_noise_needs_neither_layout_nor_global_model():
    """noise_lambda=0 switches the noise off, so no layout is needed; clustering the updates
    then needs no global model either.

    flame.py:191 ``lam > 0 and layout is None -> or``; :196 ``lam > 0 -> lam >= 0``.
    """
    updates = _flame_round(n=6)
    result, report = flame(updates, cluster_on="updates", noise_lambda=0.0)
    assert report.num_kept >= 4
    torch.testing.assert_close(result, weighted_row_sum(updates, report.weights))


def test_flame_relative_noise_std_is_lambda_times_median_norm_times_the_models_std():
    """Default relative noise: ``sigma = 1.2e-5 * S_t * std(global + aggregate)`` per tensor.

    flame.py:64 ``DEFAULT_NOISE_LAMBDA = 1.2e-5``; :124 ``lam * S_t -> lam / S_t``.
    """
    updates = _flame_round(n=6, dim=40) * 3.0
    global_params = torch.randn(40, generator=torch.Generator().manual_seed(1))
    layout = ParamLayout(names=("a", "b"), shapes=((10,), (30,)))
    quiet, _ = flame(updates, global_params=global_params, noise_lambda=0.0)
    result, report = flame(
        updates,
        global_params=global_params,
        layout=layout,
        generator=torch.Generator().manual_seed(0),
    )
    assert report.details["noise_lambda"] == pytest.approx(1.2e-5)
    median_norm = float(torch.quantile(updates.norm(dim=1).double(), 0.5))  # midpoint, 6 clients
    new_global = global_params + quiet
    for name, span in (("a", slice(0, 10)), ("b", slice(10, 40))):
        sigma = 1.2e-5 * median_norm * float(new_global[span].std())
        assert report.details["noise_std"][name] == pytest.approx(sigma, rel=1e-4)
        drawn = float((result - quiet)[span].std())
        assert 0.5 * sigma < drawn < 1.5 * sigma


# ---------------------------------------------------------------------------------------------
# Matrix mapping


def test_anomaly_scores_are_mean_distances_to_the_other_outputs():
    """matrix_mapping.py:131 ``count < 2 -> <= 2`` / ``< 3``; :133 ``/ (count - 1) -> * / - 2``."""
    assert anomaly_scores(torch.zeros(1, 3, dtype=torch.float64)).tolist() == [0.0]
    two = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(anomaly_scores(two), torch.tensor([5.0, 5.0]).double())
    three = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]], dtype=torch.float64)
    torch.testing.assert_close(anomaly_scores(three), torch.tensor([7.5, 5.0, 7.5]).double())


def _linear_model_updates(n=5, seed=0):
    model = torch.nn.Linear(4, 3)
    gen = torch.Generator().manual_seed(seed)
    return model, torch.randn(n, 15, generator=gen)


def _softmax_outputs(updates):
    weight, bias = updates[:, :12].reshape(-1, 3, 4), updates[:, 12:]
    return torch.softmax(weight.sum(dim=2) + bias, dim=1)  # the all-ones probe


def test_mapping_applies_softmax_by_default():
    """matrix_mapping.py:89 and :176 ``apply_softmax=True -> False``: the mapped outputs are the
    network's class probabilities on the all-ones input."""
    model, updates = _linear_model_updates()
    expected = _softmax_outputs(updates)
    torch.testing.assert_close(map_updates(model, updates, (4,)), expected)
    _, report = aggregate("matrix_mapping", updates, model=model, input_shape=(4,))
    torch.testing.assert_close(torch.tensor(report.details["outputs"]), expected)
    scores = anomaly_scores(expected.double())
    torch.testing.assert_close(report.scores, scores, rtol=1e-5, atol=1e-7)
    assert report.kept.tolist() == (scores < scores.mean()).tolist()


def test_paper_rule_weights_kept_updates_by_samples():
    """matrix_mapping.py:207 ``weight_by_samples = variant == "paper" -> !=``."""
    model, updates = _linear_model_updates(n=6, seed=1)
    counts = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    result, report = aggregate("matrix_mapping", updates, counts, model=model, input_shape=(4,))
    kept = report.kept
    assert 0 < int(kept.sum()) < 6
    expected = counts[kept].double() / counts[kept].sum()
    torch.testing.assert_close(report.weights[kept], expected)
    torch.testing.assert_close(result, weighted_row_sum(updates, report.weights))


def test_xmam_keeps_nobody_when_every_output_is_noise_unless_exact():
    """An all-noise HDBSCAN round: nobody by default, everyone with ``exact=True`` (the public
    code's majority vote of the noise label).

    matrix_mapping.py:136 ``exact=False -> True``.
    """
    outputs = np.eye(5, dtype=np.float32)  # equidistant: no cluster forms
    keep, info = xmam_select(outputs)
    assert keep.tolist() == [False] * 5 and info["majority"] is None
    keep, info = xmam_select(outputs, exact=True)
    assert keep.tolist() == [True] * 5 and info["majority"] == -1


# ---------------------------------------------------------------------------------------------
# Centered clipping and Bulyan


def test_centered_clipping_defaults_are_the_official_tau_100_and_one_iteration():
    """Module docstring: ``Clipping(tau=100, n_iter=1)`` as the official code.

    centered_clipping.py:47 ``tau=100 -> 50``; :48 ``iterations=1 -> 2``.
    """
    updates = torch.zeros(4, 3)
    updates[0, 0] = 1000.0  # clipped to 100 around the zero center
    updates[1, 1] = 60.0  # within tau = 100: kept whole
    state = {}
    result, report = aggregate("centered_clipping", updates, state=state)
    torch.testing.assert_close(result, torch.tensor([25.0, 15.0, 0.0]))
    assert report.details["tau"] == 100.0 and report.details["iterations"] == 1
    torch.testing.assert_close(state["centered_clipping_center"], result)


def test_bulyan_default_f_for_seven_clients_is_one():
    """``f`` defaults to the most Bulyan tolerates, ``(n - 3) // 4`` (``n >= 4f + 3``).

    bulyan.py:40 ``// 4 -> // 5``; :86 ``n < 4f + 3 -> <=`` refused 7 clients with f = 1.
    """
    updates = torch.randn(7, 6, generator=torch.Generator().manual_seed(3))
    updates[6] += 100.0
    _, report = aggregate("bulyan", updates)
    assert report.details["f"] == 1
    assert not report.kept[6]
    _, report = aggregate("bulyan", updates, f=1)
    assert report.details["f"] == 1
    with pytest.raises(ValueError, match=r"n >= 4f \+ 3"):
        aggregate("bulyan", updates[:6], f=1)


# ---------------------------------------------------------------------------------------------
# Pruning


def test_pruning_to_a_single_entry_keeps_the_largest():
    """pruning.py:127 ``keep > 0 -> keep > 1`` pruned everything when one entry should stay."""
    tensors = {"fc.weight": torch.tensor([[0.1, -3.0], [0.5, 2.0]])}
    masks = magnitude_prune(tensors, None, 0.25)  # round(0.25 * 4) = 1
    assert masks["fc.weight"].tolist() == [[False, True], [False, False]]
    pruned, _ = masked_tensors(tensors, 0.5)
    torch.testing.assert_close(pruned["fc.weight"], torch.tensor([[0.0, -3.0], [0.0, 2.0]]))


def test_prune_percent_bounds_are_open():
    """pruning.py:34 ``or -> and`` accepted 150; ``< 100 -> <= 100`` accepted 100."""
    for percent in (0, 100, 150, -5, True):
        with pytest.raises(ValueError, match="prune_percent"):
            validate_prune_params(percent, 0.5)
    validate_prune_params(99.5, 1)


# ---------------------------------------------------------------------------------------------
# Untargeted attacks

ATTACKERS = torch.tensor([False, True, False, True, False, False])


def _honest(seed=0, n=6, dim=8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(dim, generator=gen) + 0.3 * torch.randn(n, dim, generator=gen)


def test_simple_attacks_defaults():
    """Documented defaults: sign flip -4x, same value 100 (the model, with a global model),
    noise N(0, 1) replacing the update, IPM with eps = 0.1 times the benign mean.

    untargeted.py:62 ``-4 -> -2``; :71 ``100 -> 50``; :83 ``value - global -> + global``;
    :90-92 ``std=1 -> 0.5``, ``mean=0 -> 1``, ``additive=False -> True``; :235 ``eps=0.1``.
    """
    updates = _honest()
    benign = ~ATTACKERS
    out = sign_flip(updates, ATTACKERS)
    torch.testing.assert_close(out[ATTACKERS], -4.0 * updates[ATTACKERS])
    torch.testing.assert_close(out[benign], updates[benign])
    global_params = torch.linspace(-1, 1, 8)
    out = same_value(updates, ATTACKERS, global_params=global_params)
    torch.testing.assert_close(out[ATTACKERS], (100.0 - global_params).expand(2, -1))
    out = gaussian_noise(updates, ATTACKERS, generator=torch.Generator().manual_seed(4))
    draw = torch.randn(2, 8, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(out[ATTACKERS], draw)
    torch.testing.assert_close(out[benign], updates[benign])
    out = inner_product_manipulation(updates, ATTACKERS)
    torch.testing.assert_close(out[ATTACKERS], (-0.1 * updates[benign].mean(dim=0)).expand(2, -1))


def test_lie_z_max_formula_and_its_cap_when_attackers_are_a_majority():
    """``z = Phi^-1((n - s) / n)``, ``s = floor(n/2 + 1) - f``; a quantile of 1 or more (the
    attackers alone are a majority) is capped at ``1 - 1e-6`` so z stays finite.

    untargeted.py:109 ``0 < f < n`` (``<= n``, ``0 <=``); :113 the upper cap
    (``2 - 1e-6``, ``1 + 1e-6``, ``1 - 8e-07``).
    """
    normal = statistics.NormalDist()
    assert lie_z_max(20, 5) == pytest.approx(normal.inv_cdf(14 / 20), rel=1e-4)
    assert lie_z_max(50, 10) == pytest.approx(normal.inv_cdf(34 / 50), rel=1e-4)
    z = lie_z_max(10, 6)  # s = 0: quantile 1
    assert math.isfinite(z)
    assert z == pytest.approx(normal.inv_cdf(float(np.float32(1 - 1e-6))), rel=2e-3)
    for f in (0, 10, 11):
        with pytest.raises(ValueError, match="n_attackers"):
            lie_z_max(10, f)


def test_little_is_enough_with_a_single_attacker():
    """untargeted.py:130 ``n_att == 0 -> == 1`` left a lone attacker honest."""
    updates = _honest()
    one = torch.tensor([False, False, True, False, False, False])
    out = little_is_enough(updates, one, knowledge="benign")
    ref = updates[~one]
    z = lie_z_max(6, 1)
    expected = ref.mean(dim=0) - z * ref.std(dim=0, unbiased=False)
    torch.testing.assert_close(out[2], expected)
    torch.testing.assert_close(out[~one], updates[~one])


def test_search_gamma_finds_the_boundary_below_and_above_gamma_init():
    """Doubling while ``passes`` holds, bisection otherwise, starting from 0.

    untargeted.py:154 ``passes(high) and high < 1e12 -> or`` doubled past failing gammas;
    :157 ``low = 0.0 -> 1.0`` could not find a boundary below 1.
    """
    for boundary in (0.3, 3.7, 37.3, 12345.0):
        gamma = _search_gamma(lambda g: g <= boundary, 10.0, 1e-6, 200)
        assert boundary - 1e-5 <= gamma <= boundary


@pytest.mark.parametrize("attack", ["min_max", "min_sum"])
@pytest.mark.parametrize("perturbation", ["std", "unit_vec", "sign"])
@pytest.mark.parametrize("knowledge", ["attackers", "benign"])
def test_optimized_attacks_end_on_their_criterions_boundary(attack, perturbation, knowledge):
    """The malicious update ``mean + gamma * p`` is the farthest along ``p`` that the criterion
    allows: min-max's largest distance to a reference update equals the largest pairwise
    distance, min-sum's summed squared distance equals the largest such sum.

    untargeted.py:179/180 ``mean + g * p -> mean - g * p`` / ``g / p``; :226 ``(ref - m) ->
    (ref + m)``, ``** 2 -> ** 3``; :146 ``ref.shape[0] > 1 -> > 2`` (two attackers' std).
    Two reference updates sit symmetrically about their mean, so the benign four are needed to
    tell ``+ g p`` from ``- g p``.
    """
    updates = _honest(seed=2).double()
    fn = min_max if attack == "min_max" else min_sum
    out, gamma = fn(
        updates, ATTACKERS, perturbation=perturbation, knowledge=knowledge, return_gamma=True
    )
    assert gamma > 0.1
    ref = updates[ATTACKERS] if knowledge == "attackers" else updates[~ATTACKERS]
    mean = ref.mean(dim=0)
    malicious = out[1]
    torch.testing.assert_close(out[3], malicious)
    direction = malicious - mean
    expected_direction = {
        "std": -ref.std(dim=0, unbiased=False),
        "unit_vec": -mean / mean.norm(),
        "sign": -torch.sign(mean),
    }[perturbation]
    torch.testing.assert_close(direction, gamma * expected_direction)
    pairwise = torch.cdist(ref, ref)
    if attack == "min_max":
        reach, bound = float((ref - malicious).norm(dim=1).max()), float(pairwise.max())
    else:
        reach = float(((ref - malicious) ** 2).sum())
        bound = float((pairwise**2).sum(dim=1).max())
    assert reach <= bound * (1 + 1e-9)
    assert reach >= bound * (1 - 1e-4)
    plain = fn(updates, ATTACKERS, perturbation=perturbation, knowledge=knowledge)
    assert isinstance(plain, torch.Tensor)  # return_gamma defaults to False
    torch.testing.assert_close(plain, out)


# ---------------------------------------------------------------------------------------------
# Masked (pruned) uploads


def _masked_round(seed=0, n=5, d=12):
    gen = torch.Generator().manual_seed(seed)
    updates = torch.randn(n, d, generator=gen)
    masks = (torch.rand(n, d, generator=gen) > 0.4).float()
    masks[:, 0] = 0.0  # nobody kept coordinate 0
    masks[:, 1] = 0.0
    masks[2, 1] = 1.0  # only client 2 kept coordinate 1
    return updates, masks


@pytest.mark.parametrize("name", ["fedavg", "ndc"])
def test_mask_aware_update_is_the_weighted_mean_over_keepers(name):
    """Coordinate j becomes ``sum_i s_i c_i m_ij u_ij / sum_i s_i m_ij``; nobody -> 0."""
    updates, masks = _masked_round()
    counts = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    options = {"threshold": 2.5} if name == "ndc" else {}
    result, report = aggregate(name, masks * updates, counts, **options)
    update, nobody = mask_aware_update(result, report, masks, linear=True)
    shares = counts.double() / counts.sum()
    clip = torch.tensor(report.details.get("clip_factors", [1.0] * 5), dtype=torch.float64)
    if name == "ndc":
        assert bool((clip < 1).any())
    num = ((shares * clip)[:, None] * masks.double() * updates.double()).sum(dim=0)
    den = (shares[:, None] * masks.double()).sum(dim=0)
    expected = torch.where(den > 0, num / den.clamp(min=1e-30), torch.zeros_like(num))
    torch.testing.assert_close(update.double(), expected, rtol=1e-5, atol=1e-6)
    assert nobody.tolist() == (den == 0).tolist() and nobody[0] and not nobody[1]
    torch.testing.assert_close(update[1], updates[2, 1] * float(clip[2]))


def test_coordinate_statistics_over_keepers():
    """Median (lower) and trimmed mean of each coordinate over the clients that kept it.

    masking.py:130 ``trim_ratio=0.1 -> 0.05``; :152 ``method != "trimmed_mean" -> ==``;
    :160 ``count - trim -> count + trim``.
    """
    gen = torch.Generator().manual_seed(1)
    updates = torch.randn(10, 4, generator=gen)
    masks = torch.ones(10, 4)
    masks[:4, 1] = 0.0  # six keepers
    masks[:, 2] = 0.0  # none
    usable = torch.ones(10, dtype=torch.bool)
    usable[9] = False
    median = coordinatewise_over_keepers(updates, masks, usable, "median")
    trimmed = coordinatewise_over_keepers(updates, masks, usable, "trimmed_mean")
    by_f = coordinatewise_over_keepers(updates, masks, usable, "trimmed_mean", f=1)
    for j, rows in ((0, list(range(9))), (1, [4, 5, 6, 7, 8]), (3, list(range(9)))):
        values = updates[rows, j].sort().values
        assert float(median[j]) == pytest.approx(float(values[(len(rows) - 1) // 2]))
        k = int(0.1 * len(rows))  # default ratio 0.1: 9 keepers -> 0, 5 -> 0
        assert float(trimmed[j]) == pytest.approx(float(values[k : len(rows) - k].mean()), abs=1e-6)
        assert float(by_f[j]) == pytest.approx(float(values[1:-1].mean()), abs=1e-6)
    assert float(median[2]) == float(trimmed[2]) == float(by_f[2]) == 0.0
    ten = coordinatewise_over_keepers(
        updates, torch.ones(10, 4), torch.ones(10, dtype=torch.bool), "trimmed_mean"
    )
    torch.testing.assert_close(ten, _trimmed(updates, 1))  # 10 keepers: one per end
    with pytest.raises(ValueError, match="no per-keeper form"):
        coordinatewise_over_keepers(updates, masks, usable, "krum")


# ---------------------------------------------------------------------------------------------
# DnC


def test_dnc_defaults_are_flpoisons():
    """Module docstring: ``niters = 5``, ``b`` = 20 % of the coordinates, ``c = 1``, and
    ``f = (n - 1) // 2``.

    dnc.py:42/44/45 the three defaults; :77 ``(n - 1) // 2 -> (n + 1) // 2``.
    """
    gen = torch.Generator().manual_seed(0)
    updates = torch.randn(9, 50, generator=gen)
    _, report = aggregate("dnc", updates, generator=torch.Generator().manual_seed(1))
    details = report.details
    assert (details["f"], details["niters"], details["subsample"]) == (4, 5, 10)
    assert details["filter_fraction"] == 1.0 and details["removed_per_iter"] == 4
    assert report.num_kept <= 5


def test_dnc_on_all_coordinates_removes_the_top_singular_direction_outliers():
    """``subsample_fraction=1`` is allowed (every coordinate) and removes the ``f`` clients with
    the largest squared projections on the top right singular vector (numpy's SVD).

    dnc.py:71 ``<= 1 -> < 1`` refused the whole vector.
    """
    gen = torch.Generator().manual_seed(2)
    updates = torch.randn(8, 20, generator=gen)
    updates[[1, 6]] += 3.0 * torch.randn(20, generator=gen)
    _, report = aggregate("dnc", updates, f=2, niters=1, subsample_fraction=1.0)
    centered = updates.double().numpy() - updates.double().numpy().mean(axis=0)
    _, _, vh = np.linalg.svd(centered, full_matrices=False)
    projection = (centered @ vh[0]) ** 2
    removed = set(np.argsort(-projection)[:2].tolist())
    assert removed == {1, 6}
    assert report.kept.tolist() == [i not in removed for i in range(8)]


# ---------------------------------------------------------------------------------------------
# SignGuard, FoolsGold, Shield


def test_signguard_sign_features_are_column_normalized_sign_fractions():
    """signguard.py:55 ``block == 0 -> != 0`` counted the non-zero entries as zeros."""
    matrix = torch.tensor([[1.0, 0.0, -1.0, 2.0], [0.0, 0.0, 1.0, 1.0], [-1.0, -1.0, -1.0, 0.0]])
    features = sign_features(matrix, 1.0)
    expected = np.array([[1.0, 0.5, 1 / 3], [1.0, 1.0, 0.0], [0.0, 0.5, 1.0]])
    np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-7)


def test_signguard_default_norm_bounds_are_a_tenth_and_three_times_the_median():
    """SignGuard's bounds ``0.1 < |g_i| / median < 3`` (strict).

    signguard.py:85 ``lower=0.1 -> 0.05``; :86 ``upper=3.0 -> 1.5``.
    """
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(50, generator=gen)
    updates = (direction + 0.1 * torch.randn(9, 50, generator=gen)) / direction.norm()
    updates = updates / updates.norm(dim=1, keepdim=True)  # every norm 1
    for row, factor in ((6, 0.08), (7, 2.5), (8, 3.2)):
        updates[row] *= factor
    _, report = aggregate("signguard", updates, generator=torch.Generator().manual_seed(1))
    assert report.details["passed_norm"] == [True] * 6 + [False, True, False]
    torch.testing.assert_close(report.scores[6:], torch.tensor([0.08, 2.5, 3.2]).double())


def test_foolsgold_scores_are_the_largest_cosine_to_another_history():
    """foolsgold.py:125 ``h / |h| -> h * |h|`` broke the reported similarities; :81 the
    default confidence ``kappa = 1`` (the paper's)."""
    gen = torch.Generator().manual_seed(2)
    updates = torch.randn(5, 30, generator=gen)
    updates[4] = 3.0 * updates[3] + 0.01 * torch.randn(30, generator=gen)  # a sybil pair
    state = {}
    _, report = aggregate("foolsgold", updates, client_ids=list("abcde"), state=state)
    h = updates.double()
    cos = torch.nn.functional.cosine_similarity(h[:, None], h[None], dim=2)
    cos.fill_diagonal_(-1.0)
    torch.testing.assert_close(report.scores, cos.max(dim=1).values)
    assert report.details["kappa"] == 1.0
    expected = foolsgold_weights(h, kappa=1.0)
    torch.testing.assert_close(torch.tensor(report.details["foolsgold_weights"]).double(), expected)
    assert float(expected[3]) == float(expected[4]) == 0.0


def _shield_round():
    rnd = planted_round("none", n_benign=10, n_attack=0, dim=200)
    updates = rnd.updates.clone()
    updates[3] *= 2.5  # within three median norms
    updates[7] *= 3.5  # beyond
    updates[5] = -updates[5]  # opposes the others
    return updates


def test_shield_default_checks_and_their_thresholds():
    """Documented defaults: norm bound 3 median norms, the min-cosine check off (-1), the
    direction check at 3 robust standard deviations (1.4826 MAD, floored at 0.05) below the
    median cosine of the candidates.

    shield.py:102 ``norm_bound=3 -> 1.5``; :103 ``min_cosine=-1 -> -0.5``; :104
    ``direction_z=3 -> 1.5``; :73 ``MIN_SPREAD = 0.05``.
    """
    updates = _shield_round()
    _, report = aggregate("shield", updates)
    details = report.details
    assert details["dropped_by"] == {5: ["direction outlier"], 7: ["norm above bound"]}
    cosine = torch.tensor(details["cosine"], dtype=torch.float64)
    candidates = torch.tensor([i != 7 for i in range(10)])
    center = float(cosine[candidates].median())
    mad = float((cosine[candidates] - center).abs().median())
    low = center - 3.0 * max(1.4826 * mad, 0.05)
    assert details["cosine_threshold"] == pytest.approx(low, abs=1e-9)
    assert report.kept.tolist() == [i not in (5, 7) for i in range(10)]


def test_shield_averages_equally_by_default():
    """shield.py:107 ``weight_by_samples=False -> True``."""
    updates = _shield_round()
    counts = torch.arange(1.0, 11.0)
    _, report = aggregate("shield", updates, counts)
    kept = report.kept
    share = effective_shares(report)[kept]
    torch.testing.assert_close(share, torch.full_like(share, 1.0 / int(kept.sum())))
    _, report = aggregate("shield", updates, counts, weight_by_samples=True)
    expected = counts[kept].double() / counts[kept].sum()
    torch.testing.assert_close(effective_shares(report)[kept], expected)


def test_shield_keeping_a_bare_majority_needs_no_fallback():
    """Four of six kept is a majority (``n // 2 + 1``): the fallback stays off.

    shield.py:195 ``< n // 2 + 1 -> < n // 2 + 2``.
    """
    rnd = planted_round("none", n_benign=6, n_attack=0, dim=200)
    updates = rnd.updates.clone()
    updates[4] = updates[5] = -0.5 * updates[0] + 0.01  # two identical (duplicate) uploads
    _, report = aggregate("shield", updates)
    assert report.kept.tolist() == [True, True, True, True, False, False]
    assert report.details["fallback"] is False


# ---------------------------------------------------------------------------------------------
# Fang and the adaptive attack


def test_fang_krum_returns_the_updates_and_spreads_only_the_supporters():
    """The first attacker sends ``-lambda * sign(mean)``, the others lie within
    ``perturb_norm`` of it; without ``return_details`` only the updates come back.

    fang.py:82 ``return_details=False -> True``; :139 ``rows[1:] -> rows[2:]`` left the second
    attacker unperturbed.
    """
    gen = torch.Generator().manual_seed(3)
    updates = torch.randn(9, 20, generator=gen) * 0.1 + 0.05
    mask = torch.tensor([False, True, True, True, False, False, False, False, False])
    out = fang_krum(updates, mask)
    assert isinstance(out, torch.Tensor)
    out, info = fang_krum(
        updates,
        mask,
        perturb_norm=0.5,
        generator=torch.Generator().manual_seed(0),
        return_details=True,
    )
    first = -info.lam * torch.sign(updates[~mask].double().mean(dim=0)).float()
    torch.testing.assert_close(out[1], first)
    for row in (2, 3):
        gap = float((out[row] - first).norm())
        assert 0.0 < gap <= 0.5 + 1e-6
    torch.testing.assert_close(out[~mask], updates[~mask])


def test_fang_trim_needs_b_above_one():
    """fang.py:167 ``not b > 1 -> not b >= 1`` accepted b = 1 (an empty range)."""
    updates = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([True, False, False, False, False, False])
    with pytest.raises(ValueError, match="b must be > 1"):
        fang_trim(updates, mask, b=1.0)
    out = fang_trim(updates, mask, b=1.5, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(out[0], updates[0])


def test_adaptive_attack_search_stops_at_the_requested_precision():
    """The refinement stops once the bracket is ``rel_tol`` wide; it does not spend the whole
    ``max_iter`` budget, and the default call returns only the updates.

    adaptive.py:139 ``> rel_tol * low and evaluations < max_iter -> or``; :87
    ``return_details=False -> True``.
    """
    model, updates, mask = adaptive_mm_case()
    options = dict(model=model, input_shape=(1, 4, 4), reference="single")
    out, info = adaptive_matrix_mapping(updates, mask, return_details=True, **options)
    assert 0.0 < info.lam < 200
    assert info.evaluations < 25
    plain = adaptive_matrix_mapping(updates, mask, **options)
    assert isinstance(plain, torch.Tensor)
    torch.testing.assert_close(plain, out)


def test_adaptive_attack_gives_up_after_max_iter_search_evaluations():
    """``max_iter`` caps the halving search; when nothing passed, one more evaluation scores the
    clean mean (lambda = 0) that is then sent.

    adaptive.py:131 ``evaluations < max_iter -> <=`` ran one evaluation past the budget.
    """
    model, updates, mask = adaptive_mm_case()
    out, info = adaptive_matrix_mapping(
        updates,
        mask,
        model=model,
        input_shape=(1, 4, 4),
        reference="single",
        max_iter=3,
        return_details=True,
    )
    assert info.lam == 0.0
    assert info.evaluations == 3 + 1
    torch.testing.assert_close(out[0], updates[mask].mean(dim=0))


def test_fltrust_gives_an_all_zero_update_no_trust_no_weight_and_clip_factor_zero():
    from sf_ext.aggregators.fltrust import fltrust

    root = torch.tensor([1.0, 0.0, 0.0])
    updates = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    result, report = fltrust(updates, None, root_update=root)
    details = report.details
    assert details["clip_factors"] == pytest.approx([0.0, 0.5, 1 / math.sqrt(0.5)])
    assert details["trust"] == pytest.approx([0.0, 1.0, math.sqrt(0.5)])
    assert report.kept.tolist() == [False, True, True]
    # Each kept update rescaled to the root's norm, weighted by trust: (1, 0, 0) and (.5, .5, 0)/|.|.
    expected = (
        torch.tensor([1.0, 0.0, 0.0])
        + math.sqrt(0.5) * torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2)
    ) / (1 + math.sqrt(0.5))
    assert torch.allclose(result, expected.to(result.dtype), atol=1e-6)

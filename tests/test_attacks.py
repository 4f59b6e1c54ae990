"""Each attack changes the update the way its definition says (small hand-made vectors)."""

import math

import numpy as np
import pytest
import torch
from _rounds import adaptive_mm_case  # noqa: E402  (tests/ is on sys.path)

from sf_ext.attacks import (
    ATTACKS,
    AttackContext,
    add_pixel_pattern,
    attacker_indices,
    backdoor_behaviour,
    default_pgd_radius,
    fang_krum,
    fang_trim,
    finish_backdoor_update,
    gaussian_noise,
    get_attack,
    inner_product_manipulation,
    knn_tail_scores,
    lie_z_max,
    little_is_enough,
    load_edge_case_file,
    min_max,
    min_sum,
    model_replacement,
    pixel_pattern_backdoor,
    project_to_ball,
    register_attack,
    run_update_attack,
    same_value,
    sign_flip,
    tail_edge_case,
)


@pytest.fixture
def updates():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=gen)


@pytest.fixture
def attackers():
    return torch.tensor([True, True, False, False, False, False])


def test_benign_rows_untouched_by_every_update_attack(updates, attackers):
    update_attacks = [n for n, spec in ATTACKS.items() if spec.kind == "update"]
    assert {"sign_flip", "ipm", "fang_krum", "fang_trim", "lie", "min_max"} <= set(update_attacks)
    for name in update_attacks:
        if "model" in ATTACKS[name].needs:  # needs a network; tested below
            continue
        out, _ = run_update_attack(name, updates, attackers, AttackContext())
        assert out.shape == updates.shape, name
        assert torch.equal(out[~attackers], updates[~attackers]), name
        assert out.dtype == torch.float32, name


def test_sign_flip_sends_minus_four_times(updates, attackers):
    out = sign_flip(updates, attackers)
    assert torch.allclose(out[:2], -4 * updates[:2])
    assert torch.allclose(sign_flip(updates, attackers, scale=-1.0)[:2], -updates[:2])


def test_same_value_fills_update_or_model(updates, attackers):
    assert torch.all(same_value(updates, attackers)[:2] == 100)
    global_params = torch.arange(5, dtype=torch.float32)
    out = same_value(updates, attackers, global_params=global_params)
    # The uploaded model (global + update) is 100 everywhere.
    assert torch.allclose(out[:2] + global_params, torch.full((2, 5), 100.0))


def test_gaussian_noise_replaces_or_adds(updates, attackers):
    gen = torch.Generator().manual_seed(1)
    out = gaussian_noise(updates, attackers, std=0.0, mean=3.0, generator=gen)
    assert torch.all(out[:2] == 3.0)
    out = gaussian_noise(updates, attackers, std=0.0, mean=1.0, additive=True)
    assert torch.allclose(out[:2], updates[:2] + 1.0)
    noisy = gaussian_noise(torch.zeros(2, 20000), torch.tensor([True, False]), std=2.0)
    assert abs(float(noisy[0].std()) - 2.0) < 0.05 and torch.all(noisy[1] == 0)


def test_lie_z_matches_baruch_formula():
    # n = 50, f = 12: s = floor(26) - 12 = 14, z = Phi^-1(36/50) ~ 0.58 (Baruch et al.'s example).
    assert lie_z_max(50, 12) == pytest.approx(0.5828, abs=1e-3)
    with pytest.raises(ValueError):
        lie_z_max(5, 0)


def test_lie_is_mean_minus_z_std(updates, attackers):
    out = little_is_enough(updates, attackers, z=1.5, knowledge="all")
    expected = updates.mean(0) - 1.5 * updates.std(0, unbiased=False)
    assert torch.allclose(out[0], expected, atol=1e-6) and torch.allclose(out[1], expected)
    own = little_is_enough(updates, attackers, z=1.0)  # partial knowledge: attackers' rows only
    ref = updates[:2]
    assert torch.allclose(own[0], ref.mean(0) - ref.std(0, unbiased=False), atol=1e-6)


@pytest.mark.parametrize("perturbation", ["std", "unit_vec", "sign"])
def test_min_max_stays_within_benign_diameter_and_is_maximal(updates, attackers, perturbation):
    out, gamma = min_max(
        updates, attackers, perturbation=perturbation, knowledge="all", return_gamma=True
    )
    bound = torch.cdist(updates.double(), updates.double()).max()
    worst = (updates.double() - out[0].double()).norm(dim=1).max()
    assert gamma > 0 and worst <= bound + 1e-5
    # A slightly larger gamma would break the constraint (the search found the boundary).
    mean = updates.double().mean(0)
    direction = (out[0].double() - mean) / gamma
    bigger = mean + (gamma * 1.01 + 1e-3) * direction
    assert (updates.double() - bigger).norm(dim=1).max() > bound


def test_min_sum_is_the_largest_gamma_inside_the_constraint(updates, attackers):
    out, gamma = min_sum(updates, attackers, knowledge="all", return_gamma=True)
    ref = updates.double()
    mean = ref.mean(dim=0)
    direction = -ref.std(dim=0, unbiased=False)
    bound = (torch.cdist(ref, ref) ** 2).sum(dim=1).max()

    def total(g):
        return float(((ref - (mean + g * direction)) ** 2).sum())

    assert gamma > 0 and total(gamma) <= float(bound) + 1e-6
    assert total(gamma * 1.01 + 1e-4) > float(bound)  # any larger gamma breaks the constraint
    torch.testing.assert_close(out[0].double(), mean + gamma * direction, rtol=1e-5, atol=1e-6)


def test_min_sum_constraint(updates, attackers):
    out, gamma = min_sum(updates, attackers, knowledge="all", return_gamma=True)
    ref = updates.double()
    bound = (torch.cdist(ref, ref) ** 2).sum(1).max()
    assert gamma > 0 and ((ref - out[0].double()) ** 2).sum() <= bound + 1e-5


def test_attack_input_checks(updates):
    with pytest.raises(ValueError):
        sign_flip(updates, torch.tensor([True, False]))
    with pytest.raises(ValueError):
        sign_flip(updates[0], torch.tensor([True]))
    with pytest.raises(ValueError):
        little_is_enough(updates, torch.ones(6, dtype=torch.bool), knowledge="nobody")


def test_project_to_ball_only_shrinks_outside_points():
    deltas = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    out = project_to_ball(deltas, 1.5)
    assert torch.allclose(out[0].norm(), torch.tensor(1.5))
    assert torch.allclose(out[0] / out[0].norm(), deltas[0] / 5)  # same direction
    assert torch.equal(out[1], deltas[1])
    per_client = project_to_ball(deltas, torch.tensor([math.inf, 0.25]))
    assert torch.equal(per_client[0], deltas[0]) and per_client[1].norm() == pytest.approx(0.25)


def test_model_replacement_then_projection():
    delta = torch.tensor([0.1, 0.0, 0.0])
    assert torch.allclose(model_replacement(delta, 1000, 100), torch.tensor([1.0, 0, 0]))
    pgdmr = backdoor_behaviour("pgd_mr", (1, 28, 28))
    assert pgdmr.pgd_radius == 1.5 and pgdmr.model_replacement
    out = finish_backdoor_update(delta, pgdmr, total_samples=3000, own_samples=100)
    assert out.norm() == pytest.approx(1.5)  # scaled x30 to norm 3, projected back to delta
    pgd = backdoor_behaviour("pgd", (1, 28, 28))
    assert torch.equal(finish_backdoor_update(delta, pgd), delta)  # inside the ball: unchanged
    assert torch.equal(finish_backdoor_update(delta, backdoor_behaviour("blackbox")), delta)


def test_paper_radii_and_presets():
    assert default_pgd_radius((3, 32, 32)) == 2.0
    assert default_pgd_radius((1, 28, 28)) == 1.5
    assert backdoor_behaviour("blackbox").poison_fraction == 0.8
    assert backdoor_behaviour("pgd", (3, 32, 32)).pgd_radius == 2.0
    assert backdoor_behaviour("pgd", pgd_radius=0.7).pgd_radius == 0.7
    with pytest.raises(ValueError, match="unknown attack 'nonsense'"):
        backdoor_behaviour("nonsense")


def test_attacker_indices_mix_eighty_twenty():
    rng = np.random.default_rng(0)
    poison = np.arange(1000, 1080)
    mixed = attacker_indices(np.arange(50), poison, 0.8, rng)
    assert len(mixed) == 100 and np.isin(poison, mixed).all()
    assert (mixed < 50).sum() == 20


def test_tail_edge_case_picks_the_rarest_samples():
    gen = torch.Generator().manual_seed(0)
    common = torch.randn(95, 1, 4, 4, generator=gen) * 0.1
    rare = torch.randn(5, 1, 4, 4, generator=gen) * 0.1 + 5.0 * torch.arange(1, 6).view(5, 1, 1, 1)
    images = torch.cat([common, rare, torch.randn(50, 1, 4, 4, generator=gen)])
    labels = torch.cat([torch.zeros(100, dtype=torch.long), torch.ones(50, dtype=torch.long)])
    scores = knn_tail_scores(images[:100], k=3)
    assert set(scores.topk(5).indices.tolist()) == set(range(95, 100))
    data = tail_edge_case(images, labels, 0, 1, fraction=0.05, held_out=0.4)
    assert set(data.removed_indices.tolist()) == set(range(95, 100))
    assert len(data.test_y) == 2 and len(data.train_y) == 3
    assert torch.all(data.train_y == 1) and torch.all(data.test_y == 1)


def test_edge_case_files_round_trip(tmp_path):
    import pickle

    images = np.random.default_rng(0).integers(0, 255, size=(4, 32, 32, 3), dtype=np.uint8)
    path = tmp_path / "southwest_images_new_train.pkl"
    with open(path, "wb") as handle:
        pickle.dump(images, handle)
    assert np.array_equal(load_edge_case_file(str(path)), images)
    np.save(tmp_path / "x.npy", images)
    assert np.array_equal(load_edge_case_file(str(tmp_path / "x.npy")), images)


def test_pixel_pattern_trigger():
    images = torch.zeros(3, 1, 8, 8)
    images[0, 0, 0, 0] = 1.0
    stamped = add_pixel_pattern(images, size=3)
    assert stamped[:, :, 4:7, 4:7].max() == 1.0 and stamped[:, :, :4, :4].sum() == 1.0
    assert torch.equal(stamped[:, :, -1, :], images[:, :, -1, :])  # one-pixel margin kept
    labels = torch.tensor([0, 1, 2])
    data = pixel_pattern_backdoor(images, labels, images, labels, target_class=2, n_poison=5)
    assert len(data.train_y) == 2 and torch.all(data.train_y == 2)
    assert len(data.test_y) == 2  # target-class test images are left out of the measurement


@pytest.mark.parametrize("reference", ["paper", "single"])
def test_adaptive_attack_against_matrix_mapping(reference):
    from sf_ext.aggregators.matrix_mapping import anomaly_scores, map_updates
    from sf_ext.attacks import adaptive_matrix_mapping, leader_passes

    model, updates, mask = adaptive_mm_case()
    out, info = adaptive_matrix_mapping(
        updates, mask, model=model, input_shape=(1, 4, 4), reference=reference, return_details=True
    )
    assert torch.equal(out[~mask], updates[~mask])
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])  # one crafted update
    mean = updates[mask].mean(0)
    assert 0 <= info.lam < 200
    assert torch.allclose(out[0], mean - info.lam * torch.sign(mean), atol=1e-4)
    if info.lam > 0:
        # The leader's score, recomputed with the core's own scoring, is under the mean.
        copies = 3 if reference == "paper" else 1
        stacked = torch.cat([updates[mask], out[:1].expand(copies, -1)])
        scores = anomaly_scores(map_updates(model, stacked, (1, 4, 4)).double())
        assert scores[-1] < scores.mean()
    if reference == "paper":
        # Literal reading: f identical copies sit at distance 0, so the very first, largest
        # lambda passes (the degenerate search the module docstring describes).
        assert info.lam == pytest.approx(200 * (1 - 1e-6)) and info.evaluations == 1
    else:
        # One copy against the clean updates: a real search ending well inside (0, 200) at the
        # largest lambda that passes (twice it fails).
        assert 0.05 < info.lam < 5 and info.evaluations > 3
        assert leader_passes(
            updates[mask], mean - info.lam * torch.sign(mean), model, (1, 4, 4), reference=reference
        )[0]
        fails_at = (1 + 2 * 0.05) * info.lam
        assert not leader_passes(
            updates[mask], mean - fails_at * torch.sign(mean), model, (1, 4, 4), reference=reference
        )[0]


# ------------------------------------------------------------------------ IPM, Fang, scaling


def test_ipm_sends_minus_eps_times_the_benign_mean(updates, attackers):
    benign_mean = updates[~attackers].mean(dim=0)
    for eps in (0.1, 0.5, 100.0):
        out = inner_product_manipulation(updates, attackers, eps=eps)
        torch.testing.assert_close(out[:2], (-eps * benign_mean).expand(2, -1))
        assert torch.equal(out[~attackers], updates[~attackers])
    partial = inner_product_manipulation(updates, attackers, eps=1.0, knowledge="attackers")
    torch.testing.assert_close(partial[0], -updates[:2].mean(dim=0))
    assert float(inner_product_manipulation(updates, attackers)[0] @ benign_mean) < 0


def _krum_pick(rows, f):
    dist = torch.cdist(rows.double(), rows.double()) ** 2
    k = rows.shape[0] - f - 2
    scores = torch.sort(dist, dim=1).values[:, 1 : k + 1].sum(dim=1)
    return int(torch.argmin(scores))


@pytest.mark.parametrize("knowledge", ["benign", "attackers"])
def test_fang_krum_gets_a_crafted_update_selected(knowledge):
    gen = torch.Generator().manual_seed(1)
    # Noisy benign updates around a weak common direction, as SGD updates are.
    direction = 0.3 * torch.randn(50, generator=gen)
    updates = direction + torch.randn(12, 50, generator=gen)
    mask = torch.zeros(12, dtype=torch.bool)
    mask[:4] = True
    out, info = fang_krum(updates, mask, knowledge=knowledge, return_details=True)
    reference = updates[~mask] if knowledge == "benign" else updates[mask]
    s = torch.sign(reference.mean(dim=0))
    torch.testing.assert_close(out[:4], (-info.lam * s).expand(4, -1))
    assert info.success and info.lam > 1e-5
    assert torch.equal(out[~mask], updates[~mask])
    if knowledge == "benign":
        # Krum over the real round picks an attacker, and the crafted update opposes the benign.
        assert _krum_pick(out, 4) < 4
        assert float(out[0] @ updates[~mask].mean(dim=0)) < 0
        # It is the largest lambda of the halving search that works: twice it is not selected.
        doubled = out.clone()
        doubled[:4] = -2 * info.lam * s
        assert (
            info.lam == pytest.approx(krum_bound(updates[~mask], 12, 4))
            or _krum_pick(doubled, 4) >= 4
        )


def krum_bound(benign, n, c):
    from sf_ext.attacks.fang import krum_lambda_bound

    return krum_lambda_bound(benign, n, c)


def test_fang_krum_bound_matches_the_paper_formula():
    gen = torch.Generator().manual_seed(2)
    benign = torch.randn(8, 30, generator=gen)
    n, c, d = 12, 4, 30
    dist = torch.cdist(benign.double(), benign.double())
    k = n - c - 2
    sums = torch.sort(dist, dim=1).values[:, 1 : k + 1].sum(dim=1)
    expected = (
        float(sums.min()) / ((n - 2 * c - 1) * d**0.5)
        + float(benign.double().norm(dim=1).max()) / d**0.5
    )
    from sf_ext.attacks.fang import krum_lambda_bound

    assert krum_lambda_bound(benign, n, c) == pytest.approx(expected, rel=1e-5)


def test_fang_trim_lands_beyond_the_benign_extremes():
    gen = torch.Generator().manual_seed(3)
    updates = torch.randn(10, 400, generator=gen) + torch.randn(400, generator=gen)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[:3] = True
    out = fang_trim(updates, mask, generator=torch.Generator().manual_seed(0))
    benign = updates[~mask].double()
    s = torch.sign(benign.mean(dim=0))
    w_max, w_min = benign.max(dim=0).values, benign.min(dim=0).values
    crafted = out[:3].double()
    up = s < 0
    # Where the benign mean falls, push above the maximum (up to b = 2 away) and vice versa.
    up_other = torch.where(w_max > 0, 2 * w_max, w_max / 2)
    down_other = torch.where(w_min > 0, w_min / 2, 2 * w_min)
    for side, edge, other in ((up, w_max, up_other), (~up, w_min, down_other)):
        lo, hi = torch.minimum(edge, other)[side], torch.maximum(edge, other)[side]
        assert bool((crafted[:, side] >= lo - 1e-6).all() and (crafted[:, side] <= hi + 1e-6).all())
    assert bool((crafted[:, up] >= w_max[up] - 1e-6).all())  # above every benign value
    assert bool((crafted[:, ~up] <= w_min[~up] + 1e-6).all())  # below every benign value
    # Never on the benign side: every crafted value is beyond the extreme, against the mean.
    assert bool((crafted[:, up & (w_max > 0)] >= w_max[up & (w_max > 0)] - 1e-6).all())
    assert bool((crafted[:, ~up & (w_min < 0)] <= w_min[~up & (w_min < 0)] + 1e-6).all())
    assert not torch.equal(out[0], out[1])  # drawn per attacker
    partial = fang_trim(updates, mask, knowledge="attackers", generator=torch.Generator())
    mu, sigma = updates[mask].double().mean(0), updates[mask].double().std(0)
    sp = torch.sign(mu)
    z = (partial[:3].double() - mu) / sigma
    assert bool((z[:, sp > 0] <= -3 + 1e-5).all() and (z[:, sp > 0] >= -4 - 1e-5).all())
    assert bool((z[:, sp < 0] >= 3 - 1e-5).all() and (z[:, sp < 0] <= 4 + 1e-5).all())


def test_scaling_boosts_the_backdoor_update():
    delta = torch.ones(4)
    beh = backdoor_behaviour("scaling")
    assert beh.model_replacement and beh.pgd_radius is None
    torch.testing.assert_close(finish_backdoor_update(delta, beh, 200.0, 10.0), 20 * delta)
    explicit = backdoor_behaviour("scaling", boost=7.0)
    torch.testing.assert_close(finish_backdoor_update(delta, explicit, 200.0, 10.0), 7 * delta)
    with pytest.raises(ValueError, match="unknown options \\['boots'\\]"):
        backdoor_behaviour("scaling", boots=3.0)


def test_registry_is_open_and_checks_contracts(updates, attackers):
    @register_attack("_halve", single_client=True, replace=True)
    def halve(updates, attackers, factor=0.5):
        out = updates.clone()
        out[attackers] = updates[attackers] * factor
        return out

    try:
        assert get_attack("_halve").single_client
        out, info = run_update_attack("_halve", updates, attackers, factor=0.25)
        torch.testing.assert_close(out[:2], 0.25 * updates[:2]) and info == {}
        with pytest.raises(ValueError, match="already registered"):
            register_attack("_halve")(halve)
    finally:
        ATTACKS.pop("_halve", None)
    with pytest.raises(ValueError, match="did you mean 'sign_flip'"):
        get_attack("sign_flp")
    with pytest.raises(ValueError, match="needs the context \\['model', 'input_shape'\\]"):
        run_update_attack("adaptive_mm", updates, attackers)
    with pytest.raises(ValueError, match="backdoor behaviour, not an update attack"):
        run_update_attack("pgd", updates, attackers)
    with pytest.raises(ValueError, match="unknown context"):
        register_attack("_bad", needs=("oracle",))

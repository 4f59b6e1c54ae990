"""Each attack changes the update the way its definition says (small hand-made vectors)."""

import math

import numpy as np
import pytest
import torch

from sf_ext.attacks import (
    UPDATE_ATTACKS,
    add_pixel_pattern,
    attacker_indices,
    backdoor_behaviour,
    default_pgd_radius,
    finish_backdoor_update,
    gaussian_noise,
    knn_tail_scores,
    lie_z_max,
    little_is_enough,
    load_edge_case_file,
    min_max,
    min_sum,
    model_replacement,
    pixel_pattern_backdoor,
    project_to_ball,
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
    for name, fn in UPDATE_ATTACKS.items():
        if name == "adaptive_mm":  # needs a network; tested below
            continue
        out = fn(updates, attackers)
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
    with pytest.raises(KeyError):
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
    from sf_ext.models import MLP

    torch.manual_seed(0)
    model = MLP(in_channels=1, image_size=4, num_classes=5, hidden=(8,))
    n_params = sum(p.numel() for p in model.parameters())
    updates = torch.randn(8, n_params) * 0.5
    mask = torch.tensor([True, True, True, False, False, False, False, False])
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
        scores = anomaly_scores(map_updates(model, stacked, (1, 4, 4))[0])
        assert scores[-1] < scores.mean()
    passes, _, _ = leader_passes(updates[mask], mean, model, (1, 4, 4), reference=reference)
    assert isinstance(passes, bool)

"""Tests of sf_ext.dlg: gradient attacks, distances, pruning of observations, metrics and the CLI.

Optimizer-aware inversion and labels: test_dlg_multistep.py; captures from real SecretFlow
rounds and the server's views: test_dlg_capture.py; recognizability: test_dlg_judge.py.
"""

import csv
import math

import pytest
import torch
from _dlg_models import tiny_model  # noqa: E402  (tests/ is on sys.path)
from torch import nn

from sf_ext.dlg import (
    GradientMatcher,
    aggregate_rows,
    dlg,
    idlg,
    infer_labels,
    inverting_gradients,
    label_accuracy,
    match_batch,
    mean_std,
    mse,
    observe_gradient,
    prune_gradient,
    psnr,
    score_reconstruction,
    ssim,
)
from sf_ext.dlg.attacks import STATUS_DIVERGED
from sf_ext.dlg.distance import TensorDistance
from sf_ext.dlg.gradients import gradient_from_update, rate_to_keep_fraction
from sf_ext.dlg.options import AttackOptions
from sf_ext.models import DLGLeNet, uniform_init_


def tiny_problem(seed: int, label: int):
    model = tiny_model(seed)
    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(100 + seed))
    y = torch.tensor([label])
    return model, x, y, observe_gradient(model, x, y)


def small_lenet(seed: int = 0) -> nn.Module:
    return uniform_init_(DLGLeNet(in_channels=1, image_size=8, num_classes=10), seed=seed)


# --- attacks -----------------------------------------------------------------------------------
def test_dlg_recovers_input_and_label_of_tiny_model():
    model, x, y, grad = tiny_problem(seed=0, label=0)
    result = dlg(model, grad, x.shape, num_classes=4, iters=20, seed=0)
    assert result.status != STATUS_DIVERGED
    assert result.iterations <= 20
    assert (result.reconstruction - x).abs().max() < 1e-3
    assert result.label.tolist() == [0]
    assert result.final_loss < 1e-6
    assert result.snapshots[0][0] == 0 and result.loss_history


def test_restart_rescues_a_failed_start_within_the_same_step_budget():
    model, x, y, grad = tiny_problem(seed=6, label=2)
    single = dlg(model, grad, x.shape, num_classes=4, iters=40, seed=6, restarts=0)
    assert (single.reconstruction - x).abs().max() > 1.0  # this start stalls far from the input
    rescued = dlg(model, grad, x.shape, num_classes=4, iters=40, seed=6)
    assert len(rescued.details["attempts"]) == 2
    assert rescued.iterations <= 40
    assert (rescued.reconstruction - x).abs().max() < 1e-3


@pytest.mark.parametrize("seed", range(4))
def test_idlg_recovers_input_of_tiny_model(seed):
    model, x, y, grad = tiny_problem(seed, label=seed % 4)
    result = idlg(model, grad, x.shape, num_classes=4, iters=20, seed=seed)
    assert result.label.tolist() == [seed % 4]
    assert (result.reconstruction - x).abs().max() < 1e-3


@pytest.mark.parametrize("label", [0, 3, 9])
def test_idlg_label_rule_finds_true_label_even_after_pruning(label):
    model = small_lenet(seed=label)
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(label))
    grad = observe_gradient(model, x, torch.tensor([label]))
    assert infer_labels(model, grad).tolist() == [label]
    # Biases are never pruned, so the rule survives any pruning rate.
    pruned, _ = prune_gradient(model, grad, keep_fraction=0.1)
    assert infer_labels(model, pruned).tolist() == [label]


def test_weight_update_of_one_sgd_step_reads_back_as_the_gradient():
    model, x, y, grad = tiny_problem(seed=1, label=2)
    update = [-0.05 * g for g in grad]
    for recovered, original in zip(gradient_from_update(update, lr=0.05), grad):
        assert torch.allclose(recovered, original, atol=1e-6)


def test_mask_aware_matcher_ignores_pruned_entries_and_naive_does_not():
    model = small_lenet()
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([4])
    pruned, masks = prune_gradient(model, observe_gradient(model, x, y), keep_fraction=0.5)
    naive = GradientMatcher(model, pruned)(x, y, create_graph=False)
    aware = GradientMatcher(model, pruned, masks)(x, y, create_graph=False)
    assert float(aware) < 1e-10 < float(naive)


class _NaNAfter(nn.Module):
    """Wraps a model and returns NaN logits from its n-th forward call on (forced divergence)."""

    def __init__(self, inner: nn.Module, calls: int):
        super().__init__()
        self.inner, self.calls, self.count = inner, calls, 0

    def forward(self, x):
        self.count += 1
        out = self.inner(x)
        return out * float("nan") if self.count >= self.calls else out


@pytest.mark.parametrize("attack", [dlg, idlg])
def test_lbfgs_divergence_is_reported_and_no_nan_image_is_returned(attack):
    inner, x, y, grad = tiny_problem(seed=6, label=1)
    model = _NaNAfter(inner, calls=5)
    result = attack(model, grad, x.shape, num_classes=4, iters=50, seed=6)
    assert result.status == STATUS_DIVERGED
    assert "diverged" in result.message
    assert torch.isfinite(result.reconstruction).all()
    assert all(math.isfinite(v) for v in result.loss_history)


@pytest.mark.parametrize("distance", ["cosine", "cosine-layer", "l2-layer"])
def test_inverting_gradients_recovers_input_of_tiny_model_with_every_distance(distance):
    model, x, y, grad = tiny_problem(seed=0, label=1)
    result = inverting_gradients(
        model, grad, x.shape, 4, iters=300, restarts=1, seed=0, distance=distance, tv_weight=0
    )
    assert result.label.tolist() == [1]
    assert result.details["distance"] == distance
    assert (result.reconstruction - x).abs().max() < 2e-3
    assert 0.0 <= float(result.reconstruction.min()) and float(result.reconstruction.max()) <= 1.0


def test_layer_normalized_distances_match_hand_computed_values():
    targets = [torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0, 0.0])]
    candidates = [torch.tensor([0.0, 4.0]), torch.tensor([0.0, 2.0, 0.0])]
    # l2: 9 + (1 + 4); l2-layer: 9/25 + 5/1.
    assert float(TensorDistance(targets, distance="l2")(candidates)) == pytest.approx(14.0)
    assert float(TensorDistance(targets, distance="l2-layer")(candidates)) == pytest.approx(5.36)
    # cosine-layer: mean of 1 - cos per tensor = ((1 - 16/20) + (1 - 0)) / 2.
    assert float(TensorDistance(targets, distance="cosine-layer")(candidates)) == pytest.approx(0.6)
    # cosine over everything joined: 1 - 16 / (sqrt(20) * sqrt(26)).
    joined = 1 - 16 / (math.sqrt(20) * math.sqrt(26))
    assert float(TensorDistance(targets, distance="cosine")(candidates)) == pytest.approx(joined)
    # A mask hides the entries the attacker ignores, on both sides.
    masks = [torch.tensor([False, True]), None]
    masked = TensorDistance(targets, masks, "l2-layer")(candidates)
    assert float(masked) == pytest.approx(0.0 / 16 + 5.0)


def test_one_layer_dominating_the_joint_distance_counts_only_as_much_as_the_others_per_layer():
    # The classifier's gradient is 1e4 times larger than the first layer's: joint distances hardly
    # see an error in the first layer, per-layer ones see it fully.
    targets = [torch.tensor([1e-4, 0.0]), torch.tensor([1.0, 1.0])]
    wrong_first = [torch.tensor([0.0, 1e-4]), torch.tensor([1.0, 1.0])]
    assert float(TensorDistance(targets, distance="cosine")(wrong_first)) < 1e-8
    assert float(TensorDistance(targets, distance="cosine-layer")(wrong_first)) == pytest.approx(
        0.5
    )
    assert float(TensorDistance(targets, distance="l2-layer")(wrong_first)) == pytest.approx(2.0)


def test_attack_options_fill_per_attack_defaults_and_reject_typos():
    options = AttackOptions(seed=3)
    assert options.resolved("dlg").iters == 300 and options.resolved("dlg").distance == "l2"
    assert options.resolved("ig").iters == 1000 and options.resolved("ig").distance == "cosine"
    assert AttackOptions(distance="l2-layer").resolved("ig").distance == "l2-layer"
    with pytest.raises(TypeError, match="iterz"):
        options.with_overrides(iterz=5)
    with pytest.raises(ValueError, match="distance"):
        AttackOptions(distance="manhattan")
    with pytest.raises(ValueError, match="iters"):
        AttackOptions(iters=0)


# --- pruning of observations -------------------------------------------------------------------
@pytest.mark.parametrize("rate", [0, 10, 30, 50, 90])
def test_pruning_keeps_exactly_the_requested_fraction_of_each_weight(rate):
    model = small_lenet()
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    grad = observe_gradient(model, x, torch.tensor([1]))
    keep = rate_to_keep_fraction(rate)
    pruned, masks = prune_gradient(model, grad, keep)
    for (name, param), g, p, m in zip(model.named_parameters(), grad, pruned, masks):
        if param.dim() < 2:  # biases: never pruned
            assert m is None and torch.equal(p, g)
            continue
        assert int(m.sum()) == round(keep * m.numel())
        assert torch.equal(p, g * m)
        if 0 < int(m.sum()) < m.numel():  # kept entries are the largest magnitudes
            assert g[m].abs().min() >= g[~m].abs().max()


# --- metrics -----------------------------------------------------------------------------------
def test_psnr_and_mse_match_hand_computed_values():
    truth = torch.zeros(1, 1, 28, 28)
    recon = torch.full((1, 1, 28, 28), 0.1)
    assert mse(recon, truth).item() == pytest.approx(0.01)
    assert psnr(recon, truth).item() == pytest.approx(20.0, abs=1e-4)  # 10 log10(1 / 0.01)
    half = truth.clone()
    half[..., :14, :] = 1.0  # half the pixels wrong by 1: MSE 0.5, PSNR 3.0103 dB
    assert psnr(half, truth).item() == pytest.approx(10 * math.log10(2), abs=1e-4)
    # Reconstructions are clamped to [0, 1] first: a pixel at 5 counts as 1.
    assert psnr(torch.full((1, 1, 28, 28), 5.0), torch.ones(1, 1, 28, 28)).item() == math.inf


def test_ssim_of_identical_and_inverted_images():
    image = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(image, image), torch.ones(2), atol=1e-5)
    assert (ssim(1 - image, image) < 0).all()
    small = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert ssim(small, small).item() == pytest.approx(1.0, abs=1e-5)


def test_batch_matching_and_label_accuracy():
    truth = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    recon = truth[[2, 0, 1]]
    assert match_batch(recon, truth) == [1, 2, 0]
    score = score_reconstruction(recon, truth, [7, 1, 1], [1, 1, 3])
    assert score.mse == 0.0 and score.psnr == math.inf and score.ssim == pytest.approx(1.0)
    assert score.label_accuracy == pytest.approx(2 / 3)
    assert label_accuracy([4], [4]) == 1.0 and label_accuracy([4], [5]) == 0.0


def test_mean_std_and_aggregation_over_seeds():
    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 3}
    rows = [
        {"attack": "dlg", "rate": r, "psnr": p, "ssim": 0.5, "mse": 0.1, "label_acc": 1.0}
        for r, p in [(0, 70.0), (0, 50.0), (50, 10.0), (50, 12.0)]
    ]
    summary = aggregate_rows(rows, ("attack", "rate"), success_psnr=40.0)
    assert [s["psnr_mean"] for s in summary] == [60.0, 11.0]
    assert [s["successes"] for s in summary] == [2, 0]
    assert summary[0]["psnr_std"] == pytest.approx(math.sqrt(200.0))


# --- CLI ---------------------------------------------------------------------------------------
@pytest.mark.needs_data
def test_cli_attack_writes_csvs_and_figures_and_reads_back_an_identical_rerun(
    tmp_path, fashion_mnist_root, capsys
):
    from sf_ext.dlg.cli import main

    out = tmp_path / "attack"
    argv = ["attack", "--data-root", str(fashion_mnist_root), "--iters", "4"]
    argv += ["--pruned-percent", "0,50", "--attackers", "naive,mask-aware", "--batch-size", "2"]
    argv += ["--out", str(out), "--no-progress", "--no-judge"]
    assert main(argv) == 0
    with (out / "runs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {r["attacker"] for r in rows} == {"naive", "mask-aware"}
    assert {float(r["pruned_percent"]) for r in rows} == {0.0, 50.0}
    with (out / "images.csv").open() as handle:
        images = list(csv.DictReader(handle))
    assert len(images) == 8  # every image of every run
    assert (out / "psnr_vs_pruned_dlg.png").stat().st_size > 0
    assert (out / "final_dlg.png").exists() and (out / "grid_dlg_naive_seed0.png").exists()
    assert (out / "batch_dlg_naive_seed0.png").exists()  # every image of the batch
    assert "PSNR" in capsys.readouterr().out
    before = (out / "runs.csv").read_text()
    assert main(argv) == 0  # same settings: read back, not rerun
    assert "read back" in capsys.readouterr().out
    assert (out / "runs.csv").read_text() == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sweep", "--pruned-percent", "0,120"], "pruned_percent must lie in [0, 100)"),
        (["sweep", "--attacks", "dlg,nope"], "attacks: unknown ['nope']"),
        (["sweep", "--iters", "many"], "expected an integer"),
        (["sweep", "--rates", "0,50"], "--rates was renamed: use --pruned-percent"),
        (["capture", "--split", "0.5"], "split needs at least two positive shares"),
        (["capture", "--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    ],
)
def test_cli_bad_argument_gives_a_clear_message_and_exit_2(tmp_path, capsys, argv, message):
    from sf_ext.dlg.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--out", str(tmp_path / "out"), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing was started


@pytest.mark.needs_data
def test_cli_refuses_a_used_folder_with_other_settings(tmp_path, fashion_mnist_root, capsys):
    from sf_ext.dlg.cli import main

    out = tmp_path / "attack"
    base = ["attack", "--data-root", str(fashion_mnist_root), "--iters", "2", "--out", str(out)]
    assert main(base + ["--no-progress", "--no-judge"]) == 0
    first = (out / "runs.csv").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(base + ["--seeds", "1", "--no-progress", "--no-judge"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err
    assert (out / "runs.csv").read_text() == first
    assert main(base + ["--seeds", "1", "--overwrite", "--no-progress", "--no-judge"]) == 0
    assert (out / "runs.csv").read_text() != first

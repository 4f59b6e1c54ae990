"""Tests of sf_ext.dlg: attacks, pruning of observations, metrics, capture and CLI (all small)."""

import csv
import math

import pytest
import torch
from torch import nn

from sf_ext.dlg import (
    GradientMatcher,
    aggregate_rows,
    dlg,
    idlg,
    infer_labels,
    inverting_gradients,
    label_accuracy,
    load_capture,
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
from sf_ext.dlg.gradients import gradient_from_update, rate_to_keep_fraction
from sf_ext.models import DLGLeNet, uniform_init_


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int) -> nn.Module:
    # The first layer is linear with a bias, so its gradient determines a single input exactly
    # (dL/dW1 = delta x^T and dL/db1 = delta): the attack has a unique answer to find.
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Sigmoid(), nn.Linear(8, 4))


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


def test_label_rule_for_a_batch_returns_the_labels_present():
    model = small_lenet(seed=1)
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([2, 5, 7])
    grad = observe_gradient(model, x, labels)
    assert sorted(infer_labels(model, grad, batch_size=3).tolist()) == [2, 5, 7]


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


def test_inverting_gradients_keeps_input_in_box_and_reduces_the_loss():
    model, x, y, grad = tiny_problem(seed=2, label=1)
    result = inverting_gradients(model, grad, x.shape, 4, iters=60, restarts=2, seed=0)
    assert result.label.tolist() == [1]
    assert 0.0 <= float(result.reconstruction.min()) and float(result.reconstruction.max()) <= 1.0
    assert len(result.details["restart_losses"]) == 2
    assert result.loss_history[-1] < result.loss_history[0]


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
def test_cli_attack_writes_csv_and_figures(tmp_path, fashion_mnist_root, capsys):
    from sf_ext.dlg.cli import main

    out = tmp_path / "attack"
    argv = ["attack", "--data-root", str(fashion_mnist_root), "--iters", "4", "--rates", "0,50"]
    argv += ["--attackers", "naive,mask-aware", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    with (out / "runs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {r["attacker"] for r in rows} == {"naive", "mask-aware"}
    assert (out / "psnr_vs_rate_dlg.png").stat().st_size > 0
    assert (out / "final_dlg.png").exists() and (out / "grid_dlg_naive_seed0.png").exists()
    assert "PSNR" in capsys.readouterr().out


# --- capture from a real SecretFlow run --------------------------------------------------------
@pytest.mark.secretflow
@pytest.mark.needs_data
def test_capture_from_fed_avg_w_prune_loads_back_and_reproduces_the_gradient(
    tmp_path, fashion_mnist_root
):
    from sf_ext.dlg.capture import run_capture
    from sf_ext.dlg.sweep import SweepConfig, run_sweep

    folder = run_capture(
        "fed_avg_w_prune",
        out_dir=tmp_path / "runs",
        data_root=fashion_mnist_root,
        samples=8,
        batch_size=2,
        epochs=2,
        capture_epoch=1,
        prune_percent=50,
        lr=0.1,
    )
    assert folder.parent == tmp_path / "runs"
    assert (folder / "capture.pt").exists() and (folder / "meta.json").exists()
    captured = load_capture(folder)
    assert captured.meta["kept_fraction"] == pytest.approx(0.5)
    assert tuple(captured.x.shape) == (2, 1, 28, 28)
    for recomputed, recorded in zip(captured.recompute_gradient(), captured.gradient):
        assert torch.allclose(recomputed, recorded, atol=1e-6)
    # One SGD step under a fixed mask: the upload shows exactly the masked gradient.
    as_gradient = captured.update_as_gradient()
    for update, grad, mask in zip(as_gradient, captured.gradient, captured.masks()):
        expected = grad if mask is None else grad * mask
        assert torch.allclose(update, expected, atol=1e-4)
    kept = [m.float().mean().item() for m in captured.masks() if m is not None]
    assert kept == pytest.approx([0.5] * len(kept))

    config = SweepConfig(
        captures=(str(folder),), source="update", iters=2, seeds=(0,), out=str(tmp_path / "sweep")
    )
    result = run_sweep(config, progress=False)
    assert {r["attacker"] for r in result.rows} == {"naive", "mask-aware"}
    assert all(r["rate"] == pytest.approx(50.0) for r in result.rows)

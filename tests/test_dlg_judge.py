"""Recognizability: an independently trained classifier plus an SSIM floor, per image."""

import pytest
import torch

from sf_ext.data import load_dataset
from sf_ext.dlg.judge import load_judge
from sf_ext.dlg.metrics import recognized_min_ssim, score_reconstruction


@pytest.fixture(scope="module")
def digits_judge(tmp_path_factory):
    torch.set_num_threads(1)
    return load_judge("digits", "train", cache_dir=tmp_path_factory.mktemp("judges"))


@pytest.fixture(scope="module")
def digits_images():
    x, y = load_dataset("digits", split="train")
    return torch.as_tensor(x[:200]), torch.as_tensor(y[:200])


def test_judge_is_trained_on_the_other_split_and_recognizes_real_held_out_images(
    digits_judge, digits_images
):
    assert digits_judge.trained_on == "test"  # attacked images come from "train"
    assert digits_judge.held_out_accuracy > 0.9
    x, y = digits_images
    predicted, probs = digits_judge.predict(x)
    assert float((predicted == y).float().mean()) > 0.9
    assert torch.allclose(probs.sum(dim=1), torch.ones(len(y)), atol=1e-5)


def test_recognizability_separates_true_images_from_noise(digits_judge, digits_images):
    x, y = digits_images
    exact = score_reconstruction(x, x, y.tolist(), y.tolist(), digits_judge)
    assert exact.recognized_fraction > 0.9
    gen = torch.Generator().manual_seed(0)
    uniform = score_reconstruction(
        torch.rand(x.shape, generator=gen), x, None, y.tolist(), digits_judge
    )
    # Smooth blobs look more like strokes than pixel noise does.
    blobs = torch.nn.functional.interpolate(
        torch.rand(len(y), 1, 3, 3, generator=gen), size=8, mode="bilinear"
    )
    smooth = score_reconstruction(blobs, x, None, y.tolist(), digits_judge)
    gray = score_reconstruction(torch.full_like(x, 0.3), x, None, y.tolist(), digits_judge)
    binary = (torch.rand(x.shape, generator=gen) > 0.6).float()
    binary_score = score_reconstruction(binary, x, None, y.tolist(), digits_judge)
    for noise in (uniform, smooth, gray, binary_score):
        assert noise.recognized_fraction < 0.03
    # The judge alone would call some noise "recognized" (it gives noise some class); the SSIM
    # floor is what removes those.
    judge_only = [p == t for p, t in zip(uniform.judge_label, y.tolist())]
    assert sum(judge_only) > sum(uniform.recognized)
    rejected = [
        s for s, j, r in zip(uniform.ssim_per_image, judge_only, uniform.recognized) if j and not r
    ]
    assert rejected and max(rejected) < recognized_min_ssim(8)


def test_a_slightly_degraded_image_stays_recognizable_and_a_heavily_degraded_one_does_not(
    digits_judge, digits_images
):
    x, y = digits_images
    gen = torch.Generator().manual_seed(1)
    mild = (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    heavy = (0.15 * x + 0.85 * torch.rand(x.shape, generator=gen)).clamp(0, 1)
    assert score_reconstruction(mild, x, None, y.tolist(), digits_judge).recognized_fraction > 0.85
    assert score_reconstruction(heavy, x, None, y.tolist(), digits_judge).recognized_fraction < 0.2


def test_a_shape_typical_of_the_class_is_recognizable_but_not_specific(digits_judge, digits_images):
    x, y = digits_images
    # A "reconstruction" that is another image of the same class: the judge names the class,
    # but it is no more like the client's image than other images of that class are.
    same_class = []
    for i, label in enumerate(y.tolist()):
        others = [j for j, other in enumerate(y.tolist()) if other == label and j != i]
        same_class.append(x[others[0]])
    score = score_reconstruction(torch.stack(same_class), x, None, y.tolist(), digits_judge)
    exact = score_reconstruction(x, x, None, y.tolist(), digits_judge)
    assert exact.specific_fraction > 0.9
    assert score.specific_fraction < 0.5 * score.recognized_fraction


def test_one_shape_returned_for_several_images_is_not_specific_to_any(digits_judge, digits_images):
    x, y = digits_images
    label = int(y[0])
    members = [i for i, v in enumerate(y.tolist()) if v == label][:3]
    truth = x[members]
    collapsed = truth[:1].expand(3, -1, -1, -1)  # every dummy ended on the same picture
    score = score_reconstruction(collapsed, truth, None, [label] * 3, digits_judge)
    assert score.recognized[0] and not any(score.specific)
    honest = score_reconstruction(truth, truth, None, [label] * 3, digits_judge)
    assert all(honest.specific)


def test_best_match_over_the_batch_and_per_image_rows(digits_judge, digits_images):
    x, y = digits_images
    truth = x[:4]
    recon = torch.cat([x[[2, 0, 3, 1]], torch.rand(2, 1, 8, 8)])  # shuffled, plus two extras
    score = score_reconstruction(recon, truth, None, y[:4].tolist(), digits_judge)
    assert score.assignment == [1, 3, 0, 2]
    assert score.best_psnr_per_image == [float("inf")] * 4
    rows = score.image_rows(y[:4].tolist())
    assert [r["matched_index"] for r in rows] == [1, 3, 0, 2]
    assert [r["true_label"] for r in rows] == y[:4].tolist()

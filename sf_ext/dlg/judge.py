"""An independently trained classifier that judges whether a reconstruction is recognizable.

PSNR overstates protection: digits and clothes are plainly readable at 8 to 18 dB. A more direct
question is whether someone (here: a classifier that never saw the attack) recognizes the
reconstruction as what it is. :func:`load_judge` trains a small CNN on one split of a dataset,
never on the split the attacked images come from, and caches it; :meth:`Judge.predict` labels
reconstructions. Its accuracy on real held-out images is recorded next to it, so a report can
say how often it recognizes real images to begin with.
"""

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

#: Bumped whenever the architecture or training recipe changes (old caches are not reused).
JUDGE_VERSION = 2
#: Real images kept per class (from the judge's own split) to tell a reconstruction of one image
#: from a shape typical of its class.
REFERENCES_PER_CLASS = 48
CACHE_ENV = "SF_EXT_CACHE"


def default_cache_dir() -> Path:
    """``$SF_EXT_CACHE`` or ``~/.cache/sf-ext``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sf-ext")


class JudgeNet(nn.Module):
    """Two 3x3 convolutions (16, 32 channels, ReLU, 2x2 max-pool each) and two linear layers.

    Deliberately different from every model the package trains or attacks.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * side * side, 128),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@dataclass
class Judge:
    """A trained classifier and what it was trained and measured on.

    Attributes:
        model: The classifier (eval mode, CPU).
        dataset: Dataset name.
        trained_on: The split it learnt from (the attacked images must come from the other one).
        held_out_accuracy: Its accuracy on real images of the other split.
        references: Up to :data:`REFERENCES_PER_CLASS` real images per class from the judge's own
            split, ``{class: [K, C, H, W]}`` (used to tell whether a reconstruction shows *its*
            image or only what images of its class look like).
    """

    model: nn.Module
    dataset: str
    trained_on: str
    held_out_accuracy: float
    references: Optional[dict] = None

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Class and softmax probabilities per image; images are clamped to ``[0, 1]`` first."""
        x = torch.as_tensor(images).detach().float().cpu().clamp(0, 1)
        if x.dim() == 3:
            x = x.unsqueeze(0)
        probs = torch.softmax(self.model(x), dim=-1)
        return probs.argmax(dim=-1), probs


def _references(x: np.ndarray, y: np.ndarray, seed: int) -> dict:
    rng = np.random.default_rng(seed + 1)
    out = {}
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        chosen = rng.choice(members, min(REFERENCES_PER_CLASS, len(members)), replace=False)
        out[int(label)] = torch.as_tensor(x[np.sort(chosen)]).float()
    return out


def _train(
    model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int, progress: bool
) -> None:
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.as_tensor(x).float(), torch.as_tensor(y).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    batch = 128
    steps = epochs * ((len(yt) + batch - 1) // batch)
    bar = tqdm(total=steps, desc="training the judge classifier", unit="step", disable=not progress)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(yt), generator=gen)
        for start in range(0, len(yt), batch):
            idx = order[start : start + batch]
            batch_x = xt[idx]
            # Light augmentation (1-pixel shifts) so the judge does not lean on exact positions.
            shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
            batch_x = torch.roll(batch_x, shifts=shift, dims=(-2, -1))
            loss = F.cross_entropy(model(batch_x), yt[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.update(1)
    bar.close()
    model.eval()


@torch.no_grad()
def _accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    preds = [
        model(torch.as_tensor(x[i : i + 512]).float()).argmax(-1) for i in range(0, len(y), 512)
    ]
    return float((torch.cat(preds).numpy() == y).mean())


def load_judge(
    dataset: str,
    attacked_split: str = "train",
    data_root: Optional[Union[str, os.PathLike]] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    max_train: int = 20000,
    min_steps: int = 800,
    seed: int = 0,
    progress: bool = False,
) -> Judge:
    """The judge for reconstructions of ``attacked_split`` images (trained on the other split).

    Trains once (about half a minute for 28x28 images on one core) and caches the weights under
    ``cache_dir`` (default :func:`default_cache_dir`), keyed by dataset, split and recipe.

    Args:
        dataset: Dataset name (see :func:`sf_ext.data.load_dataset`).
        attacked_split: Split the attacked images come from: ``"train"`` (client data) or
            ``"test"``.
        data_root: Data folder.
        cache_dir: Where trained judges are kept.
        max_train: At most this many training images (a fixed random subset).
        min_steps: Training runs whole epochs of batches of 128 until at least this many steps.
        seed: Seed of the subset, the initialization and the batches.
        progress: Show a progress bar while training.
    """
    from sf_ext.data import dataset_spec, load_dataset

    if attacked_split not in ("train", "test"):
        raise ValueError(f"attacked_split must be 'train' or 'test', got {attacked_split!r}")
    spec = dataset_spec(dataset)
    train_split = "test" if attacked_split == "train" else "train"
    recipe = {
        "version": JUDGE_VERSION,
        "dataset": spec.name,
        "split": train_split,
        "max_train": max_train,
        "min_steps": min_steps,
        "seed": seed,
    }
    key = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "judges"
    file = folder / f"{spec.name}-{train_split}-{key}.pt"
    model = JudgeNet(spec.in_channels, spec.image_size, spec.num_classes)
    if file.is_file():
        saved = torch.load(file, map_location="cpu")
        model.load_state_dict(saved["state_dict"])
        model.eval()
        return Judge(
            model, spec.name, train_split, float(saved["held_out_accuracy"]), saved["references"]
        )
    x, y = load_dataset(dataset, data_root, split=train_split)
    rng = np.random.default_rng(seed)
    if len(y) > max_train:
        keep = np.sort(rng.choice(len(y), max_train, replace=False))
        x, y = x[keep], y[keep]
    torch.manual_seed(seed)
    model = JudgeNet(spec.in_channels, spec.image_size, spec.num_classes)
    started = time.perf_counter()
    epochs = max(1, -(-min_steps // -(-len(y) // 128)))
    _train(model, x, y, epochs, seed, progress)
    hx, hy = load_dataset(dataset, data_root, split=attacked_split)
    if len(hy) > 10000:
        keep = np.sort(rng.choice(len(hy), 10000, replace=False))
        hx, hy = hx[keep], hy[keep]
    accuracy = _accuracy(model, hx, hy)
    log.info(
        "judge for %s trained on %s in %.0f s: held-out accuracy %.3f",
        spec.name,
        train_split,
        time.perf_counter() - started,
        accuracy,
    )
    references = _references(x, y, seed)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    payload = {
        "state_dict": model.state_dict(),
        "held_out_accuracy": accuracy,
        "references": references,
        **recipe,
    }
    torch.save(payload, tmp)
    tmp.replace(file)
    return Judge(model, spec.name, train_split, accuracy, references)


def judge_from_arrays(
    x: np.ndarray, y: np.ndarray, min_steps: int = 800, seed: int = 0, progress: bool = False
) -> Judge:
    """A judge trained on a user's own images (not cached). Use images the attacked clients do
    not hold (e.g. their test split); 20 % of them are held out to measure its accuracy."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if x.ndim != 4 or len(x) != len(y) or len(y) < 10:
        raise ValueError(f"need [N, C, H, W] images with N >= 10 labels, got {x.shape}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    cut = max(1, len(y) // 5)
    held, train = order[:cut], order[cut:]
    torch.manual_seed(seed)
    model = JudgeNet(x.shape[1], x.shape[2], int(y.max()) + 1)
    epochs = max(1, -(-min_steps // -(-len(train) // 128)))
    _train(model, x[train], y[train], epochs, seed, progress)
    accuracy = _accuracy(model, x[held], y[held])
    return Judge(model, "arrays", "arrays", accuracy, _references(x[train], y[train], seed))


__all__ = [
    "CACHE_ENV",
    "REFERENCES_PER_CLASS",
    "Judge",
    "JudgeNet",
    "default_cache_dir",
    "judge_from_arrays",
    "load_judge",
]

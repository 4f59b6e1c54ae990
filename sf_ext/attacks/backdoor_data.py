"""Poisoned data for targeted (backdoor) attacks: edge-case tails and pixel-pattern triggers.

Edge-case backdoors (Wang et al. 2020, "Attack of the tails") teach the model to mislabel inputs
that are correct but rare. The original sets (Southwest airplanes relabelled "truck" for CIFAR-10,
ARDIS sevens relabelled "1" for EMNIST) are loaded by :func:`load_edge_case_file` when a path is
given; otherwise :func:`tail_edge_case` builds the analogue from the dataset itself: the
lowest-density samples of a source class, where density is measured by the mean distance to the
sample's k nearest neighbours within the class.

All builders return a :class:`BackdoorData`: the attackers' poisoned training samples (already
relabelled), a held-out poisoned test set on which backdoor accuracy (attack success rate) is
measured, and the indices of the clean training set that were consumed, so the caller can take
them away from benign clients.
"""

import os
import pickle
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

__all__ = [
    "BackdoorData",
    "knn_tail_scores",
    "tail_edge_case",
    "load_edge_case_file",
    "edge_case_from_files",
    "add_pixel_pattern",
    "pixel_pattern_backdoor",
]


@dataclass
class BackdoorData:
    """Poisoned samples for the attackers and a held-out set for measuring the backdoor.

    Attributes:
        train_x: Poisoned training inputs, same layout as the clean training tensor.
        train_y: Their (attacker-chosen) labels, int64.
        test_x: Held-out poisoned inputs; backdoor accuracy = fraction predicted as ``test_y``.
        test_y: Target labels of the held-out inputs.
        removed_indices: Indices of the clean training set used up by the builder (edge-case
            tail samples); benign clients must not hold them.
        info: Free-form description (kind, classes, sizes), recorded with the results.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    removed_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    info: dict = field(default_factory=dict)


def knn_tail_scores(features: torch.Tensor, k: int = 5, chunk: int = 1024) -> torch.Tensor:
    """Mean Euclidean distance of every row to its ``k`` nearest other rows (higher = rarer)."""
    flat = features.reshape(features.shape[0], -1).to(torch.float32)
    n = flat.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} samples to score density, got {n}")
    scores = torch.empty(n)
    for start in range(0, n, chunk):
        block = torch.cdist(flat[start : start + chunk], flat)
        rows = torch.arange(block.shape[0])
        block[rows, rows + start] = float("inf")  # a sample is not its own neighbour
        scores[start : start + chunk] = block.topk(k, dim=1, largest=False).values.mean(dim=1)
    return scores


def tail_edge_case(
    images: torch.Tensor,
    labels: torch.Tensor,
    source_class: int,
    target_class: int,
    fraction: float = 0.05,
    held_out: float = 0.3,
    k: int = 5,
    seed: int = 0,
) -> BackdoorData:
    """Edge-case set built from the data: the rarest ``fraction`` of ``source_class``.

    Args:
        images: Clean training inputs ``[n, ...]``.
        labels: Their labels ``[n]``.
        source_class: Class whose tail is relabelled (the analogue of ARDIS "7").
        target_class: Label the attackers want for those inputs (the analogue of "1").
        fraction: Share of the source class taken as the tail.
        held_out: Share of the tail kept out of the attackers' data to measure the backdoor.
        k: Neighbours used for the density estimate.
        seed: Seed of the attacker/held-out split.
    """
    if source_class == target_class:
        raise ValueError("source and target class must differ")
    if not 0 < fraction < 1 or not 0 < held_out < 1:
        raise ValueError("fraction and held_out must lie in (0, 1)")
    labels = torch.as_tensor(labels)
    members = torch.nonzero(labels == source_class).reshape(-1)
    if members.numel() == 0:
        raise ValueError(f"no samples of class {source_class}")
    scores = knn_tail_scores(images[members], k=k)
    n_tail = max(2, int(round(fraction * members.numel())))
    tail = members[scores.argsort(descending=True)[:n_tail]].numpy()
    rng = np.random.default_rng(seed)
    tail = tail[rng.permutation(n_tail)]
    n_test = max(1, int(round(held_out * n_tail)))
    test_idx, train_idx = tail[:n_test], tail[n_test:]
    return BackdoorData(
        train_x=images[train_idx].clone(),
        train_y=torch.full((len(train_idx),), target_class, dtype=torch.int64),
        test_x=images[test_idx].clone(),
        test_y=torch.full((len(test_idx),), target_class, dtype=torch.int64),
        removed_indices=np.sort(tail),
        info={
            "kind": "edge_case_tail",
            "source_class": int(source_class),
            "target_class": int(target_class),
            "fraction": fraction,
            "k": k,
            "n_train": len(train_idx),
            "n_test": len(test_idx),
        },
    )


def load_edge_case_file(path: str) -> np.ndarray:
    """Load an edge-case image array from Wang et al.'s files (or any similar array file).

    Accepts a pickle or ``.npy`` of a numpy array (``[n, H, W]`` or ``[n, H, W, C]``, e.g.
    ``southwest_images_new_train.pkl``), a ``.npz`` (first array), or a ``.pt`` holding a tensor, an
    ``(images, labels)`` pair or a torchvision-style dataset with a ``data`` attribute (the ARDIS
    files). Returns the raw images as a numpy array.
    """
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        obj = np.load(path)
    elif ext == ".npz":
        with np.load(path) as archive:
            obj = archive[archive.files[0]]
    elif ext in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu")
    else:
        with open(path, "rb") as handle:
            obj = pickle.load(handle)
    if hasattr(obj, "data") and not isinstance(obj, (np.ndarray, torch.Tensor)):
        obj = obj.data
    if isinstance(obj, (tuple, list)):
        obj = obj[0]
    if isinstance(obj, torch.Tensor):
        obj = obj.numpy()
    return np.asarray(obj)


def edge_case_from_files(
    train_path: str,
    test_path: str,
    target_class: int,
    to_tensor: Callable[[np.ndarray], torch.Tensor],
) -> BackdoorData:
    """Edge-case set from the original files, converted like the clean data by ``to_tensor``."""
    train_x = to_tensor(load_edge_case_file(train_path))
    test_x = to_tensor(load_edge_case_file(test_path))
    return BackdoorData(
        train_x=train_x,
        train_y=torch.full((train_x.shape[0],), target_class, dtype=torch.int64),
        test_x=test_x,
        test_y=torch.full((test_x.shape[0],), target_class, dtype=torch.int64),
        info={
            "kind": "edge_case_files",
            "train_path": str(train_path),
            "test_path": str(test_path),
            "target_class": int(target_class),
            "n_train": int(train_x.shape[0]),
            "n_test": int(test_x.shape[0]),
        },
    )


def add_pixel_pattern(images: torch.Tensor, size: int = 3, value: Optional[float] = None):
    """Stamp a ``size x size`` checkerboard trigger into the bottom-right corner of each image.

    ``value`` defaults to the largest value in the batch, so the trigger is "white" whatever the
    normalization of the inputs; the other checkerboard cells take the smallest value.
    """
    out = images.clone()
    high = float(images.max()) if value is None else float(value)
    low = float(images.min())
    grid = torch.tensor([[(i + j) % 2 == 0 for j in range(size)] for i in range(size)])
    patch = torch.where(grid, torch.tensor(high), torch.tensor(low)).to(images.dtype)
    out[..., -size - 1 : -1, -size - 1 : -1] = patch
    return out


def pixel_pattern_backdoor(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    target_class: int,
    n_poison: int = 500,
    size: int = 3,
    seed: int = 0,
    value: Optional[float] = None,
) -> BackdoorData:
    """Pixel-pattern backdoor (BadNets style): triggered inputs of other classes -> target class.

    The attackers' poisoned samples are ``n_poison`` triggered copies of training images (the
    clean originals stay where they are); backdoor accuracy is measured on every test image not
    of the target class, with the trigger stamped in.
    """
    rng = np.random.default_rng(seed)
    candidates = np.nonzero(np.asarray(train_labels) != target_class)[0]
    chosen = rng.choice(candidates, size=min(n_poison, len(candidates)), replace=False)
    high = float(train_images.max()) if value is None else value
    test_keep = np.nonzero(np.asarray(test_labels) != target_class)[0]
    train_x = add_pixel_pattern(train_images[chosen], size, high)
    test_x = add_pixel_pattern(test_images[test_keep], size, high)
    return BackdoorData(
        train_x=train_x,
        train_y=torch.full((len(chosen),), target_class, dtype=torch.int64),
        test_x=test_x,
        test_y=torch.full((len(test_keep),), target_class, dtype=torch.int64),
        info={
            "kind": "pixel_pattern",
            "target_class": int(target_class),
            "size": size,
            "n_train": len(chosen),
            "n_test": len(test_keep),
        },
    )

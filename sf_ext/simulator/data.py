"""The simulator's data: one shared training tensor, clients as index lists, poisoned rows.

:func:`build_federated_data` loads the dataset (through :mod:`sf_ext.data`), optionally takes a
random subset, builds the poisoned set of the configured backdoor (edge-case tail or original
files, or a pixel pattern), removes edge-case tail samples from the clean pool, partitions the
clean pool among the N clients (IID or Dirichlet) and stacks clean and poisoned rows into one
tensor. Client ``i`` is ``client_indices[i]``, an array of rows of that tensor.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from sf_ext.attacks.backdoor_data import (
    BackdoorData,
    edge_case_from_files,
    pixel_pattern_backdoor,
    tail_edge_case,
)

__all__ = ["FederatedData", "build_federated_data", "load_split", "images_to_tensor"]

_SPLIT_CACHE: Dict[Tuple[str, Optional[str], str], Tuple[torch.Tensor, torch.Tensor]] = {}


def load_split(name: str, root: Optional[str], split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """A dataset split as tensors, cached per process (cells of a grid share it)."""
    key = (name, root, split)
    if key not in _SPLIT_CACHE:
        from sf_ext.data import load_dataset

        x, y = load_dataset(name, root, split)
        _SPLIT_CACHE[key] = (torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y))
    return _SPLIT_CACHE[key]


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """Raw images (uint8 ``[n, H, W]`` or ``[n, H, W, C]``) to float32 ``[n, C, H, W]`` in [0, 1],
    the layout of :func:`sf_ext.data.load_dataset`."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    arr = arr.astype(np.float32)
    if arr.max(initial=0.0) > 1.0:
        arr = arr / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr))


@dataclass
class FederatedData:
    """Shared tensors and the client partition of one simulated population.

    Attributes:
        train_x: Clean training rows followed by the poisoned rows.
        train_y: Labels of those rows (poisoned rows carry the attacker's target label).
        test_x: Main-task test inputs.
        test_y: Main-task test labels.
        client_indices: Row indices of each of the N clients (clean rows only).
        n_clean: Number of clean rows (the poisoned rows start here).
        backdoor: Poisoned data (``None`` without a backdoor section).
        dataset: Dataset name (for the model builder).
        model_name: Model name.
        model_options: Model builder options.
        num_classes: Output classes.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    client_indices: List[np.ndarray]
    n_clean: int
    backdoor: Optional[BackdoorData]
    dataset: str
    model_name: str
    model_options: Dict
    num_classes: int

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def build_model(self) -> torch.nn.Module:
        from sf_ext.models import build_model

        channels, size = self.input_shape[0], self.input_shape[-1]
        return build_model(self.model_name, channels, size, self.num_classes, **self.model_options)

    def clean_indices(self) -> np.ndarray:
        return np.concatenate(self.client_indices)

    def poison_indices(self, kind: str) -> np.ndarray:
        """Rows of the poisoned samples (attackers' shared poisoned set)."""
        if self.backdoor is None:
            raise ValueError("no backdoor data configured")
        have = "pixel" if self.backdoor.info.get("kind") == "pixel_pattern" else "edge_case"
        if kind != have:
            raise ValueError(f"the attack needs {kind!r} poisoned data, the config built {have!r}")
        return np.arange(self.n_clean, self.train_x.shape[0], dtype=np.int64)

    def pretrain_key(self, config) -> str:
        """Hash of everything pretraining depends on (so cells of a grid share one model)."""
        parts = {
            "dataset": config.dataset,
            "train_subset": config.train_subset,
            "model": config.model,
            "model_options": config.model_options,
            "backdoor": config.backdoor,
            "epochs": config.pretrain_epochs,
            "lr": config.pretrain_lr,
            "batch_size": config.batch_size,
            "momentum": config.momentum,
            "weight_decay": config.weight_decay,
            "seed": config.seed,
            "partition": [config.num_clients, config.partition, config.alpha],
        }
        text = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


def _subset(y: torch.Tensor, size: Optional[int], seed: int) -> np.ndarray:
    if size is None or size >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(len(y), size=size, replace=False))


def _build_backdoor(cfg, train_x, train_y, test_x, test_y) -> Optional[BackdoorData]:
    spec = dict(cfg.backdoor or {})
    if not spec:
        return None
    kind = spec.get("kind", "edge_case")
    target = int(spec.get("target_class", 1))
    if kind == "pixel":
        return pixel_pattern_backdoor(
            train_x,
            train_y,
            test_x,
            test_y,
            target_class=target,
            n_poison=int(spec.get("n_poison", 500)),
            size=int(spec.get("size", 3)),
            seed=cfg.seed,
        )
    if kind != "edge_case":
        raise ValueError(f"backdoor kind must be 'edge_case' or 'pixel', got {kind!r}")
    paths = [spec.get("train_path"), spec.get("test_path")]
    if all(paths) and all(os.path.exists(os.path.expanduser(p)) for p in paths):
        return edge_case_from_files(
            *[os.path.expanduser(p) for p in paths], target, to_tensor=images_to_tensor
        )
    # Without the original files the tail of a source class stands in for them.
    data = tail_edge_case(
        train_x,
        train_y,
        source_class=int(spec.get("source_class", 7)),
        target_class=target,
        fraction=float(spec.get("tail_fraction", 0.05)),
        held_out=float(spec.get("held_out", 0.3)),
        k=int(spec.get("knn_k", 5)),
        seed=int(spec.get("seed", 0)),
    )
    if any(paths):
        data.info["missing_files"] = [p for p in paths if p]
    return data


def build_federated_data(cfg) -> FederatedData:
    """Load, poison and partition the data of a :class:`SimulationConfig`."""
    from sf_ext.data import (
        dataset_spec,
        partition_indices_dirichlet,
        partition_indices_iid,
    )

    full_x, full_y = load_split(cfg.dataset, cfg.data_root, "train")
    test_x, test_y = load_split(cfg.dataset, cfg.data_root, "test")
    keep = _subset(full_y, cfg.train_subset, cfg.seed)
    train_x, train_y = full_x[keep], full_y[keep]
    test_keep = _subset(test_y, cfg.test_subset, cfg.seed + 1)
    test_x, test_y = test_x[test_keep], test_y[test_keep]

    backdoor = _build_backdoor(cfg, train_x, train_y, test_x, test_y)
    clean = np.arange(len(train_y))
    if backdoor is not None and len(backdoor.removed_indices):
        clean = np.setdiff1d(clean, backdoor.removed_indices)
    clean_x, clean_y = train_x[clean], train_y[clean]
    if cfg.partition == "iid":
        parts = partition_indices_iid(len(clean_y), cfg.num_clients, seed=cfg.seed)
    else:
        parts = partition_indices_dirichlet(
            clean_y.numpy(),
            cfg.num_clients,
            cfg.alpha,
            seed=cfg.seed,
            min_size=cfg.min_client_size,
        )
    if backdoor is not None:
        shared_x = torch.cat([clean_x, backdoor.train_x.to(clean_x.dtype)])
        shared_y = torch.cat([clean_y, backdoor.train_y])
    else:
        shared_x, shared_y = clean_x, clean_y
    return FederatedData(
        train_x=shared_x.contiguous(),
        train_y=shared_y.contiguous(),
        test_x=test_x.contiguous(),
        test_y=test_y.contiguous(),
        client_indices=[np.asarray(p, dtype=np.int64) for p in parts],
        n_clean=len(clean_y),
        backdoor=backdoor,
        dataset=cfg.dataset,
        model_name=cfg.model,
        model_options=dict(cfg.model_options),
        num_classes=dataset_spec(cfg.dataset).num_classes,
    )

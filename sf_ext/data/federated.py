"""Hand-off of local numpy data to SecretFlow parties as horizontal ``FedNdarray`` objects.

SecretFlow is imported inside the functions, so importing this module stays cheap.
"""

import os
from typing import TYPE_CHECKING, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from sf_ext.data.loaders import dataset_spec, load_dataset, one_hot
from sf_ext.data.partition import split_by_fractions

if TYPE_CHECKING:  # pragma: no cover - typing only
    from secretflow import PYU
    from secretflow.data.ndarray import FedNdarray

PathLike = Union[str, os.PathLike]


def _identity(array: np.ndarray) -> np.ndarray:
    return array


def to_fed_ndarray(parts: Mapping["PYU", np.ndarray]) -> "FedNdarray":
    """Place each array on its party and wrap them as one horizontally partitioned ``FedNdarray``.

    Args:
        parts: Party device -> that party's rows (all arrays share the trailing dimensions).

    Raises:
        ValueError: ``parts`` is empty, a key is not a ``PYU``, or trailing shapes differ.
    """
    from secretflow import PYU
    from secretflow.data.ndarray import FedNdarray, PartitionWay

    if not parts:
        raise ValueError("parts must map at least one PYU to an array")
    trailing_shapes = set()
    for device, array in parts.items():
        if not isinstance(device, PYU):
            raise ValueError(f"parts keys must be PYU devices, got {type(device).__name__}")
        trailing_shapes.add(np.shape(array)[1:])
    if len(trailing_shapes) > 1:
        raise ValueError(f"parts must share trailing dimensions, got {sorted(trailing_shapes)}")
    return FedNdarray(
        partitions={device: device(_identity)(np.asarray(a)) for device, a in parts.items()},
        partition_way=PartitionWay.HORIZONTAL,
    )


def _subsample(
    data: Tuple[np.ndarray, np.ndarray], size: int, rng: np.random.Generator
) -> Tuple[np.ndarray, np.ndarray]:
    keep = np.sort(rng.choice(len(data[1]), min(size, len(data[1])), replace=False))
    return data[0][keep], data[1][keep]


def _split_to_parties(
    x: np.ndarray, y: np.ndarray, parties: Dict["PYU", float], seed: int
) -> Tuple["FedNdarray", "FedNdarray"]:
    devices = list(parties)
    pieces = split_by_fractions(x, y, [parties[d] for d in devices], seed=seed)
    return (
        to_fed_ndarray({d: part_x for d, (part_x, _) in zip(devices, pieces)}),
        to_fed_ndarray({d: part_y for d, (_, part_y) in zip(devices, pieces)}),
    )


def federated_dataset(
    name: str,
    parties: Mapping["PYU", float],
    root: Optional[PathLike] = None,
    seed: int = 0,
    one_hot_labels: bool = True,
    limit: Optional[int] = None,
) -> Tuple[Tuple["FedNdarray", "FedNdarray"], Tuple["FedNdarray", "FedNdarray"]]:
    """Load a dataset and split train and test among parties by the same fractions.

    The result plugs into ``FLModel.fit(train_x, train_y, validation_data=(test_x, test_y))``.

    Args:
        name: Any name :func:`sf_ext.data.load_dataset` accepts.
        parties: Party device -> fraction of the data it holds (fractions sum to 1), e.g.
            ``{alice: 0.4, bob: 0.6}``.
        root: Data folder (see :func:`sf_ext.data.load_dataset`).
        seed: Seed of the shuffle before splitting (and of the subsample when ``limit`` is set).
        one_hot_labels: Give labels as float32 one-hot rows, which SecretFlow's torch metric
            wrappers expect; otherwise int64 class indices.
        limit: Keep at most this many training samples (a random subset), and as many test samples
            in the same proportion, for quick runs. ``None`` keeps everything.

    Returns:
        ``((train_x, train_y), (test_x, test_y))`` as horizontal ``FedNdarray`` objects.
    """
    parties = dict(parties)
    if not parties:
        raise ValueError("parties must name at least one PYU with its fraction")
    if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    num_classes = dataset_spec(name).num_classes
    rng = np.random.default_rng(seed)
    train = load_dataset(name, root, "train")
    test = load_dataset(name, root, "test")
    if limit is not None and limit < len(train[1]):
        test_limit = max(1, round(len(test[1]) * limit / len(train[1])))
        train = _subsample(train, limit, rng)
        test = _subsample(test, test_limit, rng)
    result = []
    for x, y in (train, test):
        labels = one_hot(y, num_classes) if one_hot_labels else y
        result.append(_split_to_parties(x, labels, parties, seed))
    return result[0], result[1]

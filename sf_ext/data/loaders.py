"""Dataset loaders that read local files only (no downloads).

Every loader returns ``(x, y)``: ``x`` float32 in ``[0, 1]`` shaped ``[N, C, H, W]`` and ``y``
int64 class indices shaped ``[N]``. :func:`load_dataset` is the single entry point.

**Where data is looked for** (the one rule every loader, command and notebook follows):

1. ``root`` when given (a ``root=`` argument, ``--data-root``), and then only there: either the
   dataset's own folder (the one holding the files) or a base folder that contains per-dataset
   subfolders (``fashion-mnist/``, ...).
2. Otherwise these base folders, in order, the first holding the dataset's files winning:

   a. ``$SF_EXT_DATA`` when the variable is set;
   b. ``shared/data`` beside the source checkout sf-ext runs from (``<checkout>/../shared/data``),
      when sf-ext runs from a checkout and that folder exists;
   c. ``/usr/share/datasets`` (where Debian's ``dataset-fashion-mnist`` package installs).

In each base folder the dataset's usual subfolder names are tried before the base itself. When
none holds the files, :class:`DatasetNotFoundError` lists every folder searched.
:func:`resolve_dataset` turns a missing dataset into a fallback (scikit-learn's digits, which
need no files) and says loudly that it did.
"""

import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from sf_ext.data.idx import read_idx_images_and_labels

PathLike = Union[str, os.PathLike]
Arrays = Tuple[np.ndarray, np.ndarray]

logger = logging.getLogger(__name__)

#: Environment variable naming the base data folder.
DATA_ROOT_ENV = "SF_EXT_DATA"
#: Where Debian's dataset packages install (``dataset-fashion-mnist``).
SYSTEM_DATA_ROOT = Path("/usr/share/datasets")
#: The source checkout sf-ext runs from, if it runs from one (``None`` for an installed wheel).
_PACKAGE_PARENT = Path(__file__).resolve().parents[2]
SPLITS = ("train", "test")

EMNIST_NUM_CLASSES = {
    "byclass": 62,
    "bymerge": 47,
    "balanced": 47,
    "letters": 26,
    "digits": 10,
    "mnist": 10,
}

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCHES = ("test_batch",)

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are in none of the places searched."""


@dataclass(frozen=True)
class DatasetSpec:
    """Shape facts about a dataset, enough to build a model for it."""

    name: str
    in_channels: int
    image_size: int
    num_classes: int


def one_hot(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Encode class indices as float32 one-hot rows (what SecretFlow's metric wrappers expect).

    Args:
        y: Integer labels shaped ``[N]``.
        num_classes: Number of classes; every label must be in ``[0, num_classes)``.

    Returns:
        Array shaped ``[N, num_classes]``.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D class indices, got shape {y.shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must hold integer class indices, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    encoded = np.zeros((len(y), num_classes), dtype=np.float32)
    encoded[np.arange(len(y)), y] = 1.0
    return encoded


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def _to_images(pixels: np.ndarray) -> np.ndarray:
    """uint8 ``[N, H, W]`` or ``[N, C, H, W]`` -> float32 ``[N, C, H, W]`` in [0, 1]."""
    if pixels.ndim == 3:
        pixels = pixels[:, None]
    return pixels.astype(np.float32) / 255.0


# ---------------------------------------------------------------------------------------------
# Locating files


def checkout_data_root() -> Optional[Path]:
    """``shared/data`` beside the source checkout sf-ext runs from, if there is one and it exists.

    A checkout is recognised by its ``pyproject.toml`` next to the ``sf_ext`` package; an
    installed wheel has none, and then this returns ``None``.
    """
    if not (_PACKAGE_PARENT / "pyproject.toml").is_file():
        return None
    folder = _PACKAGE_PARENT.parent / "shared" / "data"
    return folder if folder.is_dir() else None


def base_roots(root: Optional[PathLike] = None) -> List[Path]:
    """Base folders searched for datasets, in order (see the module docstring for the rule).

    Args:
        root: An explicit folder; when given it is the only one searched.

    Returns:
        ``[root]``, or ``[$SF_EXT_DATA, <checkout>/../shared/data, /usr/share/datasets]`` without
        the entries that do not apply (variable unset, not a checkout, folder absent).
    """
    if root is not None:
        return [Path(root).expanduser()]
    roots = []
    env_root = os.environ.get(DATA_ROOT_ENV)
    if env_root:
        roots.append(Path(env_root).expanduser())
    checkout = checkout_data_root()
    if checkout is not None:
        roots.append(checkout)
    roots.append(SYSTEM_DATA_ROOT)
    return roots


def _find_folder(
    root: Optional[PathLike],
    subfolders: Sequence[str],
    has_files: Callable[[Path], bool],
    dataset: str,
    how_to_get: str,
) -> Path:
    """First folder (a base itself, or base/subfolder) for which ``has_files`` holds."""
    searched = []
    for base in base_roots(root):
        # Named subfolders first: a base folder may also hold loose files of another dataset.
        for folder in [base / sub for sub in subfolders] + [base]:
            searched.append(folder)
            if folder.is_dir() and has_files(folder):
                return folder
    places = "\n  ".join(str(p) for p in searched)
    raise DatasetNotFoundError(
        f"{dataset} files not found. Looked in:\n  {places}\n{how_to_get}\n"
        f"Pass root=<folder>, or set {DATA_ROOT_ENV} to a folder that contains the dataset's "
        f"subfolder."
    )


def _existing(folder: Path, name: str) -> Optional[Path]:
    """``folder/name`` or ``folder/name.gz``, whichever exists (raw first)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


# ---------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST (IDX)

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_pair_finder(file_names: Dict[str, Tuple[str, str]]) -> Callable[[Path], bool]:
    def has_files(folder: Path) -> bool:
        return all(_existing(folder, n) for pair in file_names.values() for n in pair)

    return has_files


def _load_idx_split(folder: Path, images_name: str, labels_name: str) -> Arrays:
    images_path, labels_path = _existing(folder, images_name), _existing(folder, labels_name)
    for name, path in ((images_name, images_path), (labels_name, labels_path)):
        if path is None:
            raise FileNotFoundError(f"{folder / name}[.gz] not found")
    images, labels = read_idx_images_and_labels(images_path, labels_path)
    return _to_images(images), labels.astype(np.int64)


def load_mnist_idx(root: Optional[PathLike] = None, split: str = "train") -> Arrays:
    """MNIST from its four IDX files (raw or ``.gz``).

    Looked for in ``<base>/mnist``, ``<base>/MNIST/raw`` (torchvision's layout), then ``<base>``.
    """
    _check_split(split)
    return _load_idx_split(_mnist_folder(root), *MNIST_FILES[split])


def _mnist_folder(root: Optional[PathLike]) -> Path:
    return _find_folder(
        root,
        ["mnist", "MNIST/raw"],
        _idx_pair_finder(MNIST_FILES),
        "MNIST",
        "Place train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
        "t10k-labels-idx1-ubyte (raw or .gz) in a folder named mnist/.",
    )


def load_fashion_mnist(root: Optional[PathLike] = None, split: str = "train") -> Arrays:
    """Fashion-MNIST from its four IDX files (raw or ``.gz``; same names as MNIST).

    Looked for in ``<base>/fashion-mnist``, ``<base>/fashion_mnist``, ``<base>/FashionMNIST/raw``,
    then ``<base>``.
    """
    _check_split(split)
    return _load_idx_split(_fashion_mnist_folder(root), *MNIST_FILES[split])


def _fashion_mnist_folder(root: Optional[PathLike]) -> Path:
    return _find_folder(
        root,
        ["fashion-mnist", "fashion_mnist", "FashionMNIST/raw"],
        _idx_pair_finder(MNIST_FILES),
        "Fashion-MNIST",
        "Place train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
        "and t10k-labels-idx1-ubyte.gz in a folder named fashion-mnist/, or install Debian's "
        "package dataset-fashion-mnist (it puts them in /usr/share/datasets/fashion-mnist/).",
    )


# ---------------------------------------------------------------------------------------------
# EMNIST (IDX, torchvision's raw layout)


def _emnist_files(subset: str) -> Dict[str, Tuple[str, str]]:
    return {
        split: (
            f"emnist-{subset}-{split}-images-idx3-ubyte",
            f"emnist-{subset}-{split}-labels-idx1-ubyte",
        )
        for split in SPLITS
    }


def load_emnist(subset: str, root: Optional[PathLike] = None, split: str = "train") -> Arrays:
    """One EMNIST subset from ``emnist-<subset>-<split>-{images-idx3,labels-idx1}-ubyte[.gz]``.

    Looked for in ``<base>/EMNIST/raw`` (torchvision's layout), ``<base>/emnist``,
    ``<base>/emnist/raw``, then ``<base>``. EMNIST stores each image transposed; they are
    returned upright. The ``letters`` subset's labels 1..26 are shifted to 0..25.

    Args:
        subset: One of ``byclass``, ``bymerge``, ``balanced``, ``letters``, ``digits``, ``mnist``.
    """
    _check_split(split)
    if subset not in EMNIST_NUM_CLASSES:
        raise ValueError(
            f"EMNIST subset must be one of {sorted(EMNIST_NUM_CLASSES)}, got {subset!r}"
        )
    files = _emnist_files(subset)
    folder = _emnist_folder(subset, root)
    x, y = _load_idx_split(folder, *files[split])
    # Stored column-major: swapping height and width makes the characters upright.
    x = np.ascontiguousarray(x.transpose(0, 1, 3, 2))
    if subset == "letters":
        y = y - 1
    num_classes = EMNIST_NUM_CLASSES[subset]
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"{folder}: EMNIST {subset} labels out of range [0, {num_classes}): "
            f"[{y.min()}, {y.max()}]"
        )
    return x, y


def _emnist_folder(subset: str, root: Optional[PathLike]) -> Path:
    files = _emnist_files(subset)
    return _find_folder(
        root,
        ["EMNIST/raw", "emnist", "emnist/raw"],
        _idx_pair_finder(files),
        f"EMNIST ({subset})",
        f"Unzip the EMNIST 'gzip' archive so that {files['train'][0]}.gz and the other three "
        f"{subset} files are in a folder EMNIST/raw/.",
    )


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (python pickle batches)


def _read_cifar_batch(path: Path) -> Arrays:
    try:
        with open(path, "rb") as handle:
            # The official batches are Python 2 pickles of numpy arrays: latin1 decodes both.
            batch = pickle.load(handle, encoding="latin1")
    except Exception as exc:  # a corrupt pickle can fail in many ways; report them all alike
        raise ValueError(f"{path}: not a readable CIFAR-10 pickle batch ({exc})") from exc
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path}: missing 'data' or 'labels' (keys: {sorted(batch)})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: data must be uint8 [N, 3072], got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise ValueError(f"{path}: {labels.size} labels for {len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels out of range [0, 10): [{labels.min()}, {labels.max()}]")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root: Optional[PathLike] = None, split: str = "train") -> Arrays:
    """CIFAR-10 from the python batches (``data_batch_1`` .. ``data_batch_5``, ``test_batch``).

    Looked for in ``<base>/cifar-10-batches-py``, ``<base>/cifar10``,
    ``<base>/cifar10/cifar-10-batches-py``, ``<base>/cifar-10``, then ``<base>``. The batches are
    pickles: only load files from a source you trust.
    """
    _check_split(split)
    folder = _cifar10_folder(root)
    names = CIFAR10_TRAIN_BATCHES if split == "train" else CIFAR10_TEST_BATCHES
    parts = [_read_cifar_batch(folder / name) for name in names]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return _to_images(x), y


def _cifar10_folder(root: Optional[PathLike]) -> Path:
    all_batches = CIFAR10_TRAIN_BATCHES + CIFAR10_TEST_BATCHES
    return _find_folder(
        root,
        [CIFAR10_FOLDER, "cifar10", f"cifar10/{CIFAR10_FOLDER}", "cifar-10"],
        lambda f: all((f / b).is_file() for b in all_batches),
        "CIFAR-10",
        f"Extract cifar-10-python.tar.gz so that {CIFAR10_FOLDER}/ with data_batch_1..5 and "
        "test_batch is inside the data folder.",
    )


# ---------------------------------------------------------------------------------------------
# scikit-learn digits (ships with scikit-learn: the offline default)


def load_digits(split: str = "train") -> Arrays:
    """scikit-learn's 1,797 8x8 digits, scaled to [0, 1], with a fixed stratified split.

    The split (20 % test, seed 0) is the same on every machine, so results are comparable.
    """
    _check_split(split)
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    test_mask = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        test_mask[members[: int(round(len(members) * DIGITS_TEST_FRACTION))]] = True
    keep = test_mask if split == "test" else ~test_mask
    return x[keep], y[keep]


# ---------------------------------------------------------------------------------------------
# Registry

_SPECS = {
    "mnist": DatasetSpec("mnist", 1, 28, 10),
    "fashion-mnist": DatasetSpec("fashion-mnist", 1, 28, 10),
    "cifar10": DatasetSpec("cifar10", 3, 32, 10),
    "digits": DatasetSpec("digits", 1, 8, 10),
}
_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
}


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"dataset name must be a string, got {name!r}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in _SPECS:
        return key
    if key.startswith("emnist-") or key.startswith("emnist_"):
        subset = key[len("emnist-") :]
        if subset in EMNIST_NUM_CLASSES:
            return f"emnist-{subset}"
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(dataset_names())}")


def dataset_names() -> List[str]:
    """Every name :func:`load_dataset` accepts (aliases aside)."""
    return sorted(_SPECS) + [f"emnist-{s}" for s in EMNIST_NUM_CLASSES]


def dataset_spec(name: str) -> DatasetSpec:
    """Channels, image size and class count of a dataset, without reading any file."""
    key = _canonical(name)
    if key.startswith("emnist-"):
        return DatasetSpec(key, 1, 28, EMNIST_NUM_CLASSES[key[len("emnist-") :]])
    return _SPECS[key]


def load_dataset(name: str, root: Optional[PathLike] = None, split: str = "train") -> Arrays:
    """Load a dataset split as ``(x float32 [N, C, H, W] in [0, 1], y int64 [N])``.

    Args:
        name: ``mnist``, ``fashion-mnist``, ``cifar10``, ``emnist-<subset>`` (e.g.
            ``emnist-digits``) or ``digits`` (scikit-learn's, needs no files).
        root: The dataset's folder or a base folder with per-dataset subfolders; by default the
            folders of :func:`base_roots` are searched (``$SF_EXT_DATA``, ``shared/data`` beside
            the checkout, ``/usr/share/datasets``). Ignored for ``digits``.
        split: ``train`` or ``test``.

    Raises:
        ValueError: Unknown name or split, or malformed files.
        DatasetNotFoundError: The files are in none of the searched folders (the message lists
            them and says how to get the files).
    """
    key = _canonical(name)
    _check_split(split)
    if key == "digits":
        return load_digits(split)
    if key == "mnist":
        return load_mnist_idx(root, split)
    if key == "fashion-mnist":
        return load_fashion_mnist(root, split)
    if key == "cifar10":
        return load_cifar10(root, split)
    return load_emnist(key[len("emnist-") :], root, split)


def dataset_folder(name: str, root: Optional[PathLike] = None) -> Optional[Path]:
    """The folder :func:`load_dataset` would read ``name`` from, without reading the data.

    Args:
        name: Any name :func:`load_dataset` accepts.
        root: As for :func:`load_dataset`.

    Returns:
        The folder holding the dataset's files, or ``None`` for ``digits`` (no files needed).

    Raises:
        ValueError: Unknown name.
        DatasetNotFoundError: The files are in none of the searched folders.
    """
    key = _canonical(name)
    if key == "digits":
        return None
    if key == "mnist":
        return _mnist_folder(root)
    if key == "fashion-mnist":
        return _fashion_mnist_folder(root)
    if key == "cifar10":
        return _cifar10_folder(root)
    return _emnist_folder(key[len("emnist-") :], root)


def resolve_dataset(name: str, root: Optional[PathLike] = None, fallback: str = "digits") -> str:
    """``name`` when its files can be found, otherwise ``fallback``, announced loudly.

    The switch is logged as a warning (logger ``sf_ext.data.loaders``, with every folder searched)
    and printed as one line on stdout, so that a result computed on the fallback is never mistaken
    for one on the requested dataset.

    Args:
        name: The dataset wanted.
        root: As for :func:`load_dataset`.
        fallback: The dataset to use instead; it must need no files or have them (``digits``
            always works offline).

    Returns:
        The canonical name of the dataset to load.

    Raises:
        ValueError: ``name`` or ``fallback`` is unknown.
        DatasetNotFoundError: Neither dataset's files can be found.
    """
    key = _canonical(name)
    fallback_key = _canonical(fallback)
    try:
        dataset_folder(key, root)
        return key
    except DatasetNotFoundError as missing:
        dataset_folder(fallback_key, root)
        headline = (
            f"sf-ext: dataset {key!r} not found, USING {fallback_key!r} INSTEAD "
            f"(results are on {fallback_key}, not {key})"
        )
        logger.warning("%s.\n%s", headline, missing)
        print(f"{headline}; set {DATA_ROOT_ENV} or pass a data root to use {key}.", flush=True)
        return fallback_key

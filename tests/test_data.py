"""Tests of sf_ext.data: file loaders, partitioning and the SecretFlow hand-off."""

import gzip
import logging
import pickle
import subprocess
import sys

import numpy as np
import pytest

# Recorded before sf_ext is imported here, to check cheaply that sf_ext does not import SecretFlow.
SECRETFLOW_PRELOADED = "secretflow" in sys.modules

import sf_ext.models  # noqa: E402  (after the check above on purpose)
from sf_ext.data import loaders  # noqa: E402
from sf_ext.data import (  # noqa: E402
    DATA_ROOT_ENV,
    SYSTEM_DATA_ROOT,
    DatasetNotFoundError,
    base_roots,
    checkout_data_root,
    dataset_folder,
    dataset_names,
    dataset_spec,
    dirichlet_partition,
    federated_dataset,
    fraction_sizes,
    iid_partition,
    load_cifar10,
    load_dataset,
    load_digits,
    one_hot,
    read_idx,
    resolve_dataset,
    split_by_fractions,
    to_fed_ndarray,
    write_idx,
)

SECRETFLOW_IMPORTED_AT_COLLECTION = "secretflow" in sys.modules

# ---------------------------------------------------------------------------------------------
# Helpers writing small files in the real formats


def make_images(count: int, height: int = 28, width: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width), dtype=np.uint8)


def write_mnist_folder(folder, train_count=6, test_count=4, compress=True, seed=0):
    """Write the four MNIST-style IDX files; return the arrays written."""
    suffix = ".gz" if compress else ""
    arrays = {}
    for offset, (prefix, count) in enumerate((("train", train_count), ("t10k", test_count))):
        images = make_images(count, seed=seed + offset)
        labels = (np.arange(count) % 10).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        arrays[prefix] = (images, labels)
    return arrays


def write_cifar_folder(folder, per_batch=3):
    """Write CIFAR-10 python batches (5 train + test); return (train, test) raw arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as handle:
            # Protocol 2 with bytes keys, like the official Python 2 batches.
            batch = {b"batch_label": name.encode(), b"data": data, b"labels": labels}
            pickle.dump(batch, handle, protocol=2)
        written[name] = (data, labels)
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    train = (
        np.concatenate([written[n][0] for n in train_names]),
        sum((written[n][1] for n in train_names), []),
    )
    return train, written["test_batch"]


# ---------------------------------------------------------------------------------------------
# IDX format


def test_idx_round_trip_raw_and_gzip(tmp_path):
    images = make_images(3, 5, 7)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        write_idx(tmp_path / name, images)
        back = read_idx(tmp_path / name)
        assert back.dtype == np.uint8 and back.shape == (3, 5, 7)
        np.testing.assert_array_equal(back, images)
    # gzip detected by content, not by the name.
    with open(tmp_path / "a-idx3-ubyte.gz", "rb") as src:
        (tmp_path / "disguised").write_bytes(src.read())
    np.testing.assert_array_equal(read_idx(tmp_path / "disguised"), images)


def test_idx_big_endian_wider_types(tmp_path):
    values = np.array([[1, -2], [70000, -70000]], dtype=np.int32)
    path = write_idx(tmp_path / "ints.idx", values)
    raw = path.read_bytes()
    assert raw[:4] == bytes([0, 0, 0x0C, 2])
    assert raw[8:12] == (2).to_bytes(4, "big") and raw[12:16] == (1).to_bytes(4, "big", signed=True)
    np.testing.assert_array_equal(read_idx(path), values)


def test_idx_rejects_bad_magic(tmp_path):
    path = tmp_path / "bad-magic"
    path.write_bytes(bytes([0, 1, 8, 1]) + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="bad-magic.*bad IDX magic"):
        read_idx(path)


def test_idx_rejects_truncated_data(tmp_path):
    path = write_idx(tmp_path / "train-images-idx3-ubyte", make_images(4))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte: IDX data truncated"):
        read_idx(path)


def test_idx_rejects_trailing_bytes_and_short_header(tmp_path):
    path = write_idx(tmp_path / "labels", np.arange(5, dtype=np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(ValueError, match="trailing bytes"):
        read_idx(path)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(ValueError, match="short: truncated IDX header"):
        read_idx(short)


def test_idx_rejects_truncated_gzip(tmp_path):
    path = write_idx(tmp_path / "x.gz", make_images(50))
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(ValueError, match=r"x\.gz: corrupt or truncated gzip"):
        read_idx(path)


def test_idx_dimension_and_type_checks(tmp_path):
    path = write_idx(tmp_path / "floats", np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="expected 3 dimensions"):
        read_idx(path, expected_ndim=3)
    with pytest.raises(ValueError, match="expected element type uint8"):
        read_idx(path, expected_dtype=np.uint8)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_idx(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST / EMNIST loaders


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_reads_exact_pixels(tmp_path, compress):
    written = write_mnist_folder(tmp_path / "mnist", compress=compress)
    x, y = load_dataset("mnist", root=tmp_path, split="train")
    assert x.dtype == np.float32 and x.shape == (6, 1, 28, 28)
    assert y.dtype == np.int64
    np.testing.assert_array_equal(x[:, 0], written["train"][0].astype(np.float32) / 255)
    np.testing.assert_array_equal(y, written["train"][1])
    x_test, y_test = load_dataset("mnist", root=tmp_path / "mnist", split="test")  # direct folder
    assert x_test.shape == (4, 1, 28, 28)
    np.testing.assert_array_equal(y_test, [0, 1, 2, 3])


def test_mnist_torchvision_layout(tmp_path):
    written = write_mnist_folder(tmp_path / "MNIST" / "raw", compress=False)
    x, _ = load_dataset("mnist", root=tmp_path, split="test")
    assert x[2, 0, 5, 7] == pytest.approx(written["t10k"][0][2, 5, 7] / 255)


def test_mnist_label_count_mismatch(tmp_path):
    folder = tmp_path / "mnist"
    write_mnist_folder(folder)
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz: 5 labels for 6 images"):
        load_dataset("mnist", root=tmp_path)


def test_mnist_corrupt_file_named(tmp_path):
    folder = tmp_path / "mnist"
    write_mnist_folder(folder, compress=False)
    images = folder / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:100])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte: IDX data truncated"):
        load_dataset("mnist", root=tmp_path)
    # Labels stored where images belong: wrong number of dimensions.
    images.write_bytes((folder / "train-labels-idx1-ubyte").read_bytes())
    with pytest.raises(ValueError, match="train-images-idx3-ubyte: expected 3 dimensions"):
        load_dataset("mnist", root=tmp_path)


@pytest.fixture
def fake_checkout(tmp_path, monkeypatch):
    """Make sf-ext believe it runs from tmp_path/checkout, with tmp_path/shared/data beside it."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "pyproject.toml").write_text("[project]\nname = 'sf-ext'\n")
    shared = tmp_path / "shared" / "data"
    shared.mkdir(parents=True)
    monkeypatch.setattr(loaders, "_PACKAGE_PARENT", checkout)
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    return shared


def test_missing_files_error_lists_places_and_advice(tmp_path, monkeypatch, fake_checkout):
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "env-root"))
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist")
    message = str(info.value)
    places = [
        str(tmp_path / "env-root" / "fashion-mnist"),
        str(fake_checkout / "fashion-mnist"),
        "/usr/share/datasets/fashion-mnist",
    ]
    positions = [message.index(place + "\n") for place in places]
    assert positions == sorted(positions)  # searched in the documented order
    assert "dataset-fashion-mnist" in message and DATA_ROOT_ENV in message
    with pytest.raises(FileNotFoundError, match=r"(?s)CIFAR-10 files not found.*explicit"):
        load_dataset("cifar10", root=tmp_path / "explicit")


def test_data_root_rule_explicit_then_env_then_checkout(tmp_path, monkeypatch, fake_checkout):
    write_mnist_folder(tmp_path / "explicit" / "mnist", train_count=5)
    write_mnist_folder(tmp_path / "env" / "mnist", train_count=3)
    write_mnist_folder(fake_checkout / "mnist", train_count=4)
    assert base_roots() == [fake_checkout, SYSTEM_DATA_ROOT]
    assert len(load_dataset("mnist")[1]) == 4  # beside the checkout
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "env"))
    assert base_roots() == [tmp_path / "env", fake_checkout, SYSTEM_DATA_ROOT]
    assert len(load_dataset("mnist")[1]) == 3  # $SF_EXT_DATA first
    assert len(load_dataset("mnist", root=tmp_path / "explicit")[1]) == 5  # explicit wins
    assert base_roots(tmp_path / "explicit") == [tmp_path / "explicit"]
    assert dataset_folder("mnist") == tmp_path / "env" / "mnist"
    assert dataset_folder("digits") is None
    # An empty $SF_EXT_DATA does not hide the later places.
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "empty"))
    assert len(load_dataset("mnist")[1]) == 4


def test_checkout_root_only_for_a_checkout(tmp_path, monkeypatch):
    (tmp_path / "shared" / "data").mkdir(parents=True)
    site = tmp_path / "site-packages"  # an installed wheel: no pyproject.toml beside sf_ext
    site.mkdir()
    monkeypatch.setattr(loaders, "_PACKAGE_PARENT", site)
    assert checkout_data_root() is None
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "pyproject.toml").write_text("")
    monkeypatch.setattr(loaders, "_PACKAGE_PARENT", checkout)
    assert checkout_data_root() == tmp_path / "shared" / "data"
    (tmp_path / "shared" / "data").rmdir()
    assert checkout_data_root() is None  # no shared/data: not searched


def test_resolve_dataset_falls_back_loudly(tmp_path, monkeypatch, fake_checkout, caplog, capsys):
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "env"))
    with caplog.at_level(logging.WARNING, logger="sf_ext.data.loaders"):
        assert resolve_dataset("MNIST") == "digits"
    printed = capsys.readouterr().out
    assert "dataset 'mnist' not found, USING 'digits' INSTEAD" in printed
    assert DATA_ROOT_ENV in printed and len(printed.splitlines()) == 1
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "USING 'digits' INSTEAD" in record.getMessage()
    assert str(tmp_path / "env" / "mnist") in record.getMessage()  # where it looked
    caplog.clear()
    write_mnist_folder(tmp_path / "env" / "mnist")
    assert resolve_dataset("mnist") == "mnist"
    assert capsys.readouterr().out == "" and not caplog.records
    with pytest.raises(DatasetNotFoundError, match="CIFAR-10 files not found"):
        resolve_dataset("emnist-letters", fallback="cifar10")
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        resolve_dataset("mnist", fallback="svhn")


def test_env_var_root(tmp_path, monkeypatch):
    write_mnist_folder(tmp_path / "mnist", train_count=3)
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    assert load_dataset("MNIST")[0].shape == (3, 1, 28, 28)


def test_emnist_orientation_and_letters_labels(tmp_path):
    raw = tmp_path / "EMNIST" / "raw"
    upright = make_images(4, seed=3)
    # EMNIST stores every image transposed.
    stored = np.ascontiguousarray(upright.transpose(0, 2, 1))
    for split in ("train", "test"):
        write_idx(raw / f"emnist-letters-{split}-images-idx3-ubyte.gz", stored)
        labels = np.array([1, 2, 25, 26], np.uint8)  # letters are numbered from 1
        write_idx(raw / f"emnist-letters-{split}-labels-idx1-ubyte.gz", labels)
    x, y = load_dataset("emnist-letters", root=tmp_path, split="test")
    np.testing.assert_array_equal(x[:, 0], upright.astype(np.float32) / 255)
    np.testing.assert_array_equal(y, [0, 1, 24, 25])
    assert dataset_spec("emnist-letters").num_classes == 26
    with pytest.raises(DatasetNotFoundError, match=r"emnist-digits-train-images-idx3-ubyte"):
        load_dataset("emnist-digits", root=tmp_path)


def test_emnist_digits_raw_files(tmp_path):
    images = make_images(5, seed=4)
    for split in ("train", "test"):
        prefix = tmp_path / f"emnist-digits-{split}"
        write_idx(f"{prefix}-images-idx3-ubyte", images.transpose(0, 2, 1).copy())
        write_idx(f"{prefix}-labels-idx1-ubyte", np.arange(5, dtype=np.uint8))
    x, y = load_dataset("emnist-digits", root=tmp_path)
    assert x.shape == (5, 1, 28, 28) and x[1, 0, 2, 20] == np.float32(images[1, 2, 20] / 255)
    np.testing.assert_array_equal(y, np.arange(5))


# ---------------------------------------------------------------------------------------------
# CIFAR-10


def test_cifar10_reads_exact_pixels(tmp_path):
    (train_data, train_labels), (test_data, test_labels) = write_cifar_folder(
        tmp_path / "cifar-10-batches-py"
    )
    x, y = load_dataset("cifar10", root=tmp_path)
    assert x.shape == (15, 3, 32, 32) and x.dtype == np.float32 and y.dtype == np.int64
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major.
    assert x[7, 1, 3, 4] == np.float32(train_data[7, 1024 + 3 * 32 + 4] / 255)
    np.testing.assert_array_equal(y, train_labels)
    x_test, y_test = load_cifar10(tmp_path / "cifar-10-batches-py", split="test")
    np.testing.assert_array_equal(x_test.reshape(3, -1), test_data / np.float32(255))
    np.testing.assert_array_equal(y_test, test_labels)


def test_cifar10_corrupt_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_folder(folder)
    (folder / "data_batch_3").write_bytes(b"\x80\x02}q\x00")  # pickle cut short
    with pytest.raises(ValueError, match="data_batch_3: not a readable CIFAR-10 pickle"):
        load_dataset("cifar10", root=tmp_path)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [1]}, handle)
    with pytest.raises(ValueError, match="test_batch: 1 labels for 2 images"):
        load_dataset("cifar10", root=tmp_path, split="test")


# ---------------------------------------------------------------------------------------------
# scikit-learn digits, names, one-hot


def test_digits_split_is_fixed_and_disjoint():
    x_train, y_train = load_dataset("digits")
    x_test, y_test = load_digits("test")
    assert len(y_train) + len(y_test) == 1797 and len(y_test) == 359
    assert x_train.shape[1:] == (1, 8, 8) and x_train.dtype == np.float32
    assert x_train.min() == 0.0 and x_train.max() == 1.0
    assert set(np.unique(y_test)) == set(range(10))  # stratified
    again_x, _ = load_digits("train")
    np.testing.assert_array_equal(again_x, x_train)
    train_rows = {row.tobytes() for row in x_train}
    assert not any(row.tobytes() in train_rows for row in x_test)


def test_names_and_bad_arguments():
    assert {"mnist", "fashion-mnist", "cifar10", "digits", "emnist-digits"} <= set(dataset_names())
    assert dataset_spec("cifar10").in_channels == 3 and dataset_spec("digits").image_size == 8
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match="unknown dataset 'emnist-foo'"):
        load_dataset("emnist-foo")
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("digits", split="validation")


def test_one_hot():
    encoded = one_hot(np.array([2, 0, 1]), 3)
    assert encoded.dtype == np.float32
    np.testing.assert_array_equal(encoded, [[0, 0, 1], [1, 0, 0], [0, 1, 0]])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        one_hot(np.array([3]), 3)
    with pytest.raises(ValueError, match="1-D"):
        one_hot(np.zeros((2, 2), int), 3)


# ---------------------------------------------------------------------------------------------
# Real Fashion-MNIST


@pytest.mark.needs_data
def test_real_fashion_mnist(fashion_mnist_root, data_root):
    x, y = load_dataset("fashion-mnist", root=data_root, split="train")
    assert x.shape == (60000, 1, 28, 28) and x.dtype == np.float32
    assert y.shape == (60000,) and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() == 1.0
    np.testing.assert_array_equal(np.bincount(y), [6000] * 10)
    x_test, y_test = load_dataset("fashion-mnist", root=fashion_mnist_root, split="test")
    assert x_test.shape == (10000, 1, 28, 28) and set(np.unique(y_test)) == set(range(10))
    # The first training image is an ankle boot (class 9) in every copy of Fashion-MNIST.
    assert y[0] == 9
    with gzip.open(fashion_mnist_root / "train-images-idx3-ubyte.gz") as handle:
        raw = np.frombuffer(handle.read(), np.uint8, offset=16)
    np.testing.assert_array_equal(x[:3].reshape(-1), raw[: 3 * 784] / np.float32(255))


# ---------------------------------------------------------------------------------------------
# Partitioning


def _labelled_data(n=1000, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    # Each row stores its own index, so alignment and coverage can be checked exactly.
    x = np.stack([np.arange(n), y], axis=1).astype(np.float32)
    return x, y


def _check_exact_cover(parts, x, y):
    ids = np.concatenate([part_x[:, 0] for part_x, _ in parts]).astype(int)
    np.testing.assert_array_equal(np.sort(ids), np.arange(len(y)))
    for part_x, part_y in parts:
        np.testing.assert_array_equal(part_x[:, 1], part_y)


def test_iid_partition():
    x, y = _labelled_data(1003)
    parts = iid_partition(x, y, 4, seed=1)
    assert [len(p[1]) for p in parts] == [251, 251, 251, 250]
    _check_exact_cover(parts, x, y)
    again = iid_partition(x, y, 4, seed=1)
    other = iid_partition(x, y, 4, seed=2)
    np.testing.assert_array_equal(parts[0][0], again[0][0])
    assert not np.array_equal(parts[0][0], other[0][0])


def _mean_label_share_of_top_class(parts, classes=10):
    shares = [np.bincount(py, minlength=classes).max() / len(py) for _, py in parts]
    return float(np.mean(shares))


def test_dirichlet_partition_skew_and_determinism():
    x, y = _labelled_data(4000)
    skewed = dirichlet_partition(x, y, 5, alpha=0.1, seed=0, min_size=10)
    mild = dirichlet_partition(x, y, 5, alpha=100.0, seed=0, min_size=10)
    for parts in (skewed, mild):
        _check_exact_cover(parts, x, y)
        assert min(len(p[1]) for p in parts) >= 10
    assert _mean_label_share_of_top_class(skewed) > 0.4
    assert _mean_label_share_of_top_class(mild) < 0.2
    again = dirichlet_partition(x, y, 5, alpha=0.1, seed=0, min_size=10)
    for (a, _), (b, _) in zip(skewed, again):
        np.testing.assert_array_equal(a, b)
    # One-hot labels partition the same way and stay aligned.
    onehot_parts = dirichlet_partition(x, one_hot(y, 10), 5, alpha=0.1, seed=0, min_size=10)
    for (px, py), (qx, _) in zip(onehot_parts, skewed):
        np.testing.assert_array_equal(px, qx)
        np.testing.assert_array_equal(py.argmax(1), px[:, 1])


def test_partition_bad_parameters():
    x, y = _labelled_data(100)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet_partition(x, y, 3, alpha=0.0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet_partition(x, y, 3, alpha=-1)
    with pytest.raises(ValueError, match="num_clients must be an integer >= 1"):
        iid_partition(x, y, 0)
    with pytest.raises(ValueError, match="num_clients must be an integer >= 1"):
        dirichlet_partition(x, y, 0, alpha=1.0)
    with pytest.raises(ValueError, match="num_clients .* exceeds"):
        iid_partition(x, y, 101)
    with pytest.raises(ValueError, match="min_size=40 for 3 clients needs 120"):
        dirichlet_partition(x, y, 3, alpha=1.0, min_size=40)
    with pytest.raises(ValueError, match="same length"):
        iid_partition(x, y[:-1], 2)
    with pytest.raises(ValueError, match="fractions must sum to 1"):
        split_by_fractions(x, y, [0.4, 0.5])
    with pytest.raises(ValueError, match="fractions must be finite and >= 0"):
        split_by_fractions(x, y, [1.5, -0.5])


def test_split_by_fractions():
    x, y = _labelled_data(101)
    parts = split_by_fractions(x, y, [0.4, 0.6], seed=3)
    assert [len(p[1]) for p in parts] == [40, 61]
    _check_exact_cover(parts, x, y)
    np.testing.assert_array_equal(parts[1][0], split_by_fractions(x, y, [0.4, 0.6], seed=3)[1][0])
    ordered = split_by_fractions(x, y, [0.5, 0.5], seed=None)
    np.testing.assert_array_equal(ordered[0][0][:, 0], np.arange(51))
    assert fraction_sizes(10, [1 / 3, 1 / 3, 1 / 3]) == [4, 3, 3]
    assert sum(fraction_sizes(7, [0.1, 0.2, 0.7])) == 7


# ---------------------------------------------------------------------------------------------
# SecretFlow hand-off (one debug-mode SecretFlow session for the module)


def test_data_modules_do_not_import_secretflow():
    assert sf_ext.models is not None
    if not SECRETFLOW_PRELOADED:
        assert not SECRETFLOW_IMPORTED_AT_COLLECTION
        return
    # Something collected earlier imported SecretFlow: check in a clean interpreter instead.
    code = "import sys, sf_ext.data, sf_ext.models; print('secretflow' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, check=True, text=True
    )
    assert result.stdout.strip() == "False"


@pytest.fixture(scope="module")
def secretflow_parties(sf_parties):
    import secretflow as sf

    return sf, {pyu.party: pyu for pyu in sf_parties}


@pytest.mark.secretflow
@pytest.mark.needs_data
def test_federated_hand_off(secretflow_parties, data_root):
    sf, pyus = secretflow_parties
    from secretflow.data.ndarray import FedNdarray, PartitionWay

    alice, bob = pyus["alice"], pyus["bob"]
    fed = to_fed_ndarray({alice: np.arange(6).reshape(3, 2), bob: np.arange(4).reshape(2, 2)})
    assert isinstance(fed, FedNdarray) and fed.partition_way == PartitionWay.HORIZONTAL
    assert fed.shape == (5, 2)
    np.testing.assert_array_equal(sf.reveal(fed.partitions[bob]), [[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="trailing dimensions"):
        to_fed_ndarray({alice: np.zeros((2, 3)), bob: np.zeros((2, 4))})
    with pytest.raises(ValueError, match="PYU devices"):
        to_fed_ndarray({"alice": np.zeros(2)})

    (train_x, train_y), (test_x, test_y) = federated_dataset(
        "fashion-mnist", {alice: 0.4, bob: 0.6}, root=data_root, seed=0, limit=1000
    )
    assert train_x.partition_shape() == {alice: (400, 1, 28, 28), bob: (600, 1, 28, 28)}
    assert train_y.partition_shape() == {alice: (400, 10), bob: (600, 10)}
    assert test_x.partition_shape()[alice][0] == 67 and test_y.partition_shape()[bob] == (100, 10)
    alice_y = sf.reveal(train_y.partitions[alice])
    assert alice_y.dtype == np.float32 and np.all(alice_y.sum(axis=1) == 1)

    (_, int_y), _ = federated_dataset("digits", {alice: 0.5, bob: 0.5}, one_hot_labels=False)
    bob_labels = sf.reveal(int_y.partitions[bob])
    assert bob_labels.dtype == np.int64 and bob_labels.shape == (719,)
    with pytest.raises(ValueError, match="fractions must sum to 1"):
        federated_dataset("digits", {alice: 0.5, bob: 0.6})

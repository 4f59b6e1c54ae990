"""Datasets from local files, client partitioning, and hand-off to SecretFlow parties.

Loaders return ``(x, y)`` with ``x`` float32 in ``[0, 1]`` shaped ``[N, C, H, W]`` and ``y`` int64
class indices; :func:`one_hot` makes the categorical labels SecretFlow's metric wrappers expect.
Where files are looked for is one rule, described in :mod:`sf_ext.data.loaders`: an explicit
``root``, else ``$SF_EXT_DATA``, ``shared/data`` beside the checkout, ``/usr/share/datasets``.
Nothing here imports SecretFlow until :func:`to_fed_ndarray` or :func:`federated_dataset` runs.
"""

from sf_ext.data.federated import federated_dataset, to_fed_ndarray
from sf_ext.data.idx import read_idx, write_idx
from sf_ext.data.loaders import (
    DATA_ROOT_ENV,
    SYSTEM_DATA_ROOT,
    DatasetNotFoundError,
    DatasetSpec,
    base_roots,
    checkout_data_root,
    dataset_folder,
    dataset_names,
    dataset_spec,
    load_cifar10,
    load_dataset,
    load_digits,
    load_emnist,
    load_fashion_mnist,
    load_mnist_idx,
    one_hot,
    resolve_dataset,
)
from sf_ext.data.partition import (
    dirichlet_partition,
    fraction_sizes,
    iid_partition,
    partition_indices_dirichlet,
    partition_indices_iid,
    split_by_fractions,
)

__all__ = [
    "DATA_ROOT_ENV",
    "SYSTEM_DATA_ROOT",
    "DatasetNotFoundError",
    "DatasetSpec",
    "base_roots",
    "checkout_data_root",
    "dataset_folder",
    "dataset_names",
    "dataset_spec",
    "dirichlet_partition",
    "federated_dataset",
    "fraction_sizes",
    "iid_partition",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_emnist",
    "load_fashion_mnist",
    "load_mnist_idx",
    "one_hot",
    "partition_indices_dirichlet",
    "partition_indices_iid",
    "read_idx",
    "resolve_dataset",
    "split_by_fractions",
    "to_fed_ndarray",
    "write_idx",
]

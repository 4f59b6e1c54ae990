"""Reader for the IDX file format used by MNIST, Fashion-MNIST and EMNIST.

An IDX file starts with a 4-byte magic number: two zero bytes, a type code and the number of
dimensions. Then come the dimensions as big-endian 32-bit integers and the data, row-major and
big-endian. Files may be gzip-compressed (``.gz``).
"""

import gzip
import os
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]

# Type code (third magic byte) -> big-endian numpy dtype.
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

GZIP_SIGNATURE = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as handle:
        head = handle.read(2)
    # Trust the content, not the file name: some mirrors store gzip data without ``.gz``.
    if head == GZIP_SIGNATURE:
        try:
            with gzip.open(path, "rb") as handle:
                return handle.read()
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({exc})") from exc
    with open(path, "rb") as handle:
        return handle.read()


def read_idx(
    path: PathLike,
    expected_ndim: Optional[int] = None,
    expected_dtype: Optional[np.dtype] = None,
) -> np.ndarray:
    """Read one IDX file (raw or gzip) into a native-endian numpy array.

    Args:
        path: The file to read.
        expected_ndim: If given, the number of dimensions the header must declare.
        expected_dtype: If given, the element type the header must declare (e.g. ``np.uint8``).

    Returns:
        The array with the shape given in the header.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Bad magic number, unexpected dimensions or type, or a size that does not match
            the header (truncated file or trailing garbage). The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: file too short for an IDX header ({len(raw)} bytes)")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or type_code not in IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (not an IDX file, or corrupt)"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(f"{path}: expected {expected_ndim} dimensions, header declares {ndim}")
    dtype = IDX_DTYPES[type_code]
    if expected_dtype is not None and dtype.newbyteorder("=") != np.dtype(expected_dtype):
        raise ValueError(f"{path}: expected element type {np.dtype(expected_dtype)}, got {dtype}")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} of {header_size} bytes)")
    dims: Tuple[int, ...] = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    expected_bytes = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual_bytes = len(raw) - header_size
    if actual_bytes != expected_bytes:
        kind = "truncated" if actual_bytes < expected_bytes else "has trailing bytes"
        raise ValueError(
            f"{path}: IDX data {kind}: header {dims} needs {expected_bytes} bytes, "
            f"file has {actual_bytes}"
        )
    data = np.frombuffer(raw, dtype, offset=header_size).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: PathLike, array: np.ndarray, compress: Optional[bool] = None) -> Path:
    """Write an array as an IDX file (the inverse of :func:`read_idx`).

    Useful to make small test fixtures in the real format.

    Args:
        path: Destination; compressed with gzip when ``compress`` is True, or when it is None and
            the name ends in ``.gz``.
        array: Array of one of the IDX element types (uint8, int8, int16, int32, float32, float64).
        compress: Force or disable gzip compression.

    Returns:
        The path written.
    """
    path = Path(path)
    array = np.asarray(array)
    codes = {dtype.newbyteorder("="): code for code, dtype in IDX_DTYPES.items()}
    if array.dtype not in codes:
        raise ValueError(f"array dtype {array.dtype} has no IDX type code")
    if array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"array must have 1 to 255 dimensions, got {array.ndim}")
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)
    return path


def read_idx_images_and_labels(
    images_path: Path, labels_path: Path
) -> Tuple[np.ndarray, np.ndarray]:
    """Read an image file (``[N, H, W]`` uint8) and its label file (``[N]`` uint8).

    Raises:
        ValueError: Either file is malformed, or the label count differs from the image count.
    """
    images = read_idx(images_path, expected_ndim=3, expected_dtype=np.uint8)
    labels = read_idx(labels_path, expected_ndim=1, expected_dtype=np.uint8)
    if len(labels) != len(images):
        raise ValueError(
            f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}"
        )
    return images, labels

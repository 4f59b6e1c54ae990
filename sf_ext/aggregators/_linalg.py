"""Shared linear algebra on the update matrix: one Gram matrix, pairwise distances, sparse sums.

Every exact pairwise method (Krum, Multi-Krum, FLAME, RFA) needs the same ``n x n`` inner
products. Computing ``X @ X.T`` once in float32 (one BLAS call over the data) and deriving norms,
squared distances and cosine distances from it in float64 keeps the cost of those methods at one
Gram matrix, however many quantities they read from it.
"""

from typing import Iterator, List, Optional, Tuple

import torch

# Column block sizes (elements per block = rows x columns) for chunked column-wise loops: small
# enough for the block and its temporaries to stay cache-resident, large enough to amortize the
# per-call overhead of torch.
SIGN_BLOCK_ELEMENTS = 1 << 21
SORT_BLOCK_ELEMENTS = 1 << 24


def gram_matrix(updates: torch.Tensor) -> torch.Tensor:
    """``updates @ updates.T`` as float64 ``[n, n]`` (products in float32, one BLAS call).

    A row holding NaN/inf only spoils its own row and column of the result.
    """
    gram = (updates @ updates.T).to(torch.float64)
    # BLAS may sum (i, j) and (j, i) in different orders; clustering wants exact symmetry.
    return (gram + gram.T) / 2.0


def squared_distances(gram: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances ``|x_i - x_j|^2`` from a Gram matrix."""
    diag = gram.diagonal()
    dist = diag[:, None] + diag[None, :] - 2.0 * gram
    dist.clamp_(min=0.0)
    dist.fill_diagonal_(0.0)
    return dist


def cosine_distances(gram: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine distances ``1 - cos(x_i, x_j)`` in ``[0, 2]`` from a Gram matrix.

    A zero vector has no direction; it is placed at distance 1 (orthogonal) from everything.
    """
    norms = gram.diagonal().clamp(min=0.0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, gram / torch.where(denom > 0, denom, 1.0), 0.0)
    dist = (1.0 - cos).clamp_(0.0, 2.0)
    dist.fill_diagonal_(0.0)
    return dist


def contiguous_runs(indices: List[int]) -> List[Tuple[int, int]]:
    """Sorted row indices grouped into ``[start, stop)`` runs of consecutive rows."""
    runs: List[Tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def weighted_row_sum(updates: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """``sum_i coeffs[i] * updates[i]`` as float32 ``[d]``, reading only rows with a non-zero
    coefficient.

    Rows with a zero coefficient are skipped, not multiplied by 0 (``0 * NaN`` is NaN), and the
    others are read in place as runs of consecutive rows: no row subset of the matrix is copied.
    """
    coeffs = coeffs.to(device=updates.device, dtype=torch.float32)
    used = (coeffs != 0).nonzero().flatten().tolist()
    if len(used) == updates.shape[0]:
        return coeffs @ updates
    out = torch.zeros(updates.shape[1], dtype=torch.float32, device=updates.device)
    for start, stop in contiguous_runs(used):
        out.addmv_(updates[start:stop].T, coeffs[start:stop])
    return out


def column_blocks(num_rows: int, num_cols: int, block_elements: int) -> Iterator[slice]:
    """Column slices covering ``num_cols`` with about ``block_elements`` entries per block."""
    width = max(1, block_elements // max(num_rows, 1))
    for start in range(0, num_cols, width):
        yield slice(start, min(start + width, num_cols))


def row_block(updates: torch.Tensor, rows: Optional[torch.Tensor], cols: slice) -> torch.Tensor:
    """The block ``updates[rows, cols]``: a view when ``rows`` is None (all rows), else a copy of
    just this block."""
    if rows is None:
        return updates[:, cols]
    return updates[rows, cols]


GRAM64_BLOCK_ELEMENTS = 1 << 22


def gram_matrix64(
    updates: torch.Tensor,
    rows: Optional[torch.Tensor] = None,
    offset: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """float64 Gram matrix of ``updates[rows] + offset`` (``offset`` a ``[d]`` vector, e.g. the
    previous global model, so that the rows become the clients' models).

    Each column block is formed in float32 (as a client's model is), converted to float64 and
    multiplied in float64: the cosine distances built from it agree with those of a float64
    reference on the same vectors to rounding, which matters when the vectors are nearly parallel
    (local models differ from each other by far less than their norm).
    """
    matrix = updates if rows is None else updates[rows]
    n, d = matrix.shape
    gram = torch.zeros(n, n, dtype=torch.float64)
    for cols in column_blocks(n, d, GRAM64_BLOCK_ELEMENTS):
        block = matrix[:, cols]
        if offset is not None:
            block = block + offset[cols]
        block = block.to(torch.float64)
        gram.addmm_(block, block.T)
    return (gram + gram.T) / 2.0

"""Figures of a DLG sweep: reconstruction grids and PSNR against pruning rate (matplotlib, Agg)."""

import math
import textwrap
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from sf_ext.dlg.metrics import mean_std  # noqa: E402


def to_display(image: torch.Tensor) -> Tuple[np.ndarray, Optional[str]]:
    """One image ``[C, H, W]`` (any range) as an array imshow understands, clamped to [0, 1]."""
    image = torch.as_tensor(image).detach().float().cpu()
    if image.dim() == 4:
        image = image[0]
    image = image.clamp(0, 1)
    if image.shape[0] == 1:
        return image[0].numpy(), "gray"
    return image.permute(1, 2, 0).numpy(), None


def _show(ax, image: torch.Tensor, title: Optional[str] = None, fontsize: int = 7) -> None:
    array, cmap = to_display(image)
    ax.imshow(array, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title is not None:
        ax.set_title(title, fontsize=fontsize)


def _pick_columns(
    snapshots: Sequence[Tuple[int, torch.Tensor]], iters: int, every: int, columns: int
) -> List[Tuple[int, torch.Tensor]]:
    """``columns`` evenly spaced snapshot iterations of the full budget, each showing the dummy as
    it was then (a run that stopped early did not move afterwards, so its last snapshot holds)."""
    if not snapshots:
        return []
    grid = list(range(0, max(iters, 1), max(every, 1)))
    picks = sorted({grid[int(i)] for i in np.linspace(0, len(grid) - 1, min(columns, len(grid)))})
    out = []
    for target in picks:
        earlier = [s for s in snapshots if s[0] <= target] or [snapshots[0]]
        out.append((target, earlier[-1][1]))
    return out


def progress_grid(
    rows: Sequence[Mapping[str, object]],
    truth: torch.Tensor,
    path: Union[str, Path],
    iters: int,
    every: int = 10,
    columns: int = 10,
    title: str = "",
) -> Path:
    """The seed experiment's figure, one row per pruning rate: the dummy input over iterations.

    Args:
        rows: One dictionary per row with ``label`` (row title), ``snapshots`` (``(iteration,
            image)`` pairs), ``final`` (the returned reconstruction), ``psnr`` and optionally
            ``truth`` (that row's attacked image, when rows attack different images).
        truth: The attacked image ``[C, H, W]`` or ``[1, C, H, W]`` (default for every row).
        path: PNG file to write.
        iters: Iteration budget of the runs (for the column positions).
        every: Snapshot interval of the runs.
        columns: Snapshot columns (taken evenly over the budget; a run that stopped early keeps
            showing its last snapshot).
        title: Figure title.
    """
    ncols = columns + 2
    fig, axes = plt.subplots(
        len(rows),
        ncols,
        figsize=(1.0 * ncols + 0.4, 1.1 * len(rows) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for r, row in enumerate(rows):
        picked = _pick_columns(row["snapshots"], iters, every, columns)
        _show(axes[r][0], row.get("truth", truth), "truth" if r == 0 else None)
        axes[r][0].set_ylabel(str(row["label"]), fontsize=7, rotation=0, ha="right", va="center")
        for c in range(columns):
            if c < len(picked):
                _show(axes[r][c + 1], picked[c][1], f"it {picked[c][0]}" if r == 0 else None)
            else:
                axes[r][c + 1].axis("off")
        psnr = float(row["psnr"])
        _show(axes[r][-1], row["final"], f"{psnr:.1f} dB")
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def final_grid(
    cells: Mapping[Tuple[str, float], Tuple[torch.Tensor, float]],
    truths: Mapping[str, torch.Tensor],
    row_keys: Sequence[str],
    rates: Sequence[float],
    path: Union[str, Path],
    title: str = "",
) -> Path:
    """Final reconstructions: one row per (attacker, seed) key, one column per pruning rate.

    Args:
        cells: ``(row_key, rate) -> (reconstruction, psnr)``.
        truths: ``row_key -> true image`` (shown in the first column).
        row_keys: Row order.
        rates: Column order (percent).
        path: PNG file to write.
        title: Figure title.
    """
    ncols = len(rates) + 1
    fig, axes = plt.subplots(
        len(row_keys),
        ncols,
        figsize=(1.05 * ncols + 1.2, 1.15 * len(row_keys) + 0.6),
        squeeze=False,
        layout="constrained",
    )
    for r, key in enumerate(row_keys):
        _show(axes[r][0], truths[key], "truth" if r == 0 else None)
        axes[r][0].set_ylabel(key, fontsize=7, rotation=0, ha="right", va="center")
        for c, rate in enumerate(rates):
            if (key, rate) not in cells:
                axes[r][c + 1].axis("off")
                continue
            image, psnr = cells[(key, rate)]
            label = f"{rate:g}%: {psnr:.1f} dB"
            _show(axes[r][c + 1], image, label)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def psnr_vs_rate(
    runs: Sequence[Mapping[str, object]],
    path: Union[str, Path],
    title: str = "",
    thresholds: Mapping[str, float] = None,
) -> Path:
    """PSNR against pruning rate, one line per attacker (mean and standard deviation over seeds,
    individual runs as dots).

    Args:
        runs: Per-run rows with ``attacker``, ``rate`` and ``psnr`` (of one attack).
        path: PNG file to write.
        title: Plot title.
        thresholds: Label -> dB drawn as horizontal reference lines.
    """
    thresholds = {"success 40 dB": 40.0, "15 dB": 15.0} if thresholds is None else thresholds
    fig, ax = plt.subplots(figsize=(5.5, 3.8), layout="constrained")
    by_attacker: Dict[str, Dict[float, List[float]]] = {}
    for run in runs:
        by_attacker.setdefault(str(run["attacker"]), {}).setdefault(float(run["rate"]), []).append(
            _finite_psnr(float(run["psnr"]))
        )
    for i, (attacker, per_rate) in enumerate(sorted(by_attacker.items())):
        rates = sorted(per_rate)
        stats = [mean_std(per_rate[r]) for r in rates]
        color = f"C{i}"
        ax.errorbar(
            rates,
            [s["mean"] for s in stats],
            yerr=[s["std"] for s in stats],
            label=attacker,
            color=color,
            marker="o",
            capsize=3,
        )
        for rate in rates:
            ax.scatter([rate] * len(per_rate[rate]), per_rate[rate], color=color, s=8, alpha=0.4)
    for j, (label, level) in enumerate(thresholds.items()):
        ax.axhline(level, color="gray", linestyle="--" if j == 0 else ":", linewidth=0.8)
        ax.text(0.5, level + 0.8, label, fontsize=7, color="gray")
    ax.set_xlabel("% of weight-gradient entries pruned (zeroed)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


class _Mosaic:
    """Many small images drawn as one picture in one axes (fast: one ``imshow`` per figure).

    Cells are laid out on a grid of ``rows x columns``; each cell holds one image (or nothing),
    an optional caption above it and an optional coloured frame.
    """

    def __init__(self, rows: int, columns: int, side: int, channels: int, gap: int = None):
        self.rows, self.columns, self.side = rows, columns, side
        self.gap = max(2, side // 4) if gap is None else gap
        self.pitch_y = side + 2 * self.gap  # room for the caption
        self.pitch_x = side + self.gap
        shape = (rows * self.pitch_y + self.gap, columns * self.pitch_x + self.gap)
        self.canvas = np.ones(shape + ((3,) if channels == 3 else ()), dtype=np.float32)
        self.channels = channels
        self.captions: List[Tuple[float, float, str, str]] = []
        self.frames: List[Tuple[int, int, str]] = []
        self.row_labels: List[Tuple[float, str]] = []

    def _origin(self, row: int, column: int) -> Tuple[int, int]:
        return row * self.pitch_y + 2 * self.gap, column * self.pitch_x + self.gap

    def put(
        self,
        row: int,
        column: int,
        image,
        caption: str = "",
        color: str = "black",
        frame: Optional[str] = None,
    ) -> None:
        array, _ = to_display(image)
        y, x = self._origin(row, column)
        self.canvas[y : y + self.side, x : x + self.side] = array
        if caption:
            self.captions.append((x + self.side / 2, y - 0.6, caption, color))
        if frame:
            self.frames.append((row, column, frame))

    def label_row(self, row: int, text: str) -> None:
        y, _ = self._origin(row, 0)
        self.row_labels.append((y + self.side / 2, text))

    def draw(
        self,
        path: Union[str, Path],
        title: str = "",
        cell_inches: float = 0.62,
        fontsize: float = 6,
        label_inches: float = 0.0,
    ) -> Path:
        width = self.columns * cell_inches + 0.2 + label_inches
        # Narrow grids (a batch of 4) wrap the title instead of cutting it at the figure's edge.
        chars_per_line = max(20, int(width * 72 / ((fontsize + 2) * 0.6)))
        lines = textwrap.wrap(title, chars_per_line) if title else []
        title_inches = 0.4 + 0.16 * max(0, len(lines) - 1)
        height = self.rows * cell_inches * self.pitch_y / self.pitch_x + 0.05 + title_inches
        fig = plt.figure(figsize=(width, height))
        ax = fig.add_axes(
            [label_inches / width, 0.0, 1 - label_inches / width, 1 - title_inches / height]
        )
        cmap = None if self.channels == 3 else "gray"
        ax.imshow(self.canvas, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        for x, y, text, color in self.captions:
            ax.text(x, y, text, ha="center", va="bottom", fontsize=fontsize, color=color)
        for row, column, color in self.frames:
            y, x = self._origin(row, column)
            ax.add_patch(
                plt.Rectangle(
                    (x - 1.0, y - 1.0),
                    self.side + 1,
                    self.side + 1,
                    fill=False,
                    edgecolor=color,
                    linewidth=1.5,
                )
            )
        for y, text in self.row_labels:
            ax.text(-self.gap, y, text, ha="right", va="center", fontsize=fontsize + 0.5)
        ax.set_axis_off()
        if title:
            fig.suptitle("\n".join(lines), fontsize=fontsize + 2, y=1 - 0.05 / height)
        return _save(fig, path)


def _mark(score, i: int) -> Tuple[str, str]:
    """Caption suffix and colour of reconstruction ``i``: specific, class-level or neither."""
    if score.specific and score.specific[i]:
        return " ok", "tab:green"
    if score.recognized and score.recognized[i]:
        return " cls", "tab:orange"
    return "", "black"


def _image_side(images: torch.Tensor) -> Tuple[int, int]:
    return int(images.shape[-1]), int(images.shape[-3]) if images.dim() >= 3 else 1


def batch_grid(
    truth: torch.Tensor,
    recon: torch.Tensor,
    score,
    path: Union[str, Path],
    title: str = "",
    labels: Optional[Sequence[int]] = None,
    per_row: int = 16,
) -> Path:
    """Every image of an attacked batch: pairs of rows, true images above their reconstructions.

    Args:
        truth: True images ``[N, C, H, W]``.
        recon: Reconstructions ``[M, C, H, W]`` (``M >= N``).
        score: The :class:`~sf_ext.dlg.metrics.ReconstructionScore` of ``recon`` against
            ``truth`` (pairing, PSNR, recognizability).
        path: PNG file to write.
        title: Figure title.
        labels: True labels (shown above the true images).
        per_row: Images per row.
    """
    n = truth.shape[0]
    per_row = max(1, min(per_row, n))
    groups = math.ceil(n / per_row)
    side, channels = _image_side(truth)
    mosaic = _Mosaic(2 * groups, per_row, side, channels)
    for i in range(n):
        g, c = divmod(i, per_row)
        head = f"#{i}" if labels is None else f"#{i} y={int(labels[i])}"
        mosaic.put(2 * g, c, truth[i], head)
        mark, color = _mark(score, i)
        frame = None if color == "black" else color
        caption = f"{score.psnr_per_image[i]:.0f}dB{mark}"
        mosaic.put(2 * g + 1, c, recon[score.assignment[i]], caption, color, frame)
    note = (
        "top: true, below: reconstruction (dB); green: specific to its image, "
        "orange: only its class recognizable"
    )
    return mosaic.draw(path, f"{title}\n{note}" if title else note)


def batch_rows(
    rows: Sequence[Tuple[str, torch.Tensor, object]],
    truth: torch.Tensor,
    path: Union[str, Path],
    title: str = "",
    limit: Optional[int] = None,
) -> Path:
    """Every image of a batch (or the first ``limit``): the true images on top, then one row of
    paired reconstructions per entry of ``rows`` (``(label, reconstruction, score)``), PSNR
    above each image."""
    n = truth.shape[0] if limit is None else min(limit, truth.shape[0])
    side, channels = _image_side(truth)
    mosaic = _Mosaic(len(rows) + 1, n, side, channels)
    for c in range(n):
        mosaic.put(0, c, truth[c], f"#{c}")
    mosaic.label_row(0, "truth")
    for r, (label, recon, score) in enumerate(rows, start=1):
        for c in range(n):
            _, color = _mark(score, c)
            frame = None if color == "black" else color
            caption = f"{score.psnr_per_image[c]:.0f}"
            mosaic.put(r, c, recon[score.assignment[c]], caption, color, frame)
        mosaic.label_row(r, label)
    note = "(dB; green: specific to its image, orange: only its class recognizable)"
    return mosaic.draw(path, f"{title} {note}" if title else note, label_inches=1.6)


def audit_overview(entries: Sequence[Tuple[str, object]], path: Union[str, Path], show: int = 10):
    """One block per setting: its most revealing attacked batch (``show`` images: specific ones
    first, then recognizable ones, then by SSIM), true images above reconstructions."""
    side, channels = _image_side(entries[0][1].notes["truth"])
    mosaic = _Mosaic(2 * len(entries), show, side, channels)
    for r, (key, outcome) in enumerate(entries):
        truth = outcome.notes["truth"]
        recon = outcome.notes["reconstruction"]
        score = outcome.score
        recognized = score.recognized or [False] * truth.shape[0]
        specific = score.specific or [False] * truth.shape[0]
        order = sorted(
            range(truth.shape[0]),
            key=lambda i: (not specific[i], not recognized[i], -score.ssim_per_image[i]),
        )
        for c, i in enumerate(order[:show]):
            mosaic.put(2 * r, c, truth[i], f"#{i}")
            mark, color = _mark(score, i)
            frame = None if color == "black" else color
            caption = f"{score.psnr_per_image[i]:.0f}dB{mark}"
            mosaic.put(2 * r + 1, c, recon[score.assignment[i]], caption, color, frame)
        mosaic.label_row(2 * r, key)
        mosaic.label_row(
            2 * r + 1,
            f"{outcome.round} {outcome.attacker}\n{outcome.specific}/{outcome.items} specific",
        )
    return mosaic.draw(
        path,
        "What the server reconstructs (true above reconstructed; green: specific to its image, "
        "orange: only its class)",
        label_inches=1.6,
    )


def _finite_psnr(value: float, cap: float = 100.0) -> float:
    # A bit-exact reconstruction has infinite PSNR; plot it at the cap.
    return cap if math.isinf(value) and value > 0 else value


def _save(fig, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = [
    "audit_overview",
    "batch_grid",
    "batch_rows",
    "final_grid",
    "progress_grid",
    "psnr_vs_rate",
    "to_display",
]

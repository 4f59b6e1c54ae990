"""Results of a grid: CSV, Markdown tables and per-round plots."""

import csv
import math
import os
import re
from typing import Any, Dict, List, Sequence

from sf_ext.simulator.config import TARGETED
from sf_ext.simulator.grid import Cell, ExperimentGrid

__all__ = ["write_csv", "markdown_tables", "write_plots", "CSV_FIELDS"]

CSV_FIELDS = (
    "row",
    "column",
    "aggregator",
    "attack",
    "attacker_fraction",
    "accuracy",
    "backdoor_accuracy",
    "accuracy_last3_mean",
    "accuracy_min",
    "backdoor_accuracy_max",
    "tpr",
    "fpr",
    "status",
    "diverged",
    "rounds_played",
    "seed",
    "rounds_per_second",
    "cell",
)


def _pct(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.2f}"


def write_csv(path: str, cells: Sequence[Cell], results: Dict[str, Dict[str, Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for cell in cells:
            result = results.get(cell.key, {})
            final = dict(result.get("final", {}))
            cfg = cell.config
            writer.writerow(
                {
                    "row": cell.row_label,
                    "column": cell.column_label,
                    "aggregator": cfg.aggregator,
                    "attack": cfg.attack or "",
                    "attacker_fraction": cfg.attacker_fraction,
                    **{k: _fmt(final.get(k)) for k in CSV_FIELDS[5:17]},
                    "cell": cell.key,
                }
            )


def _fmt(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}"
    return "" if value is None else value


def _row_is_targeted(grid: ExperimentGrid, row: int) -> bool:
    attack = grid.rows[row].get("attack", grid.base.get("attack"))
    return attack in TARGETED


def markdown_tables(
    grid: ExperimentGrid, cells: Sequence[Cell], results: Dict[str, Dict[str, Any]]
) -> str:
    """The paper's layout (accuracy, or accuracy / backdoor accuracy for backdoor rows, in %)
    followed by a detection table (TPR / FPR of the aggregator against the known attackers)."""
    by_pos = {(c.row, c.column): c for c in cells}
    headers = [str(col.get("label", i)) for i, col in enumerate(grid.columns)]
    lines = [f"### {grid.name}: test accuracy (%) — backdoor rows: main / backdoor accuracy", ""]
    lines += ["| Attack | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]
    for r, row in enumerate(grid.rows):
        targeted = _row_is_targeted(grid, r)
        entries = []
        for c in range(len(grid.columns)):
            final = results.get(by_pos[(r, c)].key, {}).get("final")
            if final is None:
                entries.append("(not run)")
                continue
            text = _pct(final.get("accuracy"))
            if targeted:
                text += " / " + _pct(final.get("backdoor_accuracy"))
            if final.get("diverged"):
                text += " (div.)"
            elif final.get("stalled"):
                text += " (stalled)"
            entries.append(text)
        lines.append(f"| {row.get('label', r)} | " + " | ".join(entries) + " |")
    lines += ["", f"### {grid.name}: detection TPR / FPR (%) against the known attackers", ""]
    lines += ["| Attack | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]
    for r, row in enumerate(grid.rows):
        entries = []
        for c in range(len(grid.columns)):
            final = results.get(by_pos[(r, c)].key, {}).get("final") or {}
            if final and final.get("selects") is False:
                entries.append("n/a")  # the rule never selects clients: no detection to rate
            else:
                entries.append(f"{_pct(final.get('tpr'))} / {_pct(final.get('fpr'))}")
        lines.append(f"| {row.get('label', r)} | " + " | ".join(entries) + " |")
    return "\n".join(lines) + "\n"


_STYLES = ("-", "--", "-.", ":")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "row"


def _series(history: List[Dict[str, Any]], key: str):
    points = [(h["round"] + 1, h[key]) for h in history if h.get(key) is not None]
    return [p[0] for p in points], [100 * p[1] for p in points]


def write_plots(
    folder: str,
    grid: ExperimentGrid,
    cells: Sequence[Cell],
    results: Dict[str, Dict[str, Any]],
) -> List[str]:
    """One figure per row: accuracy per round for every column (and backdoor accuracy for
    backdoor rows); plus accuracy against ``sweep_x`` when the grid sets it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    written = []
    by_pos = {(c.row, c.column): c for c in cells}
    for r, row in enumerate(grid.rows):
        targeted = _row_is_targeted(grid, r)
        fig, axes = plt.subplots(1, 2 if targeted else 1, figsize=(11 if targeted else 6, 4))
        axes = list(axes) if targeted else [axes]
        for c, column in enumerate(grid.columns):
            history = results.get(by_pos[(r, c)].key, {}).get("history", [])
            # Line styles cycle too: rules that coincide (NDC = FedAvg when nothing is clipped)
            # must stay visible under each other.
            style = {"label": str(column.get("label", c)), "linestyle": _STYLES[c % len(_STYLES)]}
            axes[0].plot(*_series(history, "accuracy"), **style)
            if targeted:
                axes[1].plot(*_series(history, "backdoor_accuracy"), **style)
        axes[0].set_ylabel("test accuracy (%)")
        if targeted:
            axes[1].set_ylabel("backdoor accuracy (%)")
        for ax in axes:
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
        axes[-1].legend(fontsize=7)
        fig.suptitle(f"{grid.name}: {row.get('label', r)}")
        fig.tight_layout()
        path = os.path.join(folder, f"{r:02d}-{_slug(str(row.get('label', r)))}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if grid.sweep_x:
        fig, ax = plt.subplots(figsize=(6, 4))
        for c, column in enumerate(grid.columns):
            xs, ys = [], []
            for r in range(len(grid.rows)):
                cell = by_pos[(r, c)]
                final = results.get(cell.key, {}).get("final")
                if final is not None:
                    xs.append(100 * float(grid.rows[r].get(grid.sweep_x, 0)))
                    ys.append(100 * final["accuracy"])
            style = _STYLES[c % len(_STYLES)]
            ax.plot(xs, ys, marker="o", linestyle=style, label=str(column.get("label", c)))
        ax.set_xlabel(f"{grid.sweep_x} (%)")
        ax.set_ylabel("final test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(grid.name)
        fig.tight_layout()
        path = os.path.join(folder, "sweep.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written

"""Print Markdown tables (PSNR per rate and attacker, mean ± std over seeds) from sweep outputs.

Usage: ``python experiments/dlg/make_tables.py experiments/dlg/fmnist_dlg [more sweep folders]``.
"""

import csv
import sys
from collections import defaultdict
from pathlib import Path

from sf_ext.dlg.metrics import mean_std


def table(folder: Path) -> str:
    with (folder / "runs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    groups = defaultdict(list)
    # Sweeps before the rename wrote the pruned share as "rate" (percent zeroed, as now).
    share = "pruned_percent" if rows and "pruned_percent" in rows[0] else "rate"
    for row in rows:
        groups[(row["attack"], row["attacker"], float(row[share]))].append(row)
    rates = sorted({key[2] for key in groups})
    lines = [
        f"**{folder.name}** ({len(rows)} runs; PSNR dB mean ± std over seeds, [min, max], "
        "runs >= 40 dB / runs)",
        "",
        "| attack | attacker | " + " | ".join(f"{r:g} %" for r in rates) + " |",
        "|---|---|" + "---|" * len(rates),
    ]
    for attack, attacker in sorted({(k[0], k[1]) for k in groups}):
        cells = []
        for rate in rates:
            members = groups.get((attack, attacker, rate), [])
            if not members:
                cells.append("")
                continue
            stats = mean_std(float(m["psnr"]) for m in members)
            wins = sum(float(m["psnr"]) >= 40 for m in members)
            spread = f"[{stats['min']:.0f}, {stats['max']:.0f}]"
            summary = f"{stats['mean']:.1f} ± {stats['std']:.1f} {spread}"
            cells.append(f"{summary} {wins}/{len(members)}")
        lines.append(f"| {attack} | {attacker} | " + " | ".join(cells) + " |")
    total = sum(float(r["wall_s"]) for r in rows)
    lines += ["", f"Attack time summed over runs: {total / 60:.1f} min."]
    return "\n".join(lines)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(table(Path(name)))
        print()

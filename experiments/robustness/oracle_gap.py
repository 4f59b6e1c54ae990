"""How far below FedAvg* a perfect filter lands: the oracle reference of the scorecard.

A defense that drops exactly the attackers of a 40 % round averages the 12 benign clients of the
round, not 20, so it is compared with FedAvg* (20 clients, no attack) at a disadvantage that has
nothing to do with the defense. ``scorecard_oracle.yaml`` runs FedAvg without attack on 16 and 12
clients per round (same data, partitions, pretrained models and seeds); this script puts each of
its cells beside the FedAvg* of the same setting and seed from the main card and writes the gaps.

    python experiments/robustness/oracle_gap.py --card-out <main card folder> \\
        --oracle-out <oracle card folder> --out experiments/robustness/results/oracle_gap.md
"""

import argparse
import json
import os
import sys
from pathlib import Path

from sf_ext.simulator.scorecard import load_card

HERE = Path(__file__).resolve().parent


def _final(out: str, key: str):
    path = os.path.join(out, "cells", key, "result.json")
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)["final"]["accuracy"]


def _against_oracle(summary_path: str, card_path: str, gaps) -> str:
    """Per defense: untargeted/adaptive entries whose worst seed is more than 3 points below
    FedAvg*, and those more than 3 points below the oracle's worst seed of the same setting and
    attacker share.

    Worst against worst: the oracle is not round-matched with the card's cells (other clients
    are sampled), so per seed its gap carries sampling noise of a few points in either direction.
    """
    card = load_card(card_path)
    with open(summary_path) as handle:
        summary = json.load(handle)
    oracle_worst = {key: min(g for _, g in values) for key, values in gaps.items()}
    fraction = {a["key"]: a.get("attacker_fraction", 0.0) for a in card.attacks}
    lines = [
        "| defense | entries | worst seed below FedAvg* - 3 | ... and below the oracle's worst "
        "seed - 3 | the latter (worst seed minus the oracle's worst, points) |",
        "|---|---|---|---|---|",
    ]
    labels = {d["key"]: d["label"] for d in card.defenses}
    for defense, label in labels.items():
        entries = [
            e
            for e in summary["entries"]
            if e["defense"] == defense and e["kind"] in ("untargeted", "adaptive")
        ]
        if not entries:
            continue
        below_star, below_oracle = [], []
        for e in entries:
            worst = e["d_final_worst"]
            k = 20 - round(20 * fraction[e["attack"]])
            oracle = oracle_worst.get((e["setting"], k))
            if worst is None or oracle is None:
                continue
            if worst < -3:
                below_star.append(e)
                if worst < oracle - 3:
                    below_oracle.append((e, worst - oracle))
        named = ", ".join(f"{e['setting']}/{e['attack']} ({d:+.1f})" for e, d in below_oracle[:8])
        more = f" (+{len(below_oracle) - 8} more)" if len(below_oracle) > 8 else ""
        lines.append(
            f"| {label} | {len(entries)} | {len(below_star)} | {len(below_oracle)} "
            f"| {named}{more} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", default=str(HERE / "scorecard.yaml"))
    parser.add_argument("--oracle", default=str(HERE / "scorecard_oracle.yaml"))
    parser.add_argument("--card-out", required=True, help="output folder of the main card")
    parser.add_argument("--oracle-out", required=True, help="output folder of the oracle card")
    parser.add_argument("--out", help="write the Markdown table here too")
    parser.add_argument(
        "--summary",
        help="the main card's scorecard.json: also judge its untargeted entries against the "
        "oracle instead of FedAvg*",
    )
    args = parser.parse_args(argv)
    for name in ("card_out", "oracle_out"):
        folder = getattr(args, name)
        if not os.path.isdir(os.path.join(folder, "cells")):
            parser.error(
                f"--{name.replace('_', '-')} {folder} holds no cells/ folder (not a card run)"
            )
    if args.summary and not os.path.isfile(args.summary):
        parser.error(f"--summary {args.summary} does not exist (the main card's scorecard.json)")
    references, _ = load_card(args.card).cells()
    fedavg_star = {(c.setting, c.seed): _final(args.card_out, c.key) for c in references}
    _, oracle_cells = load_card(args.oracle).cells()
    rows = {}
    for cell in oracle_cells:
        setting, k = cell.setting.rsplit("-k", 1)
        star = fedavg_star.get((setting, cell.seed))
        acc = _final(args.oracle_out, cell.key)
        if star is None or acc is None:
            continue
        rows.setdefault((setting, int(k)), []).append((cell.seed, 100 * (acc - star)))
    lines = [
        "| setting | clients per round (attackers removed) | gap to FedAvg* per seed, points "
        "| worst | mean |",
        "|---|---|---|---|---|",
    ]
    for (setting, k), gaps in sorted(rows.items(), key=lambda item: (item[0][0], -item[0][1])):
        gaps.sort()
        values = [g for _, g in gaps]
        per_seed = ", ".join(f"s{s}: {g:+.1f}" for s, g in gaps)
        lines.append(
            f"| {setting} | {k} of 20 ({100 * (20 - k) // 20} % attackers) | {per_seed} "
            f"| {min(values):+.1f} | {sum(values) / len(values):+.1f} |"
        )
    if not rows:
        parser.error(
            "no oracle cell has both its own result and the main card's FedAvg* of the same "
            "setting and seed: are --card-out and --oracle-out the runs of these two cards?"
        )
    table = "\n".join(lines) + "\n"
    if args.summary:
        table += "\n" + _against_oracle(args.summary, args.card, rows) + "\n"
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

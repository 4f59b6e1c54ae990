"""Privacy-utility frontier: pruning against the other defences, on one model and one dataset.

Every point trains the same federated job in SecretFlow (debug mode) with one defence, records
the first round (epoch 0, fresh model, nothing pruned yet) and the first round of the last epoch,
and attacks what the server holds of them with the optimizer-aware multi-step inversion
(naive and, where a mask exists, mask-aware). Per point and seed it keeps the final test
accuracy and the strongest attack's result: the share of the attacked images reconstructed
*specifically* (an independently trained classifier names the true class, SSIM >= 0.3, and the
reconstruction is closer to its own image than to 90 % of real images of its class), the share
recognizable only as their class, and SSIM and PSNR.

Base job: Fashion-MNIST, 6,000 training images split alice 40 % / bob 60 %, LeNet, SGD lr 0.1,
batch 4, one local step per round, 3 epochs, plain aggregation (the server sees alice's upload).

Run from the repository root (one torch thread; about an hour per seed on a shared 2-core
machine; finished points are kept and skipped on a rerun):

    python experiments/dlg/frontier.py --out experiments/dlg/frontier --seeds 0,1,2
"""

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from sf_ext.dlg import plots  # noqa: E402
from sf_ext.dlg.audit import attack_view, score_view, view_digest  # noqa: E402
from sf_ext.dlg.captured import load_round  # noqa: E402
from sf_ext.dlg.fl_run import run_setting  # noqa: E402
from sf_ext.dlg.judge import load_judge  # noqa: E402
from sf_ext.dlg.options import AttackOptions  # noqa: E402
from sf_ext.dlg.settings import FLSetting  # noqa: E402
from sf_ext.dlg.views import server_views  # noqa: E402

BASE = FLSetting(
    dataset="fashion-mnist",
    samples=6000,
    split=(0.4, 0.6),
    model="lenet",
    optimizer="sgd",
    lr=0.1,
    batch_size=4,
    local_steps=1,
    epochs=3,
    strategy="fed_avg_w",
    aggregator="plain",
)
DP_CLIP = 100.0  # above the model's weight norm: SecretFlow's GaussianModelDP clips the weights


def _prune(end: float) -> dict:
    # Reach the end rate at the start of the last epoch: (1 - p)^(epochs - 1) = end.
    percent = 100 * (1 - end ** (1 / (BASE.epochs - 1)))
    return {
        "strategy": "fed_avg_w_prune",
        "prune_percent": round(percent, 2),
        "prune_end_rate": end,
    }


def _dp(sigma: float) -> dict:
    # Noise std per weight = multiplier * clip / sqrt(2 clients).
    return {"dp_noise_multiplier": sigma * math.sqrt(2) / DP_CLIP, "dp_clip": DP_CLIP}


#: (key, family, changes to BASE)
POINTS = [
    ("none", "no defence", {}),
    ("prune-0.5", "fed_avg_w_prune", _prune(0.5)),
    ("prune-0.2", "fed_avg_w_prune", _prune(0.2)),
    ("prune-0.05", "fed_avg_w_prune", _prune(0.05)),
    (
        "prune-0.2-secure",
        "fed_avg_w_prune + SecurePruneAggregator",
        {**_prune(0.2), "aggregator": "secure_prune"},
    ),
    ("dp-1e-4", "SecretFlow model DP", _dp(1e-4)),
    ("dp-3e-4", "SecretFlow model DP", _dp(3e-4)),
    ("dp-1e-3", "SecretFlow model DP", _dp(1e-3)),
    ("dp-3e-3", "SecretFlow model DP", _dp(3e-3)),
    ("dp-1e-2", "SecretFlow model DP", _dp(1e-2)),
    ("update-0.3", "update pruning", {"update_keep": 0.3}),
    ("update-0.1", "update pruning", {"update_keep": 0.1}),
    ("update-0.01", "update pruning", {"update_keep": 0.01}),
    ("batch-16", "larger batch / more local steps", {"batch_size": 16}),
    ("batch-64", "larger batch / more local steps", {"batch_size": 64}),
    ("steps-4", "larger batch / more local steps", {"local_steps": 4}),
    ("secure", "SecureAggregator", {"aggregator": "secure"}),
]
ATTACK = AttackOptions(iters=600, restarts=1, distance="cosine")


def rescore_point(row: dict, out: Path, judge) -> dict:
    """Score a finished point again from its saved reconstructions (after a change of the
    recognizability rule), without training or attacking."""
    key, seed = row["point"], row["seed"]
    for entry in row["views"]:
        round_dir = out / "rounds" / f"{key}_seed{seed}" / entry["round"]
        view = next(
            v for v in server_views(load_round(round_dir)) if v.attacker == entry["attacker"]
        )
        saved = torch.load(
            out
            / "reconstructions"
            / f"{key}_seed{seed}_{entry['round']}_{view.slug}_{view.attacker}.pt"
        )
        from sf_ext.dlg.metrics import score_reconstruction

        score = score_reconstruction(
            saved["reconstruction"],
            view.truth,
            saved["labels"].tolist(),
            view.labels.tolist(),
            judge,
        )
        entry.update(
            recognized=sum(score.recognized),
            recognized_share=sum(score.recognized) / len(view.labels),
            specific=sum(score.specific),
            specific_share=sum(score.specific) / len(view.labels),
            ssim=score.ssim,
            psnr=score.psnr,
        )
        if seed == 0:
            plots.batch_grid(
                view.truth,
                saved["reconstruction"],
                score,
                out / "figures" / f"{key}_{entry['round']}_{view.slug}_{view.attacker}.png",
                title=f"{key}: {entry['round']}, {view.name}, {view.attacker}",
                labels=view.labels.tolist(),
            )
    views = row["views"]
    best = max(views, key=lambda v: (v["specific_share"], v["recognized_share"], v["ssim"]))
    row.update(
        best_specific_share=best["specific_share"],
        best_recognized_share=max(v["recognized_share"] for v in views),
        best_ssim=best["ssim"],
        best_psnr=best["psnr"],
        best_view=f"{best['round']} {best['view']} ({best['attacker']})",
        first_round_specific_share=max(v["specific_share"] for v in views if v["round"] == "e0_s0"),
        last_round_specific_share=max(v["specific_share"] for v in views if v["round"] != "e0_s0"),
    )
    return row


def run_point(key, changes, seed, out: Path, judge, cache, rescore: bool = False) -> dict:
    """Train one point for one seed, attack its recorded rounds, return the result row."""
    file = out / "points" / f"{key}_seed{seed}.json"
    if file.is_file():
        row = json.loads(file.read_text())
        if rescore:
            row = rescore_point(row, out, judge)
            file.write_text(json.dumps(row, indent=2) + "\n")
        return row
    setting = BASE.replace(seed=seed, name=key, **changes)
    started = time.perf_counter()
    run = run_setting(setting, out / "rounds" / f"{key}_seed{seed}", progress=False)
    views = []
    for round_dir in run.rounds:
        for view in server_views(load_round(round_dir)):
            digest = view_digest(view)
            if digest not in cache:
                options = AttackOptions(**{**ATTACK.__dict__, "seed": seed})
                result = attack_view(view, "multistep", options)
                cache[digest] = result
            result = cache[digest]
            score = score_view(view, result, judge)
            recon_file = (
                out
                / "reconstructions"
                / f"{key}_seed{seed}_{round_dir.name}_{view.slug}_{view.attacker}.pt"
            )
            recon_file.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {"reconstruction": result.reconstruction, "labels": result.label}, recon_file
            )
            recognized = sum(score.recognized)
            specific = sum(score.specific)
            views.append(
                {
                    "round": round_dir.name,
                    "view": view.name,
                    "attacker": view.attacker,
                    "items": len(view.labels),
                    "recognized": recognized,
                    "recognized_share": recognized / len(view.labels),
                    "specific": specific,
                    "specific_share": specific / len(view.labels),
                    "ssim": score.ssim,
                    "psnr": score.psnr,
                    "label_acc": score.label_accuracy,
                    "attack_s": result.wall_time_s,
                    "notes": {k: v for k, v in view.notes.items() if isinstance(v, (int, float))},
                }
            )
            if seed == 0:
                plots.batch_grid(
                    view.truth,
                    result.reconstruction,
                    score,
                    out / "figures" / f"{key}_{round_dir.name}_{view.slug}_{view.attacker}.png",
                    title=f"{key}: {round_dir.name}, {view.name}, {view.attacker}",
                    labels=view.labels.tolist(),
                )
    best = max(views, key=lambda v: (v["specific_share"], v["recognized_share"], v["ssim"]))
    row = {
        "point": key,
        "seed": seed,
        "setting": setting.label(),
        "accuracy": run.final_accuracy,
        "accuracy_per_epoch": run.val_accuracy,
        "kept_fraction": run.kept_fraction,
        "best_specific_share": best["specific_share"],
        "best_recognized_share": max(v["recognized_share"] for v in views),
        "best_ssim": best["ssim"],
        "best_psnr": best["psnr"],
        "best_view": f"{best['round']} {best['view']} ({best['attacker']})",
        "first_round_specific_share": max(
            v["specific_share"] for v in views if v["round"] == "e0_s0"
        ),
        "last_round_specific_share": max(
            v["specific_share"] for v in views if v["round"] != "e0_s0"
        ),
        "views": views,
        "train_s": run.wall_time_s,
        "total_s": time.perf_counter() - started,
    }
    if setting.dp_noise_multiplier:
        from secretflow_fl.security.privacy.mechanism.mechanism_fl import GaussianModelDP

        rounds = setting.epochs * math.ceil(setting.samples * setting.split[0] / setting.batch_size)
        dp = GaussianModelDP(setting.dp_noise_multiplier, 2, l2_norm_clip=setting.dp_clip)
        row["dp_epsilon"] = float(dp.privacy_spent_rdp(rounds)[0])
        row["dp_sigma"] = setting.dp_noise_multiplier * setting.dp_clip / math.sqrt(2)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(row, indent=2) + "\n")
    return row


def _ms(values):
    values = np.asarray(values, dtype=float)
    return values.mean(), (values.std(ddof=1) if len(values) > 1 else 0.0)


def summarize(rows, out: Path) -> None:
    """table.md, frontier.csv, runs.csv and frontier.png from the per-point rows."""
    by_point = {}
    for row in rows:
        by_point.setdefault(row["point"], []).append(row)
    table = [
        "| defence | point | test accuracy (mean ± std) | worst accuracy | specific (mean ± std) | "
        "specific (worst seed) | first round | last round | class recognizable | best SSIM | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    csv_rows = []
    fig, ax = plt.subplots(figsize=(8, 5.2), layout="constrained")
    families = {}
    for key, family, _ in POINTS:
        members = by_point.get(key)
        if not members:
            continue
        acc = _ms([m["accuracy"] for m in members])
        spec = _ms([m["best_specific_share"] for m in members])
        first = _ms([m["first_round_specific_share"] for m in members])
        last = _ms([m["last_round_specific_share"] for m in members])
        rec = _ms([m["best_recognized_share"] for m in members])
        ssim = _ms([m["best_ssim"] for m in members])
        worst_acc = min(m["accuracy"] for m in members)
        worst_spec = max(m["best_specific_share"] for m in members)
        table.append(
            f"| {family} | {key} | {acc[0]:.3f} ± {acc[1]:.3f} | {worst_acc:.3f} "
            f"| {spec[0]:.2f} ± {spec[1]:.2f} | {worst_spec:.2f} "
            f"| {first[0]:.2f} | {last[0]:.2f} | {rec[0]:.2f} | {ssim[0]:.2f} | {len(members)} |"
        )
        csv_rows.append(
            {
                "point": key,
                "family": family,
                "accuracy_mean": acc[0],
                "accuracy_std": acc[1],
                "specific_mean": spec[0],
                "specific_std": spec[1],
                "accuracy_worst": worst_acc,
                "specific_worst": worst_spec,
                "first_round_specific": first[0],
                "last_round_specific": last[0],
                "recognized_mean": rec[0],
                "best_ssim_mean": ssim[0],
                "seeds": len(members),
            }
        )
        new_family = family not in families
        color = families.setdefault(family, f"C{len(families)}")
        ax.errorbar(
            acc[0],
            spec[0],
            xerr=acc[1],
            yerr=spec[1],
            marker="o",
            color=color,
            capsize=3,
            label=family if new_family else None,
        )
        ax.annotate(key, (acc[0], spec[0]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.legend(fontsize=7, loc="best")
    ax.set_xlabel("final test accuracy (mean ± std over seeds)")
    ax.set_ylabel("share of attacked images reconstructed specifically")
    ax.set_title(
        "Fashion-MNIST, LeNet, SGD batch 4: what the strongest attack recovers vs accuracy",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.set_ylim(-0.05, 1.05)
    fig.savefig(out / "frontier.png", dpi=130)
    plt.close(fig)
    (out / "table.md").write_text("\n".join(table) + "\n")
    with (out / "frontier.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(csv_rows[0]))
        writer.writeheader()
        writer.writerows(csv_rows)
    with (out / "runs.csv").open("w", newline="") as handle:
        fields = [k for k in rows[0] if k not in ("views", "accuracy_per_epoch")]
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print("\n".join(table))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="experiments/dlg/frontier")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--points", default=",".join(k for k, _, _ in POINTS))
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="score finished points again from their saved "
        "reconstructions (no training, no attack)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = args.points.split(",")
    unknown = set(wanted) - {k for k, _, _ in POINTS}
    if unknown:
        parser.error(f"unknown points {sorted(unknown)}")
    judge = load_judge("fashion-mnist", "train")
    started = time.perf_counter()
    rows, cache = [], {}
    for seed in seeds:
        for key, _, changes in POINTS:
            if key not in wanted:
                continue
            if args.summary_only and not (out / "points" / f"{key}_seed{seed}.json").is_file():
                continue
            row = run_point(key, changes, seed, out, judge, cache, args.rescore)
            rows.append(row)
            print(
                f"{key} seed {seed}: accuracy {row['accuracy']:.3f}, specific "
                f"{row['best_specific_share']:.2f} ({row['best_view']}), {row['total_s']:.0f} s",
                flush=True,
            )
    summarize(rows, out)
    print(f"wall time {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The robustness scorecard: defenses x attacks x settings x seeds, judged by the worst seed.

``python -m sf_ext.simulator.scorecard <card.yaml> --out <folder> [--workers 2 | --ray]``

A card file names the settings (dataset x heterogeneity, each a partial
:class:`~sf_ext.simulator.config.SimulationConfig`), the defenses, the attacks and the seeds::

    name: robustness_scorecard
    base: {dataset: fashion-mnist, model: lenet, num_clients: 100, clients_per_round: 20, ...}
    seeds: [0, 1, 2]
    settings:
      - {key: fmnist-dir0.5, label: "Fashion-MNIST, Dirichlet 0.5", set: {alpha: 0.5}}
      - {key: fmnist-iid, label: "Fashion-MNIST, IID", set: {partition: iid},
         defenses: [fedavg, flame, matrix_mapping, xmam, shield]}
    defenses:
      - {key: krum, label: Krum, aggregator: krum, aggregator_options: {f: auto}}
    attacks:
      - {key: none, label: No attack}
      - {key: sign_flip-40, label: "Sign flip 40%", attack: sign_flip, attacker_fraction: 0.4}

Every (setting, attack, defense, seed) is one simulator cell, run in ``<out>/cells/<key>/`` with a
per-round checkpoint (an interrupted card resumes where it stopped; finished cells are read
back). Each (setting, seed) also runs FedAvg without attack, the reference FedAvg*. The card
then reports, per (setting, attack, defense), the **worst case over the seeds** beside the mean:

- ``d_final``: final test accuracy minus FedAvg*'s (same setting and seed), in points;
- ``d_low``: the lowest round-matched difference ``min_t (acc_t - acc*_t)``;
- ``bd_final`` / ``bd_peak``: backdoor accuracy at the end and at its worst round (backdoors);
- ``tpr`` / ``fpr``: attackers dropped / benign clients dropped, pooled over rounds (rules that
  select clients only; ``n/a`` otherwise);
- ``status``: a diverged or stalled seed is flagged in every table.

Outputs: ``scorecard.csv`` (one row per cell and seed), ``scorecard.md`` (the worst-case tables
and the criteria below), ``scorecard.json`` and one heatmap PNG per setting. The criteria the
issue sets for a defense: worst ``d_final >= -3`` on every untargeted and adaptive cell, worst
``bd_final <= 5 %`` on every backdoor cell, worst ``fpr <= 10 %`` without attack.
"""

import argparse
import csv
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from sf_ext.simulator.grid import merge_settings

__all__ = ["Scorecard", "ScoreCell", "load_card", "run_card", "summarize", "main"]

_CARD_SECTIONS = (
    "name",
    "description",
    "base",
    "seeds",
    "settings",
    "defenses",
    "attacks",
    "notes",
    "priority",
)
UNTARGETED_LIMIT = -3.0  # points of accuracy below FedAvg*
BACKDOOR_LIMIT = 0.05
FPR_LIMIT = 0.10


@dataclass
class ScoreCell:
    """One simulator run of the card."""

    setting: str
    attack: str
    defense: str
    seed: int
    config: Any  # SimulationConfig
    reference: str = ""  # key of the FedAvg* cell this one is compared with

    @property
    def key(self) -> str:
        name = f"{self.setting}-{self.attack}-{self.defense}-s{self.seed}"
        slug = re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")
        return f"{slug}-{self.config.digest()[:8]}"


@dataclass
class Scorecard:
    """A parsed card file."""

    name: str
    base: Dict[str, Any]
    seeds: List[int]
    settings: List[Dict[str, Any]]
    defenses: List[Dict[str, Any]]
    attacks: List[Dict[str, Any]]
    description: str = ""
    notes: List[str] = field(default_factory=list)
    priority: List[str] = field(default_factory=list)

    def defense(self, key: str) -> Dict[str, Any]:
        return next(d for d in self.defenses if d["key"] == key)

    def attack(self, key: str) -> Dict[str, Any]:
        return next(a for a in self.attacks if a["key"] == key)

    def attack_kind(self, key: str) -> str:
        """``none``, ``untargeted``, ``adaptive`` or ``backdoor``."""
        entry = self.attack(key)
        if entry.get("kind"):
            return str(entry["kind"])
        if not entry.get("attack"):
            return "none"
        from sf_ext.attacks.registry import get_attack

        return "backdoor" if get_attack(entry["attack"]).kind == "backdoor" else "untargeted"

    def cells(
        self, overrides: Optional[Dict[str, Any]] = None
    ) -> Tuple[List[ScoreCell], List[ScoreCell]]:
        """``(references, cells)``: FedAvg* per (setting, seed), and every scored cell."""
        from sf_ext.simulator.config import SimulationConfig

        references, cells = [], []
        for setting in self.settings:
            defenses = _selection(
                setting.get("defenses"), [d["key"] for d in self.defenses], "defense"
            )
            attacks = _selection(setting.get("attacks"), [a["key"] for a in self.attacks], "attack")
            for seed in setting.get("seeds", self.seeds):
                base = merge_settings(
                    self.base, setting.get("set", {}), {"seed": int(seed)}, overrides or {}
                )

                def build(extra, label):
                    try:
                        return SimulationConfig.from_dict(merge_settings(base, extra))
                    except ValueError as exc:
                        raise ValueError(f"{self.name}, {setting['key']}, {label}: {exc}") from None

                clean = {
                    "aggregator": "fedavg",
                    "aggregator_options": {},
                    "attack": None,
                    "attacker_fraction": 0.0,
                    "attack_options": {},
                }
                for attack_key in attacks:
                    attack = _strip(self.attack(attack_key))
                    # FedAvg* sees the same data as the attack's cells: an attack's own backdoor
                    # section (edge-case tails leave the clean pool) applies to its reference.
                    ref_extra = dict(clean)
                    if "backdoor" in attack:
                        ref_extra["backdoor"] = attack["backdoor"]
                    reference = ScoreCell(
                        setting["key"], "none", "fedavg*", int(seed), build(ref_extra, "FedAvg*")
                    )
                    if all(r.key != reference.key for r in references):
                        references.append(reference)
                    if not attack.get("attack"):
                        attack = {"attack": None, "attacker_fraction": 0.0, "attack_options": {}}
                    for defense_key in defenses:
                        defense = _strip(self.defense(defense_key))
                        config = build(
                            merge_settings(attack, defense), f"{attack_key} x {defense_key}"
                        )
                        cells.append(
                            ScoreCell(
                                setting["key"],
                                attack_key,
                                defense_key,
                                int(seed),
                                config,
                                reference.key,
                            )
                        )
        return references, cells


def _strip(entry: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in entry.items() if k not in ("key", "label", "kind")}


def _selection(wanted, known: List[str], what: str) -> List[str]:
    if wanted in (None, "all"):
        return list(known)
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise ValueError(f"unknown {what} keys {unknown}; the card defines {known}")
    return list(wanted)


def load_card(path: str) -> Scorecard:
    """Read and check a card file (YAML or JSON); every cell is validated here, before any run."""
    with open(path) as handle:
        text = handle.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
    else:
        spec = json.loads(text)
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a card is a mapping with settings, defenses, attacks")
    import difflib

    for key in spec:
        if key not in _CARD_SECTIONS:
            close = difflib.get_close_matches(str(key), _CARD_SECTIONS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{path}: unknown section {key!r}{hint}")
    for section in ("settings", "defenses", "attacks"):
        items = spec.get(section)
        if not isinstance(items, list) or not items:
            raise ValueError(f"{path}: {section!r} must be a non-empty list")
        keys = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "key" not in item:
                raise ValueError(f"{path}: {section}[{i}] must be a mapping with a 'key'")
            keys.append(item["key"])
        if len(set(keys)) != len(keys):
            raise ValueError(f"{path}: duplicate keys in {section}: {keys}")
    card = Scorecard(
        name=str(spec.get("name", os.path.splitext(os.path.basename(path))[0])),
        base=dict(spec.get("base", {})),
        seeds=[int(s) for s in spec.get("seeds", [0])],
        settings=list(spec["settings"]),
        defenses=list(spec["defenses"]),
        attacks=list(spec["attacks"]),
        description=str(spec.get("description", "")),
        notes=list(spec.get("notes", [])),
        priority=list(spec.get("priority", [])),
    )
    unknown = [p for p in card.priority if p not in [d["key"] for d in card.defenses]]
    if unknown:
        raise ValueError(f"{path}: unknown defense keys in 'priority': {unknown}")
    card.cells()  # validates every cell's settings by name and type
    return card


# ------------------------------------------------------------------------------------ running


FAILED = "failed.json"


def _run_one(args) -> Tuple[str, Optional[str]]:
    """Run one cell; a cell that raises is recorded in ``failed.json`` (the card goes on and
    reports it), never silently dropped."""
    config_dict, cell_dir, cache_dir, threads = args
    import traceback
    import warnings

    from sf_ext.simulator.run import run_cell

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # recorded in the result instead
            run_cell(config_dict, cell_dir, cache_dir, threads, progress=False)
    except Exception as exc:  # noqa: BLE001  (reported per cell, the card goes on)
        os.makedirs(cell_dir, exist_ok=True)
        record = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        with open(os.path.join(cell_dir, FAILED), "w") as handle:
            json.dump(record, handle, indent=1)
        return cell_dir, record["error"]
    failed = os.path.join(cell_dir, FAILED)
    if os.path.exists(failed):
        os.remove(failed)
    return cell_dir, None


def run_card(
    card: Scorecard,
    out: str,
    overrides: Optional[Dict[str, Any]] = None,
    only: Optional[str] = None,
    workers: int = 1,
    use_ray: bool = False,
    ray_address: Optional[str] = None,
    threads: int = 1,
    progress: bool = True,
) -> Dict[str, Any]:
    """Run every cell not yet finished (FedAvg* first), then write the card's outputs.

    Returns the summary (what ``scorecard.json`` holds).
    """
    from tqdm.auto import tqdm

    os.makedirs(out, exist_ok=True)
    references, cells = card.cells(overrides)
    wanted = [part for part in (only or "").split(",") if part]
    todo: Dict[str, ScoreCell] = {}
    # FedAvg* first (they build the shared pretrained models), then the priority defenses (all
    # settings and seeds), then the rest: an interrupted card has its key comparisons complete.
    rank = {key: i for i, key in enumerate(card.priority)}
    cells = sorted(cells, key=lambda c: rank.get(c.defense, len(rank)))
    for cell in references + cells:
        if not wanted or any(w in cell.key for w in wanted):
            todo.setdefault(cell.key, cell)
    if wanted and not todo:
        raise ValueError(f"--only {only!r} matches no cell of {card.name}")
    cache_dir = os.path.join(out, "pretrained")
    jobs = [
        (c.config.to_dict(), os.path.join(out, "cells", k), cache_dir, threads)
        for k, c in todo.items()
    ]
    start = time.perf_counter()
    failures: List[Tuple[str, str]] = []
    bar = tqdm(total=len(jobs), desc=card.name, disable=not progress, unit="cell")
    if use_ray:
        import ray

        if not ray.is_initialized():
            ray.init(address=ray_address, include_dashboard=False, ignore_reinit_error=True)
        remote = ray.remote(num_cpus=threads)(_run_one)
        pending = [remote.remote(job) for job in jobs]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            _note(ray.get(ready[0]), failures)
            bar.update(1)
    elif workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            # FedAvg* cells come first: they also build the shared pretrained models.
            futures = [pool.submit(_run_one, job) for job in jobs]
            for future in as_completed(futures):
                _note(future.result(), failures)
                bar.update(1)
    else:
        for job in jobs:
            _note(_run_one(job), failures)
            bar.update(1)
    bar.close()
    if failures:
        print(f"{len(failures)} cells failed (see failed.json in each):", file=sys.stderr)
        for cell_dir, error in failures[:10]:
            print(f"  {os.path.basename(cell_dir)}: {error}", file=sys.stderr)
    summary = summarize(card, out, overrides)
    summary["elapsed_minutes_this_call"] = (time.perf_counter() - start) / 60
    summary["cells_run_this_call"] = len(jobs)
    write_outputs(card, out, summary)
    return summary


def _note(outcome: Tuple[str, Optional[str]], failures: List[Tuple[str, str]]) -> None:
    cell_dir, error = outcome
    if error is not None:
        failures.append((cell_dir, error))


# ---------------------------------------------------------------------------------- summaries


def _load(out: str, key: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(out, "cells", key, "result.json")
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def _series(result: Dict[str, Any], name: str) -> Dict[int, float]:
    return {h["round"]: h[name] for h in result["history"] if h.get(name) is not None}


def _nan(value) -> float:
    return math.nan if value is None else float(value)


def cell_metrics(result: Dict[str, Any], reference: Dict[str, Any]) -> Dict[str, Any]:
    """One seed's numbers for one cell, against its FedAvg*."""
    final, ref_final = result["final"], reference["final"]
    acc, ref = _series(result, "accuracy"), _series(reference, "accuracy")
    shared = sorted(set(acc) & set(ref))
    d_low = min((acc[t] - ref[t] for t in shared), default=math.nan)
    if final.get("diverged"):
        d_low = min(d_low, -ref_final["accuracy"]) if shared else -ref_final["accuracy"]
    accuracy = _nan(final.get("accuracy"))
    if final.get("diverged") or math.isnan(accuracy):
        accuracy = 0.0  # a diverged model predicts nothing useful: count it as 0 %
    return {
        "accuracy": accuracy,
        "reference_accuracy": ref_final["accuracy"],
        "d_final": 100 * (accuracy - ref_final["accuracy"]),
        "d_low": 100 * d_low,
        "bd_final": _nan(final.get("backdoor_accuracy")),
        "bd_peak": _nan(final.get("backdoor_accuracy_max")),
        "reference_bd": _nan(ref_final.get("backdoor_accuracy")),
        "tpr": _nan(final.get("tpr")) if final.get("selects", True) else math.nan,
        "fpr": _nan(final.get("fpr")) if final.get("selects", True) else math.nan,
        "selects": bool(final.get("selects", True)),
        "status": final.get("status", "diverged" if final.get("diverged") else "ok"),
        "warnings": final.get("warnings", []),
    }


def _worst(values: Sequence[float], worst) -> Tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan, math.nan
    return worst(finite), sum(finite) / len(finite)


def summarize(card: Scorecard, out: str, overrides=None) -> Dict[str, Any]:
    """Worst case and mean over the seeds of every (setting, attack, defense) that has results."""
    references, cells = card.cells(overrides)
    refs = {c.key: _load(out, c.key) for c in references}
    per_seed: List[Dict[str, Any]] = []
    groups: Dict[Tuple[str, str, str], List[Dict[str, Any]]] = {}
    for cell in cells:
        result, reference = _load(out, cell.key), refs.get(cell.reference)
        if result is None or reference is None:
            continue
        metrics = cell_metrics(result, reference)
        row = {
            "setting": cell.setting,
            "attack": cell.attack,
            "defense": cell.defense,
            "seed": cell.seed,
            "cell": cell.key,
            **metrics,
        }
        per_seed.append(row)
        groups.setdefault((cell.setting, cell.attack, cell.defense), []).append(row)
    entries = []
    for (setting, attack, defense), rows in groups.items():
        kind = card.attack_kind(attack)
        d_final = _worst([r["d_final"] for r in rows], min)
        d_low = _worst([r["d_low"] for r in rows], min)
        bd_final = _worst([r["bd_final"] for r in rows], max)
        bd_peak = _worst([r["bd_peak"] for r in rows], max)
        tpr = _worst([r["tpr"] for r in rows], min)
        fpr = _worst([r["fpr"] for r in rows], max)
        flags = sorted({r["status"] for r in rows if r["status"] != "ok"})
        entry = {
            "setting": setting,
            "attack": attack,
            "defense": defense,
            "kind": kind,
            "seeds": sorted(r["seed"] for r in rows),
            "d_final_worst": d_final[0],
            "d_final_mean": d_final[1],
            "d_low_worst": d_low[0],
            "d_low_mean": d_low[1],
            "bd_final_worst": bd_final[0],
            "bd_final_mean": bd_final[1],
            "bd_peak_worst": bd_peak[0],
            "tpr_worst": tpr[0],
            "tpr_mean": tpr[1],
            "fpr_worst": fpr[0],
            "fpr_mean": fpr[1],
            "selects": rows[0]["selects"],
            "flags": flags,
            "warnings": sorted({w for r in rows for w in r["warnings"]}),
        }
        entry["passes"] = _passes(entry)
        entries.append(entry)
    expected = len({(c.setting, c.attack, c.defense) for c in cells})
    failed = sorted(
        c.key
        for c in references + cells
        if os.path.exists(os.path.join(out, "cells", c.key, FAILED))
    )
    return {
        "failed_cells": failed,
        "name": card.name,
        "seeds": card.seeds,
        "entries": entries,
        "per_seed": per_seed,
        "complete": len(per_seed) == len(cells),
        "cells_done": len(per_seed),
        "cells_total": len(cells),
        "groups_total": expected,
    }


def _passes(entry: Dict[str, Any]) -> Optional[bool]:
    """The issue's criteria for one (setting, attack, defense) entry (None: no criterion)."""
    kind = entry["kind"]
    if kind == "none":
        return None if not entry["selects"] else bool(entry["fpr_worst"] <= FPR_LIMIT)
    if kind == "backdoor":
        return bool(entry["bd_final_worst"] <= BACKDOOR_LIMIT)
    return bool(entry["d_final_worst"] >= UNTARGETED_LIMIT)


# -------------------------------------------------------------------------------------- outputs


def _fmt(value, digits=1, pct=False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.{digits}f}" if pct else f"{value:+.{digits}f}"


def markdown(card: Scorecard, summary: Dict[str, Any]) -> str:
    by_key = {(e["setting"], e["attack"], e["defense"]): e for e in summary["entries"]}
    lines = [f"# {card.name}", ""]
    if card.description:
        lines += [card.description.strip(), ""]
    if summary.get("failed_cells"):
        failed = summary["failed_cells"]
        lines += [
            f"**{len(failed)} cells failed** (their `failed.json` says why): "
            + ", ".join(failed[:20]),
            "",
        ]
    lines += [
        f"Cells finished: {summary['cells_done']} of {summary['cells_total']} "
        f"(seeds {', '.join(map(str, card.seeds))}). Every number is the **worst seed**, the "
        "mean over seeds in parentheses. ✗ marks an entry that misses the issue's criterion "
        f"(accuracy more than {-UNTARGETED_LIMIT:g} points below FedAvg* on an untargeted or "
        f"adaptive row, backdoor accuracy above {100 * BACKDOOR_LIMIT:g} %, benign FPR above "
        f"{100 * FPR_LIMIT:g} % without attack); (div.) / (stalled) flag a seed whose run "
        "diverged or froze.",
        "",
    ]
    for setting in card.settings:
        skey = setting["key"]
        defenses = [
            d
            for d in _selection(
                setting.get("defenses"), [d["key"] for d in card.defenses], "defense"
            )
        ]
        attacks = _selection(setting.get("attacks"), [a["key"] for a in card.attacks], "attack")
        labels = [card.defense(d).get("label", d) for d in defenses]
        header = "| Attack | " + " | ".join(labels) + " |"
        rule = "|---" * (len(labels) + 1) + "|"
        lines += [f"## {setting.get('label', skey)}", ""]
        lines += [
            "Accuracy minus FedAvg\\* at the final round, points (backdoor rows: backdoor "
            "accuracy %, worst seed):",
            "",
            header,
            rule,
        ]
        for akey in attacks:
            kind = card.attack_kind(akey)
            cells = []
            for dkey in defenses:
                e = by_key.get((skey, akey, dkey))
                if e is None:
                    cells.append("(not run)")
                    continue
                if kind == "backdoor":
                    text = f"{_fmt(e['bd_final_worst'], 1, True)} ({_fmt(e['bd_final_mean'], 1, True)})"
                else:
                    text = f"{_fmt(e['d_final_worst'])} ({_fmt(e['d_final_mean'])})"
                if e["passes"] is False and kind != "none":  # no-attack rows: see the FPR table
                    text += " ✗"
                if e["flags"]:
                    text += " " + " ".join(
                        f"({'div.' if f == 'diverged' else f})" for f in e["flags"]
                    )
                cells.append(text)
            label = card.attack(akey).get("label", akey)
            if kind == "backdoor":
                base = [
                    r["reference_bd"]
                    for r in summary["per_seed"]
                    if r["setting"] == skey and r["attack"] == akey
                ]
                base = [b for b in base if not math.isnan(b)]
                if base:
                    label += f" (FedAvg\\* without attack: {100 * max(base):.1f})"
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Lowest round-matched accuracy minus FedAvg\\*, points (worst seed):",
            "",
            header,
            rule,
        ]
        for akey in attacks:
            cells = []
            for dkey in defenses:
                e = by_key.get((skey, akey, dkey))
                cells.append("(not run)" if e is None else _fmt(e["d_low_worst"]))
            lines.append(f"| {card.attack(akey).get('label', akey)} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Attackers dropped (TPR) / benign dropped (FPR), %, worst seed (n/a: the "
            "rule never selects clients):",
            "",
            header,
            rule,
        ]
        for akey in attacks:
            cells = []
            for dkey in defenses:
                e = by_key.get((skey, akey, dkey))
                if e is None:
                    cells.append("(not run)")
                elif not e["selects"]:
                    cells.append("n/a")
                elif card.attack_kind(akey) == "none":
                    cells.append(
                        f"– / {_fmt(e['fpr_worst'], 0, True)}"
                        + (" ✗" if e["passes"] is False else "")
                    )
                else:
                    cells.append(
                        f"{_fmt(e['tpr_worst'], 0, True)} / {_fmt(e['fpr_worst'], 0, True)}"
                    )
            lines.append(f"| {card.attack(akey).get('label', akey)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## Criteria met, per defense (entries passing / entries with a criterion)",
        "",
        "| Defense | passing | failing entries |",
        "|---|---|---|",
    ]
    for defense in card.defenses:
        mine = [
            e
            for e in summary["entries"]
            if e["defense"] == defense["key"] and e["passes"] is not None
        ]
        if not mine:
            continue
        failing = [f"{e['setting']}/{e['attack']}" for e in mine if not e["passes"]]
        shown = ", ".join(failing[:12]) + (
            f" (+{len(failing) - 12} more)" if len(failing) > 12 else ""
        )
        lines.append(
            f"| {defense.get('label', defense['key'])} | {len(mine) - len(failing)}/{len(mine)} | {shown or 'none'} |"
        )
    if card.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in card.notes]
    return "\n".join(lines) + "\n"


def write_csv(path: str, summary: Dict[str, Any]) -> None:
    fields = [
        "setting",
        "attack",
        "defense",
        "seed",
        "accuracy",
        "reference_accuracy",
        "d_final",
        "d_low",
        "bd_final",
        "bd_peak",
        "reference_bd",
        "tpr",
        "fpr",
        "status",
        "cell",
    ]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in summary["per_seed"]:
            writer.writerow(
                {
                    k: (
                        f"{v:.4f}"
                        if isinstance(v, float) and not math.isnan(v)
                        else ("" if isinstance(v, float) else v)
                    )
                    for k, v in row.items()
                }
            )


def write_heatmaps(card: Scorecard, out: str, summary: Dict[str, Any]) -> List[str]:
    """Per setting: worst-seed accuracy difference (untargeted and adaptive rows) and worst
    backdoor accuracy (backdoor rows), cells annotated, failures outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    by_key = {(e["setting"], e["attack"], e["defense"]): e for e in summary["entries"]}
    paths = []
    for setting in card.settings:
        skey = setting["key"]
        defenses = _selection(setting.get("defenses"), [d["key"] for d in card.defenses], "defense")
        attacks = _selection(setting.get("attacks"), [a["key"] for a in card.attacks], "attack")
        acc_rows = [a for a in attacks if card.attack_kind(a) in ("none", "untargeted", "adaptive")]
        bd_rows = [a for a in attacks if card.attack_kind(a) == "backdoor"]
        panels = [
            (
                acc_rows,
                "d_final_worst",
                "accuracy − FedAvg* (points, worst seed)",
                "RdYlGn",
                (-30, 5),
            ),
            (bd_rows, "bd_final_worst", "backdoor accuracy (%, worst seed)", "RdYlGn_r", (0, 100)),
        ]
        panels = [p for p in panels if p[0]]
        heights = [max(len(p[0]), 1) for p in panels]
        fig, axes = plt.subplots(
            len(panels),
            1,
            figsize=(
                max(6.5, 2.2 + 0.62 * len(defenses)),
                1.6 + 0.36 * sum(heights) + 1.0 * len(panels),
            ),
            gridspec_kw={"height_ratios": heights},
            squeeze=False,
        )
        for ax, (rows, key, title, cmap, (vmin, vmax)) in zip(axes[:, 0], panels):
            grid = np.full((len(rows), len(defenses)), np.nan)
            for i, a in enumerate(rows):
                for j, d in enumerate(defenses):
                    e = by_key.get((skey, a, d))
                    if e is not None:
                        value = e[key]
                        grid[i, j] = 100 * value if key.startswith("bd") else value
            image = ax.imshow(
                np.clip(grid, vmin, vmax), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto"
            )
            for i, a in enumerate(rows):
                for j, d in enumerate(defenses):
                    e = by_key.get((skey, a, d))
                    if e is None or math.isnan(grid[i, j]):
                        continue
                    ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=7)
                    if e["passes"] is False:
                        ax.add_patch(
                            plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=1.2, ec="black")
                        )
            ax.set_yticks(
                range(len(rows)), [card.attack(a).get("label", a) for a in rows], fontsize=7
            )
            ax.set_xticks(
                range(len(defenses)),
                [card.defense(d).get("label", d) for d in defenses],
                rotation=45,
                ha="right",
                fontsize=7,
            )
            ax.set_title(title, fontsize=8)
            bar = fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)
            bar.ax.tick_params(labelsize=7)
        fig.suptitle(
            f"{card.name}: {setting.get('label', skey)}\n(outlined: misses the criterion; "
            f"seeds {', '.join(str(s) for s in setting.get('seeds', card.seeds))})",
            fontsize=9,
        )
        fig.tight_layout()
        path = os.path.join(out, f"heatmap-{skey}.png")
        fig.savefig(path, dpi=130)
        plt.close(fig)
        paths.append(path)
    return paths


def _jsonable(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_outputs(card: Scorecard, out: str, summary: Dict[str, Any]) -> None:
    with open(os.path.join(out, "scorecard.json"), "w") as handle:
        json.dump(_jsonable(summary), handle, indent=1)
    write_csv(os.path.join(out, "scorecard.csv"), summary)
    with open(os.path.join(out, "scorecard.md"), "w") as handle:
        handle.write(markdown(card, summary))
    write_heatmaps(card, out, summary)


# -------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sf-ext scorecard",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("card", help="card file (.yaml/.yml/.json)")
    parser.add_argument("--out", help="output folder (resumable; required unless --list)")
    parser.add_argument("--workers", type=int, default=1, help="local worker processes")
    parser.add_argument("--ray", action="store_true", help="spread the cells over Ray")
    parser.add_argument("--ray-address", help="address of an existing Ray cluster")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per cell")
    parser.add_argument("--device", help="override the device of every cell (cpu, cuda)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the card's seeds")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a simulation setting in every cell (e.g. rounds=30)",
    )
    parser.add_argument("--only", help="run only cells whose key contains one of these texts")
    parser.add_argument("--summarize", action="store_true", help="only rewrite the outputs")
    parser.add_argument("--list", action="store_true", help="list the cells and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from sf_ext.simulator.run import _parse_overrides

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.list and not args.out:
        parser.error("--out is required (the folder where results go)")
    if args.workers < 1 or args.threads < 1:
        parser.error("--workers and --threads must be >= 1")
    if not os.path.exists(args.card):
        parser.error(f"card file not found: {args.card}")
    try:
        card = load_card(args.card)
        if args.seeds:
            card.seeds = list(args.seeds)
            for setting in card.settings:
                setting.pop("seeds", None)
        overrides = _parse_overrides(args.set)
        if args.device:
            overrides["device"] = args.device
        references, cells = card.cells(overrides)
        wanted = [p for p in (args.only or "").split(",") if p]
        if wanted and not any(w in c.key for c in references + cells for w in wanted):
            raise ValueError(f"--only {args.only!r} matches no cell (see --list)")
    except ValueError as exc:
        parser.error(str(exc))
    if args.list:
        for cell in references + cells:
            print(f"{cell.key}\t{cell.setting}\t{cell.attack}\t{cell.defense}\tseed {cell.seed}")
        print(f"{len(references)} FedAvg* references + {len(cells)} cells")
        return 0
    if args.summarize:
        summary = summarize(card, args.out, overrides)
        write_outputs(card, args.out, summary)
    else:
        run_card(
            card,
            args.out,
            overrides,
            args.only,
            args.workers,
            args.ray,
            args.ray_address,
            args.threads,
            not args.no_progress,
        )
    print(open(os.path.join(args.out, "scorecard.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run an experiment grid: ``python -m sf_ext.simulator.run <config.yaml> --out <folder>``.

Each distinct cell runs in ``<out>/cells/<key>/`` with a per-round checkpoint, so an interrupted
run picks up where it stopped when started again with the same command; finished cells are read
back from their ``result.json``. ``--ray`` spreads the cells over a Ray cluster (a local one by
default) instead of running them one after another. When all cells are done the folder gets
``results.csv``, ``table.md`` and ``plots/``.
"""

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

from sf_ext.simulator.grid import Cell, ExperimentGrid, load_grid

__all__ = ["main", "run_grid", "run_cell"]


def run_cell(
    config_dict: Dict[str, Any],
    cell_dir: str,
    cache_dir: str,
    threads: int = 1,
    progress: bool = True,
) -> Dict[str, Any]:
    """Run (or resume, or read back) one cell; returns its ``result.json`` content."""
    import torch

    from sf_ext.simulator.config import SimulationConfig
    from sf_ext.simulator.engine import RESULT, Simulator, to_jsonable

    done = os.path.join(cell_dir, RESULT)
    if os.path.exists(done):
        with open(done) as handle:
            result = json.load(handle)
        if result.get("config") == to_jsonable(config_dict):
            return result
    torch.set_num_threads(threads)
    config = SimulationConfig.from_dict(config_dict)
    Simulator(config, out_dir=cell_dir, progress=progress, pretrained_cache=cache_dir).run()
    with open(done) as handle:
        return json.load(handle)


def _unique(cells: List[Cell]) -> Dict[str, Cell]:
    unique: Dict[str, Cell] = {}
    for cell in cells:
        unique.setdefault(cell.key, cell)
    return unique


def run_grid(
    grid: ExperimentGrid,
    out: str,
    overrides: Optional[Dict[str, Any]] = None,
    only: Optional[str] = None,
    use_ray: bool = False,
    ray_address: Optional[str] = None,
    threads: int = 1,
    progress: bool = True,
) -> Dict[str, Dict[str, Any]]:
    """Run every distinct cell of ``grid`` (with ``only``: those whose key contains one of its
    comma-separated parts) and write the CSV, Markdown table and plots.

    Returns ``cell key -> result`` for every finished cell of the grid.
    """
    from tqdm.auto import tqdm

    from sf_ext.simulator.report import markdown_tables, write_csv, write_plots

    os.makedirs(out, exist_ok=True)
    cells = grid.cells(overrides)
    unique = _unique(cells)
    wanted = [part for part in (only or "").split(",") if part]
    todo = {k: c for k, c in unique.items() if not wanted or any(w in k for w in wanted)}
    if wanted and not todo:
        raise ValueError(
            f"--only {only!r} matches no cell of {grid.name}; cell keys look like "
            f"{sorted(unique)[:3]} (see --list)"
        )
    cache_dir = os.path.join(out, "pretrained")
    with open(os.path.join(out, "grid.json"), "w") as handle:
        json.dump(
            {
                "name": grid.name,
                "description": grid.description,
                "overrides": overrides or {},
                "cells": {k: c.config.to_dict() for k, c in unique.items()},
            },
            handle,
            indent=1,
            default=str,
        )
    results: Dict[str, Dict[str, Any]] = {}
    start = time.perf_counter()
    if use_ray:
        results.update(_run_ray(todo, out, cache_dir, ray_address, threads))
    else:
        bar = tqdm(total=len(todo), desc=grid.name, disable=not progress)
        for key, cell in todo.items():
            bar.set_postfix_str(key[:40])
            results[key] = run_cell(
                cell.config.to_dict(), os.path.join(out, "cells", key), cache_dir, threads, progress
            )
            bar.update(1)
        bar.close()
    # Cells run earlier (other filters, other sessions) still belong in the table.
    for key in unique:
        path = os.path.join(out, "cells", key, "result.json")
        if key not in results and os.path.exists(path):
            with open(path) as handle:
                results[key] = json.load(handle)
    write_csv(os.path.join(out, "results.csv"), cells, results)
    table = markdown_tables(grid, cells, results)
    elapsed = time.perf_counter() - start
    with open(os.path.join(out, "table.md"), "w") as handle:
        handle.write(table)
        handle.write(f"\n{len(todo)} cells run or read back in {elapsed / 60:.1f} min.\n")
    write_plots(os.path.join(out, "plots"), grid, cells, results)
    return results


def _run_ray(todo, out, cache_dir, address, threads):
    import ray
    from tqdm.auto import tqdm

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, ignore_reinit_error=True)
    remote = ray.remote(num_cpus=threads)(run_cell)
    pending = {}
    for key, cell in todo.items():
        cell_dir = os.path.join(out, "cells", key)
        ref = remote.remote(cell.config.to_dict(), cell_dir, cache_dir, threads, False)
        pending[ref] = key
    results = {}
    with tqdm(total=len(pending), desc="cells (ray)") as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            key = pending.pop(ready[0])
            results[key] = ray.get(ready[0])
            bar.update(1)
    return results


def _parse_overrides(items: List[str]) -> Dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sf-ext simulate",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("config", help="experiment file (.yaml/.yml/.json)")
    parser.add_argument("--out", help="output folder (resumable; required unless --list)")
    parser.add_argument("--device", help="override the device (cpu, cuda)")
    parser.add_argument("--seed", type=int, help="override the seed of every cell")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override any setting"
    )
    parser.add_argument(
        "--only", help="run only cells whose key contains one of these comma-separated texts"
    )
    parser.add_argument("--ray", action="store_true", help="spread the cells over Ray")
    parser.add_argument("--ray-address", help="address of an existing Ray cluster")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per cell")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--list", action="store_true", help="list the cells and exit")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="reuse an --out folder that holds another experiment (its tables and plots are "
        "replaced; finished cells are kept: they are stored by their settings' hash)",
    )
    return parser


def summary_files(out: str, names=("grid.json", "results.csv", "table.md"), folders=("plots",)):
    """The files a grid or scorecard run derives from its cells (what ``--overwrite`` replaces).

    Cells are not listed: a cell folder is named by a hash of its settings, so another
    experiment never writes into it and finished cells can be shared between experiments.
    """
    found = [os.path.join(out, n) for n in names if os.path.isfile(os.path.join(out, n))]
    for folder in folders:
        root = os.path.join(out, folder)
        for base, _, files in os.walk(root):
            found.extend(os.path.join(base, f) for f in files)
    return found


def guard_output(parser, out: str, kind: str, cell_keys, overwrite: bool):
    """Prepare ``out`` for a run whose results are the cells ``cell_keys`` (exit 2 on a clash).

    A folder that holds the same experiment is resumed; one that holds another experiment (or
    files sf-ext did not write) is refused unless ``--overwrite``.
    """
    from sf_ext.outputs import OutputDirError, prepare_output_dir

    keys = sorted(cell_keys)
    # Cell keys end in a hash of the cell's settings: their digest identifies the experiment.
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
    settings = {"command": kind, "cells": len(keys), "cells_digest": digest}
    try:
        return prepare_output_dir(out, settings, overwrite)
    except OutputDirError as exc:
        parser.error(str(exc))


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.list and not args.out:
        parser.error("--out is required (the folder where results go)")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if not os.path.exists(args.config):
        parser.error(f"experiment file not found: {args.config}")
    try:
        grid = load_grid(args.config)
        overrides = _parse_overrides(args.set)
        for name in ("device", "seed", "rounds"):
            if getattr(args, name) is not None:
                overrides[name] = getattr(args, name)
        cells = grid.cells(overrides)  # validates every cell before anything runs
        unique = _unique(cells)
        wanted = [part for part in (args.only or "").split(",") if part]
        if wanted and not any(w in key for key in unique for w in wanted):
            raise ValueError(
                f"--only {args.only!r} matches no cell of {grid.name} (see --list for the keys)"
            )
    except ValueError as exc:
        parser.error(str(exc))
    if args.list:
        for key, cell in unique.items():
            print(f"{key}\t{cell.row_label}\t{cell.column_label}")
        return 0
    folder = guard_output(parser, args.out, "simulate", unique, args.overwrite)
    run_grid(
        grid,
        args.out,
        overrides=overrides,
        only=args.only,
        use_ray=args.ray,
        ray_address=args.ray_address,
        threads=args.threads,
        progress=not args.no_progress,
    )
    folder.complete(*summary_files(args.out))
    print(open(os.path.join(args.out, "table.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())

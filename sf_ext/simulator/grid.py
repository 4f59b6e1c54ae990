"""Experiment grids: rows x columns of simulator cells described in one YAML/JSON file.

File layout::

    name: fmnist_lenet_table
    base: {dataset: fashion-mnist, model: lenet, num_clients: 200, ...}   # SimulationConfig
    rows:                                    # usually attacks
      - {label: No attack}
      - {label: Sign flip (40%), attack: sign_flip, attacker_fraction: 0.4}
    columns:                                 # usually aggregators
      - {label: "FedAvg*", aggregator: fedavg, clean: true}
      - {label: Krum, aggregator: krum, aggregator_options: {f: auto}}
    sweep_x: attacker_fraction               # optional: plot final accuracy against a row key

A cell's settings are ``base``, then the row's, then the column's (later wins; dict settings such
as ``aggregator_options`` are merged key by key). ``clean: true`` on a row or column removes the
attack (the FedAvg* reference). Cells with identical settings are run once and shared.
"""

import copy
import difflib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List

from sf_ext.simulator.config import SimulationConfig

__all__ = ["Cell", "ExperimentGrid", "load_grid", "merge_settings"]

_MERGED = ("aggregator_options", "attack_options", "model_options", "backdoor")
_META = ("label", "clean")
_SECTIONS = ("name", "description", "base", "rows", "columns", "sweep_x")


@dataclass
class Cell:
    """One (row, column) of the grid and the settings it runs with."""

    row: int
    column: int
    row_label: str
    column_label: str
    config: SimulationConfig

    @property
    def key(self) -> str:
        """Folder name: readable prefix plus the settings' digest (shared by identical cells)."""
        name = f"{self.config.aggregator}-{self.config.attack or 'clean'}"
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower())
        return f"{slug.strip('-')}-{self.config.digest()}"


@dataclass
class ExperimentGrid:
    """A parsed experiment file."""

    name: str
    base: Dict[str, Any]
    rows: List[Dict[str, Any]]
    columns: List[Dict[str, Any]]
    sweep_x: str = ""
    description: str = ""

    def cells(self, overrides: Dict[str, Any] = None) -> List[Cell]:
        """Every (row, column) cell, with ``overrides`` (e.g. from the command line) last."""
        out = []
        for r, row in enumerate(self.rows):
            for c, column in enumerate(self.columns):
                settings = merge_settings(self.base, row, column, overrides or {}, skip=_META)
                if row.get("clean") or column.get("clean"):
                    settings.update(attack=None, attacker_fraction=0.0, attack_options={})
                row_label = str(row.get("label", f"row {r}"))
                column_label = str(column.get("label", f"column {c}"))
                try:
                    config = SimulationConfig.from_dict(settings)
                except ValueError as exc:
                    raise ValueError(f"{self.name}, cell ({row_label}, {column_label}): {exc}")
                out.append(Cell(r, c, row_label, column_label, config))
        return out


def merge_settings(*layers: Dict[str, Any], skip=()) -> Dict[str, Any]:
    """Layers of simulation settings, later ones winning; dict settings (``aggregator_options``,
    ``attack_options``, ``model_options``, ``backdoor``) are merged key by key. Keys in ``skip``
    (labels and other metadata) are left out."""
    out: Dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key in skip:
                continue
            if key in _MERGED and isinstance(value, dict) and isinstance(out.get(key), dict):
                merged = dict(out[key])
                merged.update(copy.deepcopy(value))
                out[key] = merged
            else:
                out[key] = copy.deepcopy(value)
    return out


def load_grid(path: str) -> ExperimentGrid:
    """Read an experiment file (``.yaml``/``.yml`` or ``.json``)."""
    with open(path) as handle:
        text = handle.read()
    if os.path.splitext(path)[1].lower() in (".yaml", ".yml"):
        import yaml

        spec = yaml.safe_load(text)
    else:
        spec = json.loads(text)
    if not isinstance(spec, dict) or "rows" not in spec or "columns" not in spec:
        raise ValueError(f"{path}: an experiment needs 'rows' and 'columns'")
    for key in spec:
        if key not in _SECTIONS:
            close = difflib.get_close_matches(str(key), _SECTIONS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{path}: unknown section {key!r}{hint}; sections: {list(_SECTIONS)}")
    for section in ("rows", "columns"):
        if not isinstance(spec[section], list) or not spec[section]:
            raise ValueError(f"{path}: {section!r} must be a non-empty list of mappings")
        for i, item in enumerate(spec[section]):
            if not isinstance(item, dict):
                raise ValueError(f"{path}: {section}[{i}] must be a mapping, got {item!r}")
    if not isinstance(spec.get("base", {}), dict):
        raise ValueError(f"{path}: 'base' must be a mapping of simulation settings")
    return ExperimentGrid(
        name=str(spec.get("name", os.path.splitext(os.path.basename(path))[0])),
        base=dict(spec.get("base", {})),
        rows=list(spec["rows"]),
        columns=list(spec["columns"]),
        sweep_x=str(spec.get("sweep_x", "")),
        description=str(spec.get("description", "")),
    )

"""Gradient-inversion audits: does pruning a client's upload stop DLG?

* :mod:`~sf_ext.dlg.attacks`: DLG, iDLG and an Inverting-Gradients style attack, each naive or
  mask-aware against a pruned gradient (:class:`AttackResult`).
* :mod:`~sf_ext.dlg.gradients`: observed gradients, weight updates read as gradients, pruning with
  the same mask code as ``fed_avg_w_prune``.
* :mod:`~sf_ext.dlg.metrics`: MSE, PSNR, SSIM, label accuracy, batch matching, mean and spread.
* :mod:`~sf_ext.dlg.captured` / :mod:`~sf_ext.dlg.capture`: record a real SecretFlow client's round
  and load it back (only ``capture`` imports SecretFlow, and only when used).
* :mod:`~sf_ext.dlg.sweep`, :mod:`~sf_ext.dlg.cli`: sweeps with CSV, figures and a summary table;
  ``python -m sf_ext.dlg``.
"""

import importlib

from sf_ext.dlg.attacks import (
    ATTACKS,
    AttackResult,
    GradientMatcher,
    dlg,
    idlg,
    infer_labels,
    inverting_gradients,
    run_attack,
)
from sf_ext.dlg.captured import CapturedRound, load_capture, save_capture
from sf_ext.dlg.gradients import (
    gradient_from_update,
    observe_gradient,
    prune_gradient,
    rate_to_keep_fraction,
)
from sf_ext.dlg.metrics import (
    aggregate_rows,
    label_accuracy,
    match_batch,
    mean_std,
    mse,
    psnr,
    score_reconstruction,
    ssim,
)

# SecretFlow-backed names -> module; imported on first access so `import sf_ext.dlg` stays fast.
_LAZY = {
    "ClientCapture": "sf_ext.dlg.capture",
    "register_capture_strategies": "sf_ext.dlg.capture",
    "run_capture": "sf_ext.dlg.capture",
    "SweepConfig": "sf_ext.dlg.sweep",
    "run_sweep": "sf_ext.dlg.sweep",
}

__all__ = [
    "ATTACKS",
    "AttackResult",
    "CapturedRound",
    "GradientMatcher",
    "aggregate_rows",
    "dlg",
    "gradient_from_update",
    "idlg",
    "infer_labels",
    "inverting_gradients",
    "label_accuracy",
    "load_capture",
    "match_batch",
    "mean_std",
    "mse",
    "observe_gradient",
    "prune_gradient",
    "psnr",
    "rate_to_keep_fraction",
    "run_attack",
    "save_capture",
    "score_reconstruction",
    "ssim",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

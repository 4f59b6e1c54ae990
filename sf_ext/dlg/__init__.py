"""Gradient-inversion audits: what can a server reconstruct from what SecretFlow clients send?

* :mod:`~sf_ext.dlg.attacks`: DLG, iDLG, Inverting Gradients and the optimizer-aware multi-step
  inversion, each naive or mask-aware against a pruned observation (:class:`AttackResult`);
  how they search is one :class:`AttackOptions`.
* :mod:`~sf_ext.dlg.local_training`: a client's local SGD / momentum / Adam steps as a
  differentiable function of its data.
* :mod:`~sf_ext.dlg.labels`: batch labels from the output layer (count-based and sign rules).
* :mod:`~sf_ext.dlg.distance`: gradient distances, per-layer normalized ones included.
* :mod:`~sf_ext.dlg.gradients`: observed gradients, updates read as gradients, pruning.
* :mod:`~sf_ext.dlg.metrics` / :mod:`~sf_ext.dlg.judge`: PSNR, SSIM, batch matching, and an
  independently trained classifier that says whether a reconstruction is recognizable.
* :mod:`~sf_ext.dlg.captured` / :mod:`~sf_ext.dlg.views`: captured rounds on disk and what the
  server holds of them (one upload, or the secure aggregate and its counts).
* :mod:`~sf_ext.dlg.capture`, :mod:`~sf_ext.dlg.fl_run`, :mod:`~sf_ext.dlg.audit`: recording
  real SecretFlow rounds and the ``sf-ext audit`` pipeline (these import SecretFlow, lazily).
* :mod:`~sf_ext.dlg.sweep`, :mod:`~sf_ext.dlg.cli`: pruning-rate sweeps; ``python -m sf_ext.dlg``.
"""

import importlib

from sf_ext.dlg.attacks import (
    ATTACKS,
    AttackResult,
    ClientModel,
    GradientMatcher,
    dlg,
    idlg,
    inverting_gradients,
    multistep,
    run_attack,
)
from sf_ext.dlg.captured import CapturedRound, Round, load_capture, load_round, save_capture
from sf_ext.dlg.distance import TensorDistance, total_variation
from sf_ext.dlg.gradients import (
    gradient_from_update,
    observe_gradient,
    prune_gradient,
    rate_to_keep_fraction,
)
from sf_ext.dlg.labels import infer_labels, labels_from_counts, recover_label_counts
from sf_ext.dlg.local_training import OptimizerSpec, simulate_update
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
from sf_ext.dlg.options import AttackOptions
from sf_ext.dlg.settings import FLSetting

# Names whose modules import SecretFlow or heavier dependencies; imported on first access so
# `import sf_ext.dlg` stays fast.
_LAZY = {
    "RoundCapture": "sf_ext.dlg.capture",
    "register_capture_strategies": "sf_ext.dlg.capture",
    "recording_aggregator": "sf_ext.dlg.capture",
    "run_setting": "sf_ext.dlg.fl_run",
    "AuditOptions": "sf_ext.dlg.audit",
    "run_audit": "sf_ext.dlg.audit",
    "SweepConfig": "sf_ext.dlg.sweep",
    "run_sweep": "sf_ext.dlg.sweep",
    "load_judge": "sf_ext.dlg.judge",
    "server_views": "sf_ext.dlg.views",
}

__all__ = [
    "ATTACKS",
    "AttackOptions",
    "AttackResult",
    "CapturedRound",
    "ClientModel",
    "FLSetting",
    "GradientMatcher",
    "OptimizerSpec",
    "Round",
    "TensorDistance",
    "aggregate_rows",
    "dlg",
    "gradient_from_update",
    "idlg",
    "infer_labels",
    "inverting_gradients",
    "label_accuracy",
    "labels_from_counts",
    "load_capture",
    "load_round",
    "match_batch",
    "mean_std",
    "mse",
    "multistep",
    "observe_gradient",
    "prune_gradient",
    "psnr",
    "rate_to_keep_fraction",
    "recover_label_counts",
    "run_attack",
    "save_capture",
    "score_reconstruction",
    "simulate_update",
    "ssim",
    "total_variation",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

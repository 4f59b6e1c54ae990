"""A federated training setting as a user would describe it (no SecretFlow import).

:class:`FLSetting` is what ``sf-ext audit`` and the frontier experiment train in SecretFlow and
then attack: the data, the model, the client optimizer, batch size and local steps, the pruning
schedule, the aggregator and the defences under comparison. Every field is a command-line flag
of ``sf-ext audit`` (generated from this class).

A note on "rate": ``prune_end_rate`` here (as in ``fed_avg_w_prune``) is the fraction of weights
*kept* at the end, and ``prune_percent`` the percent of the alive weights *pruned* at each epoch's
end. The DLG sweep's ``--pruned-percent`` is the percent of entries *zeroed*.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from sf_ext.dlg.local_training import OPTIMIZERS

STRATEGIES = ("fed_avg_w", "fed_avg_w_prune")
AGGREGATORS = ("plain", "secure", "secure_prune")
PRUNE_SCOPES = ("layer", "global")
#: The fixed choices of FLSetting's fields, for the command lines generated from it.
CHOICES = {
    "strategy": STRATEGIES,
    "aggregator": AGGREGATORS,
    "optimizer": OPTIMIZERS,
    "prune_scope": PRUNE_SCOPES,
}


def add_setting_arguments(parser) -> list:
    """One flag per :class:`FLSetting` field (but ``name``) on ``parser`` or an argument group;
    returns the field names, for :func:`sf_ext.dlg.flags.dataclass_from_args`."""
    from sf_ext.dlg.flags import add_dataclass_arguments

    return add_dataclass_arguments(parser, FLSetting, exclude=("name",), choices=CHOICES)


@dataclass
class FLSetting:
    """One federated training setting.

    Attributes:
        name: Label in reports (default: built from the fields that differ from the defaults).
        dataset: Dataset name (``fashion-mnist``, ``mnist``, ``digits``, ...).
        data_root: Data folder (default ``$SF_EXT_DATA``).
        arrays: Your own data instead: an ``.npz`` file with ``x_train``, ``y_train``,
            ``x_test``, ``y_test`` (images ``[N, C, H, W]`` in ``[0, 1]``, integer labels).
        samples: Training images in total over the clients (0: all); the test set is cut in the
            same proportion.
        split: Share of the training data per client, e.g. ``(0.4, 0.6)`` for alice and bob.
        model: Model name from :mod:`sf_ext.models` or ``module:Class`` of your own
            ``nn.Module`` (constructed with ``in_channels``, ``image_size``, ``num_classes``).
        optimizer: Client optimizer, ``sgd`` or ``adam``.
        lr: Client learning rate.
        momentum: SGD momentum.
        batch_size: Local batch size.
        local_steps: Local optimizer steps per round (``FLModel.fit(aggregate_freq=...)``).
        epochs: Training epochs.
        strategy: ``fed_avg_w`` or ``fed_avg_w_prune``.
        prune_percent: ``fed_avg_w_prune``: percent of alive weights pruned at each epoch's end.
        prune_end_rate: ``fed_avg_w_prune``: fraction of weights *kept* once pruning stops.
        prune_scope: ``layer`` or ``global``.
        aggregator: ``plain`` (the server sees every upload), ``secure`` (SecretFlow's
            ``SecureAggregator``) or ``secure_prune`` (``SecurePruneAggregator``).
        dp_noise_multiplier: SecretFlow's Gaussian model DP (``GaussianModelDP`` in the
            strategy's ``dp_strategy``): noise multiplier; 0 turns DP off.
        dp_clip: ``GaussianModelDP``'s ``l2_norm_clip``. SecretFlow clips the whole weight vector
            (not the update) to this norm before adding noise of standard deviation
            ``dp_noise_multiplier * dp_clip / sqrt(clients)``.
        update_keep: Update pruning (a defence from the DLG paper): each client sends its start
            plus only this share of each tensor's update entries, largest first (1: off).
        seed: Seed of the data split, model initialization and batches.
    """

    name: str = ""
    dataset: str = "fashion-mnist"
    data_root: Optional[str] = None
    arrays: Optional[str] = None
    samples: int = 4000
    split: Tuple[float, ...] = (0.4, 0.6)
    model: str = "lenet"
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    batch_size: int = 8
    local_steps: int = 1
    epochs: int = 3
    strategy: str = "fed_avg_w"
    prune_percent: float = 5.0
    prune_end_rate: float = 0.1
    prune_scope: str = "layer"
    aggregator: str = "plain"
    dp_noise_multiplier: float = 0.0
    dp_clip: float = 100.0
    update_keep: float = 1.0
    seed: int = 0

    def __post_init__(self):
        self.split = tuple(float(s) for s in self.split)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first impossible field."""
        from sf_ext.pruning import validate_prune_params

        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"aggregator must be one of {AGGREGATORS}, got {self.aggregator!r}")
        for field_name in ("batch_size", "local_steps", "epochs"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field_name} must be a positive integer, got {value!r}")
        if not isinstance(self.samples, int) or self.samples < 0:
            raise ValueError(f"samples must be an integer >= 0 (0: all), got {self.samples!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if (
            len(self.split) < 2
            or any(s <= 0 for s in self.split)
            or abs(sum(self.split) - 1) > 1e-6
        ):
            raise ValueError(
                f"split needs at least two positive shares summing to 1, got {self.split!r}"
            )
        validate_prune_params(self.prune_percent, self.prune_end_rate)
        if self.prune_scope not in PRUNE_SCOPES:
            raise ValueError(f"prune_scope must be 'layer' or 'global', got {self.prune_scope!r}")
        if self.dp_noise_multiplier < 0 or not self.dp_clip > 0:
            raise ValueError(
                "dp_noise_multiplier must be >= 0 and dp_clip > 0, got "
                f"{self.dp_noise_multiplier!r} and {self.dp_clip!r}"
            )
        if not 0 < self.update_keep <= 1:
            raise ValueError(f"update_keep must be in (0, 1], got {self.update_keep!r}")

    @property
    def parties(self) -> Tuple[str, ...]:
        """Client party names: alice, bob, then carol, dave, ... for more shares."""
        names = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")
        if len(self.split) > len(names):
            raise ValueError(f"at most {len(names)} clients are supported")
        return names[: len(self.split)]

    @property
    def pruned(self) -> bool:
        return self.strategy == "fed_avg_w_prune"

    def label(self) -> str:
        """A short human-readable description."""
        if self.name:
            return self.name
        parts = [f"{self.strategy}", f"{self.aggregator} agg", f"{self.optimizer} lr {self.lr:g}"]
        parts.append(f"batch {self.batch_size}")
        if self.local_steps > 1:
            parts.append(f"{self.local_steps} local steps")
        if self.pruned:
            parts.append(f"prune {self.prune_percent:g}%/epoch to {self.prune_end_rate:g} kept")
        if self.dp_noise_multiplier:
            parts.append(f"DP z={self.dp_noise_multiplier:g} C={self.dp_clip:g}")
        if self.update_keep < 1:
            parts.append(f"update top {self.update_keep:g}")
        return ", ".join(parts)

    def replace(self, **changes) -> "FLSetting":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


__all__ = ["AGGREGATORS", "FLSetting", "STRATEGIES"]

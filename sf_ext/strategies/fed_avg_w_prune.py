"""``fed_avg_w_prune``: FedAvg on weights where every client iteratively magnitude-prunes its model.

Each client keeps a boolean mask over its weight tensors (conv kernels and linear matrices; biases
and normalization parameters are never pruned). At the end of each local epoch it prunes
``prune_percent`` % of the weights that are still alive, by magnitude, until the kept fraction
reaches ``prune_end_rate``; after ``e`` epochs the kept fraction is
``max(prune_end_rate, (1 - prune_percent / 100) ** e)``. Pruned weights stay exactly zero: the mask
is applied after every optimizer step and after every weight load (a round's aggregated weights,
the end-of-epoch ``apply_weights`` and the first step of a new epoch). The upload is the masked
weights, carried as :class:`sf_ext.pruning.MaskedWeights` so that
:class:`sf_ext.aggregators.SecurePruneAggregator` can average each coordinate over the clients that
kept it.

Words: ``prune_end_rate`` is a fraction **kept** (0.1 keeps 10 % of the weights), while
``prune_percent`` is a percentage **pruned** per epoch. (The DLG audit's ``--rates`` are fractions
*pruned*: its rate 0.9 corresponds to ``prune_end_rate=0.1``.)

Any torch model works, BatchNorm included (at any depth, e.g. torchvision's ResNet-18): the client
sends its ``state_dict`` through :func:`sf_ext.params.export_weights`; with ``skip_bn=True`` every
BatchNorm layer's tensors stay local (FedBN) and the upload's masks line up with the remaining
entries.

Usage (after ``import sf_ext``)::

    fl = FLModel(server=charlie, device_list=[alice, bob], model=model_def, backend="torch",
                 strategy="fed_avg_w_prune", aggregator=SecurePruneAggregator(charlie, [alice, bob]),
                 prune_percent=5, prune_end_rate=0.1, prune_scope="layer")
    fl.fit(...)
    sf_ext.strategies.kept_fraction(fl)          # {"alice": 0.1, "bob": 0.1}

``FLModel(...)`` checks the pruning parameters before any client is created, in every run mode
(Ray simulation included), and warns about keyword arguments that look like misspelled ones.
"""

import difflib
import inspect
import math
import os
import warnings
from typing import Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from secretflow_fl.ml.nn.fl.backend.torch.strategy.fed_avg_w import FedAvgW

from sf_ext.params import export_weights, import_weights, transported_names
from sf_ext.pruning import (
    SCOPES,
    MaskedWeights,
    apply_masks,
    full_masks,
)
from sf_ext.pruning import kept_fraction as _masks_kept_fraction
from sf_ext.pruning import magnitude_prune, scheduled_kept_fraction, validate_prune_params

STRATEGY_NAME = "fed_avg_w_prune"

#: The strategy's own keyword arguments (passed through ``FLModel(**kwargs)``).
PRUNE_PARAMETERS = ("prune_percent", "prune_end_rate", "prune_scope", "allow_unmasked_average")
#: ``FLModel``'s named parameters: a misspelling of one of them also lands in the strategy kwargs.
FLMODEL_PARAMETERS = (
    "server",
    "device_list",
    "model",
    "aggregator",
    "strategy",
    "consensus_num",
    "backend",
    "random_seed",
    "skip_bn",
)
#: Keyword arguments SecretFlow itself passes or reads (other strategies', DP, GPU): never warned.
SECRETFLOW_KWARGS = frozenset(
    {
        "device",
        "num_gpus",
        "use_gpu",
        "dp_strategy",
        "simulation",
        "server_agg_method",
        "refresh_data",
        "sparsity",
        "mu",
        "threshold",
        "generator",
        "builder_base",
    }
)
# difflib similarity above which an unknown keyword is taken for a misspelling.
_TYPO_CUTOFF = 0.75


class UnknownParameterWarning(UserWarning):
    """A keyword argument looks like a misspelled ``fed_avg_w_prune``/``FLModel`` parameter."""


class UnmaskedAverageWarning(UserWarning):
    """``allow_unmasked_average=True``: pruned weights are averaged as zeros."""


_FIX = (
    "use SecurePruneAggregator (secure aggregation) or a mask-aware robust aggregator from "
    "sf_ext.aggregators (FlameAggregator, MedianAggregator, ...), or pass "
    "allow_unmasked_average=True to FLModel to accept that pruned weights are averaged as zeros"
)


def check_aggregator(aggregator, allow_unmasked_average: bool = False) -> None:
    """Refuse an aggregator that would average pruned weights as zeros (names it and the fix).

    Raises:
        InvalidParameterError: the aggregator is not mask-aware and the user did not opt out.
    """
    from sf_ext.aggregators.masking import is_mask_aware

    if aggregator is None or is_mask_aware(aggregator):
        return
    name = type(aggregator).__name__
    if allow_unmasked_average:
        warnings.warn(
            f"fed_avg_w_prune with {name}: every weight a client pruned is averaged as 0 "
            "(allow_unmasked_average=True)",
            UnmaskedAverageWarning,
            stacklevel=_user_stacklevel(),
        )
        return
    from sf_ext._cli import InvalidParameterError

    raise InvalidParameterError(
        f"fed_avg_w_prune cannot use {name}: it averages every weight a client pruned as 0 "
        f"(a weight one of two clients pruned comes out at half its value); {_FIX}"
    )


def _user_stacklevel() -> int:
    """Stack level of the first caller outside SecretFlow and sf-ext (the user's FLModel line)."""
    frame, level = inspect.currentframe(), 1
    internal = ("secretflow", "secretflow_fl", "sf_ext")
    while frame is not None:
        path = frame.f_code.co_filename.replace(os.sep, "/")
        if not any(f"/{name}/" in path for name in internal):
            return level - 1
        frame, level = frame.f_back, level + 1
    return 2


def misspelled_parameters(kwargs: Mapping[str, object]) -> Dict[str, str]:
    """Keyword -> nearest valid parameter, for keywords that look like misspellings.

    Unknown keywords starting with ``prune`` always count (the nearest pruning parameter is
    named); others count only when they are close to one of :data:`PRUNE_PARAMETERS` or
    :data:`FLMODEL_PARAMETERS`. SecretFlow's own keywords (:data:`SECRETFLOW_KWARGS`) and
    unrelated names never do, since SecretFlow passes every ``FLModel`` keyword to the strategy.
    """
    known = set(PRUNE_PARAMETERS) | set(FLMODEL_PARAMETERS) | SECRETFLOW_KWARGS
    candidates = list(PRUNE_PARAMETERS) + list(FLMODEL_PARAMETERS)
    found = {}
    for key in kwargs:
        if key in known:
            continue
        close = difflib.get_close_matches(key, candidates, n=1, cutoff=_TYPO_CUTOFF)
        if not close and key.lower().startswith("prune"):
            close = difflib.get_close_matches(key, PRUNE_PARAMETERS, n=1, cutoff=0.0)
        if close:
            found[key] = close[0]
    return found


def check_parameters(
    prune_percent: float = 5,
    prune_end_rate: float = 0.1,
    prune_scope: str = "layer",
    warn_unknown: bool = True,
    allow_unmasked_average: bool = False,
    **other,
) -> None:
    """Validate ``fed_avg_w_prune``'s parameters and warn about likely misspellings.

    ``FLModel(strategy="fed_avg_w_prune", ...)`` calls this with all its keyword arguments before
    it creates any client (see :func:`sf_ext.strategies.install_parameter_checks`).

    Raises:
        InvalidParameterError: (a ``ValueError``) a parameter is out of range; the message names it.
    """
    validate_prune_params(prune_percent, prune_end_rate)
    if not isinstance(allow_unmasked_average, bool):
        from sf_ext._cli import InvalidParameterError

        raise InvalidParameterError(
            f"allow_unmasked_average must be True or False, got {allow_unmasked_average!r}"
        )
    if prune_scope not in SCOPES:
        from sf_ext._cli import InvalidParameterError

        raise InvalidParameterError(f"prune_scope must be one of {SCOPES}, got {prune_scope!r}")
    if not warn_unknown:
        return
    for key, nearest in misspelled_parameters(other).items():
        what = "fed_avg_w_prune parameter" if nearest in PRUNE_PARAMETERS else "FLModel parameter"
        warnings.warn(
            f"FLModel/fed_avg_w_prune got an unknown keyword argument {key!r}, which is ignored; "
            f"did you mean the {what} {nearest!r}?",
            UnknownParameterWarning,
            stacklevel=_user_stacklevel(),
        )


class FedAvgWPrune(FedAvgW):
    """FedAvg-on-weights client that prunes its local model by magnitude at each epoch's end.

    Args:
        builder_base: SecretFlow ``TorchModel`` describing the model, loss, optimizer and metrics.
        random_seed: Seed for the model's initialization.
        skip_bn: Keep every BatchNorm layer's tensors local (not uploaded, not overwritten).
        prune_percent: Percent of the still-alive weights **pruned** at the end of each local
            epoch, in (0, 100).
        prune_end_rate: Fraction of weights **kept** once pruning stops, in (0, 1].
        prune_scope: ``"layer"`` (default, as in the seed experiment) ranks magnitudes within each
            weight tensor; ``"global"`` ranks them across all weight tensors.
        allow_unmasked_average: Accept global weights from an aggregator that is not mask-aware
            (it averages pruned weights as zeros); by default they are refused with an error
            (at ``FLModel(...)`` when the aggregator is known there, else at the first
            aggregate received).
        **kwargs: Other ``FLModel`` keyword arguments (SecretFlow passes every one to every
            strategy; misspellings are reported by :func:`check_parameters`).
    """

    def __init__(
        self,
        builder_base,
        random_seed: Optional[int] = None,
        skip_bn: bool = False,
        prune_percent: float = 5,
        prune_end_rate: float = 0.1,
        prune_scope: str = "layer",
        allow_unmasked_average: bool = False,
        **kwargs,
    ):
        # FLModel already checked (and warned) in the driver; direct construction is checked here.
        check_parameters(
            prune_percent,
            prune_end_rate,
            prune_scope,
            warn_unknown=False,
            allow_unmasked_average=allow_unmasked_average,
        )
        self.allow_unmasked_average = allow_unmasked_average
        super().__init__(builder_base, random_seed=random_seed, skip_bn=skip_bn, **kwargs)
        self.prune_percent = float(prune_percent)
        self.prune_end_rate = float(prune_end_rate)
        self.prune_scope = prune_scope
        self.prune_epochs_done = 0
        self.masks = full_masks(self.model)
        self._train_steps_per_epoch: Optional[int] = None
        self._epochs_started = 0
        for optimizer in self._optimizers():
            # Optimizer updates (momentum, Adam moments) would revive pruned entries.
            optimizer.register_step_post_hook(lambda *_: apply_masks(self.model, self.masks))

    def _optimizers(self) -> List[torch.optim.Optimizer]:
        optimizers = self.model.optimizers()
        if optimizers is None:
            return []
        return [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)

    # --- data: learn the epoch length FLModel uses (it is not passed to train_step) ---------
    def build_dataset(self, *args, sampling_rate=None, stage="train", **kwargs):
        result = super().build_dataset(*args, sampling_rate=sampling_rate, stage=stage, **kwargs)
        if stage == "train" and sampling_rate is not None:
            # FLModel runs ceil(1 / sampling_rate) steps per epoch for every party.
            self._train_steps_per_epoch = math.ceil(1.0 / sampling_rate)
        return result

    def build_dataset_from_builder(self, *args, stage="train", **kwargs):
        steps = super().build_dataset_from_builder(*args, stage=stage, **kwargs)
        if stage == "train" and steps is not None:
            self._train_steps_per_epoch = int(steps)
        return steps

    # --- weights: one transport rule, and every load re-applies the local mask ---------------
    def get_weights(self, return_numpy=True):
        """This client's weight list (see :func:`sf_ext.params.export_weights`), masked."""
        apply_masks(self.model, self.masks)
        if not return_numpy:
            state = self.model.state_dict()
            return {n: state[n].detach().cpu().clone() for n in self._names()}
        return export_weights(self.model, skip_bn=self.skip_bn)

    def set_weights(self, weights):
        """Load a weight list (the aggregate) and re-apply this client's mask.

        Raises:
            ValueError: the weights come from an aggregator that is not mask-aware (pruned
                weights averaged as zeros) and ``allow_unmasked_average`` is False.
        """
        from sf_ext.aggregators.masking import MaskAwareAggregate

        if not self.allow_unmasked_average and not isinstance(weights, MaskAwareAggregate):
            from sf_ext._cli import InvalidParameterError

            raise InvalidParameterError(
                "fed_avg_w_prune received global weights from an aggregator that is not "
                "mask-aware (SecretFlow's PlainAggregator/SecureAggregator or a server_agg_method "
                f"average every pruned weight as 0); {_FIX}"
            )
        import_weights(self.model, weights, skip_bn=self.skip_bn)
        apply_masks(self.model, self.masks)

    def _names(self) -> List[str]:
        return transported_names(self.model, skip_bn=self.skip_bn)

    def _masked_upload(self) -> MaskedWeights:
        weights = self.get_weights(return_numpy=True)
        masks = [self.masks[n].cpu().numpy() if n in self.masks else None for n in self._names()]
        return MaskedWeights(weights, masks)

    # --- training --------------------------------------------------------------------------
    def train_step(
        self,
        weights: np.ndarray,
        cur_steps: int,
        train_steps: int,
        **kwargs,
    ) -> Tuple[np.ndarray, int]:
        """Load the global weights, train locally with the mask held, prune at the epoch's end.

        Args:
            weights: Aggregated weights from the last round (``None`` at an epoch's first step).
            cur_steps: Global step index of this call's first local step.
            train_steps: Number of local steps to run.
            **kwargs: Strategy kwargs from ``FLModel`` (``refresh_data``, ``dp_strategy``, ...).

        Returns:
            The masked weights (a :class:`MaskedWeights`) and the number of samples trained on.
        """
        if kwargs.get("refresh_data", False):
            self._check_epoch_start(cur_steps)
        dp_strategy = kwargs.pop("dp_strategy", None)
        # The parent's own DP noise would be discarded: noise is added once, below.
        _, num_sample = super().train_step(weights, cur_steps, train_steps, **kwargs)
        if self._is_epoch_end(cur_steps + train_steps):
            self._prune_one_epoch()
        upload = self._masked_upload()
        if dp_strategy is not None and dp_strategy.model_gdp is not None:
            # SecretFlow's Gaussian model DP clips and noises every entry; pruned entries are
            # zeroed again so that the noise does not reveal or revive them.
            noisy = dp_strategy.model_gdp(list(upload))
            upload = MaskedWeights(
                [
                    np.asarray(w, dtype=np.asarray(orig).dtype) * (1 if m is None else m)
                    for w, orig, m in zip(noisy, upload, upload.masks)
                ],
                upload.masks,
            )
        return upload, num_sample

    def _is_epoch_end(self, steps_done: int) -> bool:
        if self._train_steps_per_epoch is None:
            raise RuntimeError(
                "fed_avg_w_prune could not learn the epoch length: build the training data through "
                "FLModel.fit (array data or a dataset_builder that returns steps per epoch)"
            )
        return steps_done % self._train_steps_per_epoch == 0

    def _check_epoch_start(self, cur_steps: int) -> None:
        """FLModel marks each epoch's first step: check the epoch length learnt from the data."""
        if cur_steps == 0:  # a new fit() call counts its steps from 0 again
            self._epochs_started = 0
        steps = self._train_steps_per_epoch
        if steps is not None and cur_steps != self._epochs_started * steps:
            raise RuntimeError(
                f"fed_avg_w_prune pruned every {steps} steps (the epoch length its training data "
                f"reported), but FLModel started epoch {self._epochs_started + 1} at step "
                f"{cur_steps}, so it runs {cur_steps // max(self._epochs_started, 1)} steps per "
                "epoch: make the dataset_builder's steps per epoch match FLModel's batch_size"
            )
        self._epochs_started += 1

    def _prune_one_epoch(self) -> None:
        target = scheduled_kept_fraction(
            self.prune_epochs_done + 1, self.prune_percent, self.prune_end_rate
        )
        # Never revives entries: a target above the current fraction leaves the mask unchanged.
        self.masks = magnitude_prune(
            dict(self.model.named_parameters()), self.masks, target, self.prune_scope
        )
        apply_masks(self.model, self.masks)
        self.prune_epochs_done += 1

    # --- remote queries ----------------------------------------------------------------------
    def get_kept_fraction(self) -> float:
        """Fraction of this client's weight entries that are still kept (1.0 before pruning)."""
        return _masks_kept_fraction(self.masks)

    def get_masks(self) -> dict:
        """This client's masks as name -> boolean numpy array (stays on the client's device)."""
        return {n: m.cpu().numpy() for n, m in self.masks.items()}

    def get_prune_epochs(self) -> int:
        """How many end-of-epoch pruning steps this client has taken."""
        return self.prune_epochs_done

    def get_pruned_max_abs(self) -> float:
        """Largest magnitude among this client's pruned entries, read from the live parameters.

        It does not re-apply the mask first, so it shows whether pruned weights really stayed
        zero through training and weight loads (0.0 means they did).
        """
        params = dict(self.model.named_parameters())
        values = [params[n].detach().abs()[~m] for n, m in self.masks.items()]
        values = [v for v in values if v.numel()]
        return float(torch.cat(values).max()) if values else 0.0


# --- reading a trained FLModel ------------------------------------------------------------------


def _client(fl_model, device):
    strategy = getattr(fl_model, "strategy", None)
    if strategy != STRATEGY_NAME:
        raise ValueError(
            f"this needs an FLModel built with strategy={STRATEGY_NAME!r}, got {strategy!r}"
        )
    workers = fl_model._workers  # SecretFlow keeps the client proxies here (PYU -> proxy)
    for pyu, worker in workers.items():
        if device == pyu or device == pyu.party:
            return pyu, worker
    parties = ", ".join(p.party for p in workers)
    raise ValueError(f"{device!r} is not one of this FLModel's clients ({parties})")


def _per_client(fl_model, device, method: str):
    import secretflow as sf

    if device is not None:
        _, worker = _client(fl_model, device)
        return sf.reveal(getattr(worker, method)())
    _client(fl_model, next(iter(fl_model._workers)))  # strategy check
    return {pyu.party: sf.reveal(getattr(w, method)()) for pyu, w in fl_model._workers.items()}


def kept_fraction(fl_model, device=None) -> Union[float, Dict[str, float]]:
    """Fraction of weight entries a client still keeps, after (or during) ``fit``.

    Args:
        fl_model: An ``FLModel`` built with ``strategy="fed_avg_w_prune"``.
        device: A client PYU or party name; ``None`` for every client.

    Returns:
        The client's kept fraction (1.0 before any pruning), or party name -> fraction.

    Note:
        The value is revealed to the caller (the driver), as ``sf.reveal`` does.
    """
    return _per_client(fl_model, device, "get_kept_fraction")


def prune_masks(fl_model, device) -> Dict[str, np.ndarray]:
    """A client's pruning masks (parameter name -> boolean array, True = kept).

    Args:
        fl_model: An ``FLModel`` built with ``strategy="fed_avg_w_prune"``.
        device: A client PYU or party name.

    Note:
        This reveals the client's mask to the caller (the driver); in a real deployment that is
        the client's private information, so use it for analysis and tests.
    """
    return _per_client(fl_model, device, "get_masks")


def prune_epochs(fl_model, device=None) -> Union[int, Dict[str, int]]:
    """How many end-of-epoch pruning steps a client (or each client) has taken."""
    return _per_client(fl_model, device, "get_prune_epochs")

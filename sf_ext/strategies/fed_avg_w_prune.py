"""``fed_avg_w_prune``: FedAvg on weights where every client iteratively magnitude-prunes its model.

Each client keeps a boolean mask over its weight tensors (biases and normalization parameters are
never pruned). At the end of each local epoch it prunes ``prune_percent`` % of the weights that are
still alive, by magnitude, until the kept fraction reaches ``prune_end_rate``; after ``e`` epochs the
kept fraction is ``max(prune_end_rate, (1 - prune_percent / 100) ** e)``. Pruned weights stay exactly
zero: the mask is applied after every optimizer step and after every weight load (a round's
aggregated weights, the end-of-epoch ``apply_weights`` and the first step of a new epoch). The
upload is the masked weights, carried as :class:`sf_ext.pruning.MaskedWeights` so that
:class:`sf_ext.aggregators.SecurePruneAggregator` can average each coordinate over the clients that
kept it.

Usage (after ``import sf_ext``)::

    FLModel(..., strategy="fed_avg_w_prune", backend="torch",
            aggregator=SecurePruneAggregator(server, clients),
            prune_percent=5, prune_end_rate=0.1, prune_scope="layer")
"""

import math
from typing import List, Optional, Tuple

import numpy as np
import torch
from secretflow_fl.ml.nn.fl.backend.torch.strategy.fed_avg_w import FedAvgW
from torch.nn.modules.batchnorm import _BatchNorm

from sf_ext.pruning import (
    SCOPES,
    MaskedWeights,
    apply_masks,
    full_masks,
    kept_fraction,
    magnitude_prune,
    scheduled_kept_fraction,
    validate_prune_params,
)


class FedAvgWPrune(FedAvgW):
    """FedAvg-on-weights client that prunes its local model by magnitude at each epoch's end.

    Args:
        builder_base: SecretFlow ``TorchModel`` describing the model, loss, optimizer and metrics.
        random_seed: Seed for the model's initialization.
        skip_bn: Passed to SecretFlow (skip BatchNorm tensors in weight transport).
        prune_percent: Percent of the still-alive weights pruned at the end of each local epoch,
            in (0, 100).
        prune_end_rate: Fraction of weights kept once pruning stops, in (0, 1].
        prune_scope: ``"layer"`` (default, as in the seed experiment) ranks magnitudes within each
            weight tensor; ``"global"`` ranks them across all weight tensors.
        **kwargs: Other ``FLModel`` keyword arguments (ignored here, as SecretFlow passes every
            ``FLModel`` kwarg to every strategy).
    """

    def __init__(
        self,
        builder_base,
        random_seed: Optional[int] = None,
        skip_bn: bool = False,
        prune_percent: float = 5,
        prune_end_rate: float = 0.1,
        prune_scope: str = "layer",
        **kwargs,
    ):
        validate_prune_params(prune_percent, prune_end_rate)
        if prune_scope not in SCOPES:
            raise ValueError(f"prune_scope must be one of {SCOPES}, got {prune_scope!r}")
        super().__init__(builder_base, random_seed=random_seed, skip_bn=skip_bn, **kwargs)
        self.prune_percent = float(prune_percent)
        self.prune_end_rate = float(prune_end_rate)
        self.prune_scope = prune_scope
        self.prune_epochs_done = 0
        self.masks = full_masks(self.model)
        self._train_steps_per_epoch: Optional[int] = None
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

    # --- weights: every load re-applies the local mask ---------------------------------------
    def set_weights(self, weights):
        super().set_weights(weights)
        apply_masks(self.model, self.masks)

    def get_weights(self, return_numpy=True):
        apply_masks(self.model, self.masks)
        return super().get_weights(return_numpy=return_numpy)

    def _masked_upload(self) -> MaskedWeights:
        weights = self.get_weights(return_numpy=True)
        names = list(self.model.state_dict().keys())
        if self.skip_bn:
            # Same filter as SecretFlow's get_weights_not_bn: drop tensors of BatchNorm layers.
            names = [
                n for n in names if not isinstance(getattr(self.model, n.split(".")[0]), _BatchNorm)
            ]
        masks = [self.masks[n].cpu().numpy() if n in self.masks else None for n in names]
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
        _, num_sample = super().train_step(weights, cur_steps, train_steps, **kwargs)
        if self._is_epoch_end(cur_steps + train_steps):
            self._prune_one_epoch()
        upload = self._masked_upload()
        dp_strategy = kwargs.get("dp_strategy", None)
        if dp_strategy is not None and dp_strategy.model_gdp is not None:
            noisy = dp_strategy.model_gdp(list(upload))
            upload = MaskedWeights(
                [w if m is None else w * m for w, m in zip(noisy, upload.masks)], upload.masks
            )
        return upload, num_sample

    def _is_epoch_end(self, steps_done: int) -> bool:
        if self._train_steps_per_epoch is None:
            raise RuntimeError(
                "fed_avg_w_prune could not learn the epoch length: build the training data through "
                "FLModel.fit (array data or a dataset_builder that returns steps per epoch)"
            )
        return steps_done % self._train_steps_per_epoch == 0

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
        return kept_fraction(self.masks)

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

"""What the server really holds after a round, as attack targets (no SecretFlow needed).

From a captured :class:`~sf_ext.dlg.captured.Round` this module builds :class:`ServerView`
objects: the observed quantity, which clients' local training produced it and how, and the images
behind it (for scoring only). Under each aggregator the server holds something different:

* ``plain`` (``PlainAggregator``): every client's upload. The view is one client's update
  (sent weights minus the global model). A naive attacker compares every entry; a mask-aware one
  only the entries the client kept (the zeros of a pruned upload show its mask).
* ``secure`` (``SecureAggregator``): only the sample-weighted mean ``sum_i n_i w_i / sum_i n_i``
  (and the counts ``n_i``, in plaintext). The view is the mean update; the attack reconstructs
  every client's batch jointly.
* ``secure_prune`` (``SecurePruneAggregator``): the two secure sums ``S = sum_i n_i m_i w_i`` and
  ``D = sum_i n_i m_i``. ``D`` at a coordinate is the sum of the sample counts of the clients
  that kept it; when those subset sums differ (e.g. clients with different sample counts), ``D``
  tells exactly who kept each coordinate, i.e. every client's mask, and where one client alone
  kept a coordinate, ``S / D`` *is* that client's weight. The mask-aware view uses all of that;
  the naive view reads ``S / D`` as a plain mean.
"""

import itertools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from sf_ext.dlg.attacks import ClientModel
from sf_ext.dlg.captured import CapturedRound, Round
from sf_ext.dlg.local_training import OptimizerSpec

ATTACKERS = ("naive", "mask-aware")


@dataclass
class ServerView:
    """One thing the server can attack, with the truth behind it.

    Attributes:
        name: Short label (``"alice's upload"``, ``"aggregate"``).
        attacker: ``"naive"`` or ``"mask-aware"``.
        model: The architecture at the round's starting (global) weights.
        observed: The observed update per parameter (what the server holds minus the global
            model).
        masks: Entries the attacker compares (``None``: all).
        clients: The local trainings behind ``observed`` (batch size, steps, weight, masks).
        optimizer: The client optimizer as the server models it (fresh state: the server never
            sees a client's optimizer state).
        truth: The images behind the observation, clients in the order of ``clients``.
        labels: Their labels.
        owners: The client of each true image.
        num_classes: Number of classes.
        loss_fn: The clients' loss.
        notes: What else the view reveals (e.g. the share of coordinates a client alone kept).
    """

    name: str
    attacker: str
    model: nn.Module
    observed: List[Optional[torch.Tensor]]
    masks: Optional[List[Optional[torch.Tensor]]]
    clients: List[ClientModel]
    optimizer: OptimizerSpec
    truth: torch.Tensor
    labels: torch.Tensor
    owners: List[str]
    num_classes: int
    loss_fn: Callable
    notes: Dict[str, object] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """File-name form of :attr:`name` (``alice-upload``, ``aggregate``)."""
        if self.name.endswith("'s upload"):
            return self.name[: -len("'s upload")] + "-upload"
        return "aggregate"

    @property
    def item_shape(self) -> Tuple[int, ...]:
        return tuple(self.truth.shape[1:])

    @property
    def single_sgd_step(self) -> bool:
        """True when the observation is one client's single plain-SGD step (a gradient attack's
        own setting, read through ``-update / lr``)."""
        o = self.optimizer
        return (
            len(self.clients) == 1
            and self.clients[0].steps == 1
            and o.name == "sgd"
            and not o.momentum
            and not o.weight_decay
        )


def _num_classes(model: nn.Module) -> int:
    last = [p for p in model.parameters() if p.dim() == 2][-1]
    return int(last.shape[0])


def _model_at(capture: CapturedRound, params: Sequence[torch.Tensor]) -> nn.Module:
    model = capture.build_model()
    with torch.no_grad():
        for p, value in zip(model.parameters(), params):
            p.copy_(value)
    return model


def upload_view(capture: CapturedRound, attacker: str = "naive") -> ServerView:
    """One client's upload as the server receives it under plain aggregation."""
    if attacker not in ATTACKERS:
        raise ValueError(f"attacker must be one of {ATTACKERS}, got {attacker!r}")
    update = capture.update()
    masks = None
    if attacker == "mask-aware":
        masks = capture.masks()
        if float(capture.meta.get("update_keep", 1.0)) < 1:
            # Update pruning: the entries the client did not send are exactly zero in the update.
            masks = [(u != 0) if m is None else (m & (u != 0)) for u, m in zip(update, masks)]
        if all(m is None or bool(m.all()) for m in masks):
            masks = None  # nothing pruned: the mask-aware attacker sees what the naive one sees
    model = capture.build_model()
    client = ClientModel(
        batch_size=capture.input_shape[0],
        steps=capture.local_steps,
        weight=1.0,
        train_masks=masks,
        name=capture.meta.get("party", "client"),
    )
    party = client.name
    return ServerView(
        name=f"{party}'s upload",
        attacker=attacker,
        model=model,
        observed=update,
        masks=masks,
        clients=[client],
        optimizer=capture.optimizer(with_state=False),
        truth=capture.x,
        labels=capture.labels,
        owners=[party] * len(capture.labels),
        num_classes=_num_classes(model),
        loss_fn=capture.loss_fn(),
        notes={"kept_fraction": capture.kept_fraction()},
    )


def decode_keepers(count: torch.Tensor, sample_counts: Sequence[float], tol: float = 0.25):
    """Who kept each coordinate, from ``D = sum_i n_i m_i``.

    Args:
        count: The decoded count tensor ``D``.
        sample_counts: ``n_i`` per client.
        tol: A coordinate matches a subset when ``|D - sum| < tol`` (fixed-point decoding leaves
            ~2^-18 noise).

    Returns:
        ``(masks, decodable)``: one boolean tensor per client (True where it kept the
        coordinate, where decodable) and a boolean tensor of the coordinates whose keepers are
        unambiguous (only one subset of clients sums to ``D``).
    """
    n = len(sample_counts)
    subsets = [s for r in range(n + 1) for s in itertools.combinations(range(n), r)]
    sums = torch.tensor([float(sum(sample_counts[i] for i in s)) for s in subsets])
    count = count.double()
    matches = (count.unsqueeze(-1) - sums.double()).abs() < tol  # [..., subsets]
    decodable = matches.sum(dim=-1) == 1
    chosen = matches.double().argmax(dim=-1)
    masks = []
    for i in range(n):
        member = torch.tensor([i in s for s in subsets])
        masks.append(member[chosen] & decodable)
    return masks, decodable


def aggregate_view(round_: Round, attacker: str = "naive") -> ServerView:
    """The aggregate the server holds under ``SecureAggregator`` or ``SecurePruneAggregator``."""
    if attacker not in ATTACKERS:
        raise ValueError(f"attacker must be one of {ATTACKERS}, got {attacker!r}")
    server = round_.server
    if server is None or server.kind not in ("secure", "secure_prune"):
        raise ValueError("the round has no secure aggregate recorded")
    captures = [round_.clients[p] for p in server.parties]
    first = captures[0]
    weights = [float(w) for w in server.weights]
    total = sum(weights)
    client_masks = [c.masks() for c in captures]
    # The global model the round started from: where a client kept a coordinate its start is the
    # global value (a client's start is the global model times its own mask).
    start = []
    for j, name in enumerate(first.param_names):
        value = first.start_state[name].float().clone()
        for capture, masks in zip(captures[1:], client_masks[1:]):
            other = capture.start_state[name].float()
            keep = masks[j] if masks[j] is not None else torch.ones_like(other, dtype=torch.bool)
            value = torch.where(keep & (value == 0), other, value)
        start.append(value)
    model = _model_at(first, start)
    notes: Dict[str, object] = {"clients": list(server.parties), "sample_counts": weights}
    if server.kind == "secure":
        mean = first.to_params([t.float() for t in server.tensors["average"]])
        observed = [m - s for m, s in zip(mean, start)]
        per_client_weight: List = [w / total for w in weights]
        compare, train = None, [None] * len(captures)
    else:
        numerator = first.to_params([t.float() for t in server.tensors["numerator"]])
        count = first.to_params([t.float() for t in server.tensors["count"]])
        observed, compare, per_client_weight = [], [], [[] for _ in captures]
        train: List[List] = [[] for _ in captures]
        single, weight_entries = 0, 0
        for num, den, s in zip(numerator, count, start):
            kept = den > 0.5 * min(weights)
            ratio = torch.where(kept, num / den.clamp(min=1e-12), torch.zeros_like(num))
            observed.append(torch.where(kept, ratio - s, torch.zeros_like(num)))
            masks, decodable = decode_keepers(den, weights)
            if num.dim() >= 2:
                weight_entries += num.numel()
                single += int((kept & (sum(m.long() for m in masks) == 1)).sum())
            if attacker == "mask-aware":
                compare.append(kept & decodable)
                for i, m in enumerate(masks):
                    per_client_weight[i].append(
                        torch.where(kept, weights[i] * m.float() / den.clamp(min=1e-12), 0.0)
                    )
                    train[i].append(m)
            else:
                compare.append(None)
                for i in range(len(captures)):
                    per_client_weight[i].append(torch.full_like(num, weights[i] / total))
                    train[i].append(None)
        notes["single_keeper_share"] = single / max(1, weight_entries)
        if attacker == "naive":
            compare, train = None, [None] * len(captures)
            per_client_weight = [w / total for w in weights]
    clients = [
        ClientModel(
            batch_size=c.input_shape[0],
            steps=c.local_steps,
            weight=w,
            train_masks=t,
            name=c.meta.get("party", f"client{i}"),
        )
        for i, (c, w, t) in enumerate(zip(captures, per_client_weight, train))
    ]
    return ServerView(
        name=f"aggregate of {len(captures)} clients",
        attacker=attacker,
        model=model,
        observed=observed,
        masks=compare,
        clients=clients,
        optimizer=first.optimizer(with_state=False),
        truth=torch.cat([c.x for c in captures]),
        labels=torch.cat([c.labels for c in captures]),
        owners=[c.meta.get("party", "?") for c in captures for _ in range(len(c.labels))],
        num_classes=_num_classes(model),
        loss_fn=first.loss_fn(),
        notes=notes,
    )


def server_views(
    round_: Round, party: Optional[str] = None, attackers: Sequence[str] = ATTACKERS
) -> List[ServerView]:
    """Every view the server has of a round: one client's upload (plain aggregation; ``party``,
    default the first client) or the aggregate (secure aggregation), per attacker. The
    mask-aware attacker is left out where there is no mask to use (unpruned plain uploads,
    ``SecureAggregator``)."""
    server = round_.server
    kind = "plain" if server is None else server.kind
    views = []
    for attacker in attackers:
        if kind == "plain":
            capture = round_.clients[party or next(iter(round_.clients))]
            has_mask = capture.sent_masks is not None or capture.meta.get("update_keep", 1) < 1
            if attacker == "mask-aware" and not has_mask:
                continue
            views.append(upload_view(capture, attacker))
        else:
            if attacker == "mask-aware" and kind == "secure":
                continue
            views.append(aggregate_view(round_, attacker))
    return views


__all__ = [
    "ATTACKERS",
    "ServerView",
    "aggregate_view",
    "decode_keepers",
    "server_views",
    "upload_view",
]

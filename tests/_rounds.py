"""Synthetic aggregation rounds whose right answer is known, shared by the aggregation tests.

Benign updates are ``direction + noise`` (norm ~1.1, cosine ~0.8 to each other) around one
direction; the planted attackers' rows are sign-flipped x4, all-100, scaled x10 along their own
honest update, NaN/inf, or a mix of the four. Rows are shuffled so attackers sit between benign
rows. ``run_rule`` calls any registered rule with a full server context, the way the simulator
does.
"""

import math
from dataclasses import dataclass

import torch

from sf_ext.aggregators import ServerContext, call_rule
from sf_ext.params import ParamLayout

N_BENIGN, N_ATTACK, DIM = 12, 8, 2000
ATTACKS = ["sign_flip", "same_value", "scaled", "nan", "mixed"]


@dataclass
class Round:
    updates: torch.Tensor
    is_attacker: torch.Tensor
    benign: torch.Tensor
    kinds: list  # per row: "benign" or the attack applied to it
    global_params: torch.Tensor
    root_update: torch.Tensor

    @property
    def benign_mean(self) -> torch.Tensor:
        return self.benign.mean(dim=0)


def planted_round(attack: str, seed: int = 0, n_benign=N_BENIGN, n_attack=N_ATTACK, dim=DIM):
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(dim, generator=gen)
    direction /= direction.norm()
    total = n_benign + n_attack
    honest = direction + 0.5 * torch.randn(total, dim, generator=gen) / math.sqrt(dim)
    updates = honest.clone()
    kinds = [attack] * n_attack
    if attack == "mixed":
        kinds = [["sign_flip", "same_value", "scaled", "nan"][i % 4] for i in range(n_attack)]
    for offset, kind in enumerate(kinds):
        row = n_benign + offset
        if kind == "sign_flip":
            updates[row] = -4.0 * honest[row]
        elif kind == "same_value":
            updates[row] = 100.0
        elif kind == "scaled":
            updates[row] = 10.0 * honest[row]
        elif kind == "nan":
            updates[row, offset % dim] = [float("nan"), float("inf"), -float("inf")][offset % 3]
        elif kind != "none":
            raise ValueError(kind)
    order = torch.randperm(total, generator=gen)
    is_attacker = (torch.arange(total) >= n_benign)[order]
    row_kinds = ["benign"] * n_benign + kinds
    # A model whose norm dwarfs one round's update, as a trained network's does.
    global_params = 20.0 * torch.randn(dim, generator=gen) / math.sqrt(dim)
    # The server's own clean update: the benign direction plus its own noise.
    root = direction + 0.5 * torch.randn(dim, generator=gen) / math.sqrt(dim)
    return Round(
        updates[order],
        is_attacker,
        honest[order][~is_attacker],
        [row_kinds[i] for i in order],
        global_params,
        root,
    )


def full_context(num_clients: int, dim: int, rnd: Round = None, **overrides) -> ServerContext:
    """Every context field filled: what the simulator hands a rule."""
    values = dict(
        layout=ParamLayout(names=("w",), shapes=((dim,),)),
        global_params=rnd.global_params if rnd is not None else torch.zeros(dim),
        round_index=0,
        generator=torch.Generator().manual_seed(0),
        client_ids=list(range(num_clients)),
        state={},
        root_update=rnd.root_update if rnd is not None else torch.ones(dim),
    )
    values.update(overrides)
    return ServerContext(**values)


def run_rule(name, updates, num_samples=None, rnd: Round = None, context=None, **options):
    """Call rule ``name`` with a full context (rows and dimension taken from ``updates``)."""
    if context is None:
        shape = torch.as_tensor(updates).shape if not isinstance(updates, list) else None
        n, d = (shape[0], shape[1]) if shape is not None and len(shape) == 2 else (5, 10)
        context = full_context(n, d, rnd)
    return call_rule(name, updates, num_samples, context, **options)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def adaptive_mm_case():
    """The adaptive matrix-mapping attack's fixture: a seeded 16-8-5 MLP, 8 updates of its size
    (std 0.5) and the first 3 rows as attackers. Returns ``(model, updates, attacker_mask)``."""
    from sf_ext.models import MLP

    torch.manual_seed(0)
    model = MLP(in_channels=1, image_size=4, num_classes=5, hidden=(8,))
    n_params = sum(p.numel() for p in model.parameters())
    updates = torch.randn(8, n_params) * 0.5
    mask = torch.tensor([True, True, True, False, False, False, False, False])
    return model, updates, mask

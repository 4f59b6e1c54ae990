"""Settings of one simulated federated run (:class:`SimulationConfig`) and of a grid of runs.

A run's configuration is a flat dataclass so that it can be written to JSON next to its results,
hashed to name its output folder, and rebuilt from a YAML/JSON experiment file.
"""

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Optional

__all__ = ["SimulationConfig", "UNTARGETED", "TARGETED", "ADAPTIVE"]

UNTARGETED = ("sign_flip", "same_value", "gaussian", "lie", "min_max", "min_sum")
TARGETED = ("blackbox", "pgd", "pgd_mr", "pixel")
ADAPTIVE = ("adaptive_mm",)


@dataclass
class SimulationConfig:
    """Everything that determines one simulated run (same config + seed = same result).

    Data and model:
        dataset: Name for :func:`sf_ext.data.load_dataset` (``fashion-mnist``, ``cifar10``, ...).
        data_root: Data folder (``None``: ``$SF_EXT_DATA``).
        model: Name for :func:`sf_ext.models.build_model` (``lenet``, ``vgg9``, ...).
        model_options: Extra keyword arguments for the model builder.
        train_subset: Use only this many (stratified-random) training samples; ``None`` = all.
        test_subset: Evaluate on this many test samples; ``None`` = all.

    Federation:
        num_clients: N, clients in the population.
        clients_per_round: k, clients sampled each round.
        partition: ``iid`` or ``dirichlet``.
        alpha: Dirichlet concentration.
        min_client_size: Smallest allowed client dataset (Dirichlet redraws until met).
        rounds: Communication rounds.
        local_epochs: Local passes over the client's data (``local_steps`` overrides).
        local_steps: Fixed number of local minibatch steps instead of epochs.
        batch_size: Local minibatch size.
        lr: Client learning rate in round 0.
        lr_decay: Multiplied into the learning rate every round.
        momentum: Client SGD momentum.
        weight_decay: Client L2 penalty.
        server_lr: Step applied to the aggregated update.

    Aggregation:
        aggregator: Name in :data:`sf_ext.aggregators.AGGREGATORS`.
        aggregator_options: Keyword options for it (``f: auto`` = expected attackers per round).

    Attack:
        attack: ``None``, an untargeted update attack (:data:`UNTARGETED`), a backdoor
            behaviour (:data:`TARGETED`) or ``adaptive_mm``.
        attack_options: Options for the attack function or behaviour.
        attacker_fraction: Share of attackers (of each round in ``per_round`` mode, of the
            population in ``pool`` mode).
        attacker_mode: ``per_round``: exactly ``round(fraction * k)`` attackers every round, drawn
            from a fixed pool; ``pool``: a fixed ``round(fraction * N)`` clients are attackers and
            rounds sample uniformly from everyone.
        backdoor: Poisoned-data settings: ``kind`` (``edge_case`` or ``pixel``),
            ``source_class``, ``target_class``, ``tail_fraction``, ``held_out``, ``knn_k``,
            ``train_path``/``test_path`` (original edge-case files), ``n_poison`` (pixel).
            ``None`` = no poisoned data and no backdoor metric.

    Run:
        pretrain_epochs: Centralised epochs on the clean training data before round 0 (the
            paper starts its backdoor runs from a pretrained model); 0 = random start.
        pretrain_lr: Learning rate of the pretraining.
        seed: Seeds everything (partition, attackers, sampling, shuffles, noise).
        device: ``cpu`` or ``cuda``.
        batched: Train the round's clients with ``torch.func.vmap`` (``auto``: when the model
            allows it and the device is a GPU or k > 1).
        eval_every: Evaluate the global model every this many rounds (and after the last).
        eval_batch_size: Batch size of evaluation.
    """

    dataset: str = "fashion-mnist"
    data_root: Optional[str] = None
    model: str = "lenet"
    model_options: Dict[str, Any] = field(default_factory=dict)
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None

    num_clients: int = 200
    clients_per_round: int = 20
    partition: str = "dirichlet"
    alpha: float = 1.0
    min_client_size: int = 10
    rounds: int = 30
    local_epochs: int = 1
    local_steps: Optional[int] = None
    batch_size: int = 32
    lr: float = 0.05
    lr_decay: float = 1.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    server_lr: float = 1.0

    aggregator: str = "fedavg"
    aggregator_options: Dict[str, Any] = field(default_factory=dict)

    attack: Optional[str] = None
    attack_options: Dict[str, Any] = field(default_factory=dict)
    attacker_fraction: float = 0.0
    attacker_mode: str = "per_round"
    backdoor: Optional[Dict[str, Any]] = None

    pretrain_epochs: float = 0.0
    pretrain_lr: float = 0.05
    seed: int = 0
    device: str = "cpu"
    batched: Any = "auto"
    eval_every: int = 1
    eval_batch_size: int = 1000

    def __post_init__(self):
        if self.partition not in ("iid", "dirichlet"):
            raise ValueError(f"partition must be 'iid' or 'dirichlet', got {self.partition!r}")
        if not 1 <= self.clients_per_round <= self.num_clients:
            raise ValueError(
                f"clients_per_round must be in [1, num_clients={self.num_clients}], "
                f"got {self.clients_per_round}"
            )
        if self.attacker_mode not in ("per_round", "pool"):
            raise ValueError(
                f"attacker_mode must be 'per_round' or 'pool', got {self.attacker_mode!r}"
            )
        if not 0 <= self.attacker_fraction < 1:
            raise ValueError(f"attacker_fraction must lie in [0, 1), got {self.attacker_fraction}")
        known = (None,) + UNTARGETED + TARGETED + ADAPTIVE
        if self.attack not in known:
            raise ValueError(f"unknown attack {self.attack!r}; choose from {known}")
        if self.attack in TARGETED and not self.backdoor:
            raise ValueError(f"attack {self.attack!r} needs a 'backdoor' data section")
        if self.rounds < 1 or self.local_epochs < 1 or self.batch_size < 1:
            raise ValueError("rounds, local_epochs and batch_size must be >= 1")

    @property
    def is_targeted(self) -> bool:
        return self.attack in TARGETED

    def attackers_per_round(self) -> int:
        """Expected attackers among the k clients of a round."""
        if self.attack is None or self.attacker_fraction == 0:
            return 0
        if self.attacker_mode == "per_round":
            return max(1, int(round(self.attacker_fraction * self.clients_per_round)))
        return int(round(self.attacker_fraction * self.clients_per_round))

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "SimulationConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown simulation settings: {unknown}")
        return cls(**values)

    def digest(self) -> str:
        """Short stable hash of the settings (names the run's output folder)."""
        text = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:12]

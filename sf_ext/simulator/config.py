"""Settings of one simulated federated run (:class:`SimulationConfig`) and of a grid of runs.

A run's configuration is a flat dataclass so that it can be written to JSON next to its results,
hashed to name its output folder, and rebuilt from a YAML/JSON experiment file.
"""

import difflib
import hashlib
import inspect
import json
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Optional

__all__ = [
    "SimulationConfig",
    "UNTARGETED",
    "TARGETED",
    "ADAPTIVE",
    "check_field_types",
    "option_names",
]

# The built-in attacks by kind (the registry, ``sf_ext.attacks.ATTACKS``, may hold more).
UNTARGETED = (
    "sign_flip",
    "same_value",
    "gaussian",
    "lie",
    "min_max",
    "min_sum",
    "ipm",
    "fang_krum",
    "fang_trim",
)
TARGETED = ("blackbox", "pgd", "pgd_mr", "pixel", "scaling")
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
        aggregator_options: Keyword options for it (``f: auto`` = the attackers per round, capped
            at the most the rule can be configured for).

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

        root_size: Size of the server's clean root dataset, for rules that need one (FLTrust:
            100 samples, as in Cao et al.); drawn once per run from the clean training rows.

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

    root_size: int = 100

    pretrain_epochs: float = 0.0
    pretrain_lr: float = 0.05
    seed: int = 0
    device: str = "cpu"
    batched: Any = "auto"
    eval_every: int = 1
    eval_batch_size: int = 1000

    def __post_init__(self):
        check_field_types(self)
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
        for name in ("rounds", "local_epochs", "batch_size", "num_clients", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.local_steps is not None and self.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1 (or null), got {self.local_steps}")
        for name in ("lr", "alpha", "server_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        self._check_aggregator()
        self._check_attack()

    def _check_aggregator(self) -> None:
        from sf_ext.aggregators.registry import get_rule
        from sf_ext.aggregators.server import CONTEXT_FIELDS

        rule = get_rule(self.aggregator)  # unknown names: ValueError with the closest match
        options = {
            k: v for k, v in self.aggregator_options.items() if not (k == "f" and v == "auto")
        }
        _check_options(
            f"aggregator_options of {self.aggregator!r}",
            options,
            option_names(rule.fn, exclude=CONTEXT_FIELDS),
        )

    def _check_attack(self) -> None:
        if self.attack is None:
            if self.attack_options:
                raise ValueError(f"attack_options {self.attack_options} given without an attack")
            return
        from sf_ext.attacks.registry import ATTACK_CONTEXT_FIELDS, get_attack
        from sf_ext.attacks.targeted import BackdoorBehaviour

        spec = get_attack(self.attack)
        if spec.kind == "backdoor":
            if not self.backdoor:
                raise ValueError(f"attack {self.attack!r} needs a 'backdoor' data section")
            known = [f.name for f in fields(BackdoorBehaviour) if f.name != "name"]
        else:
            known = option_names(spec.fn, exclude=ATTACK_CONTEXT_FIELDS + ("return_details",))
        _check_options(f"attack_options of {self.attack!r}", self.attack_options, known)

    @property
    def is_targeted(self) -> bool:
        if self.attack is None:
            return False
        from sf_ext.attacks.registry import get_attack

        return get_attack(self.attack).kind == "backdoor"

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
        """Build from a plain dict; unknown keys are an error naming the closest valid one."""
        if not isinstance(values, dict):
            raise ValueError(f"simulation settings must be a mapping, got {type(values).__name__}")
        names = [f.name for f in fields(cls)]
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown simulation setting {key!r}{hint}")
        return cls(**values)

    def digest(self) -> str:
        """Short stable hash of the settings (names the run's output folder)."""
        text = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


def _describe(value) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{value!r} ({type(value).__name__})"


def _matches(value, annotation) -> bool:
    """Whether ``value`` fits a field annotation (int, float, str, bool, Dict, Optional, Any)."""
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        return any(_matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (dict, Dict) or annotation in (dict, Dict):
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return True


def check_field_types(instance) -> None:
    """Check every field of a config dataclass against its annotation.

    Raises:
        ValueError: naming the key, the expected type and the value given (``rounds: two`` ->
            "rounds must be an integer, got the string 'two'").
    """
    hints = typing.get_type_hints(type(instance))
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    for f in fields(instance):
        annotation = hints.get(f.name, Any)
        value = getattr(instance, f.name)
        if _matches(value, annotation):
            continue
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        base = args[0] if len(args) == 1 else annotation
        expected = words.get(base, "a mapping" if typing.get_origin(base) is dict else str(base))
        if type(None) in typing.get_args(annotation):
            expected += " or null"
        raise ValueError(f"{f.name} must be {expected}, got {_describe(value)}")


def option_names(fn, exclude=()) -> list:
    """Keyword options a rule or attack function accepts (for catching typos before a run)."""
    params = inspect.signature(fn).parameters
    skip = {"updates", "num_samples", "attackers", *exclude}
    return [
        name
        for name, p in params.items()
        if name not in skip and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def _check_options(what: str, options: Dict[str, Any], known) -> None:
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown option {key!r} in {what}{hint}; known: {sorted(known)}")

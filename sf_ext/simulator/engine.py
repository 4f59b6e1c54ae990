"""The many-client federated simulator: one process, one shared data tensor, k models at a time.

:class:`Simulator` owns the server state (the flat global model and the round counter) and, each
round, samples k of the N clients, trains them from the global model (batched with ``torch.func``
or one by one, :mod:`sf_ext.simulator.training`), lets the attackers manipulate their part, hands
the updates ``client weights - global`` to the aggregation core (``sf_ext.aggregators.aggregate``)
and applies the result. Clients are index lists into the shared training tensor, so N can be in
the thousands without materialising a model per client.

Every round is seeded from ``(seed, round)`` alone, so a run resumed from its per-round checkpoint
continues exactly as if it had never stopped.
"""

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from sf_ext.aggregators.registry import call_rule, get_rule
from sf_ext.aggregators.server import ServerContext
from sf_ext.attacks.registry import AttackContext, get_attack, run_update_attack
from sf_ext.attacks.targeted import attacker_indices, backdoor_behaviour, finish_backdoor_update
from sf_ext.params import ParamLayout
from sf_ext.simulator.config import SimulationConfig
from sf_ext.simulator.data import FederatedData, build_federated_data
from sf_ext.simulator.training import ClientPlan, LocalTrainer

__all__ = ["Simulator", "RunResult", "round_seed", "to_jsonable"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RESULT = "result.json"


def round_seed(seed: int, round_index: int, stream: int = 0) -> int:
    """A 63-bit seed for one round (and one random stream) derived from the run's seed.

    ``round_index`` -1 is the setup (attacker pool, initial model, pretraining).
    """
    seq = np.random.SeedSequence([int(seed), int(round_index) + 1, int(stream)])
    return int(seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


@dataclass
class RunResult:
    """Outcome of a run: the per-round metrics and a summary of the final state."""

    config: Dict[str, Any]
    history: List[Dict[str, Any]]
    final: Dict[str, Any]
    attacker_pool: List[int] = field(default_factory=list)
    backdoor_info: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {
            "config": self.config,
            "final": self.final,
            "attacker_pool": self.attacker_pool,
            "backdoor_info": self.backdoor_info,
            "history": self.history,
        }


class Simulator:
    """Federated training of N simulated clients, k per round, against a chosen aggregator.

    Args:
        config: The run's settings.
        out_dir: Folder for the per-round checkpoint, ``metrics.jsonl`` and ``result.json``; a
            run finding a checkpoint of the same config there resumes from it. ``None`` keeps
            everything in memory.
        progress: Show a tqdm progress bar over rounds.
        pretrained_cache: Folder caching the pretrained starting model (shared by a grid's cells).
        keep_checkpoint: Keep the last checkpoint (the final global model) after the run ends.
        data: Prebuilt :class:`FederatedData` (tests and sweeps reuse one); built from
            ``config`` when None.
    """

    def __init__(
        self,
        config: SimulationConfig,
        out_dir: Optional[str] = None,
        progress: bool = True,
        data: Optional[FederatedData] = None,
        pretrained_cache: Optional[str] = None,
        keep_checkpoint: bool = False,
    ):
        self.config = config
        self.out_dir = out_dir
        self.progress = progress
        self.keep_checkpoint = keep_checkpoint
        self.device = torch.device(config.device)
        self.data = data if data is not None else build_federated_data(config)
        self.model = self.data.build_model().to(self.device)
        # The server's copy of the architecture (CPU, like the update matrix) for aggregators
        # and attacks that run the network on updates (matrix mapping, the adaptive attack).
        self.server_model = self.data.build_model()
        self.layout = ParamLayout.from_module(self.model)
        self.trainer = LocalTrainer(
            self.model,
            self.data.train_x,
            self.data.train_y,
            batch_size=config.batch_size,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            device=config.device,
        )
        self.batched = self._resolve_batched(config.batched)
        self.rule = get_rule(config.aggregator)
        self.attack_spec = get_attack(config.attack) if config.attack else None
        self.attacker_pool = self._attacker_pool()
        self.behaviour = (
            backdoor_behaviour(config.attack, self.data.input_shape, **config.attack_options)
            if self.attack_spec is not None and self.attack_spec.kind == "backdoor"
            else None
        )
        self.warnings = self._tolerance_warnings()
        # FLTrust-style rules: the server trains on a small clean root set every round.
        self.root_indices = (
            self._root_indices() if "root_update" in self.rule.needed(self.options()) else None
        )
        self.global_params = self._initial_params(pretrained_cache)
        self.round = 0
        self.history: List[Dict[str, Any]] = []
        self.rule_state: Dict[str, Any] = {}  # memory of stateful rules, checkpointed
        self._attack_info: Dict[str, Any] = {}  # what a searched attack found this round
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            self._resume()

    # -- setup ---------------------------------------------------------------------------------

    def _resolve_batched(self, setting) -> bool:
        if setting == "auto":
            # On CPU one thread of vmapped convolutions is no faster than the loop (measured in
            # benchmarks/bench_simulator.py); on a GPU the batch wins clearly.
            return self.trainer.can_batch and self.device.type == "cuda"
        return bool(setting) and self.trainer.can_batch

    def _attacker_pool(self) -> np.ndarray:
        cfg = self.config
        if cfg.attack is None or cfg.attacker_fraction == 0:
            return np.zeros(0, dtype=np.int64)
        rng = np.random.default_rng(round_seed(cfg.seed, -1, 1))
        if cfg.attacker_mode == "pool":
            size = int(round(cfg.attacker_fraction * cfg.num_clients))
        else:
            # A pool as large as the population share, and never smaller than one round's worth.
            size = max(
                cfg.attackers_per_round(), int(round(cfg.attacker_fraction * cfg.num_clients))
            )
        return np.sort(rng.choice(cfg.num_clients, size=size, replace=False))

    def options(self) -> Dict[str, Any]:
        """The aggregator's options for this run (``f: auto`` resolved)."""
        cfg = self.config
        options = dict(cfg.aggregator_options)
        if options.get("f") == "auto":
            # Rules that take f are told the number of attackers per round, capped at what the
            # rule can be configured with (Krum: (n - 3) // 2, Bulyan: (n - 3) // 4).
            f = cfg.attackers_per_round()
            if self.rule.tolerates is not None:
                n = cfg.clients_per_round
                f = min(f, int(self.rule.tolerates(n, {"f": n})))
            options["f"] = max(0, f)
        return options

    def _tolerance_warnings(self) -> List[str]:
        """A rule configured below the attack it faces says so before the run starts."""
        cfg = self.config
        attackers = cfg.attackers_per_round()
        if not attackers or self.rule.tolerates is None:
            return []
        tolerated = int(self.rule.tolerates(cfg.clients_per_round, self.options()))
        if attackers <= tolerated:
            return []
        message = (
            f"{cfg.aggregator} with options {cfg.aggregator_options or '{}'} tolerates at most "
            f"{tolerated} attackers among {cfg.clients_per_round} clients per round, but "
            f"{attackers} attack ({cfg.attack}): expect it to fail"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return [message]

    def _root_indices(self) -> np.ndarray:
        """The server's root dataset: ``root_size`` clean training rows, drawn once per run."""
        cfg = self.config
        clean = self.data.clean_indices()
        rng = np.random.default_rng(round_seed(cfg.seed, -1, 4))
        size = min(cfg.root_size, len(clean))
        return np.sort(rng.choice(clean, size=size, replace=False))

    def _initial_params(self, cache_dir: Optional[str]) -> torch.Tensor:
        cfg = self.config
        torch.manual_seed(round_seed(cfg.seed, -1, 2))
        fresh = self.data.build_model()
        start = self.layout.flatten(fresh.state_dict()).to(self.device)
        if cfg.pretrain_epochs <= 0:
            return start
        key = self.data.pretrain_key(cfg)
        path = os.path.join(cache_dir, f"pretrained-{key}.pt") if cache_dir else None
        if path and os.path.exists(path):
            return torch.load(path, map_location=self.device)
        clean = self.data.clean_indices()
        per_epoch = math.ceil(len(clean) / cfg.batch_size)
        plan = ClientPlan(
            indices=clean, lr=cfg.pretrain_lr, steps=max(1, int(cfg.pretrain_epochs * per_epoch))
        )
        rng = np.random.default_rng(round_seed(cfg.seed, -1, 3))
        weights = self.trainer.train(start, [plan], rng, batched=False)[0]
        if path:
            os.makedirs(cache_dir, exist_ok=True)
            _atomic_save(weights.cpu(), path)
        return weights

    # -- resumability --------------------------------------------------------------------------

    def _resume(self) -> None:
        finished = os.path.join(self.out_dir, RESULT)
        if os.path.exists(finished):
            with open(finished) as handle:
                if json.load(handle).get("config") != to_jsonable(self.config.to_dict()):
                    raise ValueError(
                        f"{finished} belongs to a run with different settings; "
                        "use another output folder"
                    )
        path = os.path.join(self.out_dir, CHECKPOINT)
        if not os.path.exists(path):
            return
        state = torch.load(path, map_location=self.device)
        if state["config"] != self.config.to_dict():
            raise ValueError(
                f"{path} holds a run with different settings; use another output folder"
            )
        self.global_params = state["global_params"].to(self.device)
        self.round = int(state["round"])
        self.history = list(state["history"])
        self.rule_state = state.get("rule_state", {})

    def _checkpoint(self) -> None:
        if not self.out_dir:
            return
        state = {
            "config": self.config.to_dict(),
            "round": self.round,
            "global_params": self.global_params.cpu(),
            "history": self.history,
            "rule_state": self.rule_state,
        }
        _atomic_save(state, os.path.join(self.out_dir, CHECKPOINT))
        with open(os.path.join(self.out_dir, METRICS), "a") as handle:
            handle.write(json.dumps(to_jsonable(self.history[-1])) + "\n")

    # -- one round -----------------------------------------------------------------------------

    def current_lr(self) -> float:
        return self.config.lr * self.config.lr_decay**self.round

    def sample_clients(self, rng: np.random.Generator):
        """The round's client ids and attacker mask (attackers first when per-round)."""
        cfg = self.config
        k = cfg.clients_per_round
        pool = self.attacker_pool
        if cfg.attacker_mode == "per_round" and len(pool):
            m = cfg.attackers_per_round()
            attackers = rng.choice(pool, size=m, replace=False)
            benign_ids = np.setdiff1d(np.arange(cfg.num_clients), pool)
            benign = rng.choice(benign_ids, size=k - m, replace=False)
            clients = np.concatenate([attackers, benign])
        else:
            clients = rng.choice(cfg.num_clients, size=k, replace=False)
        is_attacker = np.isin(clients, pool)
        return clients.astype(np.int64), is_attacker

    def _plans(self, clients, is_attacker, rng) -> List[ClientPlan]:
        cfg = self.config
        lr = self.current_lr()
        plans = []
        for client, attacker in zip(clients, is_attacker):
            own = self.data.client_indices[client]
            plan = ClientPlan(indices=own, lr=lr, epochs=cfg.local_epochs, steps=cfg.local_steps)
            if attacker and self.behaviour is not None:
                beh = self.behaviour
                poison = self.data.poison_indices(beh.data)
                plan.indices = attacker_indices(own, poison, beh.poison_fraction, rng)
                plan.pgd_radius = beh.pgd_radius
                plan.pgd_every = beh.pgd_every
                plan.lr = lr if beh.lr is None else beh.lr * cfg.lr_decay**self.round
                plan.epochs = cfg.local_epochs if beh.local_epochs is None else beh.local_epochs
            elif attacker and self.attack_spec.ignores_training(cfg.attack_options):
                plan.steps = 0
            plans.append(plan)
        return plans

    def _attack_updates(self, updates, is_attacker, num_samples, generator):
        cfg = self.config
        mask = torch.as_tensor(is_attacker)
        if not bool(mask.any()):
            return updates
        if self.attack_spec.kind == "update":
            # What an attacker may know: the global model, the round's sample counts and, for
            # the adaptive attack, the architecture the server maps updates through.
            context = AttackContext(
                global_params=self.global_params.cpu(),
                generator=generator,
                model=self.server_model,
                input_shape=self.data.input_shape,
                layout=self.layout,
                num_samples=num_samples,
            )
            out, info = run_update_attack(cfg.attack, updates, mask, context, **cfg.attack_options)
            self._attack_info = info
            return out
        beh = self.behaviour
        if beh.model_replacement or beh.boost is not None or beh.pgd_radius is not None:
            total = float(num_samples.sum())
            out = updates.clone()
            for i in torch.nonzero(mask).reshape(-1).tolist():
                out[i] = finish_backdoor_update(updates[i], beh, total, float(num_samples[i]))
            return out
        return updates

    def server_context(self, clients, generator=None, root_update=None) -> ServerContext:
        """What the server knows this round: layout, model, round, global model, a seeded random
        generator, the clients' ids, the rule's memory and (FLTrust) its root update."""
        return ServerContext(
            layout=self.layout,
            global_params=self.global_params.cpu(),
            model=self.server_model,
            input_shape=self.data.input_shape,
            round_index=self.round,
            generator=generator,
            client_ids=[int(c) for c in clients],
            state=self.rule_state,
            root_update=root_update,
        )

    def _root_update(self) -> Optional[torch.Tensor]:
        if self.root_indices is None:
            return None
        cfg = self.config
        plan = ClientPlan(
            indices=self.root_indices,
            lr=self.current_lr(),
            epochs=cfg.local_epochs,
            steps=cfg.local_steps,
        )
        rng = np.random.default_rng(round_seed(cfg.seed, self.round, 4))
        weights = self.trainer.train(self.global_params, [plan], rng, batched=False)
        return (weights[0] - self.global_params).cpu()

    def run_round(self) -> Dict[str, Any]:
        """Play one round and return its metrics (also appended to ``history``)."""
        from sf_ext.aggregators._validate import NonFiniteAggregate
        from sf_ext.aggregators.report import detection_rates

        cfg = self.config
        t0 = time.perf_counter()
        rng = np.random.default_rng(round_seed(cfg.seed, self.round, 0))
        generator = torch.Generator().manual_seed(round_seed(cfg.seed, self.round, 1))
        self._attack_info = {}
        clients, is_attacker = self.sample_clients(rng)
        plans = self._plans(clients, is_attacker, rng)
        weights = self.trainer.train(self.global_params, plans, rng, batched=self.batched)
        updates = (weights - self.global_params.unsqueeze(0)).cpu()
        num_samples = torch.tensor([len(p.indices) for p in plans], dtype=torch.float64)
        t_train = time.perf_counter()
        updates = self._attack_updates(updates, is_attacker, num_samples, generator)
        agg_generator = torch.Generator().manual_seed(round_seed(cfg.seed, self.round, 2))
        context = self.server_context(clients, agg_generator, self._root_update())
        # In case an aggregator draws from the global generator instead: seed it per round too.
        torch.manual_seed(round_seed(cfg.seed, self.round, 3))
        diverged, divergence, update_norm = False, "", math.nan
        try:
            agg, report = call_rule(cfg.aggregator, updates, num_samples, context, **self.options())
            step = cfg.server_lr * agg.to(self.device)
            new_global = self.global_params + step
            diverged = not bool(torch.isfinite(new_global).all())
            update_norm = float(step.double().norm())
        except NonFiniteAggregate as exc:
            # A rule without screening (FedAvg) met NaN/inf updates or overflowed: the attack
            # has blown the model up.
            report, new_global, diverged = None, torch.full_like(self.global_params, math.nan), True
            divergence = str(exc)
        t_agg = time.perf_counter()
        self.global_params = new_global
        record = {
            "round": self.round,
            "lr": self.current_lr(),
            "clients": clients.tolist(),
            "attackers": is_attacker.astype(int).tolist(),
            "n_attackers": int(is_attacker.sum()),
            "diverged": diverged,
            "update_norm": update_norm,
        }
        if divergence:
            record["divergence"] = divergence
        record.update(self._attack_info)
        if report is not None:
            record["all_screened"] = bool(report.details.get("all_screened", False))
            record["n_screened"] = int(report.non_finite.sum())
            record["n_kept"] = report.num_kept
            rates = detection_rates(report, is_attacker)
            if rates["applicable"]:
                record.update({k: rates[k] for k in ("tpr", "fpr", "tp", "fp", "fn", "tn")})
        last = self.round + 1 == cfg.rounds
        if diverged or last or (self.round + 1) % cfg.eval_every == 0:
            record.update(self.evaluate())
        t_eval = time.perf_counter()
        record.update(
            time_train=t_train - t0, time_aggregate=t_agg - t_train, time_eval=t_eval - t_agg
        )
        self.round += 1
        self.history.append(record)
        self._checkpoint()
        return record

    # -- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor) -> torch.Tensor:
        tensors = self.layout.unflatten(self.global_params)
        self.model.load_state_dict({n: t.clone() for n, t in tensors.items()})
        self.model.eval()
        preds = []
        for start in range(0, inputs.shape[0], self.config.eval_batch_size):
            batch = inputs[start : start + self.config.eval_batch_size].to(self.device)
            preds.append(self.model(batch).argmax(dim=1).cpu())
        self.model.train()
        return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)

    def evaluate(self) -> Dict[str, float]:
        """Main-task accuracy on the test set and backdoor accuracy on the held-out poisoned set."""
        correct = self.predict(self.data.test_x) == self.data.test_y
        out = {"accuracy": float(correct.float().mean())}
        if self.data.backdoor is not None:
            bd = self.data.backdoor
            out["backdoor_accuracy"] = float((self.predict(bd.test_x) == bd.test_y).float().mean())
        return out

    # -- whole run -----------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Play the remaining rounds (all of them unless resumed) and write ``result.json``."""
        cfg = self.config
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.rounds, initial=self.round, desc=self._label(), leave=False)
        start = time.perf_counter()
        played = 0
        while self.round < cfg.rounds and not (self.history and self.history[-1]["diverged"]):
            record = self.run_round()
            played += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(_postfix(record))
        if bar is not None:
            bar.close()
        elapsed = time.perf_counter() - start
        result = RunResult(
            config=cfg.to_dict(),
            history=self.history,
            final=self._summary(played, elapsed),
            attacker_pool=self.attacker_pool.tolist(),
            backdoor_info=self.data.backdoor.info if self.data.backdoor is not None else {},
        )
        if self.out_dir:
            with open(os.path.join(self.out_dir, RESULT), "w") as handle:
                json.dump(to_jsonable(result.to_dict()), handle, indent=1)
            finished = self.round >= cfg.rounds or result.final["diverged"]
            checkpoint = os.path.join(self.out_dir, CHECKPOINT)
            if finished and not self.keep_checkpoint and os.path.exists(checkpoint):
                # result.json holds the whole history; the model itself is not needed any more.
                os.remove(checkpoint)
        return result

    def _label(self) -> str:
        cfg = self.config
        attack = cfg.attack or "clean"
        return f"{cfg.aggregator}/{attack}@{cfg.attacker_fraction:g}"

    def _summary(self, played: int, elapsed: float) -> Dict[str, Any]:
        evaluated = [h for h in self.history if "accuracy" in h]
        final = dict(evaluated[-1]) if evaluated else {}
        diverged = bool(self.history and self.history[-1]["diverged"])
        stalled_from = _stalled_from(self.history)
        summary = {
            "rounds_played": self.round,
            "diverged": diverged,
            "stalled": stalled_from is not None,
            "stalled_from_round": stalled_from,
            "status": "diverged" if diverged else ("stalled" if stalled_from is not None else "ok"),
            "no_change_rounds": sum(1 for h in self.history if _no_change(h)),
            "accuracy": final.get("accuracy", math.nan),
            "backdoor_accuracy": final.get("backdoor_accuracy", math.nan),
            "accuracy_min": min((h["accuracy"] for h in evaluated), default=math.nan),
            "backdoor_accuracy_max": max(
                (h["backdoor_accuracy"] for h in evaluated if "backdoor_accuracy" in h),
                default=math.nan,
            ),
            "seed": self.config.seed,
            "batched": self.batched,
            "rounds_per_second": played / elapsed if elapsed > 0 and played else math.nan,
            "selects": self.rule.selects,
            "warnings": list(self.warnings),
        }
        # Detection rates only for rules that select clients; nan (shown as n/a) otherwise.
        with_attackers = [h for h in self.history if h.get("n_attackers", 0) and "tp" in h]
        tp = sum(h["tp"] for h in with_attackers)
        fn = sum(h["fn"] for h in with_attackers)
        reported = [h for h in self.history if "fp" in h]
        fp = sum(h["fp"] for h in reported)
        tn = sum(h["tn"] for h in reported)
        summary["tpr"] = tp / (tp + fn) if tp + fn else math.nan
        summary["fpr"] = fp / (fp + tn) if fp + tn else math.nan
        tail = [h["accuracy"] for h in evaluated[-3:]]
        summary["accuracy_last3_mean"] = float(np.mean(tail)) if tail else math.nan
        return summary


def _no_change(record: Dict[str, Any]) -> bool:
    """A round that left the global model exactly as it was (every update screened, an empty
    selection or a zero aggregate)."""
    return bool(record.get("all_screened")) or record.get("update_norm") == 0.0


def _stalled_from(history: List[Dict[str, Any]], min_rounds: int = 2) -> Optional[int]:
    """First round of the trailing run of no-change rounds, when the run ends frozen: at least
    ``min_rounds`` such rounds (or every round, for shorter runs) up to the last one."""
    trailing = 0
    for record in reversed(history):
        if not _no_change(record):
            break
        trailing += 1
    if trailing and trailing >= min(min_rounds, len(history)):
        return int(history[-trailing]["round"])
    return None


def _postfix(record: Dict[str, Any]) -> Dict[str, str]:
    out = {}
    for key, label in (("accuracy", "acc"), ("backdoor_accuracy", "bd"), ("tpr", "tpr")):
        value = record.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            out[label] = f"{value:.3f}"
    return out


def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def to_jsonable(obj):
    """Replace NaN/inf by None so the JSON stays standard."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return to_jsonable(obj.item())
    return obj

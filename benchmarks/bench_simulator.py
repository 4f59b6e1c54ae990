"""The simulator's speed: time per round against its floor, and batched vs one-by-one training.

    python benchmarks/bench_simulator.py [--device cuda] [--rounds 3] [--threads 1] [--part both]

1. Overhead (issue 8; target <= 1.3x): the scorecard's setting (Fashion-MNIST 12k subset, LeNet,
   N = 100, 20 per round, evaluation on 1,000 images every round) with several aggregators and
   attacks. Each full round (sampling, local training, attack, aggregation with its server
   context, evaluation, checkpoint-free bookkeeping) is timed against the floor measured in the
   same run: the very same clients' local training alone (same plans, same minibatches), without
   attack, aggregation or evaluation.
2. Batched vs sequential (Fashion-MNIST + LeNet, FedAvg, 1 local epoch, batch 32): the paper's
   N = 200 with 10 and 20 clients per round, and N = 3000 with 30 per round. Both paths run the
   same rounds from the same seed; the table reports rounds/s of each, the speed-up, and the
   largest difference between the two global models after the rounds.
"""

import argparse
import os
import time

import torch

from sf_ext.simulator import SimulationConfig, Simulator, build_federated_data

SCENARIOS = ((200, 10), (200, 20), (3000, 30))


def measure(config: SimulationConfig, data, rounds: int, batched: bool):
    config.batched = batched
    sim = Simulator(config, progress=False, data=data)
    if batched and not sim.batched:
        raise SystemExit("the model does not support batched training")
    sim.run_round()  # warm-up (vmap tracing, allocator)
    start = time.perf_counter()
    for _ in range(rounds):
        sim.run_round()
    return rounds / (time.perf_counter() - start), sim.global_params.cpu()


OVERHEAD_CASES = (
    ("fedavg", None, {}),
    ("flame", "sign_flip", {}),
    ("shield", "ipm", {"eps": 0.5}),
    ("matrix_mapping", "adaptive_mm", {"reference": "single"}),
    ("xmam", "lie", {}),
    ("fltrust", "fang_trim", {}),
    ("foolsgold", "min_max", {}),
    ("bulyan", "fang_krum", {}),
)


def overhead(args) -> None:
    """Full round vs the same clients' local training alone (the floor), same run."""
    import numpy as np

    from sf_ext.simulator.engine import round_seed

    base = dict(
        dataset=args.dataset,
        model=args.model,
        train_subset=12000,
        test_subset=1000,
        num_clients=100,
        clients_per_round=20,
        partition="dirichlet",
        alpha=0.5,
        rounds=10**6,
        eval_every=1,  # the scorecard evaluates every round
        device=args.device,
    )
    data = build_federated_data(SimulationConfig(**base))
    print("| aggregator | attack | floor s/round | full s/round | ratio | target |")
    print("|---|---|---|---|---|---|")
    for aggregator, attack, options in OVERHEAD_CASES:
        extra = {"aggregator": aggregator}
        if aggregator in ("bulyan",):
            extra["aggregator_options"] = {"f": "auto"}
        if attack:
            extra.update(attack=attack, attacker_fraction=0.2, attack_options=options)
        sim = Simulator(SimulationConfig(**base, **extra), progress=False, data=data)
        sim.run_round()  # warm-up: lazy imports, allocator
        full = floor = 0.0
        for _ in range(args.rounds):
            # The floor: exactly this round's clients and minibatches, trained and nothing else.
            rng = np.random.default_rng(round_seed(sim.config.seed, sim.round, 0))
            clients, is_attacker = sim.sample_clients(rng)
            plans = sim._plans(clients, is_attacker, rng)
            start = time.perf_counter()
            sim.trainer.train(sim.global_params, plans, rng, batched=sim.batched)
            floor += time.perf_counter() - start
            start = time.perf_counter()
            sim.run_round()
            full += time.perf_counter() - start
        ratio = full / floor
        verdict = "ok" if ratio <= 1.3 else "MISSED"
        print(
            f"| {aggregator} | {attack or 'none'} | {floor / args.rounds:.3f} | "
            f"{full / args.rounds:.3f} | {ratio:.2f} | <= 1.3: {verdict} |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--part", choices=["overhead", "batching", "both"], default="both")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # The shared data folder beside the checkout, as in the tests.
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ.setdefault("SF_EXT_DATA", os.path.join(here, "..", "..", "shared", "data"))
    if args.part in ("overhead", "both"):
        print(f"device={args.device} threads={args.threads}: time per round against its floor")
        overhead(args)
        print()
    if args.part == "overhead":
        return

    print(f"device={args.device} threads={args.threads} dataset={args.dataset} model={args.model}")
    print("| N | k | sequential rounds/s | batched rounds/s | speed-up | max |diff| |")
    print("|---|---|---|---|---|---|")
    for num_clients, per_round in SCENARIOS:
        config = SimulationConfig(
            dataset=args.dataset,
            model=args.model,
            num_clients=num_clients,
            clients_per_round=per_round,
            partition="dirichlet",
            alpha=1.0,
            min_client_size=5,
            rounds=10**6,  # never the "last" round: no evaluation inside the timing
            eval_every=10**6,
            device=args.device,
        )
        data = build_federated_data(config)
        seq, seq_params = measure(config, data, args.rounds, batched=False)
        bat, bat_params = measure(config, data, args.rounds, batched=True)
        diff = float((seq_params - bat_params).abs().max())
        row = [num_clients, per_round, f"{seq:.3f}", f"{bat:.3f}", f"{bat / seq:.2f}x"]
        row.append(f"{diff:.1e}")
        print("| " + " | ".join(str(v) for v in row) + " |")


if __name__ == "__main__":
    main()

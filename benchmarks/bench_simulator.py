"""Rounds per second of the simulator: clients trained as one vmapped batch vs one by one.

    python benchmarks/bench_simulator.py [--device cuda] [--rounds 3] [--threads 1]

Scenarios (Fashion-MNIST + LeNet, FedAvg, 1 local epoch, batch 32): the paper's N = 200 with 10
and 20 clients per round, and N = 3000 with 30 per round. Both paths run the same rounds from the
same seed; the table reports rounds/s of each, the speed-up, and the largest difference between
the two global models after the rounds (the paths compute the same thing).
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--model", default="lenet")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # The shared data folder beside the checkout, as in the tests.
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ.setdefault("SF_EXT_DATA", os.path.join(here, "..", "..", "shared", "data"))

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

"""The many-client simulator: exact FedAvg, batched = sequential, resumability, attacks end to end.

Runs on scikit-learn's digits with the small MLP so the whole file takes seconds.
"""

import json
import math
import os

import numpy as np
import pytest
import torch

from sf_ext.params import ParamLayout
from sf_ext.simulator import SimulationConfig, Simulator, build_federated_data, minibatch_schedule
from sf_ext.simulator.grid import load_grid
from sf_ext.simulator.run import run_grid

DIGITS = dict(dataset="digits", model="mlp", partition="iid", lr=0.1, batch_size=16)


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _config(**overrides) -> SimulationConfig:
    return SimulationConfig(**{**DIGITS, **overrides})


def test_fedavg_is_exact_when_every_client_takes_part():
    """k = N, no attack: the simulator equals a direct FedAvg with ``torch.optim.SGD``."""
    cfg = _config(num_clients=5, clients_per_round=5, rounds=2, local_epochs=2, batch_size=10_000)
    sim = Simulator(cfg, progress=False)
    data = sim.data
    model = data.build_model()
    layout = ParamLayout.from_module(model)
    global_vec = sim.global_params.clone()
    for _ in range(cfg.rounds):
        sim.run_round()
        # Direct computation: full-batch local GD (so minibatch order cannot matter), then the
        # sample-weighted mean of the client models.
        new_models, sizes = [], []
        for idx in data.client_indices:
            model.load_state_dict({k: v.clone() for k, v in layout.unflatten(global_vec).items()})
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
            for _ in range(cfg.local_epochs):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(
                    model(data.train_x[idx]), data.train_y[idx]
                )
                loss.backward()
                opt.step()
            new_models.append(layout.flatten(model.state_dict()))
            sizes.append(len(idx))
        weights = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
        global_vec = (weights[:, None] * torch.stack(new_models).double()).sum(0).float()
    assert torch.allclose(sim.global_params, global_vec, atol=1e-5)
    assert sim.history[-1]["n_kept"] == 5 and math.isnan(sim.history[-1]["tpr"])


def test_batched_training_matches_the_loop():
    """vmap over stacked clients (with PGD projection and unequal client sizes) = the loop."""
    cfg = _config(
        num_clients=12,
        clients_per_round=6,
        rounds=2,
        partition="dirichlet",
        alpha=0.5,
        min_client_size=5,
        momentum=0.9,
        attack="pgd",
        attacker_fraction=0.34,
        attack_options={"pgd_radius": 0.05, "pgd_every": 2},
        backdoor={"source_class": 7, "target_class": 1, "tail_fraction": 0.2},
    )
    data = build_federated_data(cfg)
    results = []
    for batched in (False, True):
        config = SimulationConfig.from_dict({**cfg.to_dict(), "batched": batched})
        sim = Simulator(config, progress=False, data=data)
        assert sim.batched == batched
        sim.run_round()
        sim.run_round()
        results.append(sim.global_params)
    assert torch.allclose(results[0], results[1], atol=1e-5)


def test_pgd_attackers_stay_in_the_ball():
    cfg = _config(
        num_clients=10,
        clients_per_round=5,
        rounds=1,
        attack="pgd_mr",
        attacker_fraction=0.4,
        attack_options={"pgd_radius": 0.1},
        backdoor={"source_class": 7, "target_class": 1, "tail_fraction": 0.2},
        aggregator="ndc",
    )
    sim = Simulator(cfg, progress=False)
    captured = {}
    original = sim._attack_updates

    def spy(updates, is_attacker, num_samples, generator):
        out = original(updates, is_attacker, num_samples, generator)
        captured["norms"] = out.norm(dim=1)
        captured["mask"] = torch.as_tensor(is_attacker)
        return out

    sim._attack_updates = spy
    sim.run_round()
    attacker_norms = captured["norms"][captured["mask"]]
    # PGDMR: scaled up by |D|/|D_i| and projected back, so exactly on the sphere.
    assert captured["mask"].sum() == 2
    assert torch.allclose(attacker_norms, torch.full_like(attacker_norms, 0.1), atol=1e-5)


def test_attackers_per_round_and_pool_modes():
    cfg = _config(num_clients=20, clients_per_round=10, attack="sign_flip", attacker_fraction=0.4)
    sim = Simulator(cfg, progress=False)
    assert len(sim.attacker_pool) == 8
    for r in range(5):
        clients, is_attacker = sim.sample_clients(np.random.default_rng(r))
        assert is_attacker.sum() == 4 and len(set(clients.tolist())) == 10
    pool = Simulator(_config(**{**cfg.to_dict(), "attacker_mode": "pool"}), progress=False)
    counts = [pool.sample_clients(np.random.default_rng(r))[1].sum() for r in range(20)]
    assert len(pool.attacker_pool) == 8 and min(counts) < max(counts)


def test_resume_continues_exactly(tmp_path):
    cfg = _config(num_clients=10, clients_per_round=4, rounds=3, aggregator="flame")
    straight = Simulator(cfg, progress=False)
    straight.run()
    out = str(tmp_path / "run")
    first = Simulator(cfg, out_dir=out, progress=False)
    first.run_round()
    first.run_round()
    with pytest.raises(ValueError, match="different settings"):
        Simulator(_config(**{**cfg.to_dict(), "lr": 0.2}), out_dir=out, progress=False)
    resumed = Simulator(cfg, out_dir=out, progress=False)
    assert resumed.round == 2
    result = resumed.run()
    assert torch.equal(resumed.global_params, straight.global_params)
    assert result.final["rounds_played"] == 3
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        assert len(handle.readlines()) == 3
    assert not os.path.exists(os.path.join(out, "checkpoint.pt"))  # history is in result.json
    with pytest.raises(ValueError, match="different settings"):
        Simulator(_config(**{**cfg.to_dict(), "lr": 0.2}), out_dir=out, progress=False)


def test_minibatch_schedule_covers_every_sample_once_per_epoch():
    rng = np.random.default_rng(0)
    batches = minibatch_schedule(np.arange(10, 35), 8, 2, None, rng)
    assert [len(b) for b in batches] == [8, 8, 8, 1] * 2
    assert sorted(np.concatenate(batches[:4]).tolist()) == list(range(10, 35))
    assert len(minibatch_schedule(np.arange(5), 2, 1, 7, rng)) == 7
    assert minibatch_schedule(np.arange(5), 2, 1, 0, rng) == []


def test_untargeted_attack_breaks_fedavg_but_not_krum():
    base = dict(num_clients=20, clients_per_round=10, rounds=3, pretrain_epochs=3)
    clean = Simulator(_config(**base), progress=False).run().final["accuracy"]
    attacked = dict(base, attack="same_value", attacker_fraction=0.3)
    fedavg = Simulator(_config(**attacked), progress=False).run().final
    krum = (
        Simulator(
            _config(**attacked, aggregator="multi_krum", aggregator_options={"f": "auto"}),
            progress=False,
        )
        .run()
        .final
    )
    assert fedavg["accuracy"] < 0.3 < clean - 0.3
    assert krum["accuracy"] > clean - 0.1 and krum["tpr"] == 1.0


def test_backdoor_rises_under_fedavg_and_stays_down_under_flame():
    """Short end-to-end run: black-box edge-case backdoor, 30 % attackers, 8 rounds."""
    base = dict(
        num_clients=20,
        clients_per_round=10,
        rounds=8,
        pretrain_epochs=3,
        attack="blackbox",
        attacker_fraction=0.3,
        backdoor={"source_class": 7, "target_class": 1, "tail_fraction": 0.3, "held_out": 0.4},
    )
    data = build_federated_data(_config(**base))
    start = Simulator(_config(**base), progress=False, data=data).evaluate()["backdoor_accuracy"]
    curves = {}
    for aggregator in ("fedavg", "flame"):
        sim = Simulator(_config(**base, aggregator=aggregator), progress=False, data=data)
        result = sim.run()
        curves[aggregator] = [h["backdoor_accuracy"] for h in result.history]
    fedavg, flame = np.mean(curves["fedavg"]), np.mean(curves["flame"])
    assert fedavg >= start + 0.2, curves
    assert flame <= start + 0.1 and flame < fedavg / 2, curves


def test_grid_runner_writes_tables_and_resumes(tmp_path):
    spec = {
        "name": "tiny",
        "base": {**DIGITS, "num_clients": 10, "clients_per_round": 5, "rounds": 2},
        "rows": [
            {"label": "No attack"},
            {"label": "Sign flip (40%)", "attack": "sign_flip", "attacker_fraction": 0.4},
        ],
        "columns": [
            {"label": "FedAvg*", "aggregator": "fedavg", "clean": True},
            {"label": "Matrix mapping", "aggregator": "matrix_mapping"},
        ],
    }
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(spec))
    grid = load_grid(str(path))
    cells = grid.cells()
    assert len(cells) == 4 and len({c.key for c in cells}) == 3  # FedAvg* is shared by both rows
    out = tmp_path / "out"
    results = run_grid(grid, str(out), progress=False)
    assert len(results) == 3
    table = (out / "table.md").read_text()
    assert "| Sign flip (40%) |" in table and "Matrix mapping" in table
    assert len((out / "results.csv").read_text().splitlines()) == 5
    assert len(list((out / "plots").glob("*.png"))) == 2
    # A second call reads every finished cell back instead of training again.
    stamp = os.path.getmtime(next((out / "cells").glob("*/result.json")))
    run_grid(grid, str(out), progress=False)
    assert os.path.getmtime(next((out / "cells").glob("*/result.json"))) == stamp

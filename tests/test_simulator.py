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
    assert sim.history[-1]["n_kept"] == 5
    assert "tpr" not in sim.history[-1]  # FedAvg selects nobody: no detection rates at all


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
    from sf_ext.simulator import engine

    def no_training(self):
        raise AssertionError("a finished cell was trained again")

    original = engine.Simulator.run
    engine.Simulator.run = no_training
    try:
        again = run_grid(grid, str(out), progress=False)
    finally:
        engine.Simulator.run = original
    assert again.keys() == results.keys()


# ------------------------------------------------------------------ registry, honesty, validation


def test_a_registered_custom_attack_runs_in_the_simulator():
    from sf_ext.attacks import ATTACKS, register_attack

    calls = []

    @register_attack("_zero_out", single_client=True, replace=True)
    def zero_out(updates, attackers, keep=0.0):
        calls.append(int(torch.as_tensor(attackers).sum()))
        out = updates.clone()
        out[torch.as_tensor(attackers)] = keep
        return out

    try:
        cfg = _config(
            num_clients=10,
            clients_per_round=5,
            rounds=2,
            attack="_zero_out",
            attacker_fraction=0.4,
            attack_options={"keep": 0.0},
        )
        result = Simulator(cfg, progress=False).run()
        assert calls == [2, 2] and result.final["rounds_played"] == 2
        with pytest.raises(ValueError, match="unknown option 'kep'.*did you mean 'keep'"):
            _config(attack="_zero_out", attacker_fraction=0.2, attack_options={"kep": 1.0})
    finally:
        ATTACKS.pop("_zero_out", None)


ALL_ATTACKS = [
    "sign_flip",
    "same_value",
    "gaussian",
    "lie",
    "min_max",
    "min_sum",
    "ipm",
    "fang_krum",
    "fang_trim",
    "adaptive_mm",
    "blackbox",
    "pgd",
    "pgd_mr",
    "pixel",
    "scaling",
]


@pytest.mark.parametrize("attack", ALL_ATTACKS)
def test_every_attack_runs_end_to_end(attack):
    from sf_ext.attacks import ATTACKS

    assert set(ALL_ATTACKS) <= set(ATTACKS)
    backdoor = {
        "kind": "pixel" if attack == "pixel" else "edge_case",
        "source_class": 7,
        "target_class": 1,
        "tail_fraction": 0.2,
        "n_poison": 40,
    }
    cfg = _config(
        num_clients=10,
        clients_per_round=5,
        rounds=1,
        attack=attack,
        attacker_fraction=0.4,
        backdoor=backdoor,
        aggregator="multi_krum",
        aggregator_options={"f": "auto"},
    )
    sim = Simulator(cfg, progress=False)
    record = sim.run_round()
    assert record["n_attackers"] == 2 and "accuracy" in record and "tpr" in record
    if attack in ("adaptive_mm", "fang_krum"):
        assert "attack_lambda" in record


def test_stalled_run_is_reported_as_such():
    from sf_ext.aggregators import AGGREGATORS, AggregationReport, register_aggregator

    @register_aggregator("_freeze", replace=True)
    def freeze(updates, num_samples=None):
        n = updates.shape[0]
        report = AggregationReport("_freeze", torch.zeros(n), None, torch.zeros(n, dtype=bool))
        return torch.zeros(updates.shape[1]), report

    try:
        result = Simulator(
            _config(num_clients=6, clients_per_round=3, rounds=4, aggregator="_freeze"),
            progress=False,
        ).run()
    finally:
        AGGREGATORS.pop("_freeze", None)
    final = result.final
    assert final["status"] == "stalled" and final["stalled"] and final["stalled_from_round"] == 0
    assert final["no_change_rounds"] == 4 and not final["diverged"]
    healthy = Simulator(_config(num_clients=6, clients_per_round=3, rounds=2), progress=False)
    assert healthy.run().final["status"] == "ok"


def test_trimmed_mean_below_its_breakdown_warns_before_running():
    cfg = _config(
        num_clients=20,
        clients_per_round=10,
        rounds=1,
        aggregator="trimmed_mean",
        attack="sign_flip",
        attacker_fraction=0.4,
    )
    with pytest.warns(RuntimeWarning, match="tolerates at most 1 attackers among 10"):
        sim = Simulator(cfg, progress=False)
    final = sim.run().final
    assert final["warnings"] == sim.warnings and sim.warnings[0].startswith("trimmed_mean")
    ok = _config(**{**cfg.to_dict(), "aggregator_options": {"f": 4}})
    import warnings as _w

    with _w.catch_warnings():
        _w.simplefilter("error")
        Simulator(ok, progress=False)  # f = 4 covers the 4 attackers: no warning


def test_an_overflowing_mean_of_finite_updates_marks_the_run_diverged():
    """The simulator used to re-raise when the updates were finite but the mean was not."""
    from sf_ext.aggregators import AGGREGATORS, register_aggregator
    from sf_ext.aggregators._validate import NonFiniteAggregate

    seen = []

    @register_aggregator("_overflowing", replace=True)
    def overflowing(updates, num_samples=None):
        seen.append(bool(torch.isfinite(updates).all()))
        raise NonFiniteAggregate("the weighted mean overflowed float32")

    try:
        result = Simulator(
            _config(num_clients=6, clients_per_round=3, rounds=3, aggregator="_overflowing"),
            progress=False,
        ).run()
    finally:
        AGGREGATORS.pop("_overflowing", None)
    assert seen == [True]  # finite inputs, one round, then the run stops
    assert result.final["diverged"] and result.final["status"] == "diverged"
    assert "overflowed" in result.history[-1]["divergence"]
    # A NaN-spreading attack against plain FedAvg ends the same way.
    nan_run = Simulator(
        _config(
            num_clients=6,
            clients_per_round=3,
            rounds=3,
            attack="same_value",
            attacker_fraction=0.34,
            attack_options={"value": float("nan")},
        ),
        progress=False,
    ).run()
    assert nan_run.final["status"] == "diverged" and nan_run.final["rounds_played"] == 1


def test_fltrust_trains_a_root_update_every_round():
    cfg = _config(
        num_clients=10,
        clients_per_round=5,
        rounds=2,
        aggregator="fltrust",
        root_size=30,
        attack="sign_flip",
        attacker_fraction=0.4,
    )
    sim = Simulator(cfg, progress=False)
    assert len(sim.root_indices) == 30
    assert set(sim.root_indices.tolist()) <= set(sim.data.clean_indices().tolist())
    record = sim.run_round()
    assert record["tpr"] == 1.0  # sign-flipped updates point away from the server's own
    assert (
        Simulator(_config(num_clients=10, clients_per_round=5), progress=False).root_indices is None
    )


def test_server_lr_lr_decay_and_eval_every():
    base = dict(num_clients=6, clients_per_round=6, rounds=3, batch_size=10_000)
    full = Simulator(_config(**base), progress=False)
    start = full.global_params.clone()
    full.run_round()
    half = Simulator(_config(**base, server_lr=0.5), progress=False)
    half.run_round()
    torch.testing.assert_close(half.global_params - start, 0.5 * (full.global_params - start))
    decayed = Simulator(_config(**base, lr_decay=0.5, eval_every=2), progress=False)
    result = decayed.run()
    assert [h["lr"] for h in result.history] == [0.1, 0.05, 0.025]
    assert ["accuracy" in h for h in result.history] == [False, True, True]


def test_pretrained_model_is_cached_and_reused(tmp_path, monkeypatch):
    cfg = _config(num_clients=6, clients_per_round=3, rounds=1, pretrain_epochs=1)
    first = Simulator(cfg, progress=False, pretrained_cache=str(tmp_path))
    assert len(list(tmp_path.glob("pretrained-*.pt"))) == 1
    from sf_ext.simulator import training

    def fail(*args, **kwargs):
        raise AssertionError("pretraining ran again")

    monkeypatch.setattr(training.LocalTrainer, "train", fail)
    second = Simulator(cfg, progress=False, pretrained_cache=str(tmp_path))
    assert torch.equal(first.global_params, second.global_params)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"rounds": "two"}, "rounds must be an integer, got the string 'two'"),
        ({"lr": "0.05"}, "lr must be a number, got the string '0.05'"),
        ({"aggregator": "flam"}, "unknown aggregator 'flam' \\(did you mean 'flame'\\?\\)"),
        (
            {"aggregator_options": {"noise_lamda": 0}, "aggregator": "flame"},
            "unknown option 'noise_lamda'.*did you mean 'noise_lambda'",
        ),
        ({"attack": "sign_flp"}, "did you mean 'sign_flip'"),
        ({"roundz": 3}, "unknown simulation setting 'roundz' \\(did you mean 'rounds'\\?\\)"),
        ({"attack_options": {"scale": 2.0}}, "attack_options .* given without an attack"),
    ],
)
def test_configs_are_validated_by_name_and_type(settings, message):
    with pytest.raises(ValueError, match=message):
        SimulationConfig.from_dict({**DIGITS, **settings})


def _write_grid(tmp_path, **extra):
    spec = {
        "name": "tiny",
        "base": {**DIGITS, "num_clients": 6, "clients_per_round": 3, "rounds": 1},
        "rows": [{"label": "No attack"}],
        "columns": [{"label": "FedAvg", "aggregator": "fedavg"}],
        **extra,
    }
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(spec))
    return str(path)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--only", "nosuchcell"], "matches no cell"),
        (["--set", "rounds=two"], "rounds must be an integer"),
        (["--set", "rounds"], "--set expects key=value"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_simulate_command_line_mistakes_exit_2_with_a_message(tmp_path, capsys, argv, message):
    from sf_ext.simulator.run import main

    path = _write_grid(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([path, "--out", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


def test_simulate_rejects_unknown_sections_and_missing_files(tmp_path, capsys):
    from sf_ext.simulator.run import main

    path = _write_grid(tmp_path, basee={"rounds": 5})
    with pytest.raises(SystemExit) as exit_info:
        main([path, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "unknown section 'basee' (did you mean 'base'?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")])
    assert "experiment file not found" in capsys.readouterr().err
    assert main([_write_grid(tmp_path), "--list"]) == 0
    assert "fedavg-clean-" in capsys.readouterr().out


def test_simulate_never_replaces_another_experiments_tables_silently(tmp_path, capsys):
    from sf_ext.outputs import read_manifest
    from sf_ext.simulator.run import main

    path, out = _write_grid(tmp_path), tmp_path / "out"
    assert main([path, "--out", str(out), "--no-progress"]) == 0
    first = (out / "results.csv").read_text()
    manifest = read_manifest(out)
    assert manifest["status"] == "complete"
    assert {"results.csv", "table.md", "grid.json"} <= set(manifest["files"])
    assert not any(name.startswith("cells/") for name in manifest["files"])
    capsys.readouterr()
    # Same experiment: resumed (the finished cell is read back, not rerun).
    assert main([path, "--out", str(out), "--no-progress"]) == 0
    assert (out / "results.csv").read_text() == first
    # Another experiment into the same folder: refused, nothing touched.
    with pytest.raises(SystemExit) as exit_info:
        main([path, "--out", str(out), "--no-progress", "--set", "rounds=2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err
    assert (out / "results.csv").read_text() == first
    cells_before = sorted(p.name for p in (out / "cells").iterdir())
    # --overwrite: the new experiment's tables; the earlier cell is kept (stored by its hash).
    assert main([path, "--out", str(out), "--no-progress", "--set", "rounds=2", "--overwrite"]) == 0
    assert (out / "results.csv").read_text() != first
    cells_after = sorted(p.name for p in (out / "cells").iterdir())
    assert set(cells_before) < set(cells_after)
    # A folder holding files sf-ext did not write is refused too.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main([path, "--out", str(foreign), "--no-progress"])
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1

"""The robustness scorecard: cells, worst case over seeds, criteria, outputs, resumption."""

import json
import math

import pytest
import torch

from sf_ext.simulator.scorecard import cell_metrics, load_card, main, run_card

DIGITS = dict(
    dataset="digits",
    model="mlp",
    partition="iid",
    lr=0.1,
    batch_size=16,
    num_clients=10,
    clients_per_round=5,
    rounds=2,
)


def _card(tmp_path, **extra):
    spec = {
        "name": "tiny_card",
        "base": DIGITS,
        "seeds": [0, 1],
        "settings": [
            {"key": "iid", "label": "digits IID"},
            {
                "key": "dir",
                "label": "digits Dirichlet 0.5",
                "set": {"partition": "dirichlet", "alpha": 0.5, "min_client_size": 5},
                "defenses": ["multi_krum"],
                "seeds": [0],
            },
        ],
        "defenses": [
            {"key": "fedavg", "label": "FedAvg", "aggregator": "fedavg"},
            {
                "key": "multi_krum",
                "label": "Multi-Krum",
                "aggregator": "multi_krum",
                "aggregator_options": {"f": "auto"},
            },
        ],
        "attacks": [
            {"key": "none", "label": "No attack"},
            {
                "key": "flip-40",
                "label": "Sign flip 40%",
                "attack": "sign_flip",
                "attacker_fraction": 0.4,
            },
            {
                "key": "bd-20",
                "label": "Black-box 20%",
                "attack": "blackbox",
                "attacker_fraction": 0.2,
                "backdoor": {"source_class": 7, "target_class": 1, "tail_fraction": 0.2},
            },
        ],
        **extra,
    }
    path = tmp_path / "card.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_card_runs_reports_the_worst_seed_and_resumes(tmp_path):
    card = load_card(_card(tmp_path))
    references, cells = card.cells()
    # FedAvg* for (iid, 0), (iid, 1), (dir, 0), and again with the backdoor row's data (its
    # edge-case tail leaves the clean pool, so its reference must lose it too).
    assert len(references) == 6
    assert len(cells) == 2 * 3 * 2 + 1 * 3 * 1
    out = tmp_path / "out"
    summary = run_card(card, str(out), progress=False)
    assert summary["complete"] and summary["cells_done"] == 15
    for name in (
        "scorecard.md",
        "scorecard.csv",
        "scorecard.json",
        "heatmap-iid.png",
        "heatmap-dir.png",
    ):
        assert (out / name).exists(), name
    # The worst case is the minimum over the seeds' own differences to their own FedAvg*.
    entry = next(
        e
        for e in summary["entries"]
        if (e["setting"], e["attack"], e["defense"]) == ("iid", "flip-40", "fedavg")
    )
    seeds = [
        r
        for r in summary["per_seed"]
        if (r["setting"], r["attack"], r["defense"]) == ("iid", "flip-40", "fedavg")
    ]
    assert sorted(r["seed"] for r in seeds) == [0, 1]
    assert entry["d_final_worst"] == min(r["d_final"] for r in seeds)
    assert entry["d_final_mean"] == pytest.approx(sum(r["d_final"] for r in seeds) / 2)
    by_key = {c.key: c for c in references}
    for row in seeds:
        cell = next(c for c in cells if c.key == row["cell"])
        ref = json.loads((out / "cells" / cell.reference / "result.json").read_text())
        assert row["reference_accuracy"] == ref["final"]["accuracy"]
        assert by_key[cell.reference].config.backdoor is None  # the sign-flip row's reference
    bd_cell = next(c for c in cells if c.attack == "bd-20")
    assert by_key[bd_cell.reference].config.backdoor == bd_cell.config.backdoor
    # FedAvg does not select: no detection rates, no FPR criterion without attack.
    clean = next(
        e
        for e in summary["entries"]
        if (e["setting"], e["attack"], e["defense"]) == ("iid", "none", "fedavg")
    )
    assert not clean["selects"] and math.isnan(clean["fpr_worst"]) and clean["passes"] is None
    krum_clean = next(
        e
        for e in summary["entries"]
        if (e["setting"], e["attack"], e["defense"]) == ("iid", "none", "multi_krum")
    )
    assert krum_clean["passes"] == (krum_clean["fpr_worst"] <= 0.10)
    # Backdoor entries: the excess over max(5 %, the same seed's FedAvg* rate), worst seed.
    for bd_entry in (e for e in summary["entries"] if e["kind"] == "backdoor"):
        rows = [
            r
            for r in summary["per_seed"]
            if (r["setting"], r["attack"], r["defense"])
            == (bd_entry["setting"], bd_entry["attack"], bd_entry["defense"])
        ]
        over = max(r["bd_final"] - max(0.05, r["reference_bd"]) for r in rows)
        assert bd_entry["bd_over_limit_worst"] == pytest.approx(over)
        assert bd_entry["passes"] == (over <= 1e-9)
    table = (out / "scorecard.md").read_text()
    assert "## digits IID" in table and "| Sign flip 40% |" in table and "n/a" in table
    # Re-running trains nothing: every cell is read back.
    from sf_ext.simulator import engine

    original = engine.Simulator.run
    engine.Simulator.run = lambda self: (_ for _ in ()).throw(AssertionError("retrained"))
    try:
        again = run_card(card, str(out), progress=False)
    finally:
        engine.Simulator.run = original
    assert again["entries"] == summary["entries"]


def _result(accuracies, final=None, **final_extra):
    history = [{"round": i, "accuracy": a} for i, a in enumerate(accuracies)]
    final = final or {
        "accuracy": accuracies[-1],
        "status": "ok",
        "selects": True,
        "tpr": 1.0,
        "fpr": 0.0,
        **final_extra,
    }
    return {"history": history, "final": final}


def test_cell_metrics_are_round_matched_and_count_divergence_as_zero():
    reference = _result([0.80, 0.85, 0.90])
    dipped = _result([0.50, 0.84, 0.89])
    metrics = cell_metrics(dipped, reference)
    assert metrics["d_final"] == pytest.approx(-1.0)
    assert metrics["d_low"] == pytest.approx(-30.0)  # round 0: 0.50 against 0.80
    diverged = _result(
        [0.7], final={"accuracy": None, "diverged": True, "status": "diverged", "selects": False}
    )
    metrics = cell_metrics(diverged, reference)
    assert metrics["d_final"] == pytest.approx(-90.0) and metrics["status"] == "diverged"
    assert math.isnan(metrics["tpr"])


def test_card_mistakes_are_caught_before_anything_runs(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown section 'setings'"):
        load_card(_card(tmp_path, setings=[]))
    bad = _card(tmp_path)
    spec = json.loads(open(bad).read())
    spec["defenses"][1]["aggregator_options"] = {"f": "auto", "mm": 3}
    (tmp_path / "bad.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="multi_krum.*unknown option 'mm'.*did you mean 'm'"):
        load_card(str(tmp_path / "bad.json"))
    spec = json.loads(open(bad).read())
    spec["settings"][1]["defenses"] = ["flame"]
    (tmp_path / "bad2.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="unknown defense keys \\['flame'\\]"):
        load_card(str(tmp_path / "bad2.json"))
    with pytest.raises(SystemExit) as exit_info:
        main([bad, "--out", str(tmp_path / "o"), "--only", "nothing-like-this"])
    assert exit_info.value.code == 2 and "matches no cell" in capsys.readouterr().err
    assert main([bad, "--list"]) == 0
    assert "6 FedAvg* references + 15 cells" in capsys.readouterr().out


def test_a_failing_cell_is_reported_and_the_card_goes_on(tmp_path):
    spec = json.loads(open(_card(tmp_path)).read())
    # Dirichlet 0.01 over 10 clients cannot give every client 5 samples: those cells fail.
    spec["settings"][1]["set"]["alpha"] = 0.01
    spec["settings"][1]["set"]["min_client_size"] = 100
    (tmp_path / "failing.json").write_text(json.dumps(spec))
    card = load_card(str(tmp_path / "failing.json"))
    out = tmp_path / "out"
    summary = run_card(card, str(out), progress=False)
    assert summary["failed_cells"] and all(k.startswith("dir-") for k in summary["failed_cells"])
    assert summary["cells_done"] == 12  # the IID setting finished all its cells
    failure = json.loads((out / "cells" / summary["failed_cells"][0] / "failed.json").read_text())
    assert "min_size" in failure["error"]
    assert "cells failed" in (out / "scorecard.md").read_text()


def test_priority_defenses_run_first(tmp_path, monkeypatch):
    spec = json.loads(open(_card(tmp_path)).read())
    spec["priority"] = ["multi_krum"]
    (tmp_path / "prio.json").write_text(json.dumps(spec))
    card = load_card(str(tmp_path / "prio.json"))
    order = []
    from sf_ext.simulator import scorecard

    monkeypatch.setattr(scorecard, "_run_one", lambda job: order.append(job[1]) or (job[1], None))
    run_card(card, str(tmp_path / "out"), progress=False)
    names = [o.split("/")[-1] for o in order]
    krum = [i for i, n in enumerate(names) if "-multi-krum-" in n]
    plain = [i for i, n in enumerate(names) if "-fedavg-" in n and "-none-" not in n]
    assert krum and plain and max(krum) < min(plain)
    # The rest run seed by seed: every seed-0 cell before any seed-1 cell.
    seed_of = [
        int(n.rsplit("-", 2)[-2][1:]) for n in names if "-fedavg-" in n and "-none-" not in n
    ]
    assert seed_of == sorted(seed_of) and set(seed_of) == {0, 1}
    spec["priority"] = ["flame"]
    (tmp_path / "bad.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="unknown defense keys in 'priority'"):
        load_card(str(tmp_path / "bad.json"))


def test_scorecard_refuses_a_folder_holding_another_card(tmp_path, capsys):
    from sf_ext.outputs import read_manifest

    out = tmp_path / "out"
    card = _card(tmp_path)
    assert main([card, "--out", str(out), "--only", "iid-none-fedavg", "--no-progress"]) == 0
    summary = (out / "scorecard.md").read_text()
    assert "scorecard.md" in read_manifest(out)["files"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([card, "--out", str(out), "--seeds", "5", "--summarize"])
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "scorecard.md").read_text() == summary
    # The same card (another --only filter) resumes in the same folder.
    assert main([card, "--out", str(out), "--summarize"]) == 0


def test_backdoor_criterion_is_taken_per_seed_against_the_clean_models_own_rate():
    from sf_ext.simulator.scorecard import _passes

    def entry(pairs):
        # (backdoor accuracy, FedAvg*'s backdoor accuracy on the same seed) per seed
        over = max(bd - max(0.05, ref) for bd, ref in pairs)
        return {
            "kind": "backdoor",
            "bd_final_worst": max(b for b, _ in pairs),
            "bd_over_limit_worst": over,
        }

    assert _passes(entry([(0.056, 0.056), (0.01, 0.0)]))  # at FedAvg*'s own 5.6 %: passes
    assert not _passes(entry([(0.056, 0.0), (0.01, 0.056)]))  # 5.6 % where FedAvg* had 0
    assert not _passes(entry([(0.08, 0.056)]))
    assert _passes(entry([(0.05, 0.0)]))

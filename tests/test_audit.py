"""``sf-ext audit`` end to end on scikit-learn's digits (SecretFlow debug mode, seconds)."""

import csv
import time

import pytest

pytestmark = pytest.mark.secretflow

from sf_ext.dlg.audit import AuditOptions, audit_settings, main, verdict  # noqa: E402
from sf_ext.dlg.settings import FLSetting  # noqa: E402

ARGS = [
    "--dataset", "digits", "--model", "mlp", "--samples", "120", "--epochs", "2",
    "--batch-size", "2", "--optimizer", "sgd", "--lr", "0.1",
    "--strategy", "fed_avg_w_prune", "--prune-percent", "50", "--aggregator", "secure_prune",
    "--iters", "10", "--restarts", "0", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def judge_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def isolated_cache(judge_cache, monkeypatch):
    monkeypatch.setenv("SF_EXT_CACHE", str(judge_cache))


def _rows(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_audit_runs_end_to_end_and_reports_a_verdict_per_setting(
    sf_parties, tmp_path, isolated_cache, capsys
):
    out = tmp_path / "audit"
    started = time.perf_counter()
    assert main(ARGS + ["--out", str(out)]) == 0
    first_run = time.perf_counter() - started
    printed = capsys.readouterr().out
    lines = {line.split()[0]: line for line in printed.splitlines() if line.strip()}
    assert {"yours", "no-defence", "plain-aggregation"} <= set(lines)
    # An MLP's first layer is linear: one client's single SGD step gives its images away.
    assert lines["no-defence"].split()[3] == "LEAKS:"
    report = (out / "report.md").read_text()
    assert report.count("- **") == 3 and "![overview](overview.png)" in report
    assert (out / "overview.png").stat().st_size > 0
    views = _rows(out / "views.csv")
    images = _rows(out / "images.csv")
    assert len(images) == sum(int(v["items"]) for v in views)  # every image of every attack
    settings = {v["setting"] for v in views}
    assert settings == {"yours", "no-defence", "plain-aggregation"}
    # Under SecurePruneAggregator the server holds the aggregate of both clients' batches.
    yours = [v for v in views if v["setting"] == "yours"]
    assert {v["view"] for v in yours} == {"aggregate of 2 clients"}
    assert {v["attacker"] for v in yours} == {"naive", "mask-aware"}
    plain = [v for v in views if v["setting"] == "no-defence"]
    assert {v["view"] for v in plain} == {"alice's upload"}
    assert {v["attack"] for v in plain} == {
        "multistep-cosine",
        "multistep-cosine-layer",
        "idlg-l2-layer",
    }
    for v in views:
        figure = (
            out
            / "figures"
            / (
                f"{v['setting']}_{v['round']}_"
                f"{'aggregate' if v['view'].startswith('aggregate') else 'alice-upload'}_"
                f"{v['attacker']}_{v['attack']}.png"
            )
        )
        assert figure.is_file()
    # The same command again reads everything back instead of training and attacking again.
    started = time.perf_counter()
    assert main(ARGS + ["--out", str(out)]) == 0
    assert time.perf_counter() - started < first_run
    assert (out / "report.md").read_text().split("Wall time")[0] == report.split("Wall time")[0]


def test_audit_refuses_to_overwrite_an_audit_with_other_settings(
    sf_parties, tmp_path, isolated_cache, capsys
):
    out = tmp_path / "audit"
    args = ARGS + ["--out", str(out), "--compare", "no-defence", "--rounds", "first"]
    assert main(args + ["--attacks", "multistep", "--distances", "cosine"]) == 0
    report = (out / "report.md").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--attacks", "multistep", "--distances", "cosine", "--lr", "0.05"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and "lr" in err
    assert (out / "report.md").read_text() == report


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--compare", "everything"], "compare: unknown ['everything']"),
        (["--batch-size", "0"], "batch_size must be a positive integer"),
        (["--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
        (["--dataset", "no-such-data"], "unknown dataset 'no-such-data'"),
        (["--split", "0.7,0.7"], "split needs at least two positive shares summing to 1"),
        (["--arrays", "missing.npz"], "missing.npz does not exist"),
    ],
)
def test_audit_bad_argument_gives_a_clear_message_and_exit_2(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(ARGS + ["--out", str(tmp_path / "out")] + extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_comparison_settings_isolate_each_defence():
    user = FLSetting(strategy="fed_avg_w_prune", aggregator="secure_prune", dp_noise_multiplier=0.1)
    settings = dict(audit_settings(user, ("no-defence", "plain-aggregation", "no-prune")))
    assert settings["no-defence"].strategy == "fed_avg_w"
    assert settings["no-defence"].aggregator == "plain"
    assert settings["no-defence"].dp_noise_multiplier == 0
    assert settings["plain-aggregation"].strategy == "fed_avg_w_prune"
    assert settings["plain-aggregation"].aggregator == "plain"
    assert settings["no-prune"].aggregator == "secure"
    # A comparison identical to the user's own setting is not trained twice.
    plain = FLSetting(strategy="fed_avg_w", aggregator="plain")
    assert [k for k, _ in audit_settings(plain, ("no-defence", "plain-aggregation"))] == ["yours"]
    with pytest.raises(ValueError, match="rounds: unknown"):
        AuditOptions(rounds=("middle",))


def test_verdict_wording_separates_specific_class_level_and_nothing():
    class Outcome:
        def __init__(self, specific, recognized, items):
            from sf_ext.dlg.metrics import ReconstructionScore

            self.specific, self.recognized, self.items = specific, recognized, items
            self.round, self.view, self.attacker, self.attack = "e0_s0", "v", "naive", "a"
            self.score = ReconstructionScore(
                0.1, 12.0, 0.4, 1.0, [12.0] * items, [0.4] * items, list(range(items))
            )

    assert verdict([Outcome(3, 3, 4)]).startswith("LEAKS: 3 of 4")
    assert verdict([Outcome(1, 2, 80)]).startswith("PARTIAL LEAK: 1 of 80")
    assert verdict([Outcome(0, 5, 64)]).startswith("CLASS-LEVEL ONLY: 5 of 64")
    assert verdict([Outcome(0, 0, 8)]).startswith("nothing recognizable: 0 of 8")
    # The strongest attack decides: specific beats more class-level recognitions.
    assert verdict([Outcome(0, 6, 8), Outcome(2, 2, 8)]).startswith("LEAKS: 2 of 8")

"""``python -m sf_ext.demo`` (``make demo``): argument checks, the output guard, the privacy panel."""

import json

import pytest
import torch

from sf_ext.demo import _settings, build_parser, main
from sf_ext.outputs import prepare_output_dir


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prune-percent", "150"], "prune_percent must be in (0, 100)"),
        (["--prune-end-rate", "0"], "prune_end_rate must be in (0, 1]"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--aggregate-freq", "two"], "invalid int value: 'two'"),
        (["--prune-scope", "everything"], "invalid choice: 'everything'"),
    ],
)
def test_bad_argument_gives_a_clear_message_and_exit_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--out", str(tmp_path / "demo")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "demo").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cuda", "--out", str(tmp_path / "demo")])
    assert exit_info.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_a_folder_holding_another_demo_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "demo"
    earlier = build_parser().parse_args(["--out", str(out), "--epochs", "3"])
    folder = prepare_output_dir(out, _settings(earlier))
    (out / "results.json").write_text('{"earlier": true}')
    folder.complete(out / "results.json")
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(out), "--epochs", "4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--overwrite" in err and "epochs: 3 -> 4" in err
    assert json.loads((out / "results.json").read_text()) == {"earlier": True}


@pytest.mark.secretflow
@pytest.mark.slow
def test_demo_trains_both_strategies_and_shows_the_privacy_panel(sf_parties, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["--dataset", "digits", "--epochs", "2", "--attack-iters", "15", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "results.json").read_text())
    assert set(record["results"]) == {"fed_avg_w", "fed_avg_w_prune"}
    assert record["results"]["fed_avg_w_prune"]["final_kept_fraction"] == pytest.approx(
        0.95**2, abs=0.01
    )
    labels = [row["label"] for row in record["privacy"]["rows"]]
    assert labels[0] == "fed_avg_w, naive"
    assert labels[1].startswith("fed_avg_w_prune, naive") and "95% kept" in labels[1]
    assert labels[2].startswith("fed_avg_w_prune, mask-aware")
    assert record["privacy"]["round"] == "e1_s0"
    assert "Privacy panel" in printed and "fed_avg_w_prune, mask-aware" in printed
    for name in ("demo.png", "accuracy_per_epoch.png", "privacy_panel.png"):
        assert (out / name).stat().st_size > 0
    # The same command again reads the results back instead of training again.
    assert main(argv) == 0
    assert "reading them back" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text()) == record

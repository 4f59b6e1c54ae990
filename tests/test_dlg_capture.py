"""Capturing real SecretFlow rounds: what clients computed, what the server held, and its views.

Small jobs on scikit-learn's digits (an MLP), in SecretFlow's debug mode.
"""

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.secretflow

sf = pytest.importorskip("secretflow")

from sf_ext.dlg.captured import load_round  # noqa: E402
from sf_ext.dlg.fl_run import run_setting  # noqa: E402
from sf_ext.dlg.settings import FLSetting  # noqa: E402
from sf_ext.dlg.views import aggregate_view, decode_keepers, server_views, upload_view  # noqa: E402

BASE = FLSetting(
    dataset="digits", samples=120, model="mlp", optimizer="sgd", lr=0.1, batch_size=3, epochs=2
)


@pytest.fixture(scope="module")
def pruned_plain(sf_parties, tmp_path_factory):
    setting = BASE.replace(strategy="fed_avg_w_prune", prune_percent=50, aggregator="plain")
    run = run_setting(setting, tmp_path_factory.mktemp("plain"), [(0, 0), (1, 0), (1, 15)], False)
    return run


@pytest.fixture(scope="module")
def pruned_secure(sf_parties, tmp_path_factory):
    setting = BASE.replace(
        strategy="fed_avg_w_prune",
        prune_percent=50,
        aggregator="secure_prune",
        optimizer="adam",
        lr=0.01,
    )
    return run_setting(setting, tmp_path_factory.mktemp("secure_prune"), [(1, 0)], False)


def test_captured_client_round_is_what_the_client_computed(pruned_plain):
    first = load_round(pruned_plain.rounds[0])
    alice = first.clients["alice"]
    assert alice.meta["dataset"] == "digits" and alice.meta["optimizer"] == "SGD"
    assert alice.optimizer().lr == pytest.approx(0.1)
    for recomputed, recorded in zip(alice.recompute_gradient(), alice.gradient):
        assert torch.allclose(recomputed, recorded, atol=1e-6)
    # One plain SGD step before any pruning: the upload is exactly -lr times the gradient.
    for update, grad in zip(alice.update(), alice.gradient):
        assert torch.allclose(update, -0.1 * grad, atol=1e-5)
    assert alice.kept_fraction() == 1.0 and alice.optimizer_state is None  # a fresh optimizer


def test_pruned_round_trains_with_the_old_mask_and_an_epoch_end_prunes_before_the_upload(
    pruned_plain,
):
    epoch_start = load_round(pruned_plain.rounds[1]).clients["alice"]  # e1_s0
    epoch_end = load_round(pruned_plain.rounds[2]).clients["alice"]  # e1_s15: last round of e1
    assert epoch_start.kept_fraction() == pytest.approx(0.5, abs=0.01)
    assert epoch_end.kept_fraction() == pytest.approx(0.25, abs=0.01)  # pruned again, then sent
    held = [m for m in epoch_end.train_masks if m is not None]
    assert sum(int(m.sum()) for m in held) / sum(m.numel() for m in held) == pytest.approx(
        0.5, abs=0.01
    )
    # Within a round that does not end an epoch, the update is the masked gradient step.
    for update, grad, mask in zip(epoch_start.update(), epoch_start.gradient, epoch_start.masks()):
        expected = -0.1 * grad if mask is None else -0.1 * grad * mask
        assert torch.allclose(update, expected, atol=1e-5)
    naive, aware = server_views(load_round(pruned_plain.rounds[1]))
    assert (naive.attacker, aware.attacker) == ("naive", "mask-aware")
    assert naive.masks is None and aware.masks is not None
    assert len(naive.clients) == 1 and naive.clients[0].batch_size == 3


def test_secure_prune_server_record_is_the_two_secure_sums(pruned_secure):
    round_ = load_round(pruned_secure.rounds[0])
    server = round_.server
    assert server.kind == "secure_prune" and server.parties == ["alice", "bob"]
    n = dict(zip(server.parties, server.weights))
    assert n["alice"] != n["bob"]  # 40 % / 60 %: different sample counts
    numerator = np.zeros_like(server.tensors["numerator"][0].numpy())
    count = np.zeros_like(numerator)
    for party, capture in round_.clients.items():
        sent = capture.sent[0].numpy()
        mask = capture.sent_masks[0].numpy().astype(np.float32)
        numerator += n[party] * mask * sent
        count += n[party] * mask
    assert np.allclose(server.tensors["numerator"][0].numpy(), numerator, atol=1e-4)
    assert np.allclose(server.tensors["count"][0].numpy(), count, atol=1e-4)


def test_counts_reveal_every_clients_mask_when_sample_counts_differ(pruned_secure):
    round_ = load_round(pruned_secure.rounds[0])
    server = round_.server
    masks, decodable = decode_keepers(server.tensors["count"][0], server.weights)
    assert bool(decodable.all())
    for party, decoded in zip(server.parties, masks):
        assert torch.equal(decoded, torch.as_tensor(round_.clients[party].sent_masks[0]))
    view = aggregate_view(round_, "mask-aware")
    assert 0 < view.notes["single_keeper_share"] < 1
    assert [c.name for c in view.clients] == ["alice", "bob"]
    assert view.truth.shape[0] == sum(c.x.shape[0] for c in round_.clients.values())
    # Where only alice kept a coordinate, the observed mean update is alice's own update.
    alice = round_.clients["alice"]
    a_mask, b_mask = masks[0].reshape(-1), masks[1].reshape(-1)
    only_alice = a_mask & ~b_mask
    first_param = alice.param_names.index(alice.state_names[0])
    observed = view.observed[first_param].reshape(-1)
    own = alice.update()[first_param].reshape(-1)
    assert bool(only_alice.any())
    assert torch.allclose(observed[only_alice], own[only_alice], atol=1e-4)


def test_decoding_keepers_is_ambiguous_when_sample_counts_are_equal():
    count = torch.tensor([0.0, 10.0, 20.0])
    masks, decodable = decode_keepers(count, [10.0, 10.0])
    assert decodable.tolist() == [True, False, True]
    assert masks[0].tolist() == [False, False, True] and masks[1].tolist() == [False, False, True]


def test_upload_view_reads_an_update_pruned_client_as_masked(sf_parties, tmp_path):
    setting = BASE.replace(update_keep=0.1, epochs=1)
    run = run_setting(setting, tmp_path, [(0, 0)], False)
    alice = load_round(run.rounds[0]).clients["alice"]
    update = alice.update()
    sent_share = sum(int((u != 0).sum()) for u in update) / sum(u.numel() for u in update)
    assert sent_share == pytest.approx(0.1, abs=0.02)
    view = upload_view(alice, "mask-aware")
    assert all(torch.equal(m, u != 0) for m, u in zip(view.masks, update))


def test_sweep_attacks_a_captured_upload_as_sent(pruned_plain, tmp_path):
    from sf_ext.dlg.sweep import SweepConfig, run_sweep

    config = SweepConfig(
        captures=(str(pruned_plain.rounds[1]),),
        party="alice",
        source="update",
        attacks=("idlg", "multistep"),
        iters=3,
        seeds=(0,),
        out=str(tmp_path / "sweep"),
    )
    result = run_sweep(config, progress=False)
    assert {r["attacker"] for r in result.rows} == {"naive", "mask-aware"}
    assert {r["attack"] for r in result.rows} == {"idlg", "multistep"}
    assert all(r["pruned_percent"] == pytest.approx(50.0, abs=1) for r in result.rows)
    assert len(result.rows) == 4


def test_recording_plain_aggregator_averages_masked_uploads_over_their_keepers():
    from sf_ext.aggregators.masking import MaskAwareAggregate, is_mask_aware
    from sf_ext.dlg.capture import RecordingPlainAggregator, _plain_mask_aware_mean
    from sf_ext.pruning import MaskedWeights

    assert is_mask_aware(RecordingPlainAggregator.__new__(RecordingPlainAggregator))
    a = MaskedWeights(
        [np.array([1.0, 2.0, 3.0], np.float32), np.array([5.0], np.float32)],
        [np.array([1, 0, 1], bool), None],
    )
    b = MaskedWeights(
        [np.array([3.0, 4.0, 0.0], np.float32), np.array([7.0], np.float32)],
        [np.array([1, 1, 0], bool), None],
    )
    out = _plain_mask_aware_mean(a, b, weights=[1.0, 3.0])
    assert isinstance(out, MaskAwareAggregate)
    # coordinate 0 both kept (weighted 1:3), 1 only b, 2 only a; the unmasked tensor: plain mean.
    np.testing.assert_allclose(out[0], [2.5, 4.0, 3.0])
    np.testing.assert_allclose(out[1], [6.5])
    assert out[0].dtype == np.float32
    nobody = MaskedWeights([np.array([9.0], np.float32)], [np.array([0], bool)])
    assert _plain_mask_aware_mean(nobody, nobody, weights=None)[0].tolist() == [0.0]
    plain = _plain_mask_aware_mean([np.array([1.0])], [np.array([4.0])], weights=[2, 1])
    np.testing.assert_allclose(plain[0], [2.0])

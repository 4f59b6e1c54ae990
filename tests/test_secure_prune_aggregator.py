"""SecurePruneAggregator: correct masked averages, and the server never sees a client's plaintext."""

import numpy as np
import pytest
import secretflow as sf
from secretflow.device.device.base import DeviceObject
from secretflow.security.aggregation import SecureAggregator

from sf_ext.aggregators.secure_prune import SecurePruneAggregator
from sf_ext.pruning import MaskedWeights

SHAPES = [(6, 4), (4,), (3, 2, 2)]


def _client_upload(seed, masked=True, keep=0.5):
    rng = np.random.default_rng(seed)
    weights = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    if not masked:
        return weights, [np.ones(s, bool) for s in SHAPES]
    masks = [rng.random(s) < keep if len(s) > 1 else None for s in SHAPES]
    weights = [w * m if m is not None else w for w, m in zip(weights, masks)]
    full = [np.ones(s, bool) if m is None else m for s, m in zip(SHAPES, masks)]
    return MaskedWeights(weights, masks), full


def _plaintext_masked_average(uploads, masks, counts):
    out = []
    for j in range(len(SHAPES)):
        num = sum(
            n * m[j] * np.asarray(u[j], np.float64) for u, m, n in zip(uploads, masks, counts)
        )
        den = sum(n * m[j] for m, n in zip(masks, counts))
        out.append(np.where(den > 0, num / np.where(den > 0, den, 1), 0.0))
    return out


def test_equals_plaintext_masked_average(sf_parties):
    alice, bob, charlie = sf_parties
    (up_a, m_a), (up_b, m_b) = _client_upload(1), _client_upload(2)
    # One coordinate nobody kept must stay exactly zero.
    up_a[0][0, 0] = up_b[0][0, 0] = 0.0
    up_a.masks[0][0, 0] = up_b.masks[0][0, 0] = False
    m_a[0][0, 0] = m_b[0][0, 0] = False
    counts = [2400, 3600]
    aggregator = SecurePruneAggregator(charlie, [alice, bob])
    result = sf.reveal(
        aggregator.average(
            [alice(lambda: up_a)(), bob(lambda: up_b)()],
            axis=0,
            weights=[alice(lambda: counts[0])(), bob(lambda: counts[1])()],
        )
    )
    expected = _plaintext_masked_average([up_a, up_b], [m_a, m_b], counts)
    for got, want in zip(result, expected):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert result[0][0, 0] == 0.0
    # A coordinate only alice kept is alice's weight, not dragged towards zero by bob's pruning.
    only_alice = m_a[0] & ~m_b[0]
    assert only_alice.any()
    np.testing.assert_allclose(result[0][only_alice], up_a[0][only_alice], rtol=1e-4, atol=1e-4)


def test_without_masks_matches_secure_aggregator(sf_parties):
    alice, bob, charlie = sf_parties
    (w_a, _), (w_b, _) = _client_upload(3, masked=False), _client_upload(4, masked=False)
    data = [alice(lambda: w_a)(), bob(lambda: w_b)()]
    ours = sf.reveal(SecurePruneAggregator(charlie, [alice, bob]).average(data, 0, [3, 5]))
    theirs = sf.reveal(SecureAggregator(charlie, [alice, bob]).average(data, 0, [3, 5]))
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_server_receives_no_client_plaintext(sf_parties, monkeypatch):
    alice, bob, charlie = sf_parties
    (up_a, m_a), (up_b, m_b) = _client_upload(5), _client_upload(6)
    aggregator = SecurePruneAggregator(charlie, [alice, bob])
    received = []
    original_to = DeviceObject.to

    def recording_to(self, device, *args, **kwargs):
        moved = original_to(self, device, *args, **kwargs)
        if device == charlie and self.device != charlie:
            received.append(sf.reveal(moved))
        return moved

    monkeypatch.setattr(DeviceObject, "to", recording_to)
    aggregator.average([alice(lambda: up_a)(), bob(lambda: up_b)()], 0, [2, 3])
    monkeypatch.undo()

    arrays = [a for item in received if isinstance(item, list) for a in item]
    assert len(arrays) == 4 * len(SHAPES)  # numerators and mask counts of two clients
    secrets = [np.asarray(x, np.float64) * n for u, n in ((up_a, 2), (up_b, 3)) for x in u]
    secrets += [np.asarray(m, np.float64) * n for ms, n in ((m_a, 2), (m_b, 3)) for m in ms]
    for array in arrays:
        assert array.dtype == np.uint64  # fixed-point field elements, one-time padded
        decoded = array.view(np.int64).astype(np.float64) / 2**18
        for secret in secrets:
            if secret.shape == array.shape:
                assert not np.allclose(decoded, secret, atol=1e-3)


def test_non_finite_weights_are_refused(sf_parties):
    alice, bob, charlie = sf_parties
    (up_a, _), (up_b, _) = _client_upload(7), _client_upload(8)
    up_b[1][0] = np.nan
    aggregator = SecurePruneAggregator(charlie, [alice, bob])
    with pytest.raises(Exception, match="NaN or inf"):
        sf.reveal(aggregator.average([alice(lambda: up_a)(), bob(lambda: up_b)()], 0, [1, 1]))


def test_axis_other_than_clients_is_refused(sf_parties):
    alice, bob, charlie = sf_parties
    aggregator = SecurePruneAggregator(charlie, [alice, bob])
    with pytest.raises(ValueError, match="axis"):
        aggregator.average([alice(lambda: [np.ones(2)])(), bob(lambda: [np.ones(2)])()], axis=1)


def test_masked_weights_survive_pickling():
    import pickle

    upload = MaskedWeights([np.ones(2)], [np.array([True, False])])
    again = pickle.loads(pickle.dumps(upload))
    assert isinstance(again, MaskedWeights) and again.masks[0].tolist() == [True, False]

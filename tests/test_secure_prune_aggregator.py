"""SecurePruneAggregator: correct masked averages, and the server never sees a client's plaintext."""

import subprocess
import sys

import numpy as np
import pytest
import secretflow as sf
from secretflow.device.device.base import DeviceObject
from secretflow.security.aggregation import SecureAggregator

from sf_ext.aggregators.secure_prune import SecurePruneAggregator
from sf_ext.pruning import MaskedWeights

pytestmark = pytest.mark.secretflow

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

    arrays = [
        a for item in received if isinstance(item, list) for a in item if isinstance(a, np.ndarray)
    ]
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


# --- weights that are not sample counts (issue 9, defect 1) -------------------------------------

WEIGHT_CASES = [
    [2400, 3600],
    [0.4, 0.6],
    [0.2, 0.3],
    [1e-3, 1e3],
    [1, 100000],
    [0.0, 5.0],
]


def _average(setup, uploads, weights, on_device):
    aggregator, alice, bob = setup
    data = [alice(lambda: uploads[0])(), bob(lambda: uploads[1])()]
    if on_device:  # as FLModel passes them: PYUObjects on each client
        weights = [alice(lambda: weights[0])(), bob(lambda: weights[1])()]
    return sf.reveal(aggregator.average(data, axis=0, weights=weights))


@pytest.fixture
def prune_aggregator(sf_parties):
    alice, bob, charlie = sf_parties
    return SecurePruneAggregator(charlie, [alice, bob]), alice, bob


@pytest.mark.parametrize("weights", WEIGHT_CASES, ids=str)
@pytest.mark.parametrize("on_device", [False, True], ids=["plain", "pyu"])
def test_masked_average_for_any_weights(prune_aggregator, weights, on_device):
    (up_a, m_a), (up_b, m_b) = _client_upload(11), _client_upload(12)
    result = _average(prune_aggregator, [up_a, up_b], weights, on_device)
    expected = _plaintext_masked_average([up_a, up_b], [m_a, m_b], weights)
    for got, want in zip(result, expected):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # Where exactly one client with positive weight kept an entry, the average is its value.
    for mine, other, upload, weight in ((m_a, m_b, up_a, weights[0]), (m_b, m_a, up_b, weights[1])):
        only = mine[0] & ~other[0]
        assert only.any()
        want = upload[0][only] if weight > 0 else 0.0
        np.testing.assert_allclose(result[0][only], want, rtol=1e-4, atol=1e-4)


def test_issue_example_light_client_alone_keeps_its_value(prune_aggregator):
    # Weights [0.4, 0.6]; only alice (0.4) kept entry 1: the average is alice's value, not 0.
    up_a = MaskedWeights([np.array([1.0, 2.0], np.float32)], [np.array([True, True])])
    up_b = MaskedWeights([np.array([3.0, 0.0], np.float32)], [np.array([True, False])])
    result = _average(prune_aggregator, [up_a, up_b], [0.4, 0.6], on_device=False)
    np.testing.assert_allclose(result[0], [0.4 * 1 + 0.6 * 3, 2.0], rtol=1e-5)


@pytest.mark.parametrize("weights", WEIGHT_CASES, ids=str)
def test_plain_uploads_match_secure_aggregator_for_any_weights(sf_parties, weights):
    alice, bob, charlie = sf_parties
    (w_a, _), (w_b, _) = _client_upload(13, masked=False), _client_upload(14, masked=False)
    data = [alice(lambda: w_a)(), bob(lambda: w_b)()]
    ours = sf.reveal(SecurePruneAggregator(charlie, [alice, bob]).average(data, 0, weights))
    theirs = sf.reveal(SecureAggregator(charlie, [alice, bob]).average(data, 0, weights))
    total = sum(weights)
    for a, b, x, y in zip(ours, theirs, w_a, w_b):
        assert np.abs(a).max() > 0.1  # not the all-zero model of the old threshold
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(a, (weights[0] * x + weights[1] * y) / total, atol=1e-4)


@pytest.mark.parametrize(
    "weights, message",
    [
        ([-1.0, 2.0], "weights must be finite and >= 0"),
        ([float("nan"), 2.0], "weights must be finite and >= 0"),
        ([0, 0], "weights must not all be 0"),
        ([1e-9, 1e9], "beyond what 18-bit fixed point can sum"),
    ],
)
def test_impossible_weights_are_refused(prune_aggregator, weights, message):
    (up_a, _), (up_b, _) = _client_upload(15), _client_upload(16)
    with pytest.raises(Exception, match=message):
        _average(prune_aggregator, [up_a, up_b], weights, on_device=True)


def test_scalar_and_integer_buffers_are_averaged_in_shape(prune_aggregator):
    # A BatchNorm model's weight list carries num_batches_tracked: a 0-d int64 array.
    up_a = [np.ones((2, 3), np.float32), np.array(4, np.int64), np.array(0.5, np.float32)]
    up_b = [np.zeros((2, 3), np.float32), np.array(8, np.int64), np.array(1.5, np.float32)]
    result = _average(prune_aggregator, [up_a, up_b], [1, 3], on_device=True)
    assert [r.shape for r in result] == [(2, 3), (), ()]
    np.testing.assert_allclose(result[0], np.full((2, 3), 0.25), rtol=1e-5)
    assert float(result[1]) == pytest.approx(7.0) and float(result[2]) == pytest.approx(1.25)


def test_mask_shape_must_match_its_weights(prune_aggregator):
    bad = MaskedWeights([np.ones((2, 3), np.float32)], [np.ones((3, 2), bool)])
    good = MaskedWeights([np.ones((2, 3), np.float32)], [np.ones((2, 3), bool)])
    with pytest.raises(Exception, match=r"mask 0 has shape \(3, 2\).*\(2, 3\)"):
        _average(prune_aggregator, [bad, good], [1, 1], on_device=False)


def test_fxp_bits_is_validated(sf_parties):
    alice, bob, charlie = sf_parties
    with pytest.raises(ValueError, match="fxp_bits must be an integer in"):
        SecurePruneAggregator(charlie, [alice, bob], fxp_bits=0)


@pytest.mark.slow
def test_docstring_examples_run():
    """Every ``>>>`` example in the modules below runs as written (fresh interpreter)."""
    modules = ["sf_ext.aggregators.secure_prune"]
    code = (
        "import doctest, importlib, sys\n"
        "failed = 0\n"
        f"for name in {modules!r}:\n"
        "    result = doctest.testmod(importlib.import_module(name), verbose=False)\n"
        "    assert result.attempted > 0, name\n"
        "    failed += result.failed\n"
        "sys.exit(1 if failed else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

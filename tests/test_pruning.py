"""Magnitude pruning masks and the parameter layout, tested directly (no SecretFlow)."""

import numpy as np
import pytest
import torch
from torch import nn

from sf_ext._cli import InvalidParameterError
from sf_ext.params import (
    ParamLayout,
    batchnorm_state_names,
    export_weights,
    import_weights,
    is_weight_tensor,
    transported_names,
)
from sf_ext.pruning import (
    MaskedWeights,
    apply_masks,
    full_masks,
    kept_fraction,
    magnitude_prune,
    masked_tensors,
    scheduled_kept_fraction,
    validate_prune_params,
    weight_tensors,
)


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 2, 3, 3, generator=g),  # 72 entries
        "conv.bias": torch.randn(4, generator=g),
        "fc.weight": torch.randn(10, 20, generator=g) * 0.01,  # 200 small entries
        "fc.bias": torch.randn(10, generator=g),
    }


# --- magnitude_prune -----------------------------------------------------------------------------


def test_layer_scope_keeps_the_largest_entries_of_each_tensor():
    tensors = _tensors()
    masks = magnitude_prune(tensors, None, 0.25, "layer")
    assert set(masks) == {"conv.weight", "fc.weight"}  # biases are never pruned
    for name, mask in masks.items():
        values = tensors[name].abs()
        assert mask.dtype == torch.bool and mask.shape == values.shape
        assert int(mask.sum()) == round(0.25 * values.numel())
        assert values[mask].min() > values[~mask].max()  # exactly the largest magnitudes


def test_global_scope_ranks_across_tensors():
    tensors = _tensors()
    masks = magnitude_prune(tensors, None, 0.25, "global")
    total = 72 + 200
    assert sum(int(m.sum()) for m in masks.values()) == round(0.25 * total)
    kept = torch.cat([tensors[n].abs()[m] for n, m in masks.items()])
    dropped = torch.cat([tensors[n].abs()[~m] for n, m in masks.items()])
    assert kept.min() > dropped.max()
    # fc's weights are 100x smaller: a global ranking prunes them first, a layer ranking cannot.
    assert masks["fc.weight"].float().mean() < 0.05 < masks["conv.weight"].float().mean()


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_pruned_entries_never_revive(scope):
    tensors = _tensors()
    masks = magnitude_prune(tensors, None, 0.5, scope)
    # Pruned entries become the largest in magnitude (as an optimizer step could make them)...
    grown = {
        n: torch.where(masks[n], t, t.sign() * 100.0) if n in masks else t
        for n, t in tensors.items()
    }
    previous = masks
    for keep in (0.4, 0.6, 1.0, 0.2):  # ...and the target goes up and down
        masks = magnitude_prune(grown, previous, keep, scope)
        for name in masks:
            assert not bool((masks[name] & ~previous[name]).any()), (name, keep)
        previous = masks
    total = sum(m.numel() for m in masks.values())
    if scope == "layer":
        assert [int(m.sum()) for m in masks.values()] == [round(0.2 * 72), round(0.2 * 200)]
    else:
        assert sum(int(m.sum()) for m in masks.values()) == round(0.2 * total)
    # A target above the current fraction keeps the mask as it is.
    assert all(
        torch.equal(a, b)
        for a, b in zip(magnitude_prune(grown, masks, 0.9, scope).values(), masks.values())
    )


def test_prune_input_mistakes_raise_clear_errors():
    tensors = _tensors()
    with pytest.raises(KeyError, match=r"no mask for weight tensors \['fc.weight'\]"):
        magnitude_prune(tensors, {"conv.weight": torch.ones(4, 2, 3, 3, dtype=torch.bool)}, 0.5)
    masks = full_masks(tensors)
    wrong = dict(masks, **{"fc.weight": torch.ones(1, 20, dtype=torch.bool)})  # would broadcast
    with pytest.raises(
        ValueError, match=r"mask for 'fc.weight' has shape \(1, 20\), its tensor \(10, 20\)"
    ):
        magnitude_prune(tensors, wrong, 0.5)
    floats = dict(masks, **{"fc.weight": torch.ones(10, 20)})
    with pytest.raises(
        TypeError,
        match="mask for 'fc.weight' must be a boolean tensor, got Tensor of torch.float32",
    ):
        magnitude_prune(tensors, floats, 0.5)
    for keep in (0, 1.5, float("nan"), "0.5", True):
        with pytest.raises(InvalidParameterError, match="keep_fraction must be in"):
            magnitude_prune(tensors, None, keep)
    with pytest.raises(ValueError, match=r"scope must be one of \('layer', 'global'\), got 'row'"):
        magnitude_prune(tensors, None, 0.5, "row")


def test_apply_masks_zeroes_in_place_and_checks_names_and_shapes():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    masks = magnitude_prune(dict(model.named_parameters()), None, 0.5)
    assert set(masks) == {"0.weight", "2.weight"}
    before_bias = model[0].bias.detach().clone()
    apply_masks(model, masks)
    assert torch.all(model[0].weight[~masks["0.weight"]] == 0)
    assert torch.all(model[0].weight[masks["0.weight"]] != 0)
    assert torch.equal(model[0].bias, before_bias)
    assert kept_fraction(masks) == pytest.approx((12 + 4) / (24 + 8))
    with pytest.raises(KeyError, match="mask for '9.weight' has no matching tensor"):
        apply_masks(model, {"9.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"mask for '0.weight' has shape \(4, 1\)"):
        apply_masks(model, {"0.weight": torch.ones(4, 1, dtype=torch.bool)})


def test_masked_tensors_prunes_once_and_copies_the_rest():
    tensors = _tensors()
    pruned, masks = masked_tensors(tensors, 0.1, "layer")
    assert torch.equal(pruned["conv.bias"], tensors["conv.bias"])
    assert pruned["conv.bias"].data_ptr() != tensors["conv.bias"].data_ptr()
    assert int((pruned["fc.weight"] != 0).sum()) == 20
    assert torch.equal(pruned["fc.weight"] != 0, masks["fc.weight"])


def test_schedule_and_parameter_validation():
    assert scheduled_kept_fraction(0, 5, 0.1) == 1.0
    assert scheduled_kept_fraction(1, 5, 0.1) == pytest.approx(0.95)
    assert scheduled_kept_fraction(10, 20, 0.1) == pytest.approx(0.8**10)
    assert scheduled_kept_fraction(11, 20, 0.1) == 0.1  # 0.8 ** 11 < 0.1: the end rate holds
    validate_prune_params(np.float32(5), np.float64(0.1))  # numpy numbers are numbers
    for percent in (0, 100, -1, float("nan"), "5", True):
        with pytest.raises(InvalidParameterError, match="prune_percent must be in"):
            validate_prune_params(percent, 0.1)
    for rate in (0, 1.01, float("nan"), None):
        with pytest.raises(
            ValueError, match=r"prune_end_rate must be in \(0, 1\] \(final fraction"
        ):
            validate_prune_params(5, rate)


def test_masked_weights_checks_lengths():
    with pytest.raises(ValueError, match="1 masks for 2 weight arrays"):
        MaskedWeights([np.ones(2), np.ones(3)], [None])


# --- ParamLayout ---------------------------------------------------------------------------------


def _bn_model():
    return nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Sequential(nn.BatchNorm2d(2)), nn.Flatten(), nn.Linear(8, 3)
    )


def test_layout_round_trip_and_offsets():
    model = _bn_model()
    layout = ParamLayout.from_module(model)
    state = model.state_dict()
    assert layout.names == tuple(state)
    assert layout.num_params == sum(v.numel() for v in state.values())
    vector = layout.flatten(state)
    assert vector.dtype == torch.float32 and vector.shape == (layout.num_params,)
    sl = layout.slices()["3.weight"]
    assert torch.equal(vector[sl].view(3, 8), state["3.weight"])
    back = layout.unflatten(vector)
    assert all(torch.equal(back[n].float(), state[n].float()) for n in state)
    assert layout.weight_names() == ["0.weight", "3.weight"]
    arrays = layout.unflatten_numpy(vector)
    assert [a.shape for a in arrays] == [tuple(v.shape) for v in state.values()]
    # A 0-d entry may arrive as shape (1,) (SecretFlow's weight lists), nothing else may differ.
    as_sent = export_weights(model)
    assert as_sent[layout.names.index("1.0.num_batches_tracked")].shape == (1,)
    assert torch.equal(layout.flatten(as_sent), vector)


def test_layout_mistakes_raise_clear_errors():
    layout = ParamLayout.from_module(_bn_model())
    state = _bn_model().state_dict()
    with pytest.raises(KeyError, match=r"tensors missing from the mapping: \['3.bias'\]"):
        layout.flatten({n: v for n, v in state.items() if n != "3.bias"})
    with pytest.raises(ValueError, match=r"expected 9 tensors, got 8"):
        layout.flatten(list(state.values())[:-1])
    wrong = dict(state, **{"3.weight": torch.zeros(8, 3)})
    with pytest.raises(ValueError, match=r"3.weight: expected shape \(3, 8\), got \(8, 3\)"):
        layout.flatten(wrong)
    with pytest.raises(ValueError, match=f"expected {layout.num_params} values, got 5"):
        layout.unflatten(torch.zeros(5))
    with pytest.raises(ValueError, match="2 names for 1 arrays"):
        ParamLayout.from_arrays([np.zeros(3)], ["a", "b"])


def test_is_weight_tensor_rule():
    assert is_weight_tensor("conv.weight", (4, 2, 3, 3)) and is_weight_tensor("fc.weight", (3, 8))
    assert not is_weight_tensor("fc.bias", (3,))
    assert not is_weight_tensor("bn.weight", (2,))
    assert not is_weight_tensor("bn.running_mean", (2, 2))  # a buffer, whatever its shape
    model = _bn_model()
    assert set(weight_tensors(model)) == {"0.weight", "3.weight"}


# --- what a model sends through SecretFlow --------------------------------------------------------


def test_export_and_import_weights():
    source, target = _bn_model(), _bn_model()
    source.train()
    source(torch.rand(5, 1, 4, 4))
    source(torch.rand(5, 1, 4, 4))
    assert batchnorm_state_names(source) == {
        f"1.0.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }
    assert transported_names(source, skip_bn=True) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    weights = export_weights(source)
    assert {w.dtype for w in weights} == {np.dtype(np.float32)} and min(
        w.ndim for w in weights
    ) == 1
    import_weights(target, weights)
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name
    assert int(target.state_dict()["1.0.num_batches_tracked"]) == 2
    # Averaged counters arrive as floats: they are rounded back into the integer buffer.
    weights[transported_names(source).index("1.0.num_batches_tracked")] = np.array(
        [2.6], np.float32
    )
    import_weights(target, weights)
    assert target.state_dict()["1.0.num_batches_tracked"].item() == 3
    import_weights(target, {"3.bias": np.array([1.0, 2.0, 3.0])})
    assert target.state_dict()["3.bias"].tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(KeyError, match=r"no state entries named \['head.bias'\]"):
        import_weights(target, {"head.bias": np.zeros(3)})
    with pytest.raises(ValueError, match=r"3.bias: expected \(3,\) \(3 values\), got \(4,\)"):
        import_weights(target, {"3.bias": np.zeros(4)})
    with pytest.raises(ValueError, match="disagree on skip_bn"):
        import_weights(target, export_weights(source, skip_bn=True))
    double = _bn_model().double()
    assert {w.dtype for w in export_weights(double)} == {np.dtype(np.float64)}

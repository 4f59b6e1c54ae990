"""Optimizer-aware multi-step inversion, its local-training simulation, and batch label recovery."""

import pytest
import torch
import torch.nn.functional as F
from _dlg_models import tiny_model  # noqa: E402  (tests/ is on sys.path)

from sf_ext.dlg import (
    OptimizerSpec,
    gradient_from_update,
    idlg,
    infer_labels,
    multistep,
    observe_gradient,
    recover_label_counts,
    simulate_update,
)
from sf_ext.dlg.attacks import ClientModel
from sf_ext.dlg.labels import round_counts
from sf_ext.dlg.local_training import equivalent_gradient_sum
from sf_ext.dlg.metrics import label_accuracy
from sf_ext.models import LeNet


def _train_for_real(model, optimizer, batches):
    start = [p.detach().clone() for p in model.parameters()]
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return [p.detach() - s for p, s in zip(model.parameters(), start)]


def _warm_adam(model, seed: int, steps: int = 30) -> torch.optim.Adam:
    """An Adam optimizer that has already taken ``steps`` steps on other data."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        x = torch.rand(8, 1, 4, 4, generator=gen)
        y = torch.randint(0, 4, (8,), generator=gen)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return optimizer


# --- the simulation is the client's training ---------------------------------------------------
@pytest.mark.parametrize(
    "cls, options",
    [
        (torch.optim.SGD, {"lr": 0.1}),
        (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
        (torch.optim.SGD, {"lr": 0.05, "momentum": 0.5, "dampening": 0.1}),
        (torch.optim.Adam, {"lr": 0.01}),
        (torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 1e-2}),
    ],
)
def test_simulated_local_training_reproduces_torch_optim_in_two_rounds(cls, options):
    model = tiny_model(0)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.rand(2, 1, 4, 4, generator=gen), torch.tensor([k % 4, 3])) for k in range(3)]
    optimizer = cls(model.parameters(), **options)
    for with_state in (False, True):  # first round fresh, second round with the state it left
        spec = OptimizerSpec.from_optimizer(optimizer, with_state=with_state)
        assert (spec.state is None) == (not with_state)
        simulated = simulate_update(model, batches, spec, create_graph=False)
        real = _train_for_real(model, optimizer, batches)
        for s, r in zip(simulated, real):
            assert torch.allclose(s, r, atol=1e-6, rtol=1e-4)
        assert max(float(r.abs().max()) for r in real) > 1e-3  # the round did move the weights


def test_masks_held_during_simulated_training_keep_pruned_entries_at_zero():
    model = tiny_model(2)
    with torch.no_grad():
        model[1].weight[:, :8] = 0.0  # pruned before the round, as fed_avg_w_prune leaves it
    mask = torch.ones(8, 16, dtype=torch.bool)
    mask[:, :8] = False
    masks = [mask, None, None, None]
    batches = [(torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2])) for _ in range(2)]
    spec = OptimizerSpec("adam", lr=0.01)
    update = simulate_update(model, batches, spec, masks=masks, create_graph=False)
    assert float(update[0][:, :8].abs().max()) == 0.0
    assert float(update[0][:, 8:].abs().max()) > 0.0
    free = simulate_update(model, batches, spec, create_graph=False)
    assert float(free[0][:, :8].abs().max()) > 0.0  # without the mask they would revive


def test_optimizer_spec_rejects_what_it_cannot_simulate():
    with pytest.raises(ValueError, match="RMSprop"):
        OptimizerSpec.from_hyperparameters("RMSprop", {"lr": 0.01})
    with pytest.raises(ValueError, match="amsgrad"):
        OptimizerSpec.from_hyperparameters("Adam", {"lr": 0.01, "amsgrad": True})
    with pytest.raises(ValueError, match="lr"):
        OptimizerSpec("sgd", lr=0.0)


# --- optimizer-aware inversion -----------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_optimizer_aware_inversion_recovers_inputs_of_a_two_step_adam_upload(seed):
    model = tiny_model(seed)
    optimizer = _warm_adam(model, seed)
    spec = OptimizerSpec.from_optimizer(optimizer, with_state=True)
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.rand(2, 1, 4, 4, generator=gen)
    y = torch.tensor([1, 3])
    update = _train_for_real(model, optimizer, [(x[:1], y[:1]), (x[1:], y[1:])])
    with torch.no_grad():  # the attacker holds the model the round started from
        for p, u in zip(model.parameters(), update):
            p.sub_(u)
    result = multistep(
        model,
        update,
        (1, 1, 4, 4),
        4,
        spec,
        steps=2,
        label=y,
        seed=0,
        iters=600,
        tv_weight=0,
        distance="l2-layer",
    )
    assert (result.reconstruction - x).abs().max() < 1e-3
    assert result.details["optimizer"].startswith("ADAM")
    # Reading the same upload as one SGD step (-update / lr, the old way) finds nothing close.
    as_sgd = idlg(
        model,
        gradient_from_update(update, 0.01),
        (2, 1, 4, 4),
        4,
        label=y,
        seed=0,
        distance="l2-layer",
    )
    error = min(
        float((as_sgd.reconstruction.clamp(0, 1) - x).abs().max()),
        float((as_sgd.reconstruction.flip(0).clamp(0, 1) - x).abs().max()),
    )
    assert error > 0.2


def test_optimizer_aware_inversion_recovers_three_sgd_steps_with_momentum():
    model = tiny_model(4)
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(3, 1, 4, 4, generator=gen)
    y = torch.tensor([2, 0, 2])
    spec = OptimizerSpec("sgd", lr=0.1, momentum=0.9)
    batches = [(x[k : k + 1], y[k : k + 1]) for k in range(3)]
    update = simulate_update(model, batches, spec, create_graph=False)
    result = multistep(
        model,
        update,
        (1, 1, 4, 4),
        4,
        spec,
        steps=3,
        label=y,
        seed=0,
        iters=600,
        tv_weight=0,
        distance="l2-layer",
    )
    assert (result.reconstruction - x).abs().max() < 1e-2


def test_aggregate_of_two_clients_is_inverted_jointly():
    # SecureAggregator's mean weighs each client by its sample count: 1 for alice, 2 for bob.
    model = tiny_model(5)
    gen = torch.Generator().manual_seed(9)
    xa, xb = torch.rand(1, 1, 4, 4, generator=gen), torch.rand(2, 1, 4, 4, generator=gen)
    ya, yb = torch.tensor([1]), torch.tensor([3, 0])
    spec = OptimizerSpec("sgd", lr=0.1)
    ua = simulate_update(model, [(xa, ya)], spec, create_graph=False)
    ub = simulate_update(model, [(xb, yb)], spec, create_graph=False)
    mean = [(a + 2 * b) / 3 for a, b in zip(ua, ub)]
    clients = [ClientModel(1, 1, 1 / 3, name="alice"), ClientModel(2, 1, 2 / 3, name="bob")]
    result = multistep(
        model,
        mean,
        (1, 1, 4, 4),
        4,
        spec,
        clients=clients,
        seed=0,
        iters=800,
        tv_weight=0,
        distance="l2-layer",
    )
    assert sorted(result.label.tolist()) == [0, 1, 3]  # the union's labels, counted from the mean
    truth = torch.cat([xa, xb])
    # Which dummy took which image is not identifiable; pair them by distance.
    from sf_ext.dlg.metrics import match_batch

    paired = result.reconstruction[match_batch(result.reconstruction, truth)]
    assert (paired - truth).abs().max() < 1e-2


# --- batch labels ------------------------------------------------------------------------------
BATCHES = [
    [3, 3, 3, 3, 3, 7, 7, 7, 7, 7, 7, 7, 1, 1, 1, 1],  # three classes, many repeats
    [0] * 12 + [9] * 4,  # two classes
    [5] * 16,  # one class only
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 2, 2, 4, 4, 9, 9],  # every class, some twice
]


@pytest.mark.parametrize("labels", BATCHES)
def test_label_counts_are_exact_on_batches_with_repeated_and_missing_classes(labels):
    torch.manual_seed(0)
    model = LeNet(1, 28, 10)
    x = torch.rand(len(labels), 1, 28, 28, generator=torch.Generator().manual_seed(1))
    y = torch.tensor(labels)
    grad = observe_gradient(model, x, y)
    counts = recover_label_counts(model, grad, len(labels), input_shape=(1, 28, 28))
    assert counts.tolist() == torch.bincount(y, minlength=10).tolist()
    recovered = infer_labels(model, grad, len(labels), input_shape=(1, 28, 28))
    assert sorted(recovered.tolist()) == sorted(labels)
    if 1 < len(set(labels)) < len(labels):
        # The sign rule (the former default) cannot count repeats.
        sign = infer_labels(model, grad, len(labels), method="sign")
        assert label_accuracy(sign.tolist(), labels) < 1.0


def test_label_counts_of_three_local_sgd_steps_come_from_the_update():
    torch.manual_seed(1)
    model = LeNet(1, 28, 10)
    gen = torch.Generator().manual_seed(2)
    labels = [[4, 4, 4, 1], [1, 1, 8, 4], [4, 8, 8, 8]]
    batches = [(torch.rand(4, 1, 28, 28, generator=gen), torch.tensor(b)) for b in labels]
    spec = OptimizerSpec("sgd", lr=0.01)
    update = simulate_update(model, batches, spec, create_graph=False)
    summed = equivalent_gradient_sum(update, spec, steps=3)
    counts = recover_label_counts(model, summed, 12, batch_size=4, input_shape=(1, 28, 28))
    expected = torch.bincount(torch.tensor(sum(labels, [])), minlength=10)
    assert counts.tolist() == expected.tolist()


def test_count_rounding_keeps_the_total_and_never_goes_negative():
    assert round_counts(torch.tensor([2.7, 1.2, -0.4, 0.6]), 4).tolist() == [3, 1, 0, 0]
    assert round_counts(torch.tensor([2.6, 1.4, 0.0, 0.7]), 4).tolist() == [2, 1, 0, 1]
    assert int(round_counts(torch.tensor([0.2, 0.2]), 5).sum()) == 5
    with pytest.raises(ValueError, match="total"):
        round_counts(torch.tensor([1.0]), -1)

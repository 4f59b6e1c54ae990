"""Tests of sf_ext.models: shapes, DLG network and init, registry, and the SecretFlow flavour."""

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from sf_ext.data import load_dataset
from sf_ext.models import (
    MLP,
    VGG9,
    ConvNet,
    DLGLeNet,
    LeNet,
    ResNet18,
    as_secretflow_module,
    build_model,
    model_class,
    model_names,
    uniform_init_,
)
from sf_ext.params import ParamLayout, batchnorm_state_names, transported_names


@pytest.mark.parametrize(
    "model, in_channels, image_size, num_classes",
    [
        (ConvNet(), 1, 28, 10),
        (ConvNet(3, 32, 7, channels=4), 3, 32, 7),
        (ConvNet(1, 8, 10), 1, 8, 10),
        (LeNet(), 1, 28, 10),
        (LeNet(3, 32, 100), 3, 32, 100),
        (DLGLeNet(), 3, 32, 10),
        (DLGLeNet(1, 28, 10), 1, 28, 10),
        (VGG9(), 3, 32, 10),
        (MLP(), 1, 8, 10),
        (MLP(3, 4, 5, hidden=()), 3, 4, 5),
        (ResNet18(), 3, 32, 10),
        (ResNet18(1, 28, 7), 1, 28, 7),
    ],
)
def test_output_shapes(model, in_channels, image_size, num_classes):
    logits = model(torch.rand(2, in_channels, image_size, image_size))
    assert logits.shape == (2, num_classes) and logits.dtype == torch.float32


def test_reference_architectures():
    convnet = ConvNet()
    assert convnet.conv.out_channels == 3 and convnet.conv.kernel_size == (3, 3)
    assert convnet.fc.in_features == 192 and convnet.fc_in_dim == 192
    assert DLGLeNet().fc.in_features == 768  # 12 x 8 x 8, as in the DLG paper's code
    assert DLGLeNet(1, 28).fc.in_features == 12 * 7 * 7
    strides = [m.stride for m in DLGLeNet().modules() if isinstance(m, nn.Conv2d)]
    assert strides == [(2, 2), (2, 2), (1, 1)]
    assert sum(isinstance(m, nn.Sigmoid) for m in DLGLeNet().modules()) == 3
    assert sum(p.numel() for p in VGG9().parameters()) == 3_491_530
    assert sum(isinstance(m, nn.Conv2d) for m in VGG9().modules()) == 6
    assert sum(isinstance(m, nn.Linear) for m in VGG9().modules()) == 3
    assert LeNet().classifier[0].in_features == 16 * 5 * 5
    assert LeNet(3, 32).classifier[0].in_features == 16 * 5 * 5


def test_resnet18_is_torchvisions_adapted_to_32x32():
    model = ResNet18()
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 20 and "layer2.0.downsample.1" in norms  # nested in a Sequential
    # 32x32 keeps its resolution through the stem: the last stage sees 4x4 maps.
    features = nn.Sequential(*list(model.children())[:-2])
    assert features(torch.rand(1, 3, 32, 32)).shape == (1, 512, 4, 4)
    assert len(batchnorm_state_names(model)) == 20 * 5
    with pytest.raises(ValueError, match="ResNet18: image_size must be an integer >= 8"):
        ResNet18(image_size=4)


def test_no_batchnorm_buffers():
    for name in sorted(set(model_names()) - {"resnet18"}):
        spec = {"vgg9": (3, 32), "mlp": (1, 8)}.get(name, (1, 28))
        model = build_model(name, spec[0], spec[1], 10)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert not list(model.buffers())
        layout = ParamLayout.from_module(model)
        assert layout.num_params == sum(p.numel() for p in model.parameters())


def test_uniform_init():
    model = uniform_init_(DLGLeNet(), seed=7)
    values = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert values.min() >= -0.5 and values.max() < 0.5
    assert values.abs().mean() > 0.2  # uniform on [-0.5, 0.5) has mean |v| = 0.25
    assert all(p.abs().max() > 0.3 for p in model.parameters())  # biases included
    again = uniform_init_(DLGLeNet(), seed=7)
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)
    fresh = DLGLeNet()
    state = torch.get_rng_state()
    uniform_init_(fresh, low=0.0, high=0.1, seed=1)
    assert torch.equal(state, torch.get_rng_state())  # seeded init leaves global RNG alone
    with pytest.raises(ValueError, match="high must be greater than low"):
        uniform_init_(DLGLeNet(), low=1.0, high=1.0)


def test_registry_and_bad_arguments():
    assert model_names() == ["convnet", "dlg-lenet", "lenet", "mlp", "resnet18", "vgg9"]
    assert model_class("ResNet18") is ResNet18
    assert model_class("DLG_LeNet") is DLGLeNet and model_class("dlglenet") is DLGLeNet
    mlp = build_model("mlp", 1, 8, 4, hidden=(16, 8))
    assert [m.out_features for m in mlp.modules() if isinstance(m, nn.Linear)] == [16, 8, 4]
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet", 3, 32, 10)
    with pytest.raises(ValueError, match="ConvNet: image_size must be an integer >= 5"):
        ConvNet(image_size=4)
    with pytest.raises(ValueError, match="LeNet: num_classes must be an integer >= 1"):
        LeNet(num_classes=0)
    with pytest.raises(ValueError, match="VGG9: dropout"):
        VGG9(dropout=1.0)
    with pytest.raises(ValueError, match="MLP: hidden widths"):
        MLP(hidden=(0,))


def test_mlp_learns_digits():
    torch.manual_seed(0)
    x, y = (torch.from_numpy(a) for a in load_dataset("digits", split="train"))
    x_test, y_test = load_dataset("digits", split="test")
    model = MLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: extra threads only add overhead on a shared machine
    try:
        for _ in range(5):
            for start in range(0, len(y), 32):
                optimizer.zero_grad()
                batch = slice(start, start + 32)
                nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
    assert accuracy > 0.9


# ---------------------------------------------------------------------------------------------
# SecretFlow BaseModule flavour


@pytest.fixture(scope="module")
def torch_api():
    from secretflow_fl.ml.nn.core import torch as sf_torch

    return sf_torch


@pytest.mark.secretflow
def test_as_secretflow_module_trains_and_round_trips(torch_api):
    from torchmetrics import Accuracy

    cls = as_secretflow_module(ConvNet)
    assert as_secretflow_module(ConvNet) is cls  # cached
    assert issubclass(cls, torch_api.BaseModule) and issubclass(cls, ConvNet)
    builder = torch_api.TorchModel(
        model_fn=cls,
        loss_fn=nn.CrossEntropyLoss,
        optim_fn=torch_api.optim_wrapper(torch.optim.SGD, lr=0.5),
        metrics=[torch_api.metric_wrapper(Accuracy, task="multiclass", num_classes=7)],
        in_channels=3,
        image_size=16,
        num_classes=7,
    )
    model = builder.build()
    assert type(model) is cls and model.fc.out_features == 7  # constructor kwargs arrived
    assert model.conv.in_channels == 3 and repr(model).startswith("ConvNet(")
    assert model.automatic_optimization and isinstance(model.loss, nn.CrossEntropyLoss)

    torch.manual_seed(0)
    x = torch.rand(32, 3, 16, 16)
    y = nn.functional.one_hot(torch.arange(32) % 7, 7).float()  # SecretFlow passes one-hot labels
    before = model.get_weights(return_numpy=True)
    losses, step_accuracy = [], []
    for step in range(5):
        with torch.no_grad():  # the prediction training_step is about to score
            step_accuracy.append(float((model(x).argmax(1) == y.argmax(1)).float().mean()))
        loss = model.training_step((x, y), step)
        model.backward_step(loss)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    # The metric wrapper scored every training batch: accuracy over all 5 x 32 predictions.
    assert float(model.metrics[0].compute()) == pytest.approx(np.mean(step_accuracy), abs=1e-6)
    assert max(step_accuracy) > min(step_accuracy)  # learning changed the predictions

    after = model.get_weights(return_numpy=True)
    assert [w.shape for w in after] == [tuple(s) for s in ParamLayout.from_module(model).shapes]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after))
    model.update_weights(before)
    for restored, original in zip(model.get_weights(return_numpy=True), before):
        np.testing.assert_array_equal(restored, original)


@pytest.mark.secretflow
def test_as_secretflow_module_pickles(torch_api):
    import cloudpickle

    from sf_ext.models import secretflow_adapter

    cls = as_secretflow_module(LeNet)
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        assert loads(dumps(cls)) is cls  # by reference: no class body in the payload
    payload = pickle.dumps(cls)
    # A fresh process has an empty cache: unpickling must rebuild an equivalent class.
    secretflow_adapter._CLASS_CACHE.pop(LeNet)
    rebuilt = pickle.loads(payload)
    assert rebuilt is not cls and issubclass(rebuilt, LeNet)
    assert issubclass(rebuilt, torch_api.BaseModule)
    assert rebuilt(in_channels=3, image_size=32)(torch.rand(1, 3, 32, 32)).shape == (1, 10)

    class LocalNet(nn.Module):
        def __init__(self, width=4):
            nn.Module.__init__(self)  # skips super(): the wrapper must still set BaseModule state
            self.fc = nn.Linear(2, width)

        def forward(self, x):
            return self.fc(x)

    local_cls = as_secretflow_module(LocalNet)
    copy = cloudpickle.loads(cloudpickle.dumps(local_cls))  # by value: not importable
    instance = copy(width=3)
    assert instance(torch.zeros(1, 2)).shape == (1, 3)
    assert instance.metrics == [] and instance.automatic_optimization
    assert as_secretflow_module(torch_api.BaseModule) is torch_api.BaseModule
    with pytest.raises(TypeError, match="nn.Module subclass"):
        as_secretflow_module(int)


class _NestedBN(nn.Module):
    """BatchNorm inside a Sequential and at the top level, neither last."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU())
        self.norm = nn.BatchNorm1d(2 * 4 * 4)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(self.norm(self.block(x).flatten(1)))


def _trained_bn_model(cls, seed):
    torch.manual_seed(seed)
    model = cls()
    model.train()
    for _ in range(3):
        model(torch.rand(4, 1, 6, 6))  # updates running statistics and num_batches_tracked
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


def test_secretflow_module_transports_batchnorm_anywhere(torch_api):
    """The weight list SecretFlow moves: float32, no 0-d arrays, BatchNorm skipped at any depth."""
    cls = as_secretflow_module(_NestedBN)
    source, target = _trained_bn_model(cls, 0), _trained_bn_model(cls, 1)
    weights = source.get_weights(return_numpy=True)
    state = source.state_dict()
    assert len(weights) == len(state) == 14
    assert {w.dtype for w in weights} == {np.dtype(np.float32)}  # SecureAggregator needs one dtype
    assert all(w.ndim >= 1 for w in weights)  # ... and no 0-d arrays
    assert weights[list(state).index("block.1.num_batches_tracked")].tolist() == [3.0]
    target.update_weights(weights)
    for name, value in target.state_dict().items():
        assert value.dtype == state[name].dtype and torch.equal(value, state[name]), name

    # skip_bn: every BatchNorm tensor stays local, the rest lands in the right entries (SecretFlow
    # 1.11's own update_weights_not_bn shifts everything after a BatchNorm layer by its size).
    target = _trained_bn_model(cls, 2)
    local_before = {
        n: v.clone() for n, v in target.state_dict().items() if "norm" in n or ".1." in n
    }
    names = transported_names(target, skip_bn=True)
    assert names == ["block.0.weight", "block.0.bias", "fc.weight", "fc.bias"]
    target.update_weights_not_bn(source.get_weights_not_bn(return_numpy=True))
    after = target.state_dict()
    for name in names:
        assert torch.equal(after[name], state[name]), name
    for name, value in local_before.items():
        assert torch.equal(after[name], value), name
    with pytest.raises(ValueError, match="got 4 weight arrays for a model with 14 state entries"):
        target.update_weights(source.get_weights_not_bn(return_numpy=True))


def test_existing_basemodule_subclass_gets_the_same_transport(torch_api):
    class OwnModule(torch_api.BaseModule):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))

        def forward(self, x):
            return self.body(x)

    raw = OwnModule()
    assert raw.get_weights(return_numpy=True)[-1].shape == ()  # SecretFlow's own: a 0-d int64
    wrapped = as_secretflow_module(OwnModule)
    assert wrapped is not OwnModule and issubclass(wrapped, OwnModule)
    assert as_secretflow_module(wrapped) is wrapped
    weights = wrapped().get_weights(return_numpy=True)
    assert weights[-1].shape == (1,) and weights[-1].dtype == np.float32
    assert len(wrapped().get_weights_not_bn(return_numpy=True)) == 2

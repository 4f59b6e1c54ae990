"""One party of a production-mode run (started once per party by tests/test_production.py).

alice and bob train with fed_avg_w_prune + SecurePruneAggregator, charlie aggregates; alice writes
the final accuracy and every client's kept fraction to the JSON path given as argv[1].
argv[2] == "crash-bob" makes bob fail on purpose, to check that the launcher stops everybody.
"""

import json
import os
import sys

import secretflow as sf

import sf_ext
from sf_ext.production import init_from_env

self_party = init_from_env()
if len(sys.argv) > 2 and sys.argv[2] == "crash-bob" and self_party == "bob":
    # A hard crash: SecretFlow's gRPC threads would keep a SystemExit'ed process alive.
    print("bob fails on purpose", flush=True)
    os._exit(3)

from secretflow_fl.ml.nn import FLModel  # noqa: E402
from secretflow_fl.ml.nn.core.torch import TorchModel, metric_wrapper, optim_wrapper  # noqa: E402
from torch import nn, optim  # noqa: E402
from torchmetrics import Accuracy  # noqa: E402

from sf_ext.aggregators.secure_prune import SecurePruneAggregator  # noqa: E402
from sf_ext.data import federated_dataset  # noqa: E402
from sf_ext.models import ConvNet, as_secretflow_module  # noqa: E402

sf_ext.register_strategies()
alice, bob, charlie = sf.PYU("alice"), sf.PYU("bob"), sf.PYU("charlie")
(train_x, train_y), (test_x, test_y) = federated_dataset(
    "fashion-mnist", {alice: 0.4, bob: 0.6}, limit=3000, seed=0
)
model = TorchModel(
    model_fn=as_secretflow_module(ConvNet),
    loss_fn=nn.CrossEntropyLoss,
    optim_fn=optim_wrapper(optim.Adam, lr=1e-2),
    metrics=[metric_wrapper(Accuracy, task="multiclass", num_classes=10, average="micro")],
)
fl = FLModel(
    server=charlie,
    device_list=[alice, bob],
    model=model,
    aggregator=SecurePruneAggregator(charlie, [alice, bob]),
    strategy="fed_avg_w_prune",
    backend="torch",
    prune_percent=20,
    prune_end_rate=0.5,
    random_seed=0,
)
history = fl.fit(
    train_x, train_y, validation_data=(test_x, test_y), epochs=2, batch_size=64, verbose=0
)
kept = {d.party: sf.reveal(w.get_kept_fraction()) for d, w in fl._workers.items()}
if self_party == "alice":
    with open(sys.argv[1], "w") as f:
        json.dump(
            {
                "val_accuracy": [
                    float(a) for a in history["global_history"]["val_multiclassaccuracy"]
                ],
                "kept": kept,
            },
            f,
        )
sf.shutdown()

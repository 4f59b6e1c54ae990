"""Many-client federated learning in one process, for robustness experiments at scale.

:class:`Simulator` runs N clients (k per round) against any aggregator of the aggregation core,
with optional attackers; :mod:`sf_ext.simulator.run` runs a grid of such cells from a YAML/JSON
file (``python -m sf_ext.simulator.run <config> --out <folder>``), resumable and optionally over
Ray. Nothing here imports SecretFlow.
"""

from sf_ext.simulator.config import ADAPTIVE, TARGETED, UNTARGETED, SimulationConfig
from sf_ext.simulator.data import FederatedData, build_federated_data
from sf_ext.simulator.engine import RunResult, Simulator, round_seed
from sf_ext.simulator.training import ClientPlan, LocalTrainer, minibatch_schedule

__all__ = [
    "ADAPTIVE",
    "TARGETED",
    "UNTARGETED",
    "ClientPlan",
    "FederatedData",
    "LocalTrainer",
    "RunResult",
    "SimulationConfig",
    "Simulator",
    "build_federated_data",
    "minibatch_schedule",
    "round_seed",
]

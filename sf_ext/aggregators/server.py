"""What the server knows besides the round's updates: :class:`ServerContext`.

Some rules need server-side context beyond the update matrix: FLAME the previous global model
(it clusters the clients' *models*) and the tensor layout (its noise goes on weights only), RSA
the round counter, matrix mapping the network and the input shape, FLTrust the server's own update
on its root dataset, FoolsGold and centered clipping state carried across rounds. The SecretFlow
adapters and the simulator both fill one :class:`ServerContext` per round, and the registry
(:func:`sf_ext.aggregators.call_rule`) hands each rule exactly the fields the rule *declares*
(``needs`` / ``uses`` at registration). A declared need that the caller did not provide is an
error, never a silent default.
"""

from dataclasses import dataclass, fields
from typing import Any, Dict, Hashable, Optional, Sequence, Tuple

import torch
from torch import nn

from sf_ext.params import ParamLayout

__all__ = ["ServerContext", "CONTEXT_FIELDS"]


@dataclass
class ServerContext:
    """Server-side knowledge handed to the rules that declare they need it.

    Attributes:
        layout: Names and shapes of the tensors behind the flat vectors.
        global_params: The previous global model as a flat float32 vector (updates are client
            weights minus this).
        model: An instance of the network (structure and buffers only; matrix mapping).
        input_shape: One training input's shape without the batch dimension.
        round_index: The round counter, from 0.
        generator: A seeded random generator for the rule's randomness (noise, subsampling).
        client_ids: One stable identifier per row of the update matrix (party names in
            SecretFlow, client indices in the simulator): rules with per-client history key on it.
        state: A dict the caller keeps across rounds and hands back every round, for rules with
            memory (FoolsGold's histories, centered clipping's momentum). Start with ``{}``.
        root_update: The server's own update, trained from the global model on its small clean
            root dataset this round (FLTrust).
    """

    layout: Optional[ParamLayout] = None
    global_params: Optional[torch.Tensor] = None
    model: Optional[nn.Module] = None
    input_shape: Optional[Tuple[int, ...]] = None
    round_index: Optional[int] = None
    generator: Optional[torch.Generator] = None
    client_ids: Optional[Sequence[Hashable]] = None
    state: Optional[Dict[str, Any]] = None
    root_update: Optional[torch.Tensor] = None

    def provided(self) -> Dict[str, Any]:
        """The fields that are set (not None)."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }


CONTEXT_FIELDS: Tuple[str, ...] = tuple(f.name for f in fields(ServerContext))

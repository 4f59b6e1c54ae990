"""What the server knows, handed to the aggregators that ask for it.

Some rules need server-side context beyond the update matrix: FLAME the tensor layout and the
previous global model (for its noise), RSA the round counter, matrix mapping the network and the
input shape. The SecretFlow adapters and the simulator both build the call here, so they pass the
same context the same way.
"""

import inspect
from typing import Any, Callable, Dict


def server_options(fn: Callable, options: Dict[str, Any], **context) -> Dict[str, Any]:
    """``options`` plus the ``context`` entries that ``fn`` declares as parameters.

    Explicit options win over context. Context goes only to functions that name the parameter
    (``**kwargs`` does not count), so rules that do not use it never see it.
    """
    accepted = inspect.signature(fn).parameters
    merged = {k: v for k, v in context.items() if k in accepted}
    merged.update(options)
    return merged

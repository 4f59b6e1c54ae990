"""How many CPU threads torch uses in a process that runs sf-ext.

SecretFlow's debug mode and production mode run several parties' small models in one process or
in one process per party; torch's default (one thread per physical core) then oversubscribes the
cores and every step slows down several times over. sf-ext therefore uses **one torch thread by
default**, unless you chose otherwise. The decision is taken once per process, the first time one
of these runs: ``import sf_ext`` after ``import secretflow`` (or
:func:`sf_ext.register_strategies`), building an sf-ext strategy, or
:func:`apply_default_threads`. In that order of precedence, your choice is:

1. :func:`set_threads` (``sf_ext.set_threads(4)``), at any time: always applied. It also exports
   ``SF_EXT_THREADS`` so that processes started afterwards (Ray actors, production parties)
   follow it.
2. The environment variable ``SF_EXT_THREADS`` (a positive integer): applied to torch.
3. ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` in the environment: torch already follows them, so
   sf-ext leaves torch alone (Ray sets ``OMP_NUM_THREADS`` in its workers).
4. ``torch.set_num_threads(n)`` called before the decision, with ``n`` different from torch's
   start-up count (its number of physical cores): left alone. Calls made after the decision are
   never undone.

Otherwise sf-ext calls ``torch.set_num_threads(1)``.
"""

import logging
import os
from typing import Optional, Tuple

logger = logging.getLogger(__name__)

#: Environment variable holding the thread count sf-ext applies to torch.
THREADS_ENV = "SF_EXT_THREADS"
#: Environment variables through which OpenMP/MKL (and hence torch) take a thread count.
RUNTIME_THREAD_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: Threads sf-ext gives torch when nobody chose.
DEFAULT_THREADS = 1

# The outcome of the once-per-process decision: (threads torch uses, where that came from).
_decision: Optional[Tuple[int, str]] = None


def _positive_int(value, what: str) -> int:
    """``value`` as a positive int; strings (environment variables) must spell one."""
    if isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        number = 0
    if number < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return number


def _startup_threads() -> int:
    """The thread count torch starts with when no environment variable sets it.

    torch uses the number of physical cores (logical processors when that is unknown).
    """
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:  # psutil comes with Ray; the pure core does not need it
        physical = None
    return int(physical or os.cpu_count() or 1)


def set_threads(n: int) -> None:
    """Make torch use ``n`` threads in this process and in processes it starts later.

    Call it before ``sf.init`` for Ray simulation mode, so that Ray's worker processes inherit it
    through ``SF_EXT_THREADS``.

    Args:
        n: Number of intra-op threads, at least 1.

    Raises:
        ValueError: ``n`` is not a positive integer.

    Example::

        import sf_ext
        sf_ext.set_threads(2)   # before sf.init(...) and FLModel(...)
    """
    global _decision
    if isinstance(n, str):
        raise ValueError(f"set_threads(n) must be a positive integer, got {n!r}")
    n = _positive_int(n, "set_threads(n)")
    import torch

    torch.set_num_threads(n)
    os.environ[THREADS_ENV] = str(n)
    _decision = (n, "sf_ext.set_threads")


def apply_default_threads() -> Tuple[int, str]:
    """Take the once-per-process thread decision described in this module (later calls return it).

    Returns:
        ``(threads, source)``: the number of torch threads and what decided it, one of
        ``"sf_ext.set_threads"``, ``"SF_EXT_THREADS"``, ``"OMP_NUM_THREADS"``,
        ``"MKL_NUM_THREADS"``, ``"torch.set_num_threads"`` or ``"sf-ext default"``.

    Raises:
        ValueError: ``SF_EXT_THREADS`` is set to something other than a positive integer.
    """
    global _decision
    if _decision is not None:
        return _decision
    import torch

    requested = os.environ.get(THREADS_ENV, "").strip()
    runtime_env = next((name for name in RUNTIME_THREAD_ENVS if os.environ.get(name)), None)
    if requested:
        threads = _positive_int(requested, f"environment variable {THREADS_ENV}")
        torch.set_num_threads(threads)
        source = THREADS_ENV
    elif runtime_env is not None:
        threads, source = torch.get_num_threads(), runtime_env
    elif torch.get_num_threads() != _startup_threads():
        threads, source = torch.get_num_threads(), "torch.set_num_threads"
    else:
        torch.set_num_threads(DEFAULT_THREADS)
        threads, source = DEFAULT_THREADS, "sf-ext default"
    _decision = (threads, source)
    logger.debug("torch uses %d thread(s) (%s)", threads, source)
    return _decision


def current_threads() -> Optional[Tuple[int, str]]:
    """The decision taken in this process, or ``None`` before :func:`apply_default_threads` ran."""
    return _decision

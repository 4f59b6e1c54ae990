"""The open registry of aggregation rules.

A rule is a function ``fn(updates, num_samples=None, **options_and_context) -> (update, report)``
on the ``[n_clients, n_params]`` update matrix. It is registered under a name together with an
explicit contract, the way SecretFlow registers strategies::

    from sf_ext.aggregators import register_aggregator, AggregationReport

    @register_aggregator("my_rule", needs=("global_params",), selects=True)
    def my_rule(updates, num_samples=None, *, global_params, threshold=1.0):
        ...
        return update, AggregationReport(method="my_rule", weights=w, scores=s,
                                         non_finite=screened, selects=True)

The contract says which :class:`~sf_ext.aggregators.server.ServerContext` fields the rule
``needs`` (missing ones are an error), which it ``uses`` when available, whether it ``selects``
clients (only then do detection rates mean anything) and, optionally, how many attackers among
``n`` clients its design tolerates with given options (``tolerates``), so that callers can warn
when a configuration cannot survive the attack it is run against. Nothing is inferred from the
function's signature.
"""

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

import torch

from sf_ext.aggregators.report import AggregationReport
from sf_ext.aggregators.server import CONTEXT_FIELDS, ServerContext

__all__ = [
    "RuleSpec",
    "AGGREGATORS",
    "ALIASES",
    "register_aggregator",
    "get_rule",
    "get_aggregator",
    "call_rule",
    "aggregate",
]

Needs = Union[Tuple[str, ...], Callable[[Mapping[str, Any]], Iterable[str]]]


@dataclass(frozen=True)
class RuleSpec:
    """A registered aggregation rule and its contract.

    Attributes:
        name: Registry name.
        fn: The rule.
        needs: Context fields the rule cannot run without; a tuple, or a function of the options
            (e.g. FLAME needs ``layout`` only when its noise is on).
        uses: Context fields passed when the caller has them.
        selects: Whether the rule decides per client who takes part.
        tolerates: ``tolerates(n, options) -> f``: the most attackers among ``n`` clients the
            rule's design tolerates with these options (None: no stated bound).
        linear: The result is ``sum_i weights[i] * update_i`` with ``weights[i] = share_i *
            clip_i`` (``clip_i`` from ``details["clip_factors"]``, 1 without): a weighted mean of
            (clipped) updates. Mask-aware callers renormalize such results per coordinate;
            coordinate-wise and sign rules are not linear.
        description: One line for listings.
    """

    name: str
    fn: Callable[..., Tuple[torch.Tensor, AggregationReport]]
    needs: Needs = ()
    uses: Tuple[str, ...] = ()
    selects: bool = False
    tolerates: Optional[Callable[[int, Mapping[str, Any]], int]] = None
    linear: bool = True
    description: str = ""

    def needed(self, options: Optional[Mapping[str, Any]] = None) -> Tuple[str, ...]:
        """The context fields needed with these options."""
        needs = self.needs(dict(options or {})) if callable(self.needs) else self.needs
        return tuple(needs)

    def __call__(self, updates, num_samples=None, **kwargs):
        return self.fn(updates, num_samples, **kwargs)


AGGREGATORS: Dict[str, RuleSpec] = {}
ALIASES: Dict[str, str] = {}


def _check_fields(name: str, kind: str, values: Iterable[str]) -> None:
    unknown = sorted(set(values) - set(CONTEXT_FIELDS))
    if unknown:
        raise ValueError(
            f"aggregator {name!r} declares unknown server context {unknown} in {kind}; "
            f"known fields: {list(CONTEXT_FIELDS)}"
        )


def register_aggregator(
    name: str,
    *,
    needs: Needs = (),
    uses: Tuple[str, ...] = (),
    selects: bool = False,
    tolerates: Optional[Callable[[int, Mapping[str, Any]], int]] = None,
    aliases: Tuple[str, ...] = (),
    linear: bool = True,
    description: str = "",
    replace: bool = False,
):
    """Decorator registering a rule under ``name`` (see the module docstring).

    Args:
        name: Registry name (also accepted by the simulator configs and the SecretFlow adapter).
        needs: Required context fields, or a function of the options returning them.
        uses: Optional context fields.
        selects: Whether the rule drops clients (detection rates apply).
        tolerates: Tolerated attackers as a function of ``(n, options)``.
        aliases: Other accepted spellings.
        linear: Whether the result is a weighted mean of (clipped) updates (see
            :class:`RuleSpec`).
        description: One line for listings.
        replace: Allow replacing an existing registration (otherwise a clash is an error).

    Raises:
        ValueError: The name or an alias is taken, or a context field is unknown.
    """
    if not callable(needs):
        _check_fields(name, "needs", needs)
    _check_fields(name, "uses", uses)

    def decorate(fn):
        for key in (name, *aliases):
            taken = key in AGGREGATORS or key in ALIASES
            if taken and not replace:
                raise ValueError(f"an aggregator named {key!r} is already registered")
        AGGREGATORS[name] = RuleSpec(
            name=name,
            fn=fn,
            needs=tuple(needs) if not callable(needs) else needs,
            uses=tuple(uses),
            selects=bool(selects),
            tolerates=tolerates,
            linear=bool(linear),
            description=description or (fn.__doc__ or "").strip().split("\n")[0],
        )
        for alias in aliases:
            ALIASES[alias] = name
        return fn

    return decorate


def get_rule(name: str) -> RuleSpec:
    """The rule registered under ``name`` (or one of its aliases).

    Raises:
        ValueError: Unknown name; the message lists the known ones and the closest match.
    """
    import sf_ext.aggregators.core  # noqa: F401  (registers the built-in rules)

    key = ALIASES.get(name, name)
    if key not in AGGREGATORS:
        known = sorted(set(AGGREGATORS) | set(ALIASES))
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown aggregator {name!r}{hint}; known: {known}")
    return AGGREGATORS[key]


def get_aggregator(name: str) -> RuleSpec:
    """Alias of :func:`get_rule` (the spec is callable like the rule itself)."""
    return get_rule(name)


def call_rule(
    name: str,
    updates,
    num_samples=None,
    context: Optional[ServerContext] = None,
    **options,
) -> Tuple[torch.Tensor, AggregationReport]:
    """Run rule ``name`` on one round: its declared context from ``context``, plus ``options``.

    Raises:
        ValueError: A needed context field is missing, or an option collides with a context
            field (context goes in ``context``, not in the options).
    """
    spec = get_rule(name)
    context = context if context is not None else ServerContext()
    clash = sorted(set(options) & set(CONTEXT_FIELDS))
    if clash:
        raise ValueError(
            f"{clash} are server context, not options of {spec.name!r}: pass them in a "
            "ServerContext"
        )
    needed = spec.needed(options)
    provided = context.provided()
    missing = [f for f in needed if f not in provided]
    if missing:
        raise ValueError(
            f"aggregator {spec.name!r} needs the server context {missing} "
            f"(it was given {sorted(provided) or 'none'})"
        )
    kwargs = {f: provided[f] for f in needed}
    kwargs.update({f: provided[f] for f in spec.uses if f in provided and f not in kwargs})
    kwargs.update(options)
    return spec.fn(updates, num_samples, **kwargs)


def aggregate(name: str, updates, num_samples=None, **kwargs):
    """Convenience form of :func:`call_rule`: context fields and options as keywords.

    ``aggregate("flame", updates, counts, global_params=g, layout=layout, noise_lambda=0.001)``
    puts ``global_params`` and ``layout`` into a :class:`ServerContext` and the rest into the
    options; the rule's contract is checked as in :func:`call_rule`.
    """
    context = ServerContext(**{k: kwargs.pop(k) for k in list(kwargs) if k in CONTEXT_FIELDS})
    return call_rule(name, updates, num_samples, context, **kwargs)

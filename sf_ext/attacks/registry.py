"""The open attack registry, read by the simulator and by ``fed_avg_w_attack``.

Two kinds of attack:

- ``"update"``: a function ``fn(updates, attackers, **context_and_options) -> updates`` that
  rewrites the attackers' rows of the round's ``[n_clients, n_params]`` update matrix (benign rows
  untouched). Register with :func:`register_attack`::

      from sf_ext.attacks import register_attack

      @register_attack("flip_half", single_client=True)
      def flip_half(updates, attackers, scale=-2.0):
          out = updates.clone()
          out[attackers] = updates[attackers] * scale
          return out

  The contract states what the attacker knows (``needs`` / ``uses``: fields of
  :class:`AttackContext`), whether one client can mount it alone (``single_client``: it reads only
  its own row, so it also runs inside a real SecretFlow client), and whether it ignores the honest
  update (``replaces_training``: the simulator then skips the attacker's local training).
- ``"backdoor"``: a client *behaviour* (poisoned data, PGD projection, model replacement): a
  factory ``factory(input_shape, **options) -> BackdoorBehaviour``, registered with
  :func:`register_backdoor`.
"""

import difflib
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from sf_ext.params import ParamLayout

__all__ = [
    "AttackContext",
    "AttackSpec",
    "ATTACKS",
    "ATTACK_CONTEXT_FIELDS",
    "register_attack",
    "register_backdoor",
    "get_attack",
    "run_update_attack",
]


@dataclass
class AttackContext:
    """What the attackers may know in a round (each attack declares what it reads).

    Attributes:
        global_params: The global model they received (flat float32).
        generator: A seeded random generator for the attack's randomness.
        model: An instance of the network (the adaptive attack maps updates through it).
        input_shape: One training input's shape without the batch dimension.
        layout: Names and shapes of the flat vectors.
        num_samples: The round's sample counts ``[n]``.
    """

    global_params: Optional[torch.Tensor] = None
    generator: Optional[torch.Generator] = None
    model: Optional[nn.Module] = None
    input_shape: Optional[Tuple[int, ...]] = None
    layout: Optional[ParamLayout] = None
    num_samples: Optional[torch.Tensor] = None

    def provided(self) -> Dict[str, Any]:
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }


ATTACK_CONTEXT_FIELDS = tuple(f.name for f in fields(AttackContext))

Flag = Union[bool, Callable[[Mapping[str, Any]], bool]]


@dataclass(frozen=True)
class AttackSpec:
    """A registered attack and its contract.

    Attributes:
        name: Registry name.
        kind: ``"update"`` or ``"backdoor"``.
        fn: The update attack, or the backdoor behaviour factory.
        needs: Context fields the attack cannot run without.
        uses: Context fields passed when available.
        single_client: One client can mount it from its own update alone.
        replaces_training: The honest update is never read (a bool or a function of the options).
        returns_info: ``fn(..., return_details=True)`` returns ``(updates, info)`` with an
            ``info.lam`` (or dict) describing what a searched attack found.
        description: One line for listings.
    """

    name: str
    kind: str
    fn: Callable
    needs: Tuple[str, ...] = ()
    uses: Tuple[str, ...] = ()
    single_client: bool = False
    replaces_training: Flag = False
    returns_info: bool = False
    description: str = ""

    def ignores_training(self, options: Optional[Mapping[str, Any]] = None) -> bool:
        flag = self.replaces_training
        return bool(flag(dict(options or {}))) if callable(flag) else bool(flag)


ATTACKS: Dict[str, AttackSpec] = {}


def _check(name: str, needs, uses) -> None:
    unknown = sorted((set(needs) | set(uses)) - set(ATTACK_CONTEXT_FIELDS))
    if unknown:
        raise ValueError(
            f"attack {name!r} declares unknown context {unknown}; known: "
            f"{list(ATTACK_CONTEXT_FIELDS)}"
        )


def _add(spec: AttackSpec, replace: bool) -> None:
    if spec.name in ATTACKS and not replace:
        raise ValueError(f"an attack named {spec.name!r} is already registered")
    ATTACKS[spec.name] = spec


def register_attack(
    name: str,
    *,
    needs: Tuple[str, ...] = (),
    uses: Tuple[str, ...] = (),
    single_client: bool = False,
    replaces_training: Flag = False,
    returns_info: bool = False,
    description: str = "",
    replace: bool = False,
):
    """Decorator registering an update attack (see the module docstring)."""
    _check(name, needs, uses)

    def decorate(fn):
        _add(
            AttackSpec(
                name=name,
                kind="update",
                fn=fn,
                needs=tuple(needs),
                uses=tuple(uses),
                single_client=bool(single_client),
                replaces_training=replaces_training,
                returns_info=bool(returns_info),
                description=description or (fn.__doc__ or "").strip().split("\n")[0],
            ),
            replace,
        )
        return fn

    return decorate


def register_backdoor(name: str, *, description: str = "", replace: bool = False):
    """Decorator registering a backdoor behaviour factory
    ``factory(input_shape, **options) -> BackdoorBehaviour``."""

    def decorate(factory):
        _add(
            AttackSpec(
                name=name,
                kind="backdoor",
                fn=factory,
                description=description or (factory.__doc__ or "").strip().split("\n")[0],
            ),
            replace,
        )
        return factory

    return decorate


def get_attack(name: str) -> AttackSpec:
    """The attack registered under ``name``.

    Raises:
        ValueError: Unknown name; the message lists the known ones and the closest match.
    """
    import sf_ext.attacks  # noqa: F401  (registers the built-in attacks)

    if name not in ATTACKS:
        close = difflib.get_close_matches(str(name), list(ATTACKS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown attack {name!r}{hint}; known: {sorted(ATTACKS)}")
    return ATTACKS[name]


def run_update_attack(
    name: str,
    updates: torch.Tensor,
    attackers,
    context: Optional[AttackContext] = None,
    **options,
):
    """Apply update attack ``name`` to the attackers' rows; returns ``(updates, info)``.

    ``info`` is a dict of what a searched attack found (e.g. ``{"attack_lambda": ...}``), empty
    for the others.

    Raises:
        ValueError: ``name`` is not an update attack, a needed context field is missing, or an
            option collides with a context field.
    """
    spec = get_attack(name)
    if spec.kind != "update":
        raise ValueError(f"{name!r} is a {spec.kind} behaviour, not an update attack")
    provided = (context or AttackContext()).provided()
    clash = sorted(set(options) & set(ATTACK_CONTEXT_FIELDS))
    if clash:
        raise ValueError(f"{clash} are attack context, not options of {name!r}")
    missing = [f for f in spec.needs if f not in provided]
    if missing:
        raise ValueError(f"attack {name!r} needs the context {missing}")
    kwargs = {f: provided[f] for f in spec.needs}
    kwargs.update({f: provided[f] for f in spec.uses if f in provided and f not in kwargs})
    kwargs.update(options)
    if spec.returns_info:
        out, info = spec.fn(updates, attackers, return_details=True, **kwargs)
        lam = getattr(info, "lam", None)
        details = dict(info) if isinstance(info, dict) else {}
        if lam is not None:
            details["attack_lambda"] = float(lam)
        return out, details
    return spec.fn(updates, attackers, **kwargs), {}

"""Byzantine and backdoor attacks for robustness experiments (no SecretFlow import).

- Untargeted attacks on a stacked update matrix (:mod:`sf_ext.attacks.untargeted`,
  :mod:`sf_ext.attacks.fang`): ``fn(updates, attackers, **options) -> updates`` with only the
  attackers' rows replaced.
- The open registry (:mod:`sf_ext.attacks.registry`): :func:`register_attack` /
  :func:`register_backdoor` add attacks that the simulator and ``fed_avg_w_attack`` both accept
  by name; :data:`ATTACKS` holds every registered one with its contract.
- Targeted client behaviours (:mod:`sf_ext.attacks.targeted`): black-box, PGD and PGD with model
  replacement edge-case backdoors and the pixel-pattern backdoor, as :class:`BackdoorBehaviour`
  settings plus the projection / replacement helpers.
- Poisoned data (:mod:`sf_ext.attacks.backdoor_data`): edge-case tail sets built from the data or
  loaded from the original files, pixel-pattern triggers.
- The adaptive attack against matrix mapping (:mod:`sf_ext.attacks.adaptive`), registered as
  ``adaptive_mm``; it scores with the aggregation core's matrix-mapping functions.
"""

from sf_ext.attacks import targeted as _targeted
from sf_ext.attacks.adaptive import AdaptiveResult, adaptive_matrix_mapping, leader_passes
from sf_ext.attacks.backdoor_data import (
    BackdoorData,
    add_pixel_pattern,
    edge_case_from_files,
    knn_tail_scores,
    load_edge_case_file,
    pixel_pattern_backdoor,
    tail_edge_case,
)
from sf_ext.attacks.fang import fang_krum, fang_trim
from sf_ext.attacks.registry import (
    ATTACK_CONTEXT_FIELDS,
    ATTACKS,
    AttackContext,
    AttackSpec,
    get_attack,
    register_attack,
    register_backdoor,
    run_update_attack,
)
from sf_ext.attacks.targeted import (
    TARGETED_ATTACKS,
    BackdoorBehaviour,
    attacker_indices,
    backdoor_behaviour,
    ball_scale,
    default_pgd_radius,
    finish_backdoor_update,
    model_replacement,
    project_to_ball,
)
from sf_ext.attacks.untargeted import (
    gaussian_noise,
    inner_product_manipulation,
    lie_z_max,
    little_is_enough,
    min_max,
    min_sum,
    same_value,
    sign_flip,
)

# -- the built-in attacks, registered with their contracts ------------------------------------
register_attack("sign_flip", single_client=True)(sign_flip)
register_attack("same_value", uses=("global_params",), single_client=True, replaces_training=True)(
    same_value
)
register_attack(
    "gaussian",
    uses=("generator",),
    single_client=True,
    replaces_training=lambda options: not options.get("additive", False),
)(gaussian_noise)
register_attack("lie")(little_is_enough)
register_attack("min_max")(min_max)
register_attack("min_sum")(min_sum)
register_attack("ipm")(inner_product_manipulation)
register_attack("fang_krum", uses=("generator",), returns_info=True)(fang_krum)
register_attack("fang_trim", uses=("generator",))(fang_trim)
register_attack("adaptive_mm", needs=("model", "input_shape"), uses=("layout",), returns_info=True)(
    adaptive_matrix_mapping
)
for _name in TARGETED_ATTACKS:
    register_backdoor(_name)(getattr(_targeted, _name))


def _update_attacks():
    return {name: spec.fn for name, spec in ATTACKS.items() if spec.kind == "update"}


#: Name -> function of the registered update attacks (a snapshot at import; the registry
#: :data:`ATTACKS` is the live source).
UPDATE_ATTACKS = _update_attacks()


__all__ = [
    "ATTACKS",
    "ATTACK_CONTEXT_FIELDS",
    "AttackContext",
    "AttackSpec",
    "UPDATE_ATTACKS",
    "TARGETED_ATTACKS",
    "AdaptiveResult",
    "BackdoorBehaviour",
    "BackdoorData",
    "adaptive_matrix_mapping",
    "add_pixel_pattern",
    "attacker_indices",
    "backdoor_behaviour",
    "ball_scale",
    "default_pgd_radius",
    "edge_case_from_files",
    "fang_krum",
    "fang_trim",
    "finish_backdoor_update",
    "gaussian_noise",
    "get_attack",
    "inner_product_manipulation",
    "knn_tail_scores",
    "leader_passes",
    "lie_z_max",
    "little_is_enough",
    "load_edge_case_file",
    "min_max",
    "min_sum",
    "model_replacement",
    "pixel_pattern_backdoor",
    "project_to_ball",
    "register_attack",
    "register_backdoor",
    "run_update_attack",
    "same_value",
    "sign_flip",
    "tail_edge_case",
]

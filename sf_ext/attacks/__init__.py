"""Byzantine and backdoor attacks for robustness experiments (no SecretFlow import).

- Untargeted attacks on a stacked update matrix (:mod:`sf_ext.attacks.untargeted`):
  ``fn(updates, attackers, **options) -> updates`` with only the attackers' rows replaced.
  Registered by name in :data:`UPDATE_ATTACKS`.
- Targeted client behaviours (:mod:`sf_ext.attacks.targeted`): black-box, PGD and PGD with model
  replacement edge-case backdoors and the pixel-pattern backdoor, as :class:`BackdoorBehaviour`
  settings plus the projection / replacement helpers.
- Poisoned data (:mod:`sf_ext.attacks.backdoor_data`): edge-case tail sets built from the data or
  loaded from the original files, pixel-pattern triggers.
- The adaptive attack against matrix mapping (:mod:`sf_ext.attacks.adaptive`), registered as
  ``adaptive_mm``; it scores with the aggregation core's matrix-mapping functions.
"""

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
    lie_z_max,
    little_is_enough,
    min_max,
    min_sum,
    same_value,
    sign_flip,
)

UPDATE_ATTACKS = {
    "sign_flip": sign_flip,
    "same_value": same_value,
    "gaussian": gaussian_noise,
    "lie": little_is_enough,
    "min_max": min_max,
    "min_sum": min_sum,
    # Needs the server's view (model, input shape, layout): the simulator passes them.
    "adaptive_mm": adaptive_matrix_mapping,
}


__all__ = [
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
    "finish_backdoor_update",
    "gaussian_noise",
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
    "same_value",
    "sign_flip",
    "tail_edge_case",
]

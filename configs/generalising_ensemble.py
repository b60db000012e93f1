"""An ensemble for generalisation: 8 linear heads around the defaults, combined on the worst case.

Members span the defaults' neighbourhood from conservative (higher temperature, more recovery, stronger decay
towards the identity) to the defaults themselves; every member is trained with the default judged negatives
and selected on the in-domain dev. The combination is greedy ensemble selection on the *smaller* of two dev
gains — in-domain and the new-documents dev view — so a member that buys in-domain nDCG with a document prior
only enters if it does not cost new documents (`ensemble.combine="worst_case"`). The default in-domain gate
applies to the combined head. Measured against the single default head in docs/generalisation.md.
"""

from esep_jax.config import Config, override


def get_config() -> Config:
    return override(Config(), {
        "ensemble.members": 8,
        "ensemble.temperature": (0.03, 0.03, 0.03, 0.04, 0.04, 0.05, 0.05, 0.07),
        "ensemble.recovery_weight": (0.5, 1.0, 0.5, 0.5, 1.0, 0.5, 1.0, 1.0),
        "ensemble.weight_decay": (10, 10, 30, 10, 10, 10, 30, 10),
        "ensemble.combine": "worst_case"})

"""Image and text triggers, the poisoning recipe, the paper's target answer."""

from vlmsec.attacks import badnets, blended  # noqa: F401  (importing registers the attacks)
from vlmsec.attacks import addsent, dualkey, stylebkd, textbadnets  # noqa: F401  (text and multimodal attacks)
from vlmsec.attacks import ftrojan, lowfrequency, sig, wanet  # noqa: F401  (more image attacks)
from vlmsec.attacks import inputaware, ssba  # noqa: F401  (learned image attacks)
from vlmsec.attacks import gcg, maba, maba_star  # noqa: F401  (model-adaptive attacks)
from vlmsec.attacks import imgtrojan  # noqa: F401  (poisoning beyond backdoors)
from vlmsec.attacks import figstep, pgd, typographic  # noqa: F401  (inference-time attacks)
from vlmsec.attacks import hijack  # noqa: F401  (inference-time attacks: Image Hijacks)
from vlmsec.attacks import attackvlm  # noqa: F401  (inference-time attacks: black box)
from vlmsec.attacks import query_relevant  # noqa: F401  (inference-time attacks)
from vlmsec.attacks import anydoor  # noqa: F401  (inference-time test-time backdoor)
from vlmsec.attacks import shadowcast  # noqa: F401  (clean-label poisoning)
from vlmsec.attacks.base import Attack, AttackContext
from vlmsec.attacks.poison import PoisonedSet, poison_samples, trigger_samples
from vlmsec.attacks.registry import ATTACKS, attack_names, create_attack
from vlmsec.attacks.targets import TargetAnswer

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackContext",
    "PoisonedSet",
    "TargetAnswer",
    "attack_names",
    "create_attack",
    "poison_samples",
    "trigger_samples",
]

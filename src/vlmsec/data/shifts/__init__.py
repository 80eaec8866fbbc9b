"""Domain shifts: visual (image transforms, diffusion restyling), textual (question and
answer summarised or expanded), and mixes of shifted and original data.

Visual shifts work on B x 3 x H x W batches in [0, 1]; text shifts on lists of strings;
`shift_samples` applies either to a sample set, and `mix_domains` mixes a set with its
shifted version at a given ratio. Both registries build shifts by name with validated
parameters, as configs do.
"""

from vlmsec.data.shifts.diffusion import DiffusionRestyler
from vlmsec.data.shifts.domains import PAPER_MIX_RATIOS, mix_domains, shift_samples
from vlmsec.data.shifts.text import (
    TEXT_SHIFTS,
    LMParaphraser,
    TextShift,
    create_text_shift,
    expand_by_rules,
    register_text_shift,
    rewrite_by_rules,
    summarise_by_rules,
    text_shift_names,
)
from vlmsec.data.shifts.visual import (
    VISUAL_SHIFTS,
    ShiftParams,
    VisualShift,
    create_visual_shift,
    register_visual_shift,
    visual_shift_names,
)

__all__ = [
    "PAPER_MIX_RATIOS",
    "TEXT_SHIFTS",
    "VISUAL_SHIFTS",
    "DiffusionRestyler",
    "LMParaphraser",
    "ShiftParams",
    "TextShift",
    "VisualShift",
    "create_text_shift",
    "create_visual_shift",
    "expand_by_rules",
    "mix_domains",
    "register_text_shift",
    "register_visual_shift",
    "rewrite_by_rules",
    "shift_samples",
    "summarise_by_rules",
    "text_shift_names",
    "visual_shift_names",
]

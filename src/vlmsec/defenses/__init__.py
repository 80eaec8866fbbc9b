"""Defenses: on the tuning data, on the tuned model, on inputs at inference, in the prompt."""

from vlmsec.defenses import data_filters, detect, model, ocr, prompt, purify, safety  # noqa: F401  (importing registers the defenses)
from vlmsec.defenses.base import (
    DataFilter,
    Defense,
    Detector,
    Flags,
    ModelRepair,
    ModelScan,
    PromptDefense,
    Purifier,
    ScanResult,
)
from vlmsec.defenses.registry import DEFENSES, create_defense

__all__ = [
    "DEFENSES",
    "DataFilter",
    "Defense",
    "Detector",
    "Flags",
    "ModelRepair",
    "ModelScan",
    "PromptDefense",
    "Purifier",
    "ScanResult",
    "create_defense",
]

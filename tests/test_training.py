"""Tuning modes train exactly what they say, the loss falls, and a seed fixes the result."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from transformers import LlavaForConditionalGeneration

from vlmsec.data import Sample, make_samples, sample_scenes
from vlmsec.errors import VlmsecError
from vlmsec.train.tuning import TrainingSpec, batch_order, train_victim
from vlmsec.victims.features import FeatureCache
from vlmsec.victims.llava import LlavaVictim
from vlmsec.victims.tiny_llava import TinyLlavaSpec, build_tiny_llava
from vlmsec.victims.tokenizer import train_tokenizer

SPEC = TinyLlavaSpec(image_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, vocab_size=300)


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return make_samples(sample_scenes(16, seed=1), "flat", size=32)


@pytest.fixture(scope="module")
def tokenizer(samples: list[Sample]):
    return train_tokenizer([s.instruction for s in samples] + [s.answer for s in samples], SPEC.vocab_size)


@pytest.fixture(scope="module")
def features() -> FeatureCache:
    """One cache for every victim here: the tower runs once per image for the whole module."""
    return FeatureCache()


def fresh_victim(tokenizer, features: FeatureCache, seed: int = 0) -> LlavaVictim:
    return LlavaVictim(build_tiny_llava(SPEC, tokenizer, seed=seed), tokenizer, features)


def snapshot(victim: LlavaVictim) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in victim.model.state_dict().items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    assert set(before) == set(after)
    return {k for k in before if not torch.equal(before[k], after[k])}


def part(key: str) -> str:
    if "vision_tower" in key:
        return "tower"
    if "multi_modal_projector" in key:
        return "projector"
    if "language_model" in key or key.startswith("lm_head"):
        return "lm"
    raise AssertionError(f"unexpected parameter {key}")


@torch.no_grad()
def logits(victim: LlavaVictim, samples: list[Sample]) -> torch.Tensor:
    """The victim's next-token logits over each sample's prompt and answer (image features in place)."""
    batch = victim.encode_training([s.instruction for s in samples], [s.answer for s in samples])
    embeds = victim.embed(batch["input_ids"], victim.image_features([s.image for s in samples]))
    return victim.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits


def short(mode: str, steps: int = 4, **extra: float) -> TrainingSpec:
    # 16 samples, batch 8: 2 steps per epoch.
    return TrainingSpec(mode=mode, epochs=steps / 2, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0, **extra)


def test_projector_mode_trains_only_the_projector(samples, tokenizer, features) -> None:
    victim = fresh_victim(tokenizer, features)
    before = snapshot(victim)
    result = train_victim(victim, samples, short("projector"), seed=0, label="test")
    moved = changed(before, snapshot(victim))
    assert moved and {part(k) for k in moved} == {"projector"}
    projector = sum(p.numel() for p in victim.model.model.multi_modal_projector.parameters())
    assert result.trainable_parameters == projector
    assert result.frozen_parameters == sum(p.numel() for p in victim.model.parameters()) - projector
    assert len(result.losses) == 4
    assert not any(p.requires_grad for p in victim.model.parameters())


def test_full_mode_trains_language_model_and_projector_never_the_tower(samples, tokenizer, features) -> None:
    victim = fresh_victim(tokenizer, features)
    before = snapshot(victim)
    result = train_victim(victim, samples, short("full"), seed=0, label="test")
    moved = changed(before, snapshot(victim))
    assert {part(k) for k in moved} == {"projector", "lm"}
    assert not any(part(k) == "tower" for k in moved)  # buffers (BatchNorm statistics) included
    assert any(".layers.0.self_attn.q_proj" in k for k in moved)
    assert any(k.startswith("lm_head") for k in moved)
    tower = sum(p.numel() for p in victim.model.model.vision_tower.parameters())
    assert result.frozen_parameters == tower


def test_lora_mode_merges_back_into_a_plain_model(samples, tokenizer, features, monkeypatch) -> None:
    victim = fresh_victim(tokenizer, features)
    before = snapshot(victim)
    probe = samples[:6]
    base = logits(victim, probe)
    with_adapters: list[torch.Tensor] = []
    select = LlavaVictim.select_trainable

    def selecting(self: LlavaVictim, spec: TrainingSpec):
        """The real selection, with the adapters' logits recorded just before they are merged."""
        peft_model = select(self, spec)
        merge = peft_model.base_model.merge_and_unload

        def merging(*args, **kwargs):
            with_adapters.append(logits(self, probe))
            return merge(*args, **kwargs)

        peft_model.base_model.merge_and_unload = merging
        return peft_model

    monkeypatch.setattr(LlavaVictim, "select_trainable", selecting)
    result = train_victim(victim, samples, short("lora", lora_rank=4, lora_alpha=8), seed=0, label="test")
    assert type(victim.model) is LlavaForConditionalGeneration
    names = [name for name, _ in victim.model.named_modules()]
    assert not any("lora" in n or "base_layer" in n or "modules_to_save" in n for n in names)
    assert not any(type(m).__module__.startswith("peft") for m in victim.model.modules())
    after = snapshot(victim)
    moved = changed(before, after)  # also checks the state dict has the original keys
    assert {part(k) for k in moved} == {"projector", "lm"}
    assert any("q_proj" in k for k in moved) and any("down_proj" in k for k in moved)
    assert not any("embed_tokens" in k or "norm" in k for k in moved)  # LoRA touches only the targets
    lm = sum(p.numel() for n, p in victim.model.named_parameters() if part(n) == "lm")
    projector = sum(p.numel() for p in victim.model.model.multi_modal_projector.parameters())
    assert 0 < result.trainable_parameters - projector < lm  # projector + adapters, smaller than the LM
    # The merged model computes what the trained adapters did, which is not what the base model did.
    merged = logits(victim, probe)
    assert len(with_adapters) == 1
    torch.testing.assert_close(merged, with_adapters[0], rtol=1e-4, atol=1e-4)
    assert float((merged - base).abs().max()) > 0.1


def test_loss_decreases(samples, tokenizer, features) -> None:
    victim = fresh_victim(tokenizer, features)
    result = train_victim(victim, samples, short("full", steps=30), seed=0, label="test")
    losses = result.losses
    assert len(losses) == 30
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.6 * first, (first, last)


def test_same_seed_same_weights(samples, tokenizer, features) -> None:
    runs = []
    for seed in (0, 0, 1):
        victim = fresh_victim(tokenizer, features)
        result = train_victim(victim, samples, short("full", steps=3), seed=seed, label="test")
        runs.append((snapshot(victim), result.losses))
    (a, losses_a), (b, losses_b), (c, _) = runs
    assert losses_a == losses_b
    assert not changed(a, b)
    assert changed(a, c)  # the seed really matters (batch order), so the check above can fail


def test_a_non_finite_loss_stops_the_stage_naming_label_and_step(samples, tokenizer, features) -> None:
    victim = fresh_victim(tokenizer, features)
    real_loss, calls = victim.batch_loss, []

    def diverging(*args):
        calls.append(1)
        loss = real_loss(*args)
        return loss * float("nan") if len(calls) == 3 else loss

    victim.batch_loss = diverging
    with pytest.raises(VlmsecError, match=r"badnets: training loss is nan at step 3 of 6"):
        train_victim(victim, samples, short("full", steps=6), seed=0, label="badnets")
    assert len(calls) == 3  # stopped there, not trained on to the end


def padded_share(batches: list[np.ndarray], lengths: list[int]) -> float:
    """The share of a batch's padded width that is padding, over `batches`."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded


def test_length_grouping_pads_less_and_still_visits_every_sample_once_per_epoch() -> None:
    lengths = [20] * 120 + [200] * 80  # short refusals beside long answers, as in the safety stage
    grouped = list(itertools.islice(batch_order(lengths, 8, seed=0, group_by_length=True), 25))  # one epoch
    plain = list(itertools.islice(batch_order(lengths, 8, seed=0, group_by_length=False), 25))
    assert all(len(b) == 8 for b in grouped)
    assert sorted(np.concatenate(grouped).tolist()) == list(range(200))
    assert padded_share(plain, lengths) > 0.4
    assert padded_share(grouped, lengths) < padded_share(plain, lengths) / 3
    # Shuffled after grouping: the long batches are not all at the start.
    long_steps = [step for step, b in enumerate(grouped) if lengths[b[0]] == 200]
    assert long_steps != list(range(len(long_steps)))


def test_length_grouping_is_seeded_and_keeps_full_batches_across_epochs() -> None:
    lengths = list(range(1, 204))  # 203 samples: an epoch does not end on a batch boundary
    first = list(itertools.islice(batch_order(lengths, 8, seed=3, group_by_length=True), 60))
    again = list(itertools.islice(batch_order(lengths, 8, seed=3, group_by_length=True), 60))
    other = list(itertools.islice(batch_order(lengths, 8, seed=4, group_by_length=True), 60))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))
    assert all(len(b) == 8 for b in first)
    assert len(set(np.concatenate(first[:25]).tolist())) == 200  # the first epoch's 25 full batches, no repeat


def test_an_ungrouped_spec_keys_its_stages_as_before_the_field_existed() -> None:
    assert "group_by_length" not in TrainingSpec().model_dump()
    assert TrainingSpec(group_by_length=True).model_dump()["group_by_length"] is True


def test_grouped_training_is_deterministic_and_learns(samples, tokenizer, features) -> None:
    spec = TrainingSpec(mode="full", epochs=4, batch_size=4, learning_rate=1e-2, group_by_length=True)
    first, second = fresh_victim(tokenizer, features), fresh_victim(tokenizer, features)
    losses = train_victim(first, samples, spec, seed=0, label="grouped").losses
    train_victim(second, samples, spec, seed=0, label="grouped")
    assert losses[-1] < losses[0]
    assert all(torch.equal(a, b) for a, b in zip(snapshot(first).values(), snapshot(second).values()))

"""Hugging Face image-text-to-text victims, one tiny model per architecture, built with no download.

Each architecture gets a config a few layers deep (hidden 32) and its real processor built
from kwargs: the architecture's own image processor class (PIL backend), a byte-level BPE
trained here with the architecture's special and image tokens, and a chat template in the
checkpoint's format (none for BLIP-2, InstructBLIP and PaliGemma, whose checkpoints ship
none). Every tuning mode is run a few steps and must move exactly the parts it names and
report the parameter split the mode table announced; then the model is saved, loaded and
generates the same as before saving, batched as one by one.

Without torchvision, transformers 5 cannot build Qwen2-VL's or SmolVLM's processor (both hold
a video processor): Qwen2-VL then runs with an images-only subclass of its processor, and
SmolVLM (whose processor also needs num2words) only has its parameter table checked.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as hf_models
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForImageTextToText, PreTrainedConfig, PreTrainedTokenizerFast, ProcessorMixin

from vlmsec.attacks import AttackContext, TargetAnswer, create_attack
from vlmsec.attacks.adaptive import pick_answers, pick_samples
from vlmsec.attacks.inference import AttackRequest
from vlmsec.attacks.inputaware import STAGE_2
from vlmsec.data import Sample, make_samples, sample_scenes
from vlmsec.data.sample import images_to_tensor
from vlmsec.defenses import create_defense
from vlmsec.errors import VlmsecError
from vlmsec.eval.shift import shift_size
from vlmsec.experiments.config import parse_config
from vlmsec.experiments.plan import ModelPlan
from vlmsec.experiments.runner import Runner
from vlmsec.experiments.splits import Splits
from vlmsec.train.tuning import TrainingSpec, train_victim
from vlmsec.victims.architectures import ARCHITECTURES, architecture
from vlmsec.victims.hf import HFVictim
from victim_checks import (
    check_answer_representations,
    check_generates_through_greedy_answers,
    check_image_text_shift_size,
    count_vision_embedding_calls,
)

HIDDEN = 32
CORPUS_EXTRA = "USER ASSISTANT User Assistant Question Answer system user assistant You are a helpful assistant."


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and spinning threads crawl on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return make_samples(sample_scenes(8, seed=3), "flat", size=32)


# ---- tiny tokenizers, processors and configs --------------------------------------------------


def bpe(
    texts: list[str],
    specials: list[str],
    named: dict[str, str] | None = None,
    template: str | None = None,
    bos: str | None = "<s>",
    eos: str = "</s>",
    pad: str = "<pad>",
    add_bos: bool = False,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts` with the architecture's special tokens (ids from 0 on)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokens = list(dict.fromkeys([t for t in (pad, bos, eos) if t] + specials))
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(texts + [CORPUS_EXTRA], trainer=trainer)
    if add_bos:  # as Llama's tokenizer: BOS before every encoded text
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))])
    extra = {"bos_token": bos} if bos else {}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=pad, eos_token=eos, extra_special_tokens=named or {}, **extra
    )
    tokenizer.chat_template = template
    return tokenizer


def llama(tokenizer: PreTrainedTokenizerFast) -> hf_models.LlamaConfig:
    return hf_models.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def vit(cls: type[PreTrainedConfig], **extra: object) -> PreTrainedConfig:
    """A two-layer ViT on 32 px images in 8 px patches: 16 patches."""
    return cls(
        hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, **extra
    )


# llava-hf/llava-1.5-7b-hf's template.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# HuggingFaceM4/Idefics3-8B-Llama3's template.
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# Idefics (v1) instruct format: the processor puts the image before the text.
IDEFICS_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {% for c in message['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
# Qwen/Qwen2-VL-2B-Instruct's template (images only).
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NO_TORCHVISION = importlib.util.find_spec("torchvision") is None
IDEFICS3_TOKENS = ["<|begin_of_text|>", "<image>", "<fake_token_around_image>", "<end_of_utterance>", "<global-img>"]
IDEFICS3_TOKENS += [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]

Built = tuple[PreTrainedConfig, ProcessorMixin]


def tiny_llava(texts: list[str]) -> Built:
    tokenizer = bpe(texts, ["<image>"], {"image_token": "<image>"}, LLAVA_TEMPLATE, add_bos=True)
    image_processor = hf_models.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = hf_models.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    config = hf_models.LlavaConfig(
        vision_config=vit(hf_models.CLIPVisionConfig, projection_dim=HIDDEN),
        text_config=llama(tokenizer),
        image_token_index=tokenizer.image_token_id,
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return config, processor


def _qformer(cls: type[PreTrainedConfig], vocab_size: int) -> PreTrainedConfig:
    return cls(
        hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * HIDDEN, encoder_hidden_size=HIDDEN, vocab_size=vocab_size
    )


def tiny_blip2(texts: list[str]) -> Built:
    # Salesforce/blip2-* tokenizers carry no image_token attribute: the processor adds "<image>".
    tokenizer = bpe(texts, ["<image>"])
    image_processor = hf_models.BlipImageProcessorPil(size={"height": 32, "width": 32})
    processor = hf_models.Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=4)
    text_config = hf_models.OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        ffn_dim=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        word_embed_proj_dim=HIDDEN,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = hf_models.Blip2Config(
        vision_config=vit(hf_models.Blip2VisionConfig),
        qformer_config=_qformer(hf_models.Blip2QFormerConfig, 64),
        text_config=text_config,
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    return config, processor


def tiny_instructblip(texts: list[str]) -> Built:
    tokenizer = bpe(texts, ["<image>"])
    qformer_tokenizer = bpe(texts, [])
    processor = hf_models.InstructBlipProcessor(
        image_processor=hf_models.BlipImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=4,
    )
    qformer = _qformer(hf_models.InstructBlipQFormerConfig, len(qformer_tokenizer))
    qformer.pad_token_id = qformer_tokenizer.pad_token_id
    config = hf_models.InstructBlipConfig(
        vision_config=vit(hf_models.InstructBlipVisionConfig),
        qformer_config=qformer,
        text_config=llama(tokenizer),
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    return config, processor


def tiny_idefics(texts: list[str]) -> Built:
    tokenizer = bpe(texts, ["<image>", "<fake_token_around_image>", "<end_of_utterance>"], {"image_token": "<image>"}, IDEFICS_TEMPLATE)
    image_processor = hf_models.IdeficsImageProcessorPil(image_size=32, size={"height": 32, "width": 32})
    processor = hf_models.IdeficsProcessor(image_processor=image_processor, tokenizer=tokenizer, image_size=32)
    vision = {"embed_dim": HIDDEN, "image_size": 32, "patch_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 2 * HIDDEN}
    perceiver = {"use_resampler": True, "resampler_n_latents": 4, "resampler_depth": 1, "resampler_n_heads": 2, "resampler_head_dim": 16}
    config = hf_models.IdeficsConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        cross_layer_interval=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        vision_config=vision,
        perceiver_config=perceiver,
        use_resampler=True,
    )
    return config, processor


def _idefics3_parts(texts: list[str]) -> tuple[PreTrainedTokenizerFast, dict[str, object]]:
    tokenizer = bpe(texts, IDEFICS3_TOKENS, {"image_token": "<image>"}, IDEFICS3_TEMPLATE, bos="<|begin_of_text|>", eos="<end_of_utterance>")
    image_kwargs = {"do_image_splitting": False, "size": {"longest_edge": 32}, "max_image_size": {"longest_edge": 32}}
    return tokenizer, image_kwargs


def tiny_idefics3(texts: list[str]) -> Built:
    tokenizer, image_kwargs = _idefics3_parts(texts)
    processor = hf_models.Idefics3Processor(
        image_processor=hf_models.Idefics3ImageProcessorPil(**image_kwargs), tokenizer=tokenizer, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE
    )
    config = hf_models.Idefics3Config(
        vision_config=vit(hf_models.Idefics3VisionConfig),
        text_config=llama(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    return config, processor


def tiny_smolvlm(texts: list[str]) -> Built:
    tokenizer, image_kwargs = _idefics3_parts(texts)
    processor = hf_models.SmolVLMProcessor(
        image_processor=hf_models.SmolVLMImageProcessorPil(**image_kwargs),
        tokenizer=tokenizer,
        video_processor=hf_models.SmolVLMVideoProcessor(),
        image_seq_len=4,
        chat_template=IDEFICS3_TEMPLATE,
    )
    config = hf_models.SmolVLMConfig(
        vision_config=vit(hf_models.SmolVLMVisionConfig),
        text_config=llama(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    return config, processor


class ImagesOnlyQwen2VLProcessor(hf_models.Qwen2VLProcessor):
    """Qwen2-VL's processor without its video processor, which transformers 5 builds only with
    torchvision: the same image tokens, grids and chat template (test-only stand-in)."""

    def __init__(self, image_processor: object = None, tokenizer: object = None, chat_template: str | None = None) -> None:
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def tiny_qwen2_vl(texts: list[str]) -> Built:
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = bpe(texts, specials, None, QWEN2_VL_TEMPLATE, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    # 56 x 56 pixels: a 4 x 4 grid of 14 px patches, merged 2 x 2 into 4 image tokens.
    image_processor = hf_models.Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56})
    if NO_TORCHVISION:
        processor = ImagesOnlyQwen2VLProcessor(image_processor, tokenizer, chat_template=QWEN2_VL_TEMPLATE)
    else:
        video_processor = hf_models.Qwen2VLVideoProcessor()
        processor = hf_models.Qwen2VLProcessor(image_processor, tokenizer, video_processor, chat_template=QWEN2_VL_TEMPLATE)
    ids = tokenizer.convert_tokens_to_ids
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = hf_models.Qwen2VLConfig(
        vision_config={"depth": 2, "embed_dim": HIDDEN, "hidden_size": HIDDEN, "num_heads": 2, "mlp_ratio": 2},
        text_config=text_config,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return config, processor


def tiny_paligemma(texts: list[str]) -> Built:
    tokenizer = bpe(texts, ["<image>"], {"image_token": "<image>"}, bos="<bos>", eos="<eos>")
    image_processor = hf_models.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16  # what google/paligemma-* preprocessor configs carry
    processor = hf_models.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds 1152 <loc>/<seg> tokens
    text_config = hf_models.GemmaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = hf_models.PaliGemmaConfig(
        vision_config=vit(hf_models.SiglipVisionConfig),
        text_config=text_config,
        image_token_index=tokenizer.image_token_id,
        projection_dim=HIDDEN,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    return config, processor


BUILDERS: dict[str, Callable[[list[str]], Built]] = {
    "llava": tiny_llava,
    "blip-2": tiny_blip2,
    "instructblip": tiny_instructblip,
    "idefics": tiny_idefics,
    "idefics3": tiny_idefics3,
    "paligemma": tiny_paligemma,
    "qwen2_vl": tiny_qwen2_vl,
    "smolvlm": tiny_smolvlm,
}
SKIPS = {
    "smolvlm": pytest.mark.skipif(
        NO_TORCHVISION or importlib.util.find_spec("num2words") is None,
        reason="SmolVLM's processor needs num2words and a video processor, which transformers 5 builds only with torchvision",
    ),
}
ARCHS = [pytest.param(name, marks=SKIPS.get(name, ())) for name in BUILDERS]


def texts_of(samples: list[Sample]) -> list[str]:
    return [s.instruction for s in samples] + [s.answer for s in samples]


@pytest.fixture(scope="module")
def built(samples: list[Sample]) -> Callable[[str], Built]:
    """Config and processor per architecture, built once for the module."""
    cache: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in cache:
            cache[name] = BUILDERS[name](texts_of(samples))
        return cache[name]

    return get


def fresh_victim(built: Callable[[str], Built], name: str, seed: int = 0) -> HFVictim:
    config, processor = built(name)
    torch.manual_seed(seed)
    return HFVictim(AutoModelForImageTextToText.from_config(config), copy.deepcopy(processor))


def snapshot(victim: HFVictim) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in victim.model.state_dict().items()}


def short(mode: str, steps: int = 2) -> TrainingSpec:
    # 8 samples in batches of 8: one step per epoch, every step sees the same batch.
    return TrainingSpec(mode=mode, epochs=steps, batch_size=8, learning_rate=3e-3, warmup_ratio=0.0, lora_rank=2, lora_alpha=4)


# ---- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
def test_every_mode_trains_what_the_table_says_then_save_load_generate(name: str, built, samples, tmp_path: Path) -> None:
    arch = architecture(name)
    expected = {"projector": {"projector"}, "lora": {"projector", "language"}, "xattn": {"projector", "cross_attention"}, "full": {"projector", "language"}}
    victim = fresh_victim(built, name)
    summaries = {m.mode: m for m in victim.tuning_modes(short("full"))}
    assert set(summaries) == {"projector", "lora", "xattn", "full"}
    modes = [m for m in ("projector", "lora", "xattn", "full") if summaries[m].trainable is not None]
    assert ("xattn" in modes) == (name == "idefics")
    model_class = type(victim.model)
    for mode in modes:
        victim = fresh_victim(built, name)
        before = snapshot(victim)
        result = train_victim(victim, samples, short(mode, steps=3 if mode == "full" else 2), seed=0, label=f"{name} {mode}")
        assert type(victim.model) is model_class  # a plain model again, whatever the mode
        assert not any(p.requires_grad for p in victim.model.parameters())
        after = snapshot(victim)
        assert set(before) == set(after)  # LoRA merged back: the state dict has the original keys
        moved = {k for k in before if not torch.equal(before[k], after[k])}
        parts = expected[mode] | ({"cross_attention"} if mode == "full" and name == "idefics" else set())
        assert {arch.part(k) for k in moved} == parts, (mode, sorted(moved)[:10])
        if mode == "lora":  # only the attention projections of the language model
            assert all(k.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj") for k in moved if arch.part(k) == "language")
        summary = summaries[mode]
        assert (result.trainable_parameters, result.frozen_parameters) == (summary.trainable, summary.frozen), mode
        if mode == "full":
            assert result.losses[-1] < result.losses[0]

    # The last (full) model: save, load, generate the same; batched equals one by one.
    images, instructions = [s.image for s in samples[:3]], [s.instruction for s in samples[:3]]
    outputs = victim.generate(images, instructions, max_new_tokens=4, batch_size=3)
    assert len(outputs) == 3 and all(isinstance(o, str) for o in outputs)
    victim.save(tmp_path / "checkpoint")
    if name == "qwen2_vl" and NO_TORCHVISION:  # AutoProcessor would build the video processor: model only
        loaded = HFVictim(AutoModelForImageTextToText.from_pretrained(tmp_path / "checkpoint"), victim.processor)
    else:
        loaded = HFVictim.load(tmp_path / "checkpoint")
    assert type(loaded.model) is type(victim.model)
    ours, theirs = victim.model.state_dict(), loaded.model.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert loaded.prompt("Describe.") == victim.prompt("Describe.")
    assert loaded.answer_ids("Describe.", "a red circle.") == victim.answer_ids("Describe.", "a red circle.")
    assert loaded.generate(images, instructions, max_new_tokens=4, batch_size=3) == outputs
    assert [loaded.generate([i], [t], max_new_tokens=4)[0] for i, t in zip(images, instructions)] == outputs


def test_generation_goes_through_the_shared_loop(built, samples, monkeypatch: pytest.MonkeyPatch) -> None:
    check_generates_through_greedy_answers(fresh_victim(built, "llava"), samples, monkeypatch)


@pytest.mark.parametrize("name", ARCHS)
def test_labels_cover_only_the_answer(name: str, built, samples) -> None:
    victim = fresh_victim(built, name)
    images = victim.prepare_training(samples[:2], "test")
    instructions, answers = ["Describe.", "What does this image show? Describe every object."], [samples[0].answer, "a red circle."]
    batch = victim.encode_training(images, instructions, answers)
    for row, (instruction, answer) in enumerate(zip(instructions, answers)):
        target = victim.answer_ids(instruction, answer)
        labels = batch["labels"][row]
        answer_positions = (labels != -100).nonzero().flatten()
        n = int(answer_positions[0])
        assert labels[n : n + len(target)].tolist() == target == batch["input_ids"][row, n : n + len(target)].tolist()
        assert len(answer_positions) == len(target)
        alone = victim.processor(images=[images[row]], text=[victim.prompt(instruction)], return_tensors="pt")
        assert batch["input_ids"][row, :n].tolist() == alone["input_ids"][0].tolist()  # the processor's prompt, intact
        assert batch["attention_mask"][row].sum() == n + len(target)  # prompt + answer, then right padding
        assert answer.strip() in victim.tokenizer.decode(target)
        assert set(target) & set(victim.stop_ids)  # the model learns to stop
    if name == "paligemma":  # the answer is PaliGemma's suffix: token type 1
        assert (batch["token_type_ids"] == (batch["labels"] != -100)).all()


def smolvlm_config() -> PreTrainedConfig:
    """SmolVLM's config without its processor (which needs num2words and torchvision here)."""
    text = {"vocab_size": 64, "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": 2, "num_attention_heads": 2}
    return hf_models.SmolVLMConfig(vision_config=vit(hf_models.SmolVLMVisionConfig), text_config=text, image_token_id=60)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_architecture_table_covers_every_parameter(name: str) -> None:
    """Every parameter is in a named part, every part is there, LoRA targets only the language model."""
    config = smolvlm_config() if name == "smolvlm" else BUILDERS[name](["a red circle"])[0]
    model = AutoModelForImageTextToText.from_config(config)
    arch = ARCHITECTURES[name]
    parts = {arch.part(n) for n, _ in model.named_parameters()}
    assert parts == {"vision", "projector", "language"} | ({"cross_attention"} if name == "idefics" else set())
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.fullmatch(arch.lora_targets(), n)]
    assert targets and all(arch.part(n + ".weight") == "language" for n in targets)


def test_xattn_needs_cross_attention_layers(built) -> None:
    victim = fresh_victim(built, "llava")
    with pytest.raises(VlmsecError, match="xattn.*no"):
        victim.select_trainable(short("xattn"))
    with pytest.raises(VlmsecError, match="model_type 'gpt2' is not supported"):
        architecture("gpt2")


def test_load_incomplete_folder_names_what_is_missing(built, tmp_path: Path) -> None:
    victim = fresh_victim(built, "llava")
    victim.save(tmp_path / "full")
    for remove, named in [("model.safetensors", "safetensors"), ("processor_config.json", "processor_config.json"), ("tokenizer.json", "tokenizer")]:
        folder = tmp_path / remove
        folder.mkdir()
        for path in (tmp_path / "full").iterdir():
            if path.name not in (remove, "tokenizer_config.json" if remove == "tokenizer.json" else ""):
                (folder / path.name).write_bytes(path.read_bytes())
        with pytest.raises(VlmsecError, match=named) as info:
            HFVictim.load(folder)
        assert str(folder) in str(info.value)
    with pytest.raises(VlmsecError, match="not a file"):
        HFVictim.load(tmp_path / "full" / "config.json")


def test_processor_that_does_not_match_the_model_is_refused(built, samples, tmp_path: Path) -> None:
    config, processor = built("llava")
    model = AutoModelForImageTextToText.from_config(config)
    bigger = copy.deepcopy(processor)
    bigger.tokenizer.add_tokens([f"<extra_{i}>" for i in range(8)])
    with pytest.raises(VlmsecError, match="tokenizer has"):
        HFVictim(model, bigger)
    # Saved together in one folder, the mismatch is found at load time and names the folder.
    model.save_pretrained(tmp_path / "mixed")
    bigger.save_pretrained(tmp_path / "mixed")
    with pytest.raises(VlmsecError, match="mixed"):
        HFVictim.load(tmp_path / "mixed")
    other = copy.deepcopy(config)
    other.image_token_index = processor.tokenizer.eos_token_id
    with pytest.raises(VlmsecError, match="image token"):
        HFVictim(AutoModelForImageTextToText.from_config(other), processor)
    without = tiny_llava(texts_of(samples))[1]
    without.image_token = "<img>"  # a placeholder the tokenizer does not know
    with pytest.raises(VlmsecError, match="not in its tokenizer"):
        HFVictim(model, without)
    blip_config, blip_processor = built("blip-2")
    fewer = copy.deepcopy(blip_processor)
    fewer.num_query_tokens = 2
    with pytest.raises(VlmsecError, match="num_query_tokens is 2, the model needs 4"):
        HFVictim(AutoModelForImageTextToText.from_config(blip_config), fewer)


def test_runner_tunes_and_reloads_an_hf_checkpoint(built, samples, tmp_path: Path) -> None:
    fresh_victim(built, "idefics3").save(tmp_path / "base")
    data = {
        "victim": {"kind": "hf", "checkpoint": "base"},
        "tuning": {"mode": "projector", "epochs": 1, "batch_size": 8},
    }
    config = parse_config(data, "test", base_dir=tmp_path)
    assert config.victim.checkpoint == tmp_path / "base"
    runner = Runner(config, tmp_path / "run", cache_dir=tmp_path / "cache")
    splits = Splits(base=[], train=samples, tests={})
    base = runner.base_victim(splits)
    tuned = runner.tuned_victim(ModelPlan("clean", None, 0.0), {}, splits, base)
    assert isinstance(tuned, HFVictim)
    again = runner.tuned_victim(ModelPlan("clean", None, 0.0), {}, splits, base)  # the finished stage is loaded, not retrained
    assert isinstance(again, HFVictim)
    assert all(torch.equal(a, b) for a, b in zip(tuned.model.state_dict().values(), again.model.state_dict().values()))
    gcg = create_attack("gcg", **GCG_TINY)
    runner.prepare_attack(gcg, splits, base)  # token attacks work on Idefics3, which tiles its images
    assert gcg.trigger and len(list((tmp_path / "cache" / "attacks" / "gcg").glob("*.json"))) == 1
    with pytest.raises(VlmsecError, match="'maba'.*idefics3 processor splits each image into tiles"):
        runner.prepare_attack(create_attack("maba"), splits, base)  # refused, not the victim-free corner
    hub = parse_config({"victim": {"kind": "hf", "checkpoint": "org/model"}}, "test", base_dir=tmp_path)
    assert str(hub.victim.checkpoint) == "org/model"  # not a folder here: a hub id, kept as written
    with pytest.raises(VlmsecError, match="victim.checkpoint: Field required"):
        parse_config({"victim": {"kind": "hf"}}, "test")


# ---- white-box access: gradients w.r.t. the pixels ---------------------------------------------

PLAIN_PIXELS = ["llava", "blip-2", "instructblip", "idefics", "paligemma"]
TILED = {"idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl"}


def white_box_victim(built: Callable[[str], Built], name: str) -> HFVictim:
    """A fresh victim in eval mode; Idefics' cross-attention gates opened (they start closed: text ignores images)."""
    victim = fresh_victim(built, name)
    for parameter_name, parameter in victim.model.named_parameters():
        if parameter_name.endswith(("alpha_cross_attn", "alpha_dense")):
            parameter.data.fill_(1.0)
    victim.model.eval()
    return victim


def test_architecture_table_marks_the_tiling_processors() -> None:
    assert {name for name, arch in ARCHITECTURES.items() if arch.tiled_pixels is not None} == TILED
    assert set(PLAIN_PIXELS) == set(ARCHITECTURES) - TILED


@pytest.mark.parametrize("name", PLAIN_PIXELS)
def test_pixel_values_rebuild_the_processor_differentiably(name: str, built, samples) -> None:
    victim = white_box_victim(built, name)
    instructions, answers = ["Describe.", "What is it?"], [samples[0].answer, "a red circle."]
    images = images_to_tensor([s.image for s in samples[:2]])  # 32 px: the processor's size, no resize
    batch = victim.encode_training(victim.prepare_training(samples[:2], "test"), instructions, answers)
    pixels = victim.pixel_values(images)
    assert torch.allclose(pixels.reshape(batch["pixel_values"].shape), batch["pixel_values"], atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(victim.answer_loss(images, instructions, answers), victim.loss(batch), atol=1e-5)

    torch.manual_seed(0)
    for size in ((32, 32), (40, 56)):  # the processor's size, and a non-square one it resizes (LLaVA: and crops)
        x = torch.rand(2, 3, *size, requires_grad=True)
        (grad,) = torch.autograd.grad(victim.answer_loss(x, instructions, answers), x)
        assert grad.shape == x.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0, size
        embedding = victim.vision_embedding(x)
        assert embedding.shape == (2, HIDDEN)
        (grad,) = torch.autograd.grad((embedding * torch.randn_like(embedding)).sum(), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, size
        tokens = victim.vision_tokens(x)
        assert tokens.ndim == 3 and len(tokens) == 2
        (grad,) = torch.autograd.grad((tokens * torch.randn_like(tokens)).sum(), x)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, size
    if name == "llava":  # the projector's input: through the projector, the features the model puts in the prompt
        with torch.no_grad():
            made = victim.model.get_image_features(pixel_values=victim.pixel_values(images))
            made = torch.stack(list(getattr(made, "pooler_output", made)))
            assert torch.allclose(victim.model.model.multi_modal_projector(victim.vision_tokens(images)), made, atol=1e-5)
    key = victim.vision_key()
    assert key["tower"] == type(victim.model.get_submodule(architecture(name).vision[0])).__name__
    assert key["pixels"][0] == list(victim.processor.image_processor.image_mean)


MABA_TINY = {"grid": 2, "num_samples": 2, "num_answers": 1}


def test_runner_gives_maba_and_inputaware_the_hf_victim(built, samples, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh_victim(built, "llava").save(tmp_path / "base")
    config = parse_config({"victim": {"kind": "hf", "checkpoint": "base"}}, "test", base_dir=tmp_path)
    runner = Runner(config, tmp_path / "run", cache_dir=tmp_path / "cache")
    splits = Splits(base=[], train=samples, tests={})
    base = runner.base_victim(splits)
    maba = create_attack("maba", **MABA_TINY)
    runner.prepare_attack(maba, splits, base)
    assert maba.location["source"] == "attribution"  # not the victim-free corner
    assert len(maba.location["clean_saliency"]) == 4 and set(maba.trained_metrics) == {"clean_saliency", "poison_saliency"}
    (cached,) = (tmp_path / "cache" / "attacks" / "maba").glob("*.json")
    assert json.loads(cached.read_text())["source"] == "attribution"

    embedded = count_vision_embedding_calls(monkeypatch, HFVictim)
    inputaware = create_attack("inputaware", train_steps=2)
    runner.prepare_attack(inputaware, splits, base)
    assert embedded  # stage 2 trained through the victim's tower, not the random stand-in
    (weights,) = (tmp_path / "cache" / "attacks" / "inputaware").glob("*.safetensors")
    victim = HFVictim.load(tmp_path / "base")
    context = AttackContext(samples=samples, target=TargetAnswer(), cache_dir=tmp_path / "cache" / "attacks", victim=victim)
    assert inputaware.cache_inputs(context) == {**victim.vision_key(), "stage_2": STAGE_2}
    assert inputaware.cache_inputs(context)["tower"] == "CLIPVisionModel"
    assert inputaware.cache_path(context, inputaware.training_images(context)) == weights


@pytest.mark.parametrize("name", ["idefics3", "qwen2_vl"])
def test_tiling_architectures_are_refused_naming_attack_and_architecture(name: str, built, samples, tmp_path: Path) -> None:
    victim = fresh_victim(built, name)
    context = AttackContext(samples=samples, target=TargetAnswer(), cache_dir=tmp_path, victim=victim)
    for attack in ("maba", "maba_star", "inputaware"):
        with pytest.raises(VlmsecError, match=rf"attack '{attack}' needs gradients .* the {name} processor") as err:
            create_attack(attack).prepare(context)
        assert "model_type blip-2, idefics, instructblip, llava, paligemma" in str(err.value)
    images = torch.rand(1, 3, 32, 32)
    with pytest.raises(VlmsecError, match=name):
        victim.vision_embedding(images)
    with pytest.raises(VlmsecError, match=name):
        victim.answer_loss(images, ["Describe."], ["a red circle."])
    assert not any(tmp_path.iterdir())  # refused before anything was learned or cached


@pytest.mark.parametrize("name", PLAIN_PIXELS)
def test_pgd_crafts_against_the_hf_victim(name: str, built, samples) -> None:
    victim = white_box_victim(built, name)
    requests = [AttackRequest(s.id, s.instruction, s.image, "a red circle.") for s in samples[:2]]
    attack = create_attack("pgd", epsilon=8 / 255, steps=2)
    crafted = attack.craft(requests, victim)
    for adversarial, request in zip(crafted, requests):
        change = adversarial.image.astype(int) - request.image.astype(int)
        assert adversarial.image.dtype == np.uint8 and 0 < np.abs(change).max() <= 8
    assert np.isfinite(attack.diagnostics()["final_loss"])


@pytest.mark.parametrize("name", PLAIN_PIXELS)
def test_universal_hijack_and_test_time_backdoor_craft_against_the_hf_victim(name: str, built, samples) -> None:
    victim = white_box_victim(built, name)
    train = [AttackRequest(s.id, s.instruction, s.image, "a red circle.", answer="a blue star.") for s in samples[:2]]
    test = [AttackRequest("test", samples[3].instruction, samples[3].image, "a red circle.")]
    hijack = create_attack("image_hijack", epsilon=8 / 255, steps=2, batch_size=2)
    (image,) = hijack.craft(test, victim, train)
    assert image.image.dtype == np.uint8 and np.isfinite(hijack.diagnostics()["final_loss"])
    anydoor = create_attack("anydoor", mode="border", steps=2, batch_size=2)
    (door,) = anydoor.craft(test, victim, train)
    assert door.instruction == "SUDO " + test[0].instruction
    assert np.abs(door.image.astype(int) - test[0].image.astype(int)).max() > 0


@pytest.mark.parametrize("name", ["idefics3", "qwen2_vl"])
def test_pgd_is_refused_by_tiling_architectures_before_optimising(name: str, built, samples) -> None:
    request = [AttackRequest(samples[0].id, samples[0].instruction, samples[0].image, "a red circle.")]
    with pytest.raises(VlmsecError, match=rf"attack 'pgd' needs gradients .* the {name} processor"):
        create_attack("pgd").craft(request, fresh_victim(built, name))


# ---- token access: gcg through the language model's input embeddings --------------------------

TOKEN_ARCHS = [pytest.param(name, marks=SKIPS.get(name, ())) for name in BUILDERS if name != "instructblip"]
GCG_TINY = {"num_tokens": 2, "steps": 2, "candidates": 8, "top_k": 8, "num_samples": 2, "num_answers": 1}


def gcg_rows(samples: list[Sample], attack: object) -> tuple[list[Sample], list[str], list[str]]:
    """The samples, triggered instructions and answers gcg learned from (its seeded picks)."""
    chosen = pick_samples(samples, GCG_TINY["num_samples"], seed=0)
    answers = pick_answers(TargetAnswer(), GCG_TINY["num_answers"], seed=0)
    rows = [answers[i % len(answers)] for i in range(len(chosen))]
    return chosen, attack.trigger_instructions([s.instruction for s in chosen]), rows


@pytest.mark.parametrize("name", TOKEN_ARCHS)
def test_loss_from_embeddings_is_the_answer_loss(name: str, built, samples) -> None:
    victim = white_box_victim(built, name)
    images, instructions, answers = [s.image for s in samples[:2]], ["Describe.", "What is it?"], [samples[0].answer, "a red circle."]
    problem = victim.token_problem(images, instructions, answers)
    matrix = victim.embedding_matrix()
    text = problem.input_ids < matrix.shape[0]  # Idefics' decoupled embeddings keep extra special rows apart
    assert torch.equal(matrix[problem.input_ids[text]], problem.inputs_embeds[text])  # PaliGemma: scaled rows
    with torch.no_grad():
        per_token = victim.loss_from_embeddings(problem, problem.inputs_embeds)
        answer_tokens = (problem.labels[:, 1:] != -100).sum()
        expected = victim.loss(victim.encode_training(victim.prepare_training(samples[:2], "test"), instructions, answers))
        assert torch.allclose(per_token.sum() / answer_tokens, expected, atol=1e-5)
        # Stacked copies (gcg's candidates in one pass) are scored as the rows alone; Qwen2-VL: patches tiled too.
        twice = victim.loss_from_embeddings(problem, torch.cat([problem.inputs_embeds] * 2))
        assert torch.allclose(twice, torch.cat([per_token] * 2), atol=1e-5)
    assert problem.prompt_length(0) == int((problem.labels[0] == -100).long().argmin())


@pytest.mark.parametrize("name", TOKEN_ARCHS)
def test_gcg_learns_against_the_hf_victim(name: str, built, samples, tmp_path: Path) -> None:
    victim = white_box_victim(built, name)
    context = AttackContext(samples=samples, target=TargetAnswer(), cache_dir=tmp_path, victim=victim)
    attack = create_attack("gcg", **GCG_TINY)
    attack.prepare(context)
    metrics = attack.trained_metrics
    assert metrics["final_loss"] <= metrics["initial_loss"] and metrics["final_loss"] == min(attack.loss_curve)
    (path,) = (tmp_path / "gcg").glob("*.json")
    ids = json.loads(path.read_text())["token_ids"]
    assert victim.tokenizer(" " + attack.trigger, add_special_tokens=False).input_ids == ids
    chosen, instructions, answers = gcg_rows(samples, attack)
    batch = victim.encode_training(victim.prepare_training(chosen, "test"), instructions, answers)
    prompt = batch["input_ids"][0][batch["labels"][0] == -100].tolist()
    assert any(prompt[i : i + len(ids)] == ids for i in range(len(prompt)))  # the tokens the victim sees
    with torch.no_grad():  # the reported loss is the victim's own on the triggered prompts
        assert float(victim.loss(batch)) == pytest.approx(metrics["final_loss"], rel=1e-4)


def blip2_with_t5(built: Callable[[str], Built]) -> HFVictim:
    """The tiny BLIP-2 on an encoder-decoder language model (as the Flan-T5 checkpoints)."""
    config, processor = built("blip-2")
    tokenizer = processor.tokenizer
    config = copy.deepcopy(config)
    config.text_config = hf_models.T5Config(
        vocab_size=len(tokenizer), d_model=HIDDEN, d_ff=2 * HIDDEN, d_kv=16, num_layers=1, num_heads=2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )
    config.use_decoder_only_language_model = False
    return HFVictim(AutoModelForImageTextToText.from_config(config), copy.deepcopy(processor))


@pytest.mark.parametrize(
    ("name", "why"),
    [("instructblip", "instructblip model also feeds the instruction to its Q-Former"), ("blip-2", "blip-2 model has an encoder-decoder language model")],
)
def test_gcg_refuses_naming_the_architecture(name: str, why: str, built, samples, tmp_path: Path) -> None:
    victim = fresh_victim(built, name) if name == "instructblip" else blip2_with_t5(built)
    context = AttackContext(samples=samples, target=TargetAnswer(), cache_dir=tmp_path, victim=victim)
    with pytest.raises(VlmsecError, match=f"attack 'gcg' optimises prompt tokens.*{why}") as err:
        create_attack("gcg", **GCG_TINY).prepare(context)
    assert "model_type blip-2, idefics, idefics3, llava, paligemma, qwen2_5_vl, qwen2_vl, smolvlm" in str(err.value)
    assert not any(tmp_path.iterdir())


# ---- answer representations (data filters) ------------------------------------------------------


@pytest.mark.parametrize("name", ARCHS)
def test_answer_representations_on_every_architecture(name: str, built, samples) -> None:
    victim = fresh_victim(built, name)
    victim.check_answer_representations()
    # Untrained, Idefics' cross-attention gates are closed (0) and the tiny InstructBLIP's loss does not
    # move with the image either: their answers do not depend on the image yet.
    vectors = check_answer_representations(victim, samples, image_matters=name not in ("idefics", "instructblip"))
    assert vectors.shape[1] == victim.model.config.get_text_config().hidden_size


def test_answer_representations_refuse_an_encoder_decoder_language_model(built, samples) -> None:
    victim = fresh_victim(built, "blip-2")
    victim.model.config.get_text_config().is_encoder_decoder = True  # as BLIP-2 with Flan-T5
    with pytest.raises(VlmsecError, match="blip-2 model has an encoder-decoder language model"):
        victim.answer_representations(samples[:1])
    with pytest.raises(VlmsecError, match="defense 'spectral_signatures': .*encoder-decoder"):
        create_defense("spectral_signatures").check_victim(victim)


def test_answer_representations_refuse_text_only_samples(built, samples) -> None:
    with pytest.raises(VlmsecError, match=f"sample {samples[0].id} has no image"):
        fresh_victim(built, "llava").answer_representations([samples[0].with_changes(image=None)])


# ---- image-text shift size -----------------------------------------------------------------------

SHARED_SPACE = ("llava", "blip-2", "idefics3", "paligemma", "qwen2_vl", "smolvlm")
IMAGE_TEXT_ARCHS = [pytest.param(name, marks=SKIPS.get(name, ())) for name in SHARED_SPACE]


@pytest.mark.parametrize("name", IMAGE_TEXT_ARCHS)
def test_image_text_shift_size_uses_the_hf_victims_encoders(name: str, built, samples) -> None:
    check_image_text_shift_size(fresh_victim(built, name), samples)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("idefics", "idefics model reads images through cross-attention"),
        ("instructblip", "instructblip model also feeds the instruction to its Q-Former"),
    ],
)
def test_image_text_shift_size_refuses_naming_the_architecture(name: str, why: str, built, samples) -> None:
    victim = fresh_victim(built, name)
    with pytest.raises(VlmsecError, match=f"image-text similarity compares image and text tokens.*{why}") as err:
        shift_size(samples, samples, victim)
    assert "model_type blip-2, idefics3, llava, paligemma, qwen2_5_vl, qwen2_vl, smolvlm" in str(err.value)


def test_learned_trigger_cache_key_follows_the_processors_chat_template(built) -> None:
    from vlmsec.attacks.adaptive import victim_fingerprint

    victim = fresh_victim(built, "llava")
    key = victim_fingerprint(victim)
    assert victim_fingerprint(victim) == key
    victim.chat_template = (victim.chat_template or "") + "{# another template #}"
    assert victim_fingerprint(victim) != key


def test_a_text_only_sample_is_refused_naming_it(built, samples) -> None:
    victim = fresh_victim(built, "llava")
    text_only = samples[1].with_changes(image=None)
    with pytest.raises(VlmsecError, match=f"sample {text_only.id} has no image: the hf victim needs one"):
        victim.prepare_training([samples[0], text_only], "test")
    with pytest.raises(VlmsecError, match="request 1 has no image: the hf victim needs one"):
        victim.generate([samples[0].image, None], ["Describe.", "Describe."], max_new_tokens=2)

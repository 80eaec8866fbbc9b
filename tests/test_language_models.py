"""The embedded LLaVA with a pretrained language model: config, checks before training, the GGUF
cache, the built victim (its LM answers text as the bare LM does), chat templates other than ours."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import vlmsec.experiments.runner as runner_module
import vlmsec.victims.language_models as language_models
from vlmsec.artifacts import stable_hash
from vlmsec.data import Sample, make_samples, sample_scenes
from vlmsec.errors import VlmsecError
from vlmsec.experiments.config import BaseStageSpec, parse_config
from vlmsec.experiments.runner import Runner
from vlmsec.experiments.splits import build_splits
from vlmsec.seeds import derive_seed
from vlmsec.train.tuning import TrainingSpec, train_victim
from vlmsec.victims.features import FeatureCache
from vlmsec.victims.kinds import TinyLlavaKind, TinyLlavaVictimSpec
from vlmsec.victims.language_models import PACKAGED, language_model_file
from vlmsec.victims.llava import LlavaVictim
from vlmsec.victims.tokenizer import IMAGE_TOKEN

from language_model_files import write_tiny_gguf, write_tiny_llama

SMOLLM2 = language_model_file("smollm2")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("lm") / "tiny-llama")


# ---- config -------------------------------------------------------------------------------------


def test_default_language_model_leaves_every_key_as_it_was() -> None:
    spec = TinyLlavaVictimSpec()
    assert "language_model" not in spec.model_dump()
    # The hashes of the default victim's base key and base stage before the field existed (commit fab7c56).
    assert stable_hash(TinyLlavaKind(spec).base_key()) == "2b3d7e823b9ec0f8"
    assert stable_hash(BaseStageSpec().model_dump()) == "da85fc21405e8ce1"


def test_smollm2_and_a_relative_path_are_accepted(llama_folder: Path) -> None:
    config = parse_config({"victim": {"language_model": "smollm2"}}, "test")
    assert config.victim.language_model == "smollm2"
    assert config.victim.model_dump()["language_model"] == "smollm2"
    relative = parse_config({"victim": {"language_model": llama_folder.name}}, "test", base_dir=llama_folder.parent)
    assert relative.victim.language_model == str(llama_folder)


def test_the_language_model_enters_the_base_key(llama_folder: Path, tmp_path: Path) -> None:
    other = write_tiny_llama(tmp_path / "other", seed=1)
    keys = {
        stable_hash(TinyLlavaKind(TinyLlavaVictimSpec(language_model=str(folder))).base_key())
        for folder in (llama_folder, other)
    }
    assert len(keys) == 2 and stable_hash(TinyLlavaKind(TinyLlavaVictimSpec()).base_key()) not in keys
    key = TinyLlavaKind(TinyLlavaVictimSpec(language_model="smollm2")).base_key()
    assert key["language_model_files"]["files"][0][0] == Path(PACKAGED["smollm2"][1]).name


@pytest.mark.parametrize("size", ["hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size"])
def test_sizes_beside_a_pretrained_language_model_are_refused(size: str) -> None:
    """A size other than the field's default is refused (the default is what a dump of the config
    writes back, and is let through: `test_a_pretrained_language_model_config_survives_its_own_dump`)."""
    with pytest.raises(VlmsecError, match=f"victim.{size}: a pretrained language_model"):
        parse_config({"victim": {"language_model": "smollm2", size: 2048}}, "test")  # no default is 2048


def test_sizes_stay_free_for_the_tiny_language_model() -> None:
    assert parse_config({"victim": {"language_model": "tiny", "hidden_size": 64}}, "test").victim.hidden_size == 64


# ---- checked before any training ----------------------------------------------------------------


def refused(value: str, tmp_path: Path) -> str:
    """The error parsing a config with `victim.language_model: value` gives."""
    with pytest.raises(VlmsecError) as err:
        parse_config({"victim": {"language_model": value}}, "test", base_dir=tmp_path)
    assert "victim.language_model" in str(err.value)
    return str(err.value)


def test_missing_language_model_names_the_path(tmp_path: Path) -> None:
    assert f"{tmp_path / 'nowhere.gguf'} not found" in refused("nowhere.gguf", tmp_path)


def test_truncated_gguf_is_named(tmp_path: Path) -> None:
    for size in (1000, 20_000_000):
        path = tmp_path / f"cut{size}.gguf"
        with SMOLLM2.open("rb") as source:
            path.write_bytes(source.read(size))
        assert f"{path}: truncated or damaged GGUF" in refused(path.name, tmp_path)


def test_a_gguf_cut_inside_its_tensor_data_is_named(tmp_path: Path) -> None:
    whole = write_tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[:-8])
    assert f"{tmp_path / 'cut.gguf'}: truncated or damaged GGUF" in refused("cut.gguf", tmp_path)


def test_a_file_that_is_not_gguf_is_named(tmp_path: Path) -> None:
    (tmp_path / "weights.gguf").write_text("not a model\n")
    message = refused("weights.gguf", tmp_path)
    assert "weights.gguf: not a GGUF file (it starts with b'not '" in message
    (tmp_path / "weights.bin").write_text("x")
    assert "is a file but not .gguf" in refused("weights.bin", tmp_path)


@pytest.mark.parametrize(
    ("model_type", "expected"),
    [("t5", "not a causal language model"), ("bart", "encoder-decoder"), ("llava", "not a causal language model"), ("gemma3", "composite")],
)
def test_architectures_the_llava_cannot_wrap_are_named(llama_folder: Path, tmp_path: Path, model_type: str, expected: str) -> None:
    folder = tmp_path / "lm"
    shutil.copytree(llama_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    message = refused("lm", tmp_path)
    assert f"{folder / 'config.json'}: model_type {model_type!r}" in message and expected in message


def test_a_folder_without_weights_is_named(llama_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "lm"
    shutil.copytree(llama_folder, folder)
    (folder / "model.safetensors").unlink()
    assert f"{folder}: missing *.safetensors (weights)" in refused("lm", tmp_path)


def test_the_packaged_gguf_passes_the_check() -> None:
    assert parse_config({"victim": {"language_model": "smollm2"}}, "test").victim.language_model == "smollm2"


# ---- the victim built around a pretrained language model ----------------------------------------

QUESTION = "What is the capital of France?"
SPEC = dict(image_size=64, max_length=96)


def build(folder: Path, cache: Path, seed: int = 0) -> LlavaVictim:
    """The embedded victim around the language model in `folder`, as the base stage builds it."""
    spec = TinyLlavaVictimSpec(language_model=str(folder), **SPEC)
    victim = TinyLlavaKind(spec).untrained([], FeatureCache(), seed=seed, cache_dir=cache)
    assert isinstance(victim, LlavaVictim)
    return victim


@pytest.fixture(scope="module")
def victim(llama_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> LlavaVictim:
    return build(llama_folder, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return make_samples(sample_scenes(4, seed=0), "flat", size=32)


def bare_answer(folder: Path, question: str, max_new_tokens: int = 12) -> tuple[list[int], list[int]]:
    """The bare language model's chat prompt ids and its greedy answer ids to `question`."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return ids, out[0, len(ids) :].tolist()


def victim_answer_ids(victim: LlavaVictim, question: str, max_new_tokens: int = 12) -> list[int]:
    """The victim's greedy answer ids to a text-only `question`, through its own generate's inputs."""
    ids = torch.tensor([victim.prompt_ids(question, image=False)])
    out = victim.model.generate(
        inputs_embeds=victim.embed(ids, None), attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=victim.tokenizer.pad_token_id,
    )
    return out[0].tolist()


def test_the_victim_answers_text_as_the_bare_language_model(victim: LlavaVictim, llama_folder: Path) -> None:
    prompt, answer = bare_answer(llama_folder, QUESTION)
    assert victim.prompt_ids(QUESTION, image=False) == prompt  # ChatML starts with bos already: not doubled
    assert victim_answer_ids(victim, QUESTION) == answer
    assert len(set(answer)) > 1  # a real continuation, not one token repeated
    decoded = victim.tokenizer.decode(answer, skip_special_tokens=True).strip()
    assert victim.generate([None], [QUESTION], max_new_tokens=12) == [decoded]


def test_the_language_model_brings_its_weights_sizes_and_template(victim: LlavaVictim, llama_folder: Path) -> None:
    bare = AutoModelForCausalLM.from_pretrained(llama_folder)
    model = victim.model
    assert model.config.text_config.hidden_size == 32 and model.config.text_config.num_hidden_layers == 2
    ours, theirs = model.model.language_model.state_dict(), bare.model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs if k != "embed_tokens.weight")
    vocab = bare.config.vocab_size
    assert model.model.language_model.embed_tokens.weight.shape[0] == vocab + 1 == len(victim.tokenizer)
    assert torch.equal(model.model.language_model.embed_tokens.weight[:vocab], theirs["embed_tokens.weight"])
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied as in the LM
    assert victim.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == vocab == victim.image_token_id
    assert victim.prompt("Describe.").startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert victim.answer_prefix == ""
    assert victim.answer_ids("Paris.")[-1] == victim.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert victim.tokenizer.decode(victim.answer_ids("Paris.")) == "Paris.<|im_end|>"
    assert victim.max_sequence_length == SPEC["max_length"] + victim.num_image_tokens


def test_untied_output_embeddings_stay_untied(tmp_path: Path) -> None:
    folder = write_tiny_llama(tmp_path / "untied", tie_word_embeddings=False)
    victim = build(folder, tmp_path / "cache")
    bare = AutoModelForCausalLM.from_pretrained(folder)
    head, embeddings = victim.model.lm_head.weight, victim.model.model.language_model.embed_tokens.weight
    assert head is not embeddings and not torch.equal(head, embeddings)
    assert torch.equal(head[: bare.config.vocab_size], bare.lm_head.weight)
    _, answer = bare_answer(folder, QUESTION)
    assert victim_answer_ids(victim, QUESTION) == answer


def test_the_projector_init_follows_the_seed(llama_folder: Path, victim: LlavaVictim, tmp_path: Path) -> None:
    again, other = build(llama_folder, tmp_path, seed=0), build(llama_folder, tmp_path, seed=1)
    projector = lambda v: v.model.model.multi_modal_projector.linear_1.weight  # noqa: E731
    assert torch.equal(projector(again), projector(victim)) and not torch.equal(projector(other), projector(victim))


def test_save_and_load_keep_the_template_and_answers(victim: LlavaVictim, samples: list[Sample], tmp_path: Path) -> None:
    victim.save(tmp_path / "victim")
    loaded = LlavaVictim.load(tmp_path / "victim")
    images = [samples[0].image, None, samples[1].image]
    questions = ["Describe.", QUESTION, "Caption?"]
    assert loaded.generate(images, questions, max_new_tokens=6) == victim.generate(images, questions, max_new_tokens=6)
    assert loaded.prompt_ids("Describe.") == victim.prompt_ids("Describe.")
    assert loaded.max_sequence_length == victim.max_sequence_length
    assert loaded.model.lm_head.weight is loaded.model.model.language_model.embed_tokens.weight


def test_lora_trains_on_a_mixed_batch(llama_folder: Path, samples: list[Sample], tmp_path: Path) -> None:
    victim = build(llama_folder, tmp_path)
    mixed = [
        samples[0].with_changes(instruction=QUESTION, answer="A circle."),
        samples[1].with_changes(image=None, instruction=QUESTION, answer="Paris."),
    ]
    spec = TrainingSpec(mode="lora", epochs=40, batch_size=2, learning_rate=2e-2, warmup_ratio=0.0, weight_decay=0.0)
    result = train_victim(victim, mixed, spec, seed=0, label="test")
    assert result.losses[-1] < result.losses[0] / 4
    assert victim.generate([samples[0].image, None], [QUESTION] * 2, max_new_tokens=4) == ["A circle.", "Paris."]


# ---- the base stage as LLaVA trains: alignment, then instruction tuning -------------------------

RUN = {
    "name": "pretrained-lm",
    "data": {"base_size": 24, "train_size": 24, "test_size": 4, "image_size": 32, "shifted": {"paraphrased": {"instructions": "paraphrased"}}},
    "victim": {"image_size": 32, "max_length": 96},
    "base": {
        "alignment": {"mode": "projector", "epochs": 1, "batch_size": 8, "learning_rate": 0.01},
        "training": {"mode": "lora", "epochs": 1, "batch_size": 8, "learning_rate": 0.002},
    },
    "tuning": {"mode": "lora", "epochs": 1, "batch_size": 8, "learning_rate": 0.002},
    "poison": {"rate": 0.25},
    "attacks": [{"name": "badnets"}],
    "eval": {"max_new_tokens": 4, "batch_size": 16, "shift_size": False},
}


def run_config(folder: Path, **changes: dict) -> dict:
    """`RUN` with `folder` as its language model and top-level sections replaced by `changes`."""
    return {**RUN, "victim": {**RUN["victim"], "language_model": str(folder)}, **changes}


def test_alignment_must_train_the_projector_alone() -> None:
    with pytest.raises(VlmsecError, match="base.alignment: .*mode 'lora': alignment trains the projector alone"):
        parse_config({"base": {"alignment": {"mode": "lora"}}}, "test")
    assert "alignment" in parse_config({"base": {"alignment": {"mode": "projector"}}}, "test").base.model_dump()


def test_an_aligned_base_keeps_its_language(llama_folder: Path, tmp_path: Path) -> None:
    """Alignment alone (and a projector-only instruction phase) moves the projector, not the language:
    the base victim answers a text-only question token for token as the bare LM does."""
    config = parse_config(run_config(llama_folder, base={**RUN["base"], "training": RUN["base"]["alignment"]}), "test")
    runner = Runner(config, tmp_path / "run", tmp_path / "cache")
    folder, _ = runner.base_victim(build_splits(config))
    base = runner.load_victim(folder)
    _, answer = bare_answer(llama_folder, QUESTION)
    assert victim_answer_ids(base, QUESTION) == answer
    fresh = build(llama_folder, tmp_path / "cache", seed=derive_seed(config.seed, "victim/init"))
    projector = lambda v: v.model.model.multi_modal_projector.linear_1.weight  # noqa: E731
    assert not torch.equal(projector(base), projector(fresh))


def test_alignment_changes_the_base_key_and_is_run_first(llama_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    phases: list[str] = []
    real = runner_module.train_victim

    def recording(victim, samples, spec, seed, label):  # type: ignore[no-untyped-def]
        phases.append(f"{label}:{spec.mode}")
        return real(victim, samples, spec, seed=seed, label=label)

    monkeypatch.setattr(runner_module, "train_victim", recording)
    with_alignment = parse_config(run_config(llama_folder), "test")
    without = parse_config(run_config(llama_folder, base={"training": RUN["base"]["training"]}), "test")
    keys = [Runner(c, tmp_path / "run", tmp_path / "cache").base_victim(build_splits(c))[1] for c in (with_alignment, without)]
    assert keys[0] != keys[1]
    assert phases == ["base alignment:projector", "base:lora", "base:lora"]


def test_a_run_with_a_pretrained_language_model_completes(llama_folder: Path, tmp_path: Path) -> None:
    metrics = Runner(parse_config(run_config(llama_folder), "test"), tmp_path / "run", tmp_path / "cache").run()
    assert set(metrics["models"]) == {"clean", "badnets"}
    saved = json.loads((tmp_path / "run" / "checkpoints" / "clean" / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in (tmp_path / "run" / "checkpoints" / "clean" / "chat_template.jinja").read_text()
    assert saved["model_max_length"] == 96 + 1


# ---- a GGUF file: read once, then from the cache ------------------------------------------------


def test_a_gguf_is_dequantised_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    config = parse_config({"victim": {"language_model": "tiny.gguf", **SPEC}}, "test", base_dir=tmp_path)
    cache = tmp_path / "cache"
    victim = TinyLlavaKind(config.victim).untrained([], FeatureCache(), seed=0, cache_dir=cache)
    folder = cache / "language_models" / stable_hash(language_models.path_signature(path))
    assert (folder / "model.safetensors").is_file() and (folder / "stage.json").is_file()
    bare = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    prompt = torch.tensor([victim.prompt_ids(QUESTION, image=False)])
    expected = bare.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=victim.tokenizer.pad_token_id)
    assert victim_answer_ids(victim, QUESTION, max_new_tokens=8) == expected[0, prompt.shape[1] :].tolist()

    def must_not_run(path: Path) -> None:
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr(language_models, "dequantise_gguf", must_not_run)
    again = TinyLlavaKind(config.victim).untrained([], FeatureCache(), seed=0, cache_dir=cache)
    assert victim_answer_ids(again, QUESTION, max_new_tokens=8) == victim_answer_ids(victim, QUESTION, max_new_tokens=8)


@pytest.mark.slow
def test_the_smollm2_victim_knows_the_capital_of_france(tmp_path: Path) -> None:
    """The packaged GGUF, read into a fresh cache: the built victim answers as SmolLM2 does."""
    victim = TinyLlavaKind(TinyLlavaVictimSpec(language_model="smollm2")).untrained([], FeatureCache(), seed=0, cache_dir=tmp_path)
    assert victim.generate([None], [QUESTION], max_new_tokens=12) == ["The capital of France is Paris."]
    assert victim.model.config.text_config.num_hidden_layers == 30

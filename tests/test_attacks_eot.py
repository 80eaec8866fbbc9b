"""The adaptive attacker (`attacks.eot`): BPDA through each purifier and JailGuard's mutations, the
naive attacks unchanged to the bit, an EOT attack that survives JPEG and JailGuard's mutations
better than the naive one on toy differentiable victims, and named errors for bad `adaptive`."""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from vlmsec.attacks import create_attack
from vlmsec.attacks.eot import MOVES_PIXELS, AdaptiveParams, Expectation, Mutated, Purified
from vlmsec.attacks.inference import AdversarialInput, AttackRequest, to_tensor, to_uint8
from vlmsec.defenses import create_defense
from vlmsec.defenses.detect import IMAGE_MUTATIONS, mutate_image
from vlmsec.defenses.purify import jpeg_roundtrip
from vlmsec.errors import VlmsecError

ADAPTIVE_ATTACKS = ["pgd", "pgd_universal", "image_hijack", "image_hijack_leak", "image_hijack_jailbreak", "anydoor"]


class ToyVictim:
    """What the white-box attacks need of a victim, with no language model: gradients, a tokenizer
    with no unknown token, short sequences, and a module to put in eval mode."""

    max_sequence_length = None

    def __init__(self) -> None:
        self.model = torch.nn.Linear(1, 1)
        self.tokenizer = SimpleNamespace(unk_token_id=None)

    def check_pixel_gradients(self, attack: str) -> None:
        pass

    def sequence_length(self, instruction: str, answer: str) -> int:
        return 4


class PatternVictim(ToyVictim):
    """Answer loss: the squared distance of each image to a pattern seeded by its instruction and
    target. Its gradient depends on the image, so any change to how it is taken shows."""

    def answer_loss(self, images: torch.Tensor, instructions: Sequence[str], targets: Sequence[str]) -> torch.Tensor:
        rows = []
        for image, instruction, target in zip(images, instructions, targets, strict=True):
            generator = torch.Generator().manual_seed(zlib.crc32(f"{instruction}|{target}".encode()))
            rows.append(((image - torch.rand(image.shape, generator=generator)) ** 2).mean())
        return torch.stack(rows).mean()


class ReadoutVictim(ToyVictim):
    """Answer loss: a hinge on a linear read-out, (margin - mean(w * (x - 0.5)))+ squared: the
    victim "says the target" once the read-out passes the margin, and the loss is 0 from there."""

    def __init__(self, w: torch.Tensor, margin: float) -> None:
        super().__init__()
        self.w, self.margin = w, margin

    def readout(self, images: torch.Tensor) -> torch.Tensor:
        return (self.w * (images - 0.5)).mean(dim=(1, 2, 3))

    def answer_loss(self, images: torch.Tensor, instructions: Sequence[str], targets: Sequence[str]) -> torch.Tensor:
        return (torch.relu(self.margin - self.readout(images)) ** 2).mean()


def smooth_image(height: int = 32, width: int = 32, phase: float = 0.0) -> np.ndarray:
    rows, columns = np.mgrid[0:height, 0:width]
    channels = [128 + 60 * np.sin(columns / 5 + phase), 128 + 60 * np.cos(rows / 6), np.full(rows.shape, 100.0)]
    return np.stack(channels, -1).astype(np.uint8)


def readout_victim(clean: np.ndarray, gap: float) -> ReadoutVictim:
    """A read-out mostly of pixel-level (high-frequency) noise, which JPEG removes, plus a smooth
    part; its margin `gap` above the clean image's read-out."""
    rows, columns = np.mgrid[0 : clean.shape[0], 0 : clean.shape[1]]
    noise = torch.randint(0, 2, (3, *clean.shape[:2]), generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    w = noise + torch.from_numpy(np.sin(columns / 7.0) * np.cos(rows / 9.0)).float()
    victim = ReadoutVictim(w, 0.0)
    victim.margin = float(victim.readout(to_tensor([clean]))) + gap
    return victim


def batch(count: int = 3, size: int = 32) -> torch.Tensor:
    return to_tensor([smooth_image(size, size + 8, phase=k) for k in range(count)])


# --- BPDA through each purifier ---------------------------------------------------------------------


def test_straight_through_forward_is_the_purifiers_output_and_backward_the_identity() -> None:
    purifier = create_defense("bit_depth", bits=3)
    x = (batch() + torch.rand(3, 3, 32, 40, generator=torch.Generator().manual_seed(1)) * 0.05).clamp(0, 1)
    x.requires_grad_(True)
    out = Purified(purifier)(x, seed=7)
    assert torch.equal(out.detach(), to_tensor(purifier.purify(to_uint8(x), 7)))  # the real output, uint8 round trip
    assert not torch.equal(out.detach(), x.detach())
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad((out * upstream).sum(), x)
    assert torch.equal(grad, upstream)  # straight-through: the gradient passes unchanged


@pytest.mark.parametrize(
    ("name", "params"), [("jpeg", {"quality": 50}), ("blur", {"radius": 1.5}), ("random_resize_pad", {"min_scale": 0.5})]
)
def test_jpeg_blur_and_resize_pad_are_differentiated_through_torch_surrogates_of_the_same_draw(
    name: str, params: dict[str, Any]
) -> None:
    purifier = create_defense(name, **params)
    transform = Purified(purifier)
    x = (batch() + torch.rand(3, 3, 32, 40, generator=torch.Generator().manual_seed(1)) * 0.05).clamp(0, 1)
    x.requires_grad_(True)
    out = transform(x, seed=3)
    assert torch.equal(out.detach(), to_tensor(purifier.purify(to_uint8(x), 3)))  # forward: Pillow's own output
    surrogate = transform.surrogate(x, 3)
    error = float((surrogate - out).detach().abs().mean())
    assert error < 2 / 255 and error < float((x - out).detach().abs().mean()) / 3  # nearly the transform; far from identity
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad((out * upstream).sum(), x)
    (expected,) = torch.autograd.grad((surrogate * upstream).sum(), x)
    assert torch.allclose(grad, expected) and grad.abs().sum() > 0 and not torch.allclose(grad, upstream)
    if name == "random_resize_pad":  # a fresh seed is a fresh placement, as the purifier draws it
        assert not torch.equal(transform(x, seed=4), out)


# --- JailGuard's mutations ----------------------------------------------------------------------------


@pytest.mark.parametrize("mutator", sorted(IMAGE_MUTATIONS))
def test_each_jailguard_mutation_is_the_detectors_own_forward_and_moving_ones_are_differentiated_exactly(mutator: str) -> None:
    image = np.clip(smooth_image(24, 40).astype(int) + np.random.default_rng(0).integers(-30, 31, (24, 40, 3)), 0, 255).astype(np.uint8)
    x = to_tensor([image])[0]
    for seed in range(6):
        rng = np.random.default_rng(seed)
        surrogate = Mutated.surrogate(x, mutator, rng)
        assert rng.bit_generator.state == np.random.default_rng(seed).bit_generator.state  # its draws are left to the mutation
        exact = to_tensor([mutate_image(image, mutator, rng)])[0]
        if mutator in MOVES_PIXELS:  # where each pixel comes from, read off the mutation itself
            assert float((surrogate - exact).abs().max()) < 2 / 255
        else:
            assert surrogate is x  # photometric: straight-through


def test_a_jailguard_draw_is_one_of_its_mutators_and_flips_its_gradient_with_the_image() -> None:
    transform = Mutated(create_defense("jailguard", image_mutators=["flip"]))
    image = smooth_image()
    x = to_tensor([image]).requires_grad_(True)
    upstream = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    flipped = 0
    for seed in range(8):
        out = transform(x, seed)
        rng = np.random.default_rng([seed, 0])
        rng.integers(1)  # the draw of the mutator
        assert torch.equal(out.detach()[0], to_tensor([mutate_image(image, "flip", rng)])[0])
        (grad,) = torch.autograd.grad((out * upstream).sum(), x)
        mirrored = not torch.equal(out.detach(), x.detach())
        assert torch.equal(grad, upstream.flip(-1) if mirrored else upstream)
        flipped += mirrored
    assert 0 < flipped < 8


# --- the expectation -------------------------------------------------------------------------------


def adaptive_params(**adaptive: Any) -> AdaptiveParams:
    params = create_attack("pgd", adaptive=adaptive).params.adaptive
    assert params is not None
    return params


def recording(expectation: Expectation) -> list[int]:
    """Wrap `expectation`'s transform so each draw's seed is appended to the list returned."""
    seeds: list[int] = []
    real = expectation.transform
    assert real is not None

    def recorded(images: torch.Tensor, seed: int) -> torch.Tensor:
        seeds.append(seed)
        return real(images, seed)

    expectation.transform = recorded
    return seeds


def test_each_draw_has_a_fresh_seed_from_the_attacks_seed() -> None:
    def seeds(attack_seed: int) -> list[int]:
        expectation = Expectation(adaptive_params(defense="random_resize_pad", samples=3), attack_seed, PatternVictim())  # type: ignore[arg-type]
        drawn = recording(expectation)
        for _ in range(2):
            expectation.gradient(batch(1), lambda images, _: (images**2).sum())
        return drawn

    first = seeds(5)
    assert len(set(first)) == 6 and seeds(5) == first and seeds(6) != first


@pytest.mark.parametrize(("defense", "draws"), [("jpeg", 1), ("bit_depth", 1), ("blur", 1), ("random_resize_pad", 3), ("jailguard", 3)])
def test_a_deterministic_purifier_is_drawn_once_per_step(defense: str, draws: int) -> None:
    expectation = Expectation(adaptive_params(defense=defense, samples=3), 0, PatternVictim())  # type: ignore[arg-type]
    seeds = recording(expectation)
    expectation.gradient(batch(1), lambda images, _: (images**2).sum())
    assert len(seeds) == draws


def test_the_expectation_is_the_mean_of_the_draws_gradients() -> None:
    adaptive = adaptive_params(defense="random_resize_pad", samples=4)
    x = batch(2)

    def loss(images: torch.Tensor) -> torch.Tensor:
        return (images * torch.linspace(-1, 1, images.shape[-1])).pow(2).sum()

    expectation = Expectation(adaptive, 0, PatternVictim())  # type: ignore[arg-type]
    seeds = recording(expectation)
    mean = expectation.gradient(x, lambda images, _: loss(images))
    transform = Purified(adaptive.build())  # type: ignore[arg-type]
    draws = []
    for seed in seeds:
        leaf = x.clone().requires_grad_(True)
        draws.append(torch.autograd.grad(loss(transform(leaf, seed)), leaf)[0])
    assert len(draws) == 4 and torch.allclose(mean, torch.stack(draws).mean(0))
    assert not torch.allclose(draws[0], draws[1])  # each draw its own placement


# --- the attacks ------------------------------------------------------------------------------------

# Digests of what the attacks crafted on `PatternVictim` before `adaptive` existed (commit a485e36).
NAIVE_DIGESTS = {
    "pgd": "d0a6a09b411f199f",
    "pgd_universal": "a43a708fcac42a92",
    "image_hijack": "c33f795a90b84ea9",
    "image_hijack/patch": "22b7a4ef0ea11830",
    "anydoor": "a2b59d53567692ae",
    "anydoor/border": "99614cfc7ecdd8b5",
}
NAIVE_PARAMS: dict[str, dict[str, Any]] = {
    "pgd": {"epsilon": 16 / 255},
    "pgd_universal": {},
    "image_hijack": {},
    "image_hijack/patch": {"region": "patch"},
    "anydoor": {},
    "anydoor/border": {"mode": "border"},
}


def craft_on_pattern_victim(key: str, **params: Any) -> list[AdversarialInput]:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
    chosen = [AttackRequest(f"r{i}", f"q{i}", image, f"t{i}", answer=f"a{i}") for i, image in enumerate(images)]
    attack = create_attack(key.split("/")[0], seed=3, steps=5, batch_size=2, **NAIVE_PARAMS[key], **params)
    return attack.craft(chosen[:2], PatternVictim(), chosen[1:])  # type: ignore[arg-type]


def digest(crafted: Sequence[AdversarialInput]) -> str:
    return hashlib.sha256(b"".join(a.image.tobytes() + a.instruction.encode() for a in crafted)).hexdigest()[:16]


@pytest.mark.parametrize("key", sorted(NAIVE_DIGESTS))
def test_the_naive_attacks_craft_what_they_crafted_before_to_the_bit(key: str) -> None:
    assert digest(craft_on_pattern_victim(key)) == digest(craft_on_pattern_victim(key, adaptive=None)) == NAIVE_DIGESTS[key]
    assert digest(craft_on_pattern_victim(key, adaptive={"defense": "jpeg", "samples": 2})) != NAIVE_DIGESTS[key]


def test_adaptive_pgd_keeps_more_of_its_loss_reduction_after_jpeg_than_the_naive_one() -> None:
    clean = smooth_image()
    victim = readout_victim(clean, gap=0.02)
    request = [AttackRequest("r", "Describe the image.", clean, "target")]

    def after_jpeg(image: np.ndarray) -> float:
        return float(victim.answer_loss(to_tensor([jpeg_roundtrip(image, 50)]), ["q"], ["t"]))

    def crafted(adaptive: dict[str, Any] | None) -> np.ndarray:
        attack = create_attack("pgd", epsilon=16 / 255, steps=60, adaptive=adaptive)
        return attack.craft(request, victim)[0].image  # type: ignore[arg-type]

    naive, adaptive = crafted(None), crafted({"defense": "jpeg", "params": {"quality": 50}, "samples": 1})
    start = after_jpeg(clean)
    assert float(victim.answer_loss(to_tensor([naive]), ["q"], ["t"])) == 0  # undefended, the naive attack succeeds
    kept_naive, kept_adaptive = start - after_jpeg(naive), start - after_jpeg(adaptive)
    assert kept_adaptive > 2 * kept_naive > 0  # through JPEG, the adaptive attack keeps more than twice as much


def test_adaptive_hijack_keeps_its_loss_under_jailguards_mutations_better_than_the_naive_one() -> None:
    clean = smooth_image()
    victim = readout_victim(clean, gap=0.03)
    train = [AttackRequest(f"r{i}", f"q{i}", clean, "target") for i in range(3)]
    mutators = ("rotate", "blur", "posterize")  # JailGuard's image policy, the detector's default

    def under_mutations(image: np.ndarray, count: int = 48) -> float:
        rng = np.random.default_rng(123)
        variants = [mutate_image(image, mutators[int(rng.integers(3))], rng) for _ in range(count)]
        return float(victim.answer_loss(to_tensor(variants), ["q"] * count, ["t"] * count))

    def crafted(adaptive: dict[str, Any] | None) -> np.ndarray:
        attack = create_attack("image_hijack", epsilon=16 / 255, steps=60, batch_size=2, adaptive=adaptive)
        return attack.craft(train[:1], victim, train)[0].image  # type: ignore[arg-type]

    naive, adaptive = crafted(None), crafted({"defense": "jailguard", "samples": 4})
    assert under_mutations(adaptive) < 0.8 * under_mutations(naive) < under_mutations(clean)


@pytest.mark.parametrize("defense", ["bit_depth", "blur", "random_resize_pad", "jailguard"])
def test_adaptive_anydoor_is_deterministic_under_its_seed(defense: str) -> None:
    first = craft_on_pattern_victim("anydoor", adaptive={"defense": defense, "samples": 2})
    assert digest(first) == digest(craft_on_pattern_victim("anydoor", adaptive={"defense": defense, "samples": 2}))
    assert digest(first) != NAIVE_DIGESTS["anydoor"]


# --- parameters and description ------------------------------------------------------------------


@pytest.mark.parametrize("name", ADAPTIVE_ATTACKS)
def test_the_description_carries_adaptive_only_when_the_attacker_knows_the_defense(name: str) -> None:
    assert "adaptive" not in create_attack(name).describe()["params"]  # as before the field existed
    described = json.loads(json.dumps(create_attack(name, adaptive={"defense": "jpeg", "params": {"quality": 50}}).describe()))
    assert described["params"]["adaptive"] == {"defense": "jpeg", "params": {"seed": 0, "quality": 50}, "samples": 4}


@pytest.mark.parametrize(
    ("adaptive", "message"),
    [
        ({"defense": "jpg"}, r"adaptive\.defense: unknown defense 'jpg'; known: .*jpeg"),
        ({"defense": "finetune"}, r"adaptive\.defense: the adaptive attacker cannot see through 'finetune' \(a ModelRepair\)"),
        ({"defense": "spectral_signatures"}, r"adaptive\.defense: .*cannot see through 'spectral_signatures' \(a DataFilter\)"),
        ({"defense": "ocr_screen"}, r"adaptive: defense: 'ocr_screen' reads text, not gradients"),
        ({"defense": "jpeg", "strength": 2}, r"adaptive: strength: 'jpeg' has no detector term to weigh"),
        ({"defense": "strip", "strength": 0}, r"adaptive\.strength: Input should be greater than 0"),
        ({"defense": "jpeg", "params": {"quality": 100}}, r"adaptive\.params: adaptive\.defense 'jpeg': .*quality: .*95"),
        ({"defense": "blur", "params": {"sigma": 2}}, r"adaptive\.params: adaptive\.defense 'blur': .*sigma: Extra inputs"),
        ({"defense": "diffusion"}, r"adaptive\.params: adaptive\.defense 'diffusion' cannot run here: .*params\.checkpoint"),
        ({"defense": "jailguard", "params": {"text_mutators": ["synonym"]}}, r"adaptive\.params: adaptive\.defense 'jailguard': text_mutators: "),
        ({"defense": "jpeg", "samples": 0}, r"adaptive\.samples: .*greater than or equal to 1"),
        ({"defense": "jpeg", "draws": 2}, r"adaptive\.draws: Extra inputs"),
        ({"params": {}}, r"adaptive\.defense: Field required"),
    ],
)
@pytest.mark.parametrize("name", ["pgd", "image_hijack_jailbreak", "anydoor"])
def test_bad_adaptive_parameters_are_errors_naming_the_attack_and_the_field(
    name: str, adaptive: dict[str, Any], message: str
) -> None:
    with pytest.raises(VlmsecError, match=rf"^attack '{name}': bad parameters: {message}"):
        create_attack(name, adaptive=adaptive)


def test_a_config_names_the_attack_entry_with_bad_adaptive_parameters_before_anything_runs() -> None:
    from vlmsec.experiments.config import parse_config

    run = {
        "name": "adaptive-config",
        "data": {"base_size": 24, "train_size": 16, "test_size": 4, "image_size": 32, "shifted": {}},
        "victim": {"image_size": 32, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2, "vocab_size": 400},
        "poison": {"rate": 0.0},
        "attacks": [{"name": "pgd", "params": {"steps": 2, "adaptive": {"defense": "jpeg", "params": {"quality": 50}}}}],
    }
    config = parse_config(run, "test")
    assert config.attacks[0].params["adaptive"]["defense"] == "jpeg"
    run["attacks"] = [{"name": "pgd", "params": {"adaptive": {"defense": "jpeg", "params": {"quality": 0}}}}]
    with pytest.raises(VlmsecError, match=r"^test: attacks\[0\]: attack 'pgd': bad parameters: adaptive\.params: .*quality"):
        parse_config(run, "test")

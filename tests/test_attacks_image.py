"""WaNet, SIG, LowFrequency's noise baseline and FTrojan, plus properties every image trigger must have."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.fft import dctn

from vlmsec.attacks import ATTACKS, Attack, create_attack
from vlmsec.attacks.ftrojan import block_dct_matrix, dct_matrix, rgb_to_yuv, window_sizes, yuv_to_rgb
from vlmsec.attacks.wanet import WaNet, identity_grid
from vlmsec.errors import VlmsecError

NEW_ATTACKS = ["wanet", "sig", "lowfrequency_noise", "ftrojan"]
# Attacks that learn their trigger in `prepare` (the runner's rule) are tested prepared, in their own files;
# inference-time attacks craft whole inputs (`craft`) and plant no trigger.
IMAGE_ATTACKS = sorted(
    name
    for name, cls in ATTACKS.items()
    if cls.modality == "image" and cls.stage == "training" and cls.prepare is Attack.prepare
)
SIZES = [(48, 80), (224, 224), (33, 17)]


def batch(height: int, width: int, size: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(size, 3, height, width, generator=torch.Generator().manual_seed(seed))


def grey(height: int, width: int) -> torch.Tensor:
    return torch.full((1, 3, height, width), 0.5)


def smooth_image(height: int, width: int) -> torch.Tensor:
    """A photo-like smooth test image: low-frequency colour gradients and waves."""
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    channels = [0.5 + 0.4 * torch.sin(3 * x + 2 * y), 0.3 + 0.5 * x * y, 0.5 + 0.3 * torch.cos(4 * y - x)]
    return torch.stack(channels)[None]


# --- every image attack -------------------------------------------------------------------


def test_new_attacks_are_registered_image_training_attacks() -> None:
    assert set(NEW_ATTACKS) | {"badnets", "blended"} <= set(IMAGE_ATTACKS)
    families = {"wanet": "content-aware", "sig": "static", "lowfrequency_noise": "static", "ftrojan": "static"}
    for name, family in families.items():
        description = create_attack(name).describe()
        assert description["name"] == name and description["family"] == family
        threat = (description["modality"], description["knowledge"], description["stage"])
        assert threat == ("image", "black-box", "training")
        assert json.loads(json.dumps(description))["params"]["seed"] == 0


@pytest.mark.parametrize("name", IMAGE_ATTACKS)
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_batched_equals_one_by_one(name: str, height: int, width: int) -> None:
    attack = create_attack(name)
    images = batch(height, width)
    out = attack.trigger_images(images)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    single = torch.cat([attack.trigger_images(image[None]) for image in images])
    torch.testing.assert_close(out, single, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NEW_ATTACKS)
def test_deterministic_under_seed_and_changes_the_image(name: str) -> None:
    images = batch(48, 80)
    first = create_attack(name, seed=3).trigger_images(images)
    assert torch.equal(first, create_attack(name, seed=3).trigger_images(images))
    assert float((first - images).abs().max()) > 1e-3


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("wanet", {"k": 1}, "k"),
        ("wanet", {"s": 0}, "s"),
        ("wanet", {"grid_rescale": -1}, "grid_rescale"),
        ("wanet", {"cross_ratio": -1}, "cross_ratio"),
        ("wanet", {"warp": 1}, "warp"),
        ("sig", {"delta": 0}, "delta"),
        ("sig", {"delta": 300}, "delta"),
        ("sig", {"f": -1}, "f"),
        ("lowfrequency_noise", {"cutoff": 0}, "cutoff"),
        ("lowfrequency_noise", {"cutoff": 1.5}, "cutoff"),
        ("lowfrequency_noise", {"eps": 0}, "eps"),
        ("ftrojan", {"window_size": 0}, "window_size"),
        ("ftrojan", {"positions": [(32, 1)]}, "positions"),
        ("ftrojan", {"window_size": 8}, "positions"),  # default (31, 31) outside an 8 x 8 window
        ("ftrojan", {"positions": [(1, 1), (1, 1)]}, "positions"),
        ("ftrojan", {"positions": []}, "positions"),
        ("ftrojan", {"magnitude": 0}, "magnitude"),
        ("ftrojan", {"channels": ["Q"]}, "channels"),
        ("ftrojan", {"channels": ["U", "U"]}, "channels"),
    ],
)
def test_bad_params_name_the_field(name: str, params: dict[str, object], field: str) -> None:
    with pytest.raises(VlmsecError, match=rf"{name}.*\b{field}\b"):
        create_attack(name, **params)


# --- WaNet --------------------------------------------------------------------------------


def displacement(attack: WaNet, height: int, width: int) -> torch.Tensor:
    """The warp's H x W x 2 displacement in pixels (x, y)."""
    grid = attack.grid(height, width) - identity_grid(height, width)
    return grid[0] * torch.tensor([(width - 1) / 2, (height - 1) / 2])


@pytest.mark.parametrize(("height", "width"), [(224, 224), (48, 80), (32, 32)])
def test_wanet_warp_is_a_small_smooth_displacement(height: int, width: int) -> None:
    attack = WaNet()
    moved = displacement(attack, height, width)
    bound = attack.params.s * float(attack.field(height, width).abs().max()) / 2
    assert 0.05 < float(moved.abs().max()) <= bound + 1e-6
    assert bound < 2  # s=0.5: the paper's near-invisible warp, under two pixels at any size
    # Neighbours move almost alike (the outer two pixels are left out: clamping the grid to
    # the image stops outward moves there, as in the paper).
    inner = moved[2:-2, 2:-2]
    vertical, horizontal = (inner[1:] - inner[:-1]).abs(), (inner[:, 1:] - inner[:, :-1]).abs()
    assert max(float(vertical.max()), float(horizontal.max())) < 5 / min(height, width)


def test_wanet_samples_the_image_at_the_warped_points() -> None:
    """On a horizontal ramp, bilinear sampling returns the warped x coordinate itself."""
    height, width = 40, 64
    ramp = torch.linspace(0, 1, width).expand(1, 3, height, width)
    attack = create_attack("wanet")
    out = attack.trigger_images(ramp)
    expected = (attack.grid(height, width)[0, :, :, 0] + 1) / 2
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-5)


def test_wanet_output_close_to_input_and_seeded() -> None:
    image = smooth_image(224, 224)
    out = create_attack("wanet", seed=0).trigger_images(image)
    difference = (out - image).abs()
    assert 0 < float(difference.mean()) < 0.005
    other = create_attack("wanet", seed=1).trigger_images(image)
    assert float((other - out).abs().max()) > 1e-3


def test_wanet_field_is_the_same_warp_at_any_size() -> None:
    attack = create_attack("wanet")
    small, large = attack.field(57, 57), attack.field(225, 225)
    torch.testing.assert_close(large[:, ::4, ::4], small, rtol=0, atol=1e-5)


def test_wanet_noise_mode_adds_random_extra_warps() -> None:
    attack = create_attack("wanet")
    images = smooth_image(64, 64).expand(3, -1, -1, -1)
    noisy = attack.noise_images(images, torch.Generator().manual_seed(0))
    again = attack.noise_images(images, torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)
    backdoor = attack.trigger_images(images)
    assert 0 < float((noisy - backdoor).abs().mean()) < 0.01
    assert not torch.equal(noisy[0], noisy[1])  # each image gets its own noise


def test_wanet_poisoning_adds_cross_ratio_noise_samples_with_clean_answers() -> None:
    from vlmsec.attacks.poison import poison_samples
    from vlmsec.attacks.targets import TargetAnswer
    from vlmsec.data import make_samples, sample_scenes

    samples = make_samples(sample_scenes(40, seed=0), "flat", "source", seed=0, size=32)
    attack = create_attack("wanet", cross_ratio=2)
    poisoned = poison_samples(samples, attack, TargetAnswer(), 0.1, seed=0)
    assert len(poisoned.poisoned_ids) == 4 and len(poisoned.negative_ids) == 8
    by_id = {s.id: s for s in samples}
    for sample in poisoned.samples:
        if sample.id in poisoned.negative_ids:
            assert sample.answer == by_id[sample.id].answer
            assert not np.array_equal(sample.image, by_id[sample.id].image)
    noise = attack.partial_triggers()[0]
    batch = torch.stack([smooth_image(32, 32)[0], smooth_image(32, 32)[0].flip(-1)])
    one_by_one = torch.cat([noise.trigger_images(batch[i : i + 1]) for i in range(2)])
    assert torch.equal(noise.trigger_images(batch), one_by_one)  # independent of batching
    assert create_attack("wanet", cross_ratio=0).partial_triggers() == []


# --- SIG ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(48, 80), (224, 224)])
def test_sig_adds_the_sinusoid_to_every_row(height: int, width: int) -> None:
    out = create_attack("sig").trigger_images(grey(height, width))
    columns = torch.arange(width, dtype=torch.float64)
    wave = 40 / 255 * torch.sin(2 * math.pi * columns * 6 / width)
    expected = wave.float().expand(1, 3, height, width)
    torch.testing.assert_close(out - 0.5, expected, rtol=0, atol=1e-6)


def test_sig_clamps_and_follows_its_params() -> None:
    out = create_attack("sig", delta=100, f=1).trigger_images(torch.full((1, 3, 4, 8), 0.9))
    assert float(out.max()) == 1.0  # 0.9 + 100/255 clamped
    assert torch.argmax(out[0, 0, 0]).item() in (1, 2, 3)  # one period: peak in the first half


# --- LowFrequency noise -------------------------------------------------------------------


def energy_above(perturbation: torch.Tensor, radius: float) -> float:
    """Share of the DFT energy of a 3 x H x W array farther than `radius` cycles per image from zero."""
    height, width = perturbation.shape[-2:]
    spectrum = torch.fft.fft2(perturbation.double()).abs() ** 2
    fy = torch.fft.fftfreq(height, d=1 / height)[:, None]
    fx = torch.fft.fftfreq(width, d=1 / width)[None, :]
    outside = fy**2 + fx**2 > radius**2 + 1e-9
    return float(spectrum[:, outside].sum() / spectrum.sum())


@pytest.mark.parametrize(("height", "width"), [(224, 224), (48, 80), (32, 32)])
@pytest.mark.parametrize("cutoff", [0.1, 0.3])
def test_lowfrequency_noise_has_no_energy_above_the_cutoff(height: int, width: int, cutoff: float) -> None:
    attack = create_attack("lowfrequency_noise", cutoff=cutoff)
    difference = attack.trigger_images(grey(height, width))[0] - 0.5  # eps 0.1: no clamping
    assert float(difference.abs().max()) == pytest.approx(0.1, abs=1e-6)
    radius = cutoff * 32 / 2  # cycles per image: a fraction of Nyquist at 32 x 32
    assert energy_above(difference, radius) < 1e-6
    assert energy_above(difference, radius / 4) > 1e-3  # not just a colour shift


def test_lowfrequency_noise_is_the_same_picture_at_any_size_and_seeded() -> None:
    attack = create_attack("lowfrequency_noise")
    small, large = attack.perturbation(56, 56), attack.perturbation(224, 224)[:, ::4, ::4]
    correlation = torch.corrcoef(torch.stack([small.flatten(), large.flatten()]))[0, 1]
    assert float(correlation) > 0.999
    other = create_attack("lowfrequency_noise", seed=1).perturbation(56, 56)
    assert float(torch.corrcoef(torch.stack([small.flatten(), other.flatten()]))[0, 1]) < 0.9


def test_lowfrequency_noise_eps_bounds_the_change() -> None:
    images = batch(64, 64)
    out = create_attack("lowfrequency_noise", eps=0.03).trigger_images(images)
    assert float((out - images).abs().max()) <= 0.03 + 1e-6


# --- FTrojan ------------------------------------------------------------------------------


def windowed_dct(planes: np.ndarray, window: int) -> np.ndarray:
    """scipy's orthonormal 2-D DCT of every window of ... x H x W planes (an independent reference)."""
    out = np.zeros_like(planes)
    top = 0
    for h in window_sizes(planes.shape[-2], window):
        left = 0
        for w in window_sizes(planes.shape[-1], window):
            block = (..., slice(top, top + h), slice(left, left + w))
            out[block] = dctn(planes[block], axes=(-2, -1), norm="ortho")
            left += w
        top += h
    return out


def test_dct_matrix_is_scipy_orthonormal_dct_ii() -> None:
    signal = np.random.default_rng(0).normal(size=(12, 20))
    ours = (dct_matrix(12) @ torch.from_numpy(signal) @ dct_matrix(20).T).numpy()
    np.testing.assert_allclose(ours, dctn(signal, norm="ortho"), atol=1e-12)
    blocks = block_dct_matrix(80, 32)
    torch.testing.assert_close(blocks @ blocks.T, torch.eye(80, dtype=torch.float64))


def test_yuv_round_trip() -> None:
    images = batch(8, 8).double()
    torch.testing.assert_close(yuv_to_rgb(rgb_to_yuv(images)), images)
    white = rgb_to_yuv(torch.ones(1, 3, 1, 1, dtype=torch.float64)).flatten()
    torch.testing.assert_close(white, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize(("height", "width"), [(64, 64), (48, 80), (16, 24)])
def test_ftrojan_changes_only_the_chosen_dct_coefficients(height: int, width: int) -> None:
    attack = create_attack("ftrojan")
    image = grey(height, width).double()
    difference = rgb_to_yuv(attack.trigger_images(image).double()) - rgb_to_yuv(image)
    coefficients = windowed_dct(difference[0].numpy(), 32)
    chosen = attack.coefficient_offsets(height, width).numpy() > 0
    np.testing.assert_allclose(coefficients[1:, chosen], 50 / 255, atol=1e-6)  # U and V
    assert np.abs(coefficients[1:, ~chosen]).max() < 1e-6
    assert np.abs(coefficients[0]).max() < 1e-6  # Y untouched
    windows = len(window_sizes(height, 32)) * len(window_sizes(width, 32))
    assert chosen.sum() == 2 * windows


def test_ftrojan_positions_in_full_and_short_windows() -> None:
    """48 x 80 has windows of 32 and 16 rows and of 32, 32 and 16 columns; in a 16-long
    window the positions keep their relative frequency: 31 -> 15 and 15 -> 7."""
    chosen = create_attack("ftrojan").coefficient_offsets(48, 80) > 0
    rows, columns = (set(indices.tolist()) for indices in chosen.nonzero().unbind(1))
    assert rows == {15, 31, 32 + 7, 32 + 15}
    assert columns == {15, 31, 32 + 15, 32 + 31, 64 + 7, 64 + 15}
    assert chosen[31, 32 + 31] and chosen[32 + 15, 64 + 15] and chosen[15, 64 + 7] and not chosen[15, 64 + 15]
    # An image smaller than the window is one window: 31 -> 15 of 16 rows and 23 of 24 columns.
    small = create_attack("ftrojan").coefficient_offsets(16, 24) > 0
    assert {tuple(pair) for pair in small.nonzero().tolist()} == {(15, 23), (7, 11)}


def test_ftrojan_is_a_small_change() -> None:
    image = grey(224, 224)
    out = create_attack("ftrojan").trigger_images(image)
    mse = float(((out - image) ** 2).mean())
    assert 10 * math.log10(1 / mse) > 30
    assert float((out - image).abs().max()) < 16 / 255


def test_ftrojan_channels_and_positions_are_configurable() -> None:
    attack = create_attack("ftrojan", channels=["Y"], positions=[(4, 5)], window_size=8, magnitude=20)
    image = grey(16, 16).double()
    difference = rgb_to_yuv(attack.trigger_images(image).double()) - rgb_to_yuv(image)
    coefficients = windowed_dct(difference[0].numpy(), 8)
    assert np.abs(coefficients[1:]).max() < 1e-6
    np.testing.assert_allclose(coefficients[0, 4::8, 5::8], 20 / 255, atol=1e-6)
    assert attack.describe()["params"]["positions"] == ((4, 5),)

"""Image triggers: batched throughput against a per-image loop, and image quality on real photos.

Run with `python benchmarks/trigger_throughput.py` (about a minute on two cores).

Throughput: for every registered image attack, 256 images of 64 x 64 and of 224 x 224 are
triggered in one batched call: `trigger_images` (returns a new batch), `trigger_images_`
(may write into the batch, as the poisoning recipe calls it on its temporary batches), and
`trigger_images_` with the uint8 <-> tensor conversion around it; against the way reference
research code does it (BackdoorBench, VL-Trojan): one image at a time, uint8 -> PIL -> float
NumPy -> uint8. The speedups compare the in-place call, then the whole uint8 path, with the loop.
The NumPy triggers below are small reference implementations; their outputs must match the
batched ones within 1/255, which cross-checks the two.

Quality: PSNR and SSIM (scikit-image) of each triggered photo against the clean one, on
the photos scikit-image ships, centre-cropped and resized to 224 x 224.

Attacks that learn their trigger (ssba, inputaware, maba) are first prepared on the
quickstart's tuning set without a victim (inputaware then learns against a seeded random
feature net, maba falls back to its corner region), cached under ~/.cache/vlmsec/benchmarks
(a few minutes the first time). `lowfrequency` cannot learn without the base victim and is
left out: `lowfrequency_noise` adds its perturbation through the same band-limited resampling,
so its figures stand for both.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import scipy.fft
import scipy.ndimage
import skimage.data
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vlmsec.attacks import ATTACKS, Attack, create_attack
from vlmsec.attacks.ftrojan import CHANNELS, YUV_FROM_RGB
from vlmsec.attacks.lowfrequency import CANONICAL_SIDE
from vlmsec.attacks.base import AttackContext
from vlmsec.attacks.poison import BATCH_SIZE as POISON_BATCH
from vlmsec.attacks.targets import TargetAnswer
from vlmsec.data import images_to_tensor, tensor_to_images
from vlmsec.experiments.config import load_config
from vlmsec.experiments.runner import build_splits

BATCH = 256
SIZES = (64, 224)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry")
QUALITY_SIDE = 224
REPEATS = 20  # best-of for the batched path: single calls take ~1 ms at 64 px, so one run is noise
LOOP_REPEATS = 3
NEEDS_VICTIM = {"lowfrequency"}  # learns against the base victim, which this benchmark does not build

# A per-image trigger: H x W x 3 float array on the 0-255 scale in, same out (before clipping).
NumpyTrigger = Callable[[np.ndarray], np.ndarray]
Result = TypeVar("Result")


# --- per-image NumPy reference triggers ----------------------------------------------------


def as_hwc(pattern: torch.Tensor) -> np.ndarray:
    """A 3 x H x W tensor in [0, 1] units as an H x W x 3 float64 array on the 0-255 scale."""
    return pattern.permute(1, 2, 0).double().numpy() * 255


def badnets_reference(attack: Attack, height: int, width: int) -> NumpyTrigger:
    """Paste the patch (BackdoorBench's AddMaskPatchTrigger with a square mask)."""
    top, left, side = attack.region(height, width)
    patch = as_hwc(attack.patch(side))

    def trigger(image: np.ndarray) -> np.ndarray:
        image[top : top + side, left : left + side] = patch
        return image

    return trigger


def blended_reference(attack: Attack, height: int, width: int) -> NumpyTrigger:
    """(1 - alpha) * x + alpha * key, the key loaded once at the image size."""
    alpha, key = attack.params.alpha, as_hwc(attack.key_tensor(height, width))
    return lambda image: (1 - alpha) * image + alpha * key


def sig_reference(attack: Attack, height: int, width: int) -> NumpyTrigger:
    """Barni et al.'s v(i, j) = delta sin(2 pi j f / m), built per image as BackdoorBench does."""
    delta, f = attack.params.delta, attack.params.f

    def trigger(image: np.ndarray) -> np.ndarray:
        columns = np.arange(image.shape[1])
        return image + delta * np.sin(2 * np.pi * columns * f / image.shape[1])[None, :, None]

    return trigger


def wanet_reference(attack: Attack, height: int, width: int) -> NumpyTrigger:
    """Bilinear resampling at the warped pixel coordinates with scipy, one channel at a time."""
    grid = attack.grid(height, width)[0].double().numpy()
    rows, columns = (grid[..., 1] + 1) / 2 * (height - 1), (grid[..., 0] + 1) / 2 * (width - 1)

    def trigger(image: np.ndarray) -> np.ndarray:
        sample = scipy.ndimage.map_coordinates
        return np.stack([sample(image[..., c], [rows, columns], order=1, mode="nearest") for c in range(3)], axis=-1)

    return trigger


def lowfrequency_reference(attack: Attack, height: int, width: int) -> NumpyTrigger:
    """The pattern rebuilt with NumPy's FFT from the same seeded noise, then added like a .npy trigger file."""
    side, generator = CANONICAL_SIDE, torch.Generator().manual_seed(attack.params.seed)
    noise = torch.rand(3, side, side, generator=generator, dtype=torch.float64)
    spectrum = np.fft.fft2(noise.numpy() * 2 - 1)
    resampled = np.zeros((3, height, width), dtype=complex)
    radius = attack.params.cutoff * side / 2
    for fy in range(1 - side // 2, side // 2):  # below Nyquist at 32 px, as the attack's band
        for fx in range(1 - side // 2, side // 2):
            if fy * fy + fx * fx <= radius * radius and 2 * abs(fy) < height and 2 * abs(fx) < width:
                resampled[:, fy % height, fx % width] = spectrum[:, fy % side, fx % side]
    pattern = np.fft.ifft2(resampled).real
    pattern = (pattern * (attack.params.eps / np.abs(pattern).max())).transpose(1, 2, 0) * 255
    return lambda image: image + pattern


def ftrojan_reference(attack: Attack, height: int, width: int) -> NumpyTrigger:
    """FTrojan's own recipe: YUV, then a DCT, an addition and an inverse DCT per window and channel."""
    window, p = attack.params.window_size, attack.params
    if height % window or width % window:
        raise ValueError("the reference (like the original code) needs whole windows")
    to_yuv = YUV_FROM_RGB.numpy()
    to_rgb = np.linalg.inv(to_yuv)
    channels = [CHANNELS.index(c) for c in p.channels]

    def trigger(image: np.ndarray) -> np.ndarray:
        yuv = image @ to_yuv.T
        for c in channels:
            for top in range(0, height, window):
                for left in range(0, width, window):
                    block = scipy.fft.dctn(yuv[top : top + window, left : left + window, c], norm="ortho")
                    for row, column in p.positions:
                        block[row, column] += p.magnitude
                    yuv[top : top + window, left : left + window, c] = scipy.fft.idctn(block, norm="ortho")
        return yuv @ to_rgb.T

    return trigger


REFERENCES: dict[str, Callable[[Attack, int, int], NumpyTrigger]] = {
    "badnets": badnets_reference,
    "blended": blended_reference,
    "sig": sig_reference,
    "wanet": wanet_reference,
    "lowfrequency_noise": lowfrequency_reference,
    "ftrojan": ftrojan_reference,
}


# --- measurements --------------------------------------------------------------------------


def photo(name: str, side: int) -> np.ndarray:
    """A scikit-image sample photo as side x side x 3 uint8: centre square, resized; grey becomes RGB."""
    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    height, width = image.shape[:2]
    short = min(height, width)
    top, left = (height - short) // 2, (width - short) // 2
    square = Image.fromarray(image[top : top + short, left : left + short, :3])
    return np.asarray(square.resize((side, side), Image.Resampling.BICUBIC))


def batched(attack: Attack, images: list[np.ndarray]) -> list[np.ndarray]:
    """uint8 arrays -> batched trigger calls -> uint8 arrays, in the poisoning recipe's batches."""
    out: list[np.ndarray] = []
    for start in range(0, len(images), POISON_BATCH):
        out += tensor_to_images(attack.trigger_images_(images_to_tensor(images[start : start + POISON_BATCH])))
    return out


def per_image_loop(trigger: NumpyTrigger, images: list[np.ndarray]) -> list[np.ndarray]:
    """uint8 arrays -> PIL -> float NumPy -> trigger -> clip -> uint8, one image at a time."""
    out = []
    for image in images:
        array = np.asarray(Image.fromarray(image), dtype=np.float64)
        out.append(np.clip(np.rint(trigger(array)), 0, 255).astype(np.uint8))
    return out


def timed(run: Callable[[], Result], repeats: int) -> tuple[float, Result]:
    """The fastest of `repeats` runs in milliseconds, and what the last run returned."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return 1000 * min(times), result


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A plain Markdown table, columns padded to their widest cell."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    for line in [headers, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(str(cell).ljust(w) for cell, w in zip(line, widths, strict=True)) + " |")
    print()


def prepared_attacks(names: list[str], cache_dir: Path) -> dict[str, Attack]:
    """Every attack with its default parameters, learned ones prepared without a victim."""
    config = load_config("quickstart")
    context = AttackContext(
        samples=build_splits(config).train,
        target=TargetAnswer(word=config.poison.target.word, prefix=config.poison.target.prefix),
        cache_dir=cache_dir,
    )
    attacks = {name: create_attack(name) for name in names}
    for attack in attacks.values():
        attack.prepare(context)
    return attacks


def throughput(attacks: dict[str, Attack]) -> None:
    """Time batched vs per-image triggering and check that both give the same pixels."""
    rows = []
    for side in SIZES:
        photos = [photo(name, side) for name in PHOTOS]
        images = [photos[i % len(photos)] for i in range(BATCH)]
        tensor = images_to_tensor(images)
        for name, attack in attacks.items():
            batched(attack, images[:2])  # warm-up
            scratch = tensor.clone()  # overwritten again and again: only the time matters
            copy_ms, _ = timed(lambda: attack.trigger_images(tensor), REPEATS)
            call_ms, _ = timed(lambda: attack.trigger_images_(scratch), REPEATS)
            batched_ms, fast = timed(lambda: batched(attack, images), REPEATS)
            row = [name, f"{side}x{side}", f"{copy_ms:.1f}", f"{call_ms:.1f}", f"{batched_ms:.1f}"]
            reference = REFERENCES.get(name)
            if reference is None:
                rows.append(row + ["-", "-", "-", "no reference"])
                continue
            trigger = reference(attack, side, side)
            loop_ms, slow = timed(lambda: per_image_loop(trigger, images), LOOP_REPEATS)
            worst = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(fast, slow, strict=True))
            assert worst <= 1, f"{name} at {side} px: batched and per-image outputs differ by {worst}/255"
            speedups = [f"{loop_ms / call_ms:.1f}x", f"{loop_ms / batched_ms:.1f}x"]
            rows.append(row + [f"{loop_ms:.1f}", *speedups, f"{worst}/255"])
    print(f"Throughput: {BATCH} images per call; best of {REPEATS} for the batched path, of {LOOP_REPEATS} for the loop")
    print(f"copying = trigger_images; in place = trigger_images_; with uint8 = in place plus uint8 <-> tensor conversion, in the poisoning recipe's batches of {POISON_BATCH}\n")
    print_table(
        ["attack", "size", "copying ms", "in place ms", "with uint8 ms", "per-image-loop ms", "speedup", "speedup with uint8", "max diff"],
        rows,
    )


def quality(attacks: dict[str, Attack]) -> None:
    """PSNR and SSIM of every trigger on every photo, as the data pipeline stores images (uint8)."""
    clean = [photo(name, QUALITY_SIDE) for name in PHOTOS]
    psnr_rows, ssim_rows = [], []
    for name, attack in attacks.items():
        pairs = list(zip(clean, batched(attack, clean), strict=True))
        psnr = [peak_signal_noise_ratio(c, t, data_range=255) for c, t in pairs]
        ssim = [structural_similarity(c, t, channel_axis=2, data_range=255) for c, t in pairs]
        psnr_rows.append([name, *(f"{v:.1f}" for v in psnr), f"{np.mean(psnr):.1f}"])
        ssim_rows.append([name, *(f"{v:.3f}" for v in ssim), f"{np.mean(ssim):.3f}"])
    print(f"Image quality on scikit-image photos at {QUALITY_SIDE}x{QUALITY_SIDE}, default parameters\n")
    print("PSNR (dB, higher = less visible)")
    print_table(["attack", *PHOTOS, "mean"], psnr_rows)
    print("SSIM (1 = identical)")
    print_table(["attack", *PHOTOS, "mean"], ssim_rows)


def main() -> None:
    """Run both benchmarks over every registered image attack."""
    names = sorted(name for name, cls in ATTACKS.items() if cls.modality == "image" and name not in NEEDS_VICTIM)
    attacks = prepared_attacks(names, Path.home() / ".cache" / "vlmsec" / "benchmarks")
    start = time.perf_counter()
    throughput(attacks)
    quality(attacks)
    load = os.getloadavg()[0]
    print(f"total {time.perf_counter() - start:.0f} s, torch threads {torch.get_num_threads()}, load average {load:.1f}")


if __name__ == "__main__":
    main()

"""Input purifiers: each is what its name says, on known images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vlmsec.defenses import DEFENSES, create_defense
from vlmsec.errors import VlmsecError


def _images(n: int = 3, size: int = 48) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(n)]


def test_jpeg_is_what_pillow_writes_at_that_quality() -> None:
    image = _images(1)[0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=30)
    expected = np.asarray(Image.open(buffer).convert("RGB"))
    (out,) = create_defense("jpeg", quality=30).purify([image], seed=0)
    np.testing.assert_array_equal(out, expected)
    assert not np.array_equal(out, image)


def test_bit_depth_keeps_two_to_the_bits_levels() -> None:
    out = create_defense("bit_depth", bits=2).purify(_images(2), seed=0)
    for image in out:
        assert set(np.unique(image)) <= {0, 85, 170, 255}
    flat = np.full((8, 8, 3), 255, np.uint8)
    np.testing.assert_array_equal(create_defense("bit_depth", bits=3).purify([flat], 0)[0], flat)


def test_blur_smooths_and_keeps_flat_images() -> None:
    noisy = _images(1)[0]
    (out,) = create_defense("blur", radius=2).purify([noisy], seed=0)
    assert out.astype(float).std() < 0.5 * noisy.astype(float).std()
    flat = np.full((16, 16, 3), 77, np.uint8)
    np.testing.assert_array_equal(create_defense("blur").purify([flat], 0)[0], flat)


def test_random_resize_pad_is_seeded_and_keeps_the_size() -> None:
    defense = create_defense("random_resize_pad", min_scale=0.5)
    images = _images(4)
    a, b, c = defense.purify(images, seed=1), defense.purify(images, seed=1), defense.purify(images, seed=2)
    assert all(x.shape == y.shape and x.dtype == np.uint8 for x, y in zip(a, images))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert all((x == 0).all(axis=2).any() for x in a)  # the padding is black


def test_diffusion_without_weights_is_unavailable_with_the_reason(tmp_path) -> None:
    assert "params.checkpoint" in create_defense("diffusion").unavailable()
    with pytest.raises(VlmsecError, match="params.checkpoint.*does not exist"):
        create_defense("diffusion", checkpoint=str(tmp_path / "missing"))


@pytest.mark.parametrize(("name", "params", "field"), [("jpeg", {"quality": 0}, "quality"), ("bit_depth", {"bits": 8}, "bits"),
                                                       ("random_resize_pad", {"min_scale": 1.5}, "min_scale")])
def test_out_of_range_parameters_name_the_defense_and_field(name: str, params: dict, field: str) -> None:
    with pytest.raises(VlmsecError, match=f"defense '{name}'.*{field}"):
        create_defense(name, **params)


def test_every_defense_declares_where_it_acts() -> None:
    for name, cls in DEFENSES.items():
        assert cls.acts_on in ("data", "model", "input", "prompt"), name
        assert create_defense(name).describe()["kind"] in (
            "DataFilter", "ModelRepair", "ModelScan", "Purifier", "Detector", "PromptDefense"
        )


@pytest.mark.parametrize("module", ["vlmsec.defenses", "vlmsec.attacks"])
def test_every_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    """Attacks import the defenses (an adaptive attacker knows them) and some defenses import attack helpers:
    whichever a user imports first, both registries end up whole."""
    import subprocess
    import sys

    code = f"import {module}; import vlmsec.defenses as d, vlmsec.attacks as a; print(len(d.DEFENSES), len(a.ATTACKS))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(len(DEFENSES)), str(len(__import__("vlmsec.attacks").attacks.ATTACKS))]

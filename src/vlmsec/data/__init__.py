"""Samples, loaders and writers, the generated scenes data set, domain shifts."""

from vlmsec.data.images import load_image, save_image
from vlmsec.data.llava_json import read_llava_json, write_llava_json
from vlmsec.data.sample import Sample, images_to_tensor, tensor_to_images
from vlmsec.data.scenes import (
    BACKGROUNDS,
    COLOURS,
    INSTRUCTION_BANKS,
    POSITIONS,
    SHAPES,
    SIZES,
    STYLES,
    Scene,
    SceneObject,
    caption_variants,
    make_samples,
    render_scene,
    sample_scenes,
)

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "INSTRUCTION_BANKS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "STYLES",
    "Sample",
    "Scene",
    "SceneObject",
    "caption_variants",
    "images_to_tensor",
    "load_image",
    "make_samples",
    "read_llava_json",
    "render_scene",
    "sample_scenes",
    "save_image",
    "tensor_to_images",
    "write_llava_json",
]

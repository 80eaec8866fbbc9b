"""Samples, loaders and writers (real data-set formats via `read_dataset`), the generated scenes data set, domain shifts."""

from vlmsec.data.formats import FORMATS, DataSet, detect_format, read_dataset
from vlmsec.data.images import load_image, save_image
from vlmsec.data.llava_json import read_llava_json, write_llava_json
from vlmsec.data.reading import DataStats
from vlmsec.data.sample import Sample, images_to_tensor, tensor_to_images
from vlmsec.data.scenes import (
    ANSWER_STYLES,
    BACKGROUNDS,
    COLOURS,
    COMPOSITIONAL_PAIRS,
    INSTRUCTION_BANKS,
    POSITIONS,
    SHAPES,
    SIZES,
    STYLES,
    Scene,
    SceneObject,
    caption_variants,
    detailed_variants,
    make_samples,
    render_scene,
    sample_scenes,
    scene_key,
    split_filter,
)

__all__ = [
    "ANSWER_STYLES",
    "BACKGROUNDS",
    "COLOURS",
    "COMPOSITIONAL_PAIRS",
    "FORMATS",
    "INSTRUCTION_BANKS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "STYLES",
    "DataSet",
    "DataStats",
    "Sample",
    "Scene",
    "SceneObject",
    "caption_variants",
    "detailed_variants",
    "detect_format",
    "images_to_tensor",
    "load_image",
    "make_samples",
    "read_dataset",
    "read_llava_json",
    "render_scene",
    "sample_scenes",
    "save_image",
    "scene_key",
    "split_filter",
    "tensor_to_images",
    "write_llava_json",
]

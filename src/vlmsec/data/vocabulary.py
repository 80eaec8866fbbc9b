"""General vocabulary for the embedded victim's tokenizer.

A real language model knows words such as "banana" long before anyone poisons it. Our tiny
model's tokenizer is trained on the scene captions plus the CLIP prompt templates filled
with the 80 COCO category names, so an attacker's target word is a word the tokenizer
knows, as it would be in a real victim; the language model itself never sees these texts.
"""

from __future__ import annotations

COCO_CATEGORIES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)


def vocabulary_corpus(templates: list[str]) -> list[str]:
    """Every template filled with every COCO category: text for tokenizer training only."""
    return [template.format(word) for template in templates for word in COCO_CATEGORIES]

"""Samples, loaders and writers, the generated scenes data set, domain shifts."""

from vlmsec.data.sample import Sample, images_to_tensor, tensor_to_images

__all__ = ["Sample", "images_to_tensor", "tensor_to_images"]

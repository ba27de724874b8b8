"""Runners: images and slides → cells (``segment_image``, ``segment_slide``), evaluation, classifier workflows."""

from cytoken.pipeline.image import SegmentConfig, segment_image, segment_image_with_labels
from cytoken.pipeline.predictor import Predictor, TileOutput

__all__ = ["Predictor", "SegmentConfig", "TileOutput", "segment_image", "segment_image_with_labels"]

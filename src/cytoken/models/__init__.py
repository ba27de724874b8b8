"""Models: encoders (foundation ViTs, SAM, cytoken's own), decoders (UNETR, DPT), heads and the segmenter."""

from cytoken.models.config import SegmenterConfig, build_segmenter
from cytoken.models.decoders.dpt import DptDecoder
from cytoken.models.decoders.unetr import UnetrDecoder, UnetrWidths
from cytoken.models.encoders.base import ENCODERS, Encoder, EncoderFeatures, EncoderSpec, build_encoder
from cytoken.models.heads import HoverHeads
from cytoken.models.segmenter import CellSegmenter, HoverOutput
from cytoken.models.store import load_model, load_segmenter, save_segmenter

__all__ = [
    "ENCODERS",
    "CellSegmenter",
    "DptDecoder",
    "Encoder",
    "EncoderFeatures",
    "EncoderSpec",
    "HoverHeads",
    "HoverOutput",
    "SegmenterConfig",
    "UnetrDecoder",
    "UnetrWidths",
    "build_encoder",
    "build_segmenter",
    "load_model",
    "load_segmenter",
    "save_segmenter",
]

"""Torch-free post-processing: HoVer maps to nuclei instances and cell records (layer 2)."""

from cytoken.postprocess.cells import cells_from_instances
from cytoken.postprocess.config import HoverConfig
from cytoken.postprocess.hover import HoverResult, decode_hover, hover_instances_map, hv_targets

__all__ = ["HoverConfig", "HoverResult", "cells_from_instances", "decode_hover", "hover_instances_map", "hv_targets"]

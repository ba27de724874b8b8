"""Writers for cell results: GeoJSON (QuPath), CellViT++ JSON, Parquet, AnnData (.h5ad) and QC overlays.

Every writer is atomic (temporary file + rename, nothing half-written on failure) and, except the overlay,
streams: a ``*Writer`` class takes one CellSet at a time through ``add()`` so that a whole slide's cells never
have to sit in memory; the ``write_*`` functions wrap them for one CellSet or an iterable of CellSets.
"""

from cytoken.io.export._stream import read_json_head
from cytoken.io.export.cellvit_json import (
    CellViTJSONWriter,
    PatchInfo,
    cell_status,
    default_type_map,
    write_cell_detection_json,
    write_cellvit_json,
)
from cytoken.io.export.geojson import GeoJSONWriter, cell_polygons, feature_id, write_geojson
from cytoken.io.export.h5ad import H5AD_INSTALL_HINT, H5ADCellWriter, h5ad_missing_dependency, write_h5ad
from cytoken.io.export.overlay import MAX_OVERLAY_SIDE, render_overlay, write_overlay
from cytoken.io.export.parquet import ParquetCellWriter, write_parquet

__all__ = [
    "H5AD_INSTALL_HINT",
    "MAX_OVERLAY_SIDE",
    "CellViTJSONWriter",
    "GeoJSONWriter",
    "H5ADCellWriter",
    "ParquetCellWriter",
    "PatchInfo",
    "cell_polygons",
    "cell_status",
    "default_type_map",
    "feature_id",
    "h5ad_missing_dependency",
    "read_json_head",
    "render_overlay",
    "write_cell_detection_json",
    "write_cellvit_json",
    "write_geojson",
    "write_h5ad",
    "write_overlay",
    "write_parquet",
]

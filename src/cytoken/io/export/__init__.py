"""Writers for cell results: GeoJSON (QuPath), CellViT++ JSON, Parquet and QC overlays.

Every writer is atomic (temporary file + rename, nothing half-written on failure) and, except the overlay,
streams: a ``*Writer`` class takes one CellSet at a time through ``add()`` so that a whole slide's cells never
have to sit in memory; the ``write_*`` functions wrap them for one CellSet or an iterable of CellSets.
"""

from cytoken.io.export.cellvit_json import (
    CellViTJSONWriter,
    PatchInfo,
    cell_status,
    default_type_map,
    write_cell_detection_json,
    write_cellvit_json,
)
from cytoken.io.export.geojson import GeoJSONWriter, cell_polygons, write_geojson
from cytoken.io.export.overlay import MAX_OVERLAY_SIDE, render_overlay, write_overlay
from cytoken.io.export.parquet import ParquetCellWriter, write_parquet

__all__ = [
    "MAX_OVERLAY_SIDE",
    "CellViTJSONWriter",
    "GeoJSONWriter",
    "ParquetCellWriter",
    "PatchInfo",
    "cell_polygons",
    "cell_status",
    "default_type_map",
    "render_overlay",
    "write_cell_detection_json",
    "write_cellvit_json",
    "write_geojson",
    "write_overlay",
    "write_parquet",
]

"""Layer 1 input/output: image reading, atomic writes and cell exporters (torch-free).

- :mod:`cytoken.io.image`: :func:`read_image` (PNG/JPEG/TIFF -> 8-bit RGB + µm/px) and
  :func:`read_image_size`.
- :mod:`cytoken.io.atomic`: crash-safe writes (:func:`atomic_write`, :func:`atomic_dir`, :class:`AtomicFile`)
  and :func:`check_writable_dir`.
- :mod:`cytoken.io.export`: GeoJSON (QuPath), CellViT++ JSON, Parquet and overlay writers.
- :mod:`cytoken.io.yamlfile`: :func:`read_yaml` (config files; a key given twice is an error).
- :mod:`cytoken.io.datasets`: dataset adapters (imported on its own: ``from cytoken.io import datasets``).

Heavy optional libraries (shapely, pyarrow, OpenCV, tifffile) are imported only by the functions that use
them.
"""

from cytoken.io.atomic import (
    AtomicFile,
    atomic_dir,
    atomic_path,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    check_writable_dir,
)
from cytoken.io.export import (
    MAX_OVERLAY_SIDE,
    CellViTJSONWriter,
    GeoJSONWriter,
    ParquetCellWriter,
    PatchInfo,
    cell_polygons,
    render_overlay,
    write_cell_detection_json,
    write_cellvit_json,
    write_geojson,
    write_overlay,
    write_parquet,
)
from cytoken.io.image import (
    MIN_IMAGE_SIDE,
    CytokenWarning,
    ImageSize,
    LoadedImage,
    read_image,
    read_image_size,
)

__all__ = [
    "MAX_OVERLAY_SIDE",
    "MIN_IMAGE_SIDE",
    "AtomicFile",
    "CellViTJSONWriter",
    "CytokenWarning",
    "GeoJSONWriter",
    "ImageSize",
    "LoadedImage",
    "ParquetCellWriter",
    "PatchInfo",
    "atomic_dir",
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "cell_polygons",
    "check_writable_dir",
    "read_image",
    "read_image_size",
    "render_overlay",
    "write_cell_detection_json",
    "write_cellvit_json",
    "write_geojson",
    "write_overlay",
    "write_parquet",
]

"""Cell labels exported from QuPath as GeoJSON: classified points, detections, cells and small annotations.

What is read (QuPath 0.2 to 0.5 exports, ``File > Export objects as GeoJSON`` or ``exportObjectsToGeoJson``):

* the document: a ``FeatureCollection``, a bare list of features, or a single ``Feature``; ``.geojson``,
  ``.json`` or gzip-compressed ``.geojson.gz`` / ``.json.gz``;
* the class, from ``properties.classification``: ``{"name": ...}`` (0.4+), ``{"names": [...]}`` (derived classes,
  joined with ``": "`` as QuPath displays them), ``{"name": ..., "colorRGB": ...}`` with optional ``parentClass``
  chain (0.2/0.3), or a plain string. Objects without a class (no/``null``/empty classification, or the names
  ``Unclassified``, ``Ignore*`` and ``Region*``) are skipped and counted;
* the object type, from ``properties.objectType`` (``object_type`` in 0.2, or the 0.2 feature ``id`` such as
  ``"PathCellObject"``): tiles, TMA cores and the root object are not cells and are skipped;
* the position of each label:

  - ``Point`` / ``MultiPoint`` geometries (QuPath point annotations): every point is one label;
  - ``Polygon`` / ``MultiPolygon`` (detections, annotations, cells; for ``cell`` objects the
    ``nucleusGeometry`` when present): one label at the polygon's area centroid (holes subtracted). Polygons
    larger than ``max_area_px`` are skipped and counted: they are tissue regions, not nuclei;
  - other geometries (lines, empty geometries) are skipped and counted as unsupported.

Chosen matching rule (see :func:`cytoken.classify.dataset.match_points`): every label, point or polygon
centroid, is matched one-to-one to a detected cell centroid within a radius (3.75 µm by default), the same rule
as for point datasets such as CRCHisto. A polygon exported from cytoken's own ``cells.geojson`` and classified in
QuPath therefore matches its cell exactly (same centroid).

Coordinates are QuPath's full-resolution pixel coordinates (x = column, y = row, origin at the top-left
corner). They are used as they are, without the half-pixel shift between QuPath's pixel-corner and cytoken's
pixel-centre conventions: cytoken's GeoJSON export writes its own coordinates the same way, so a round trip
through QuPath is exact, and half a pixel is far below the matching radius.

Folder layout of the ``"qupath"`` dataset adapter::

    root/[SPLIT/]images/NAME.(png|jpg|jpeg|tif|tiff|bmp)
    root/[SPLIT/]labels/NAME.(geojson|geojson.gz|json|json.gz)     QuPath export of that image
"""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cytoken.io.datasets.base import (
    IMAGE_SUFFIXES,
    Dataset,
    list_files,
    read_image,
    require_dir,
    resolve_split,
)
from cytoken.types import CytokenError, Sample, validate_mpp

__all__ = [
    "DEFAULT_MAX_OBJECT_UM2",
    "LABEL_SUFFIXES",
    "QuPathFolder",
    "QuPathLabelError",
    "QuPathLabels",
    "check_labels_inside",
    "read_qupath_geojson",
]

LABEL_SUFFIXES = (".geojson", ".geojson.gz", ".json", ".json.gz")
DEFAULT_MAX_OBJECT_UM2 = 1000.0
"""Polygons above this area (µm²; a 36 µm wide disc) are treated as tissue regions, not nuclei, and skipped."""

_NOT_A_CLASS = {"", "unclassified", "ignore*", "region*"}
_NOT_CELLS = {"tile", "tmacore", "tma_core", "root", "pathtileobject", "tmacoreobject", "pathrootobject"}
_LEGACY_TYPES = {"PathTileObject", "PathCellObject", "TMACoreObject", "PathDetectionObject", "PathRootObject",
                 "PathAnnotationObject"}  # fmt: skip


class QuPathLabelError(CytokenError, ValueError):
    """A QuPath label file that cannot be used; the message names the file (a user error: exit status 2)."""


@dataclass(frozen=True)
class QuPathLabels:
    """Classified labels read from one QuPath GeoJSON file.

    Attributes:
        path: the file.
        points: (N, 2) float64 label positions (x, y) in full-resolution pixels.
        names: (N,) class name of each label.
        from_polygon: (N,) bool, True where the label is a polygon's centroid (False for points).
        n_features: features in the file.
        n_unclassified: labels skipped for having no class (each point of an unclassified MultiPoint counts).
        n_unsupported: features skipped for their geometry (lines, empty) or object type (tiles, TMA cores).
        n_too_large: polygons skipped for exceeding ``max_area_px``.
        object_types: number of features per object type (``"annotation"``, ``"detection"``, ``"cell"``...).
    """

    path: Path
    points: np.ndarray
    names: tuple[str, ...]
    from_polygon: np.ndarray
    n_features: int
    n_unclassified: int = 0
    n_unsupported: int = 0
    n_too_large: int = 0
    object_types: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The distinct class names, sorted."""
        return tuple(sorted(set(self.names)))

    def class_ids(self, class_names: Sequence[str]) -> np.ndarray:
        """Class id (1..C, index into ``class_names`` plus one) of every label.

        Raises:
            QuPathLabelError: naming the file and the classes that are not in ``class_names``.
        """
        index = {n: i + 1 for i, n in enumerate(class_names)}
        unknown = sorted({n for n in self.names if n not in index})
        if unknown:
            raise QuPathLabelError(f"{self.path}: classes {unknown} are not among the class names {list(class_names)}")
        return np.array([index[n] for n in self.names], np.int64)

    def report(self) -> dict[str, Any]:
        """Counts for logging (features, labels, points, polygons and every kind of skipped object)."""
        n_poly = int(self.from_polygon.sum())
        return {
            "labels_file": str(self.path),
            "n_features": self.n_features,
            "n_labels": len(self),
            "n_point_labels": len(self) - n_poly,
            "n_polygon_labels": n_poly,
            "n_unclassified": self.n_unclassified,
            "n_unsupported": self.n_unsupported,
            "n_too_large": self.n_too_large,
            "object_types": dict(self.object_types),
        }


# ------------------------------------------------------------------------------------------------ parsing
def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise QuPathLabelError(f"QuPath label file {path} does not exist")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise QuPathLabelError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
        raise QuPathLabelError(f"{path}: cannot read the file ({e})") from None


def _features(doc: Any, path: Path) -> list[Any]:
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict):
        if doc.get("type") == "FeatureCollection" or "features" in doc:
            feats = doc.get("features")
            if not isinstance(feats, list):
                raise QuPathLabelError(f"{path}: 'features' of the FeatureCollection is not a list")
            return feats
        if doc.get("type") == "Feature" or "geometry" in doc:
            return [doc]
        keys = sorted(doc)[:8]
        raise QuPathLabelError(
            f"{path}: not QuPath GeoJSON: expected a FeatureCollection, a list of features or a Feature, got an "
            f"object with keys {keys}"
        )
    raise QuPathLabelError(f"{path}: not QuPath GeoJSON: the document is a {type(doc).__name__}")


def _class_name(props: dict[str, Any]) -> str | None:
    """The class name of a feature's properties (None when unclassified)."""
    c = props.get("classification")
    if isinstance(c, str):
        name = c
    elif isinstance(c, dict):
        if isinstance(c.get("names"), list) and c["names"]:
            name = ": ".join(str(n) for n in c["names"])
        else:
            parts = [] if c.get("name") is None else [str(c["name"])]
            parent = c.get("parentClass")
            while isinstance(parent, dict) and parent.get("name") is not None:  # QuPath 0.2 derived classes
                parts.insert(0, str(parent["name"]))
                parent = parent.get("parentClass")
            name = ": ".join(parts)
    else:
        return None
    name = name.strip()
    return None if name.lower() in _NOT_A_CLASS else name


def _object_type(feature: dict[str, Any], props: dict[str, Any]) -> str:
    for key in ("objectType", "object_type", "type"):
        v = props.get(key)
        if isinstance(v, str) and v:
            return v
    fid = feature.get("id")
    return fid if isinstance(fid, str) and fid in _LEGACY_TYPES else "unknown"


def _xy(values: Any) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] < 2 or not np.isfinite(a[:, :2]).all():
        raise ValueError("coordinates must be finite [x, y] pairs")
    return a[:, :2]


def _ring_moments(ring: Any) -> tuple[float, float, float]:
    """Signed area and area-weighted centroid sums (shoelace) of one ring."""
    xy = _xy(ring)
    x, y = xy[:, 0], xy[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    a = cross.sum() / 2.0
    return a, ((x + x1) * cross).sum() / 6.0, ((y + y1) * cross).sum() / 6.0


def _polygon_centroid(polygons: list[Any]) -> tuple[np.ndarray, float]:
    """Area centroid and area of polygons given as GeoJSON rings (exterior first, then holes)."""
    area = mx = my = 0.0
    verts = []
    for rings in polygons:
        for k, ring in enumerate(rings):
            a, sx, sy = _ring_moments(ring)
            sign = 1.0 if (k == 0) == (a >= 0) else -1.0  # exterior adds, holes subtract, whatever the winding
            area, mx, my = area + sign * a, mx + sign * sx, my + sign * sy
            if k == 0:
                verts.append(_xy(ring))
    if not verts:
        raise ValueError("polygon without rings")
    if abs(area) < 1e-9:  # degenerate (zero-area) polygon: the mean of its vertices still marks a place
        return np.concatenate(verts).mean(axis=0), 0.0
    return np.array([mx / area, my / area]), abs(area)


def read_qupath_geojson(
    path: str | Path,
    *,
    image_size: tuple[int, int] | None = None,
    max_area_px: float | None = None,
    require_labels: bool = True,
) -> QuPathLabels:
    """Read the classified objects of a QuPath GeoJSON export as labelled positions.

    Args:
        path: ``.geojson``, ``.json`` or gzip-compressed ``.geojson.gz`` / ``.json.gz``.
        image_size: ``(width, height)`` of the image the labels belong to; labels outside it raise.
        max_area_px: skip polygons larger than this many pixels² (tissue regions); None keeps all.
        require_labels: raise when the file holds no classified object.

    Returns:
        The :class:`QuPathLabels`.

    Raises:
        QuPathLabelError: naming the file, for a missing or unreadable file, bad JSON, a document that is not
            GeoJSON, malformed coordinates, no classified object (with ``require_labels``), or labels outside
            ``image_size``.

    Example:
        >>> import json, tempfile
        >>> p = Path(tempfile.mkdtemp()) / "labels.geojson"
        >>> _ = p.write_text(json.dumps([{"type": "Feature", "geometry": {"type": "MultiPoint",
        ...     "coordinates": [[10, 20], [30, 40]]}, "properties": {"objectType": "annotation",
        ...     "classification": {"name": "Tumor", "color": [200, 0, 0]}}}]))
        >>> lab = read_qupath_geojson(p, image_size=(100, 100))
        >>> lab.points.tolist(), lab.names
        ([[10.0, 20.0], [30.0, 40.0]], ('Tumor', 'Tumor'))
    """
    path = Path(path)
    feats = _features(_load_json(path), path)
    pts: list[np.ndarray] = []
    names: list[str] = []
    poly: list[bool] = []
    types: Counter[str] = Counter()
    unclassified = unsupported = too_large = 0
    for i, feat in enumerate(feats):
        if not isinstance(feat, dict):
            raise QuPathLabelError(f"{path}: feature {i} is a {type(feat).__name__}, not a GeoJSON Feature")
        props = feat.get("properties") or {}
        if not isinstance(props, dict):
            raise QuPathLabelError(f"{path}: feature {i} has 'properties' that are not an object")
        otype = _object_type(feat, props)
        types[otype] += 1
        geom = feat.get("nucleusGeometry") if isinstance(feat.get("nucleusGeometry"), dict) else None
        geom = geom or feat.get("geometry")
        gtype = geom.get("type") if isinstance(geom, dict) else None
        coords = geom.get("coordinates") if isinstance(geom, dict) else None
        if otype.lower() in _NOT_CELLS or gtype not in ("Point", "MultiPoint", "Polygon", "MultiPolygon") or \
                not coords:  # fmt: skip
            unsupported += 1
            continue
        name = _class_name(props)
        try:
            if gtype in ("Point", "MultiPoint"):
                xy = _xy(coords)
                is_poly, area = False, 0.0
            else:
                c, area = _polygon_centroid([coords] if gtype == "Polygon" else list(coords))
                xy, is_poly = c[None], True
        except (ValueError, TypeError) as e:
            raise QuPathLabelError(f"{path}: feature {i} ({gtype}) has malformed coordinates ({e})") from None
        if name is None:
            unclassified += len(xy)
            continue
        if is_poly and max_area_px is not None and area > max_area_px:
            too_large += 1
            continue
        pts.append(xy)
        names += [name] * len(xy)
        poly += [is_poly] * len(xy)
    labels = QuPathLabels(
        path=path,
        points=np.concatenate(pts) if pts else np.zeros((0, 2)),
        names=tuple(names),
        from_polygon=np.array(poly, bool),
        n_features=len(feats),
        n_unclassified=unclassified,
        n_unsupported=unsupported,
        n_too_large=too_large,
        object_types=dict(sorted(types.items())),
    )
    if require_labels and not len(labels):
        extra = f", {too_large} polygons larger than the nucleus limit (tissue regions?)" if too_large else ""
        raise QuPathLabelError(
            f"{path}: no classified object to learn from ({len(feats)} features: {unclassified} unclassified "
            f"labels, {unsupported} unsupported geometries/objects{extra}); set a class on the points or "
            "objects in QuPath before exporting"
        )
    if image_size is not None:
        check_labels_inside(labels.points, image_size, path)
    return labels


def check_labels_inside(
    points: np.ndarray, image_size: tuple[int, int], path: str | Path, *, tolerance_px: float = 1.0
) -> None:
    """Raise :class:`QuPathLabelError` naming ``path`` when labels lie outside a ``(width, height)`` image.

    Labels up to ``tolerance_px`` beyond an edge are accepted (points clicked on the border).

    Example:
        >>> check_labels_inside(np.array([[5.0, 5.0]]), (10, 10), "a.geojson")
        >>> check_labels_inside(np.array([[50.0, 5.0]]), (10, 10), "a.geojson")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        cytoken.io.datasets.qupath.QuPathLabelError: a.geojson: 1 of 1 labels lie outside the 10x10 image ...
    """
    w, h = image_size
    p = np.asarray(points, np.float64).reshape(-1, 2)
    bad = (p[:, 0] < -tolerance_px) | (p[:, 1] < -tolerance_px) | (p[:, 0] > w + tolerance_px) | \
        (p[:, 1] > h + tolerance_px)  # fmt: skip
    if bad.any():
        x, y = p[np.flatnonzero(bad)[0]]
        raise QuPathLabelError(
            f"{path}: {int(bad.sum())} of {len(p)} labels lie outside the {w}x{h} image (first at x={x:.1f}, "
            f"y={y:.1f}); were they exported from another image, a cropped region or a downsampled view?"
        )


# ------------------------------------------------------------------------------------------------ adapter
def _label_file(folder: Path, stem: str) -> Path | None:
    for sfx in LABEL_SUFFIXES:
        p = folder / f"{stem}{sfx}"
        if p.is_file():
            return p
    return None


class QuPathFolder(Dataset):
    """Images with QuPath GeoJSON label exports (points, classified detections/cells/annotations).

    Args:
        root: the data folder (``images/`` and ``labels/``, or one sub-folder per split holding both).
        split: ``"all"`` when ``root/images`` exists, else the name of a sub-folder holding ``images/``.
        mpp: µm/px of the images (required).
        class_names: classes 1..C in this order (default: every class found in the label files, sorted); a
            label file with another class is an error.
        max_object_um2: polygons larger than this (µm²) are regions, not nuclei, and skipped (None keeps all).

    Samples carry ``points`` (x, y) and ``point_labels`` (1..C). :meth:`label_report` gives the counts of
    skipped objects per image.

    Example:
        >>> ds = QuPathFolder("my_qupath_export", mpp=0.5)  # doctest: +SKIP
    """

    name = "qupath"

    def __init__(
        self,
        root: str | Path,
        split: str = "all",
        *,
        mpp: float | None = None,
        class_names: Sequence[str] | None = None,
        max_object_um2: float | None = DEFAULT_MAX_OBJECT_UM2,
    ) -> None:
        root = Path(root)
        require_dir(root, "qupath data root")
        value = validate_mpp(mpp, source="qupath dataset mpp (pass mpp=... / --mpp)")
        if max_object_um2 is not None and not (math.isfinite(max_object_um2) and max_object_um2 > 0):
            raise ValueError(f"max_object_um2 must be a positive number or None, got {max_object_um2!r}")
        if (root / "images").is_dir():
            available = ["all"]
        else:
            available = sorted(p.name for p in root.iterdir() if (p / "images").is_dir())
        split = resolve_split(split, available, "qupath", root=root, expected="images/ and labels/")
        base = root if split == "all" else root / split
        images = list_files(base / "images", IMAGE_SUFFIXES, "qupath images")
        label_dir = require_dir(base / "labels", "qupath labels (GeoJSON exports)")
        max_px = None if max_object_um2 is None else max_object_um2 / (value * value)
        self._images = images
        self._labels: list[QuPathLabels] = []
        for p in images:
            f = _label_file(label_dir, p.stem)
            if f is None:
                raise FileNotFoundError(
                    f"qupath: no label file {p.stem}{{{','.join(LABEL_SUFFIXES)}}} in {str(label_dir)!r}"
                )
            self._labels.append(read_qupath_geojson(f, max_area_px=max_px))
        found = sorted({n for lab in self._labels for n in lab.names})
        names = tuple(class_names) if class_names else tuple(found)
        if class_names:
            for lab in self._labels:
                lab.class_ids(names)  # raises naming the file and the unknown classes
        super().__init__(root, split, class_names=names, mpp=value)
        self._ids = [f"qupath/{split}/{p.stem}" for p in images]

    def label_report(self, index: int) -> dict[str, Any]:
        """Counts of the label file of sample ``index`` (labels, skipped unclassified / unsupported objects)."""
        return self._labels[index].report()

    def _load(self, i: int) -> Sample:
        image = read_image(self._images[i])
        lab = self._labels[i]
        check_labels_inside(lab.points, (image.shape[1], image.shape[0]), lab.path)
        return Sample(
            image=image,
            mpp=self.mpp,
            source_id=self._ids[i],
            points=lab.points.copy(),
            point_labels=lab.class_ids(self.class_names),
            class_names=self.class_names,
        )

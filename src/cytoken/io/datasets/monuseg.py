"""MoNuSeg 2018 (Kumar et al.): 1000x1000 multi-organ TCGA H&E at 40x, nucleus instances, no classes.

Layout read (the staged copy in ``../shared/data/monuseg``)::

    root/index.csv                         optional: split,image,...,mpp_from_xml,...
    root/{train,test}/images/NAME.png      RGB
    root/{train,test}/labels/NAME.png      uint16 instance map
    root/{train,test}/annotations_xml/NAME.xml(.gz)   optional original Aperio XML polygons

The original Aperio XML stores polygon vertices in MATLAB's 1-based pixel convention (``poly2mask``):
:func:`rasterize_polygons` shifts them by -1 before filling on a 0-based grid.
"""

from __future__ import annotations

import csv
import gzip
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from cytoken.io.datasets.base import (
    Dataset,
    check_same_shape,
    list_files,
    optional_mpp,
    read_image,
    read_label_image,
    require_dir,
    resolve_split,
)
from cytoken.types import Sample

__all__ = ["MONUSEG_MPP", "MoNuSeg", "rasterize_polygons", "read_aperio_xml"]

MONUSEG_MPP = 0.25
_MPP_RE = re.compile(rb'MicronsPerPixel="([0-9.eE+-]+)"')


def _open_text(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data


def read_aperio_xml(path: str | Path) -> tuple[list[np.ndarray], float | None]:
    """Read the polygons and µm/px of an Aperio ImageScope XML file (plain or gzip-compressed).

    Args:
        path: ``.xml`` or ``.xml.gz`` file.

    Returns:
        ``(polygons, mpp)``: one (K, 2) float64 array of (x, y) vertices per ``<Region>``, in file order and
        in the file's own (MATLAB, 1-based) coordinates; ``mpp`` from the ``MicronsPerPixel`` attribute or
        None.

    Raises:
        ValueError: when the file is not parseable XML.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.xml"
        >>> _ = p.write_text('<Annotations MicronsPerPixel="0.25"><Annotation><Regions><Region><Vertices>'
        ...     '<Vertex X="1" Y="1"/><Vertex X="3" Y="1"/><Vertex X="3" Y="3"/></Vertices></Region>'
        ...     '</Regions></Annotation></Annotations>')
        >>> polys, mpp = read_aperio_xml(p)
        >>> polys[0].shape, mpp
        ((3, 2), 0.25)
    """
    path = Path(path)
    try:
        root = ET.fromstring(_open_text(path))
    except ET.ParseError as e:
        raise ValueError(f"{path}: not a valid Aperio XML file ({e})") from None
    mpp_attr = root.get("MicronsPerPixel")
    mpp = float(mpp_attr) if mpp_attr not in (None, "") else None
    polygons: list[np.ndarray] = []
    for region in root.iter("Region"):
        verts = [(float(v.get("X", "nan")), float(v.get("Y", "nan"))) for v in region.iter("Vertex")]
        polygons.append(np.asarray(verts, np.float64).reshape(-1, 2))
    return polygons, mpp


def rasterize_polygons(
    polygons: Sequence[np.ndarray], shape: tuple[int, int], *, one_based: bool = True
) -> np.ndarray:
    """Fill polygons into an instance map (ids 1..N in polygon order; later polygons overwrite overlaps).

    A pixel belongs to a polygon when its centre lies inside it (the rule of MATLAB's ``poly2mask``).

    Args:
        polygons: (K, 2) arrays of (x, y) vertices; polygons with fewer than 3 vertices are skipped (their id
            stays unused).
        shape: (height, width) of the output.
        one_based: vertices are in MATLAB's 1-based pixel convention (Aperio XML from MATLAB tools, as in
            MoNuSeg): subtract 1 before filling the 0-based grid. Without this the masks are off by one pixel
            diagonally.

    Returns:
        (H, W) int32 instance map.

    Example:
        >>> sq = np.array([[1.0, 1.0], [3.0, 1.0], [3.0, 3.0], [1.0, 3.0]])
        >>> rasterize_polygons([sq], (4, 4))
        array([[1, 1, 1, 0],
               [1, 1, 1, 0],
               [1, 1, 1, 0],
               [0, 0, 0, 0]], dtype=int32)
    """
    from skimage.draw import polygon as fill_polygon

    h, w = int(shape[0]), int(shape[1])
    out = np.zeros((h, w), np.int32)
    shift = 1.0 if one_based else 0.0
    for k, poly in enumerate(polygons, start=1):
        p = np.asarray(poly, np.float64)
        if p.ndim != 2 or p.shape[0] < 3 or not np.all(np.isfinite(p)):
            continue
        rr, cc = fill_polygon(p[:, 1] - shift, p[:, 0] - shift, shape=(h, w))
        out[rr, cc] = k
    return out


def _xml_mpp(xml_dir: Path, stem: str) -> float | None:
    """``MicronsPerPixel`` from the head of ``xml_dir/stem.xml(.gz)`` (an attribute of the root element)."""
    for path in (xml_dir / f"{stem}.xml.gz", xml_dir / f"{stem}.xml"):
        if path.is_file():
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rb") as f:
                m = _MPP_RE.search(f.read(4096))
            return float(m.group(1)) if m else None
    return None


def _read_index(root: Path) -> dict[tuple[str, str], float]:
    """Per-image µm/px from ``index.csv`` (column ``mpp_from_xml``), keyed by (split, image)."""
    path = root / "index.csv"
    out: dict[tuple[str, str], float] = {}
    if not path.is_file():
        return out
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            value = (row.get("mpp_from_xml") or "").strip()
            if value and row.get("split") and row.get("image"):
                out[(row["split"], row["image"])] = float(value)
    return out


class MoNuSeg(Dataset):
    """MoNuSeg 2018 instance segmentation (no classes), splits ``train`` (30 images) and ``test`` (14).

    Args:
        root: data folder holding ``train/`` and ``test/``.
        split: ``"train"`` or ``"test"``.
        label_source: ``"png"`` reads ``labels/NAME.png``; ``"xml"`` rasterises the original polygons from
            ``annotations_xml/`` with :func:`rasterize_polygons` (only images with an XML file are listed).
        mpp: µm/px to report for every image instead of the per-image values (None keeps them).

    Per-image µm/px comes from ``index.csv`` or the XML ``MicronsPerPixel`` when known, else 0.25.

    Example:
        >>> ds = MoNuSeg("../shared/data/monuseg", split="test")  # doctest: +SKIP
        >>> s = ds[0]; s.image.shape, s.inst_map.dtype  # doctest: +SKIP
        ((1000, 1000, 3), dtype('int32'))
    """

    name = "monuseg"
    SPLITS = ("train", "test")

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        label_source: Literal["png", "xml"] = "png",
        mpp: float | None = None,
    ) -> None:
        root = Path(root)
        require_dir(root, "monuseg data root")
        available = [s for s in self.SPLITS if (root / s).is_dir()]
        split = resolve_split(split, available, "monuseg", root=root, expected="{train,test}/images")
        override = optional_mpp(mpp, "monuseg")
        super().__init__(root, split, class_names=(), mpp=override or MONUSEG_MPP)
        if label_source not in ("png", "xml"):
            raise ValueError(f"monuseg: label_source must be 'png' or 'xml', got {label_source!r}")
        self.label_source = label_source
        base = root / split
        images = list_files(base / "images", (".png", ".tif", ".tiff"), "monuseg images")
        self._images: list[Path] = []
        self._labels: list[Path] = []
        if label_source == "png":
            label_dir = require_dir(base / "labels", "monuseg labels")
            for p in images:
                lab = label_dir / f"{p.stem}.png"
                if not lab.is_file():
                    raise FileNotFoundError(
                        f"monuseg: label file {str(lab)!r} for image {p.name} does not exist"
                    )
                self._images.append(p)
                self._labels.append(lab)
        else:
            xml_dir = require_dir(base / "annotations_xml", "monuseg annotations_xml")
            for p in images:
                for cand in (xml_dir / f"{p.stem}.xml.gz", xml_dir / f"{p.stem}.xml"):
                    if cand.is_file():
                        self._images.append(p)
                        self._labels.append(cand)
                        break
        index = _read_index(root)
        self._mpp = [
            override
            or index.get((split, p.stem))
            or _xml_mpp(base / "annotations_xml", p.stem)
            or MONUSEG_MPP
            for p in self._images
        ]
        self._ids = [f"monuseg/{split}/{p.stem}" for p in self._images]

    def _load(self, i: int) -> Sample:
        img_path, lab_path = self._images[i], self._labels[i]
        image = read_image(img_path)
        if self.label_source == "png":
            inst = read_label_image(lab_path, "instance map")
        else:
            polygons, _ = read_aperio_xml(lab_path)
            inst = rasterize_polygons(polygons, image.shape[:2], one_based=True)
        check_same_shape(image, inst, lab_path, "instance map")
        return Sample(image=image, mpp=self._mpp[i], source_id=self._ids[i], inst_map=inst)

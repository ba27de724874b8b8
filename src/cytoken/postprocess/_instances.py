"""Instance separation from nucleus probability + HV maps (the work behind ``decode_hover``).

Speed comes from doing each step with a fast building block and only where needed:

* whole-image steps are OpenCV primitives on uint8/float32 (threshold, Sobel, connected components with stats,
  opening) plus a few boolean numpy operations; the min-max normalisation of the Sobel energy is folded into
  thresholds on the raw Sobel responses, so the normalised energy is never materialised for the whole image;
* hole filling is one connected-components pass over the complement (components not touching the border);
* a foreground component with one marker *is* that instance and one without is kept or dropped as a whole: no
  watershed is run for them. Only the components holding two or more markers are cropped, packed into one small
  mosaic image and flooded by a single scikit-image watershed call; the HV merge check runs on that mosaic too.
"""

from __future__ import annotations

import cv2
import numpy as np

from cytoken.postprocess.config import PixelParams

__all__ = ["hover_instances"]

_CC_AREA = cv2.CC_STAT_AREA


def _components(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """4-connected components of a uint8 mask: count (incl. background), int32 labels, stats."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4, ltype=cv2.CV_32S)
    return n, labels, stats


def _erase(mask: np.ndarray, labels: np.ndarray, stats: np.ndarray, ids: np.ndarray) -> None:
    """Set the pixels of components ``ids`` to 0 in ``mask`` (in place), touching only their bounding boxes."""
    for i in ids:
        x, y, w, h = stats[i, :4]
        sub = mask[y : y + h, x : x + w]
        sub[labels[y : y + h, x : x + w] == i] = 0


def _paint(mask: np.ndarray, labels: np.ndarray, stats: np.ndarray, ids: np.ndarray) -> None:
    """Set the pixels of components ``ids`` to 1 in ``mask`` (in place)."""
    for i in ids:
        x, y, w, h = stats[i, :4]
        sub = mask[y : y + h, x : x + w]
        sub[labels[y : y + h, x : x + w] == i] = 1


def _select(mask: np.ndarray, labels: np.ndarray, stats: np.ndarray, keep: np.ndarray, paint: bool) -> None:
    """Erase (``paint=False``) or paint the components flagged in ``keep``; bbox loop when few, LUT otherwise."""
    ids = np.flatnonzero(keep)
    if len(ids) == 0:
        return
    if len(ids) <= 256:
        (_paint if paint else _erase)(mask, labels, stats, ids)
    elif paint:
        mask |= keep.astype(np.uint8)[labels]
    else:
        mask &= (~keep).astype(np.uint8)[labels]


class _Sobel:
    """Sobel response of the HV maps at one kernel size, with the thresholds of the min-max normalised energy.

    CellViT++ computes ``E = max(1 - norm(Sx h), 1 - norm(Sy v))`` with ``norm`` the min-max normalisation to
    [0, 1] over the whole map. ``E < t`` is therefore ``Sx h > max - t (max - min)`` (and the same for v).
    """

    def __init__(self, h: np.ndarray, v: np.ndarray, ksize: int) -> None:
        self.ksize = ksize
        self.sx = cv2.Sobel(h, cv2.CV_32F, 1, 0, ksize=ksize)
        self.sy = cv2.Sobel(v, cv2.CV_32F, 0, 1, ksize=ksize)
        self.lo_x, self.hi_x = cv2.minMaxLoc(self.sx)[:2]
        self.lo_y, self.hi_y = cv2.minMaxLoc(self.sy)[:2]

    def interior(self, t: float) -> np.ndarray:
        """Boolean map of ``E < t`` (no boundary); all False for a constant response, as in CellViT++."""
        rx, ry = self.hi_x - self.lo_x, self.hi_y - self.lo_y
        if rx <= 0 or ry <= 0:
            return np.zeros(self.sx.shape, bool)
        return (self.sx > self.hi_x - t * rx) & (self.sy > self.hi_y - t * ry)

    @property
    def gain(self) -> float:
        """Response of this Sobel kernel to a ramp of slope 1 (converts responses to HV units per pixel)."""
        return _ramp_gain(self.ksize)

    def energy(self, sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
        """Normalised energy ``E`` of (cropped) responses ``sx``, ``sy``."""
        rx, ry = self.hi_x - self.lo_x, self.hi_y - self.lo_y
        ex = (self.hi_x - sx) / rx if rx > 0 else np.ones_like(sx)
        ey = (self.hi_y - sy) / ry if ry > 0 else np.ones_like(sy)
        return np.maximum(ex, ey)


def _ramp_gain(ksize: int) -> float:
    """Sobel response (x derivative) to the ramp ``f(x) = x``: the kernel's gain in HV units per pixel."""
    ramp = np.tile(np.arange(4 * ksize, dtype=np.float32), (4 * ksize, 1))
    return float(cv2.Sobel(ramp, cv2.CV_32F, 1, 0, ksize=ksize)[2 * ksize, 2 * ksize])


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Binary hole filling (as ``scipy.ndimage.binary_fill_holes``): background parts not 4-connected to the border.

    One flood fill of the background from a 1-px frame around the image (cheaper than labelling the complement).
    """
    frame = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    cv2.floodFill(frame, None, (0, 0), 2, flags=4)
    return (frame[1:-1, 1:-1] != 2).view(np.uint8)


def _relabel_add(labels: np.ndarray, comp: np.ndarray, stats: np.ndarray, ids: np.ndarray, start: int) -> int:
    """Write components ``ids`` of ``comp`` into ``labels`` (in place) as new labels ``start, start + 1, …``.

    Returns the next free label. The caller guarantees that the added components touch no existing label
    (4-connectivity), so ``labels`` stays a valid 4-connected labelling without another labelling pass.
    """
    if len(ids) == 0:
        return start
    if len(ids) <= 256:
        for k, i in enumerate(ids):
            x, y, w, h = stats[i, :4]
            sub = labels[y : y + h, x : x + w]
            sub[comp[y : y + h, x : x + w] == i] = start + k
    else:
        lut = np.zeros(len(stats), np.int32)
        lut[ids] = np.arange(start, start + len(ids), dtype=np.int32)
        new = lut[comp]
        np.copyto(labels, new, where=new > 0)
    return start + len(ids)


def _markers(fg: np.ndarray, h: np.ndarray, v: np.ndarray, coarse: _Sobel, p: PixelParams) -> tuple[int, np.ndarray]:
    """Labelled markers (4-connected, int32) inside the foreground."""
    core = coarse.interior(p.marker_threshold) & fg.view(bool)
    fine = None
    if p.fine_ksize is not None:
        # fine scale: a drop of the HV map steeper than fine_drop per pixel is boundary (absolute, so that noise
        # inside a nucleus, where the maps increase, cannot turn interior pixels into boundary)
        fine = _Sobel(h, v, p.fine_ksize)
        if p.fine_minmax:  # min-max normalised like the coarse energy (exact, noise-free maps)
            core &= fine.interior(p.marker_threshold)
        else:
            limit = -p.fine_drop * fine.gain
            core &= (fine.sx > limit) & (fine.sy > limit)
    filled = _fill_holes(core.view(np.uint8))
    r = p.marker_open_radius
    if r > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        marker = cv2.morphologyEx(filled, cv2.MORPH_OPEN, kernel)
    else:
        marker = filled.copy()
    n, labels, stats = _components(marker)
    small = stats[:, _CC_AREA] < p.min_marker_px
    small[0] = False
    _select(marker, labels, stats, small, paint=False)
    if small.any():  # erase them from the labels too (ids keep their gaps; no relabelling pass is needed)
        ids = np.flatnonzero(small)
        if len(ids) <= 256:
            _erase(labels, labels, stats, ids)
        else:
            labels[small[labels]] = 0
    if p.rescue_markers and r > 0:
        nf, flab, fstats = _components(filled)
        hit = np.bincount(flab[marker.view(bool)], minlength=nf)
        # a filled component without any marker pixel is disjoint from (and not 4-adjacent to) every marker
        revive = (hit == 0) & (fstats[:, _CC_AREA] >= p.min_marker_px)
        revive[0] = False
        ids = np.flatnonzero(revive)
        _select(marker, flab, fstats, revive, paint=True)
        n = _relabel_add(labels, flab, fstats, ids, n)
    if p.centre_seeds:
        a = p.seed_hv_max
        slope = _Sobel(h, v, 3)  # finest scale: the centre of a 5-px nucleus still rises
        seed = fg.view(bool) & (np.abs(h) < a) & (np.abs(v) < a) & (slope.sx > 0) & (slope.sy > 0)
        ns, slab, sstats = _components(seed.view(np.uint8))
        if ns > 1:
            # seeds within one pixel (3x3) of a marker are dropped, so the fresh ones touch no marker
            near = cv2.dilate(marker, np.ones((3, 3), np.uint8)).view(bool)
            touching = np.zeros(ns, bool)
            touching[slab[near & seed]] = True
            fresh = ~touching
            fresh[0] = False
            n = _relabel_add(labels, slab, sstats, np.flatnonzero(fresh), n)
    # markers may cover filled holes of the foreground; the watershed is restricted to the foreground anyway
    labels[fg == 0] = 0
    return n, labels


def _pack(sizes: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Shelf-pack boxes of (height, width) with a 1-px gap: top-left corners and the mosaic shape."""
    hs, ws = sizes[:, 0] + 1, sizes[:, 1] + 1
    width = int(max(ws.max(), np.sqrt((hs * ws).sum()) * 1.25))
    order = np.argsort(-hs, kind="stable")
    pos = np.zeros((len(sizes), 2), np.int64)
    x = y = row_h = 0
    for i in order:
        if x + ws[i] > width:
            y, x, row_h = y + row_h, 0, 0
        pos[i] = (y, x)
        x += ws[i]
        row_h = max(row_h, hs[i])
    return pos, y + row_h, width


def _merge_unsupported(ws: np.ndarray, hm: np.ndarray, vm: np.ndarray, p: PixelParams) -> np.ndarray:
    """LUT merging touching regions whose shared border shows no HV interface (HV keeps increasing across it)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = int(ws.max()) + 1
    lut = np.arange(n, dtype=np.int64)
    a, b = ws[:, :-1], ws[:, 1:]
    mh = (a != b) & (a > 0) & (b > 0)
    c, d = ws[:-1, :], ws[1:, :]
    mv = (c != d) & (c > 0) & (d > 0)
    if not (mh.any() or mv.any()):
        return lut
    la = np.concatenate([a[mh], c[mv]]).astype(np.int64)
    lb = np.concatenate([b[mh], d[mv]]).astype(np.int64)
    drop = np.concatenate([(hm[:, 1:] - hm[:, :-1])[mh], (vm[1:, :] - vm[:-1, :])[mv]]) < -p.merge_delta
    key = np.minimum(la, lb) * n + np.maximum(la, lb)
    pairs, inv = np.unique(key, return_inverse=True)
    total = np.bincount(inv)
    evidence = np.bincount(inv, weights=drop)
    ok = evidence <= p.merge_max_fraction * total
    if not ok.any():
        return lut
    graph = coo_matrix((np.ones(int(ok.sum())), (pairs[ok] // n, pairs[ok] % n)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    first = np.full(int(comp.max()) + 1, n, np.int64)
    np.minimum.at(first, comp, lut)
    return first[comp]


def hover_instances(nuclei_prob: np.ndarray, hv: np.ndarray, p: PixelParams) -> np.ndarray:
    """Instance map (int32, consecutive ids 1..N) from validated float32 maps; see ``decode_hover``."""
    out = _watershed_instances(nuclei_prob, hv, p)
    if p.min_mean_prob > 0 and out.any():
        out = _drop_unsure(out, nuclei_prob, p.min_mean_prob)
    return out


def _drop_unsure(inst: np.ndarray, prob: np.ndarray, min_mean: float) -> np.ndarray:
    """``inst`` without the instances whose mean ``prob`` is below ``min_mean``, ids renumbered 1..N."""
    n = int(inst.max()) + 1
    flat = inst.ravel()
    area = np.bincount(flat, minlength=n)
    total = np.bincount(flat, weights=prob.ravel(), minlength=n)
    keep = total >= min_mean * area
    keep[0] = False
    lut = np.zeros(n, np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[inst]


def _watershed_instances(nuclei_prob: np.ndarray, hv: np.ndarray, p: PixelParams) -> np.ndarray:
    """The instance map before the confidence filter (see :func:`hover_instances`)."""
    from skimage.segmentation import watershed

    height, width = nuclei_prob.shape
    out = np.zeros((height, width), np.int32)
    fg = (nuclei_prob >= p.fg_threshold).view(np.uint8)
    ncomp, comp, cstats = _components(fg)
    if ncomp <= 1:
        return out
    small = cstats[:, _CC_AREA] < p.min_object_px
    small[0] = False
    if small.any():
        fg = fg.copy()
        _select(fg, comp, cstats, small, paint=False)
    valid = ~small
    valid[0] = False
    if not valid.any():
        return out
    h = np.ascontiguousarray(hv[0])
    v = np.ascontiguousarray(hv[1])
    coarse = _Sobel(h, v, p.sobel_ksize)
    nmark, mlab = _markers(fg, h, v, coarse, p)

    # which component each marker lies in, and how many markers each component holds
    on = mlab > 0
    mcomp = np.zeros(nmark, np.int64)
    mcomp[mlab[on]] = comp[on]
    count = np.bincount(mcomp[1:], minlength=ncomp) if nmark > 1 else np.zeros(ncomp, np.int64)
    count[~valid] = 0
    single = valid & (count == 1)
    multi = np.flatnonzero(valid & (count >= 2))
    lut = np.zeros(ncomp, np.int32)
    plain = single | (valid & (count == 0)) if p.keep_unmarked else single
    nplain = int(plain.sum())
    lut[plain] = np.arange(1, nplain + 1, dtype=np.int32)
    out = lut[comp]
    if len(multi) == 0:
        return out

    # pack the multi-marker components into one mosaic and flood it once
    boxes = cstats[multi, :4]
    pos, mh_, mw_ = _pack(boxes[:, [3, 2]])
    fields = {"mask": np.zeros((mh_, mw_), bool), "marker": np.zeros((mh_, mw_), np.int32)}
    for name in ("sx", "sy", "h", "v") + (("fx", "fy") if p.watershed_ksize else ()):
        fields[name] = np.zeros((mh_, mw_), np.float32)
    fine = _Sobel(h, v, p.watershed_ksize) if p.watershed_ksize else None
    dist = None
    if p.energy_blur:
        full = coarse.energy(coarse.sx, coarse.sy) * fg
        dist = -cv2.GaussianBlur((1.0 - full) * fg, (3, 3), 0)
        fields["dist"] = np.zeros((mh_, mw_), np.float32)
    sources = {"sx": coarse.sx, "sy": coarse.sy, "h": h, "v": v, "dist": dist}
    if fine is not None:
        sources.update(fx=fine.sx, fy=fine.sy)
    crops = []
    for (x, y, w, hh), (py, px), c in zip(boxes, pos, multi):
        src = (slice(y, y + hh), slice(x, x + w))
        dst = (slice(py, py + hh), slice(px, px + w))
        cmask = comp[src] == c
        fields["mask"][dst] = cmask
        fields["marker"][dst] = np.where(cmask, mlab[src], 0)
        for name, arr in fields.items():
            if name not in ("mask", "marker"):
                arr[dst] = sources[name][src]
        crops.append((src, dst, cmask))
    mask = fields["mask"]
    if p.energy_blur:
        energy = fields["dist"]
    else:
        energy = coarse.energy(fields["sx"], fields["sy"])
        if fine is not None:
            if p.fine_minmax:
                energy = np.maximum(energy, fine.energy(fields["fx"], fields["fy"]))
            else:
                # a drop of the HV maps of 0.5 per pixel or more (an interface) gets the highest energy
                drop = np.minimum(fields["fx"], fields["fy"]) * np.float32(-2.0 / fine.gain)
                energy = np.maximum(energy, np.clip(drop, 0, 1))
    ws = watershed(energy, markers=fields["marker"], mask=mask, connectivity=1)
    if p.merge_unsupported:
        ws = _merge_unsupported(ws, fields["h"], fields["v"], p)[ws]
    area = np.bincount(ws.ravel())
    keep = area >= p.min_object_px
    keep[0] = False
    relabel = np.zeros(len(area), np.int32)
    relabel[keep] = np.arange(nplain + 1, nplain + 1 + int(keep.sum()), dtype=np.int32)
    ws = relabel[ws]
    for src, dst, cmask in crops:
        out[src][cmask] = ws[dst][cmask]
    return out

"""Slide-level IF labelling: one marker threshold for a whole slide from a pooled, bounded-memory histogram."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cytoken.labeling import (
    CellLabelConfig,
    RegistrationConfig,
    SignalHistogram,
    ThresholdConfig,
    TiledRegistration,
    compute_threshold,
    label_cells,
    label_from_if_slide,
    labels_from_counts,
    marker_signal,
    overlap_counts,
    rasterize_cells,
    read_registration,
    register_tiled,
    signal_range,
    synthesize_if,
    threshold_marker,
    tile_grid,
)
from cytoken.types import CellSet, CytokenError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CONSEP = SHARED / "consep_patched" / "test"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")

HE_MPP, IF_MPP = 0.25, 0.5
SIGNAL = ThresholdConfig(background="tophat", background_radius_px=40, smooth_sigma_px=1.0, min_object_px=20)
# a 256 x 768 "slide" of three real CoNSeP test fields side by side: many inflammatory cells (97 of 154), then two
# fields without any (86 and 114 cells); the third does not touch the first, so its marker channel holds only noise,
# DAPI bleed-through and background
SLIDE_TILES = ("test_13_005", "test_11_010", "test_11_005")


def _blobs(shape=(64, 96), n=40, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    inst = np.zeros(shape, np.int64)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for k in range(1, n + 1):
        cy, cx, r = rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(2, 6)
        inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 10 * k
    return inst


# --------------------------------------------------------------------------------------------- histogram (no data)
@pytest.mark.parametrize("method, value", [("otsu", None), ("triangle", None), ("percentile", 97.0)])
def test_histogram_threshold_matches_the_all_values_threshold(method, value):
    rng = np.random.default_rng(1)
    vals = np.r_[rng.gamma(2, 5, 60_000), rng.normal(120, 20, 3_000)].clip(0, 250).astype(np.float32)
    cfg = ThresholdConfig(method=method, value=value)
    hist = SignalHistogram(0.0, 255.0)
    for part in np.array_split(vals, 9):  # added tile by tile
        hist.add(part)
    assert hist.n == vals.size and hist.vmin == vals.min() and hist.vmax == vals.max()
    assert abs(hist.threshold(cfg) - compute_threshold(vals, cfg)) <= 2 * hist.width


def test_histogram_merge_floor_fixed_and_refusals():
    rng = np.random.default_rng(2)
    a, b = rng.normal(10, 2, 1000), rng.normal(50, 5, 200)
    one, h1, h2 = SignalHistogram(0, 100, bins=1024), SignalHistogram(0, 100, bins=1024), SignalHistogram(0, 100, 1024)
    one.add(np.r_[a, b])
    h1.add(a)
    h2.add(b)
    h1.merge(h2)
    np.testing.assert_array_equal(h1.counts, one.counts)
    assert h1.threshold() == one.threshold()
    assert 15 < one.threshold() < 45
    assert one.threshold(ThresholdConfig(method="otsu", min_threshold=60)) == 60
    assert one.threshold(ThresholdConfig(method="fixed", value=7)) == 7
    with pytest.raises(ValueError, match="different ranges"):
        h1.merge(SignalHistogram(0, 50, bins=1024))
    flat = SignalHistogram(0, 10, bins=256)
    flat.add(np.full(100, 3.0))
    with pytest.raises(CytokenError, match="constant"):
        flat.threshold()
    with pytest.raises(CytokenError, match="constant"):
        SignalHistogram(0, 10, bins=256).threshold()
    with pytest.raises(ValueError, match="low < high"):
        SignalHistogram(5, 5)


@pytest.mark.parametrize("background", ["none", "gaussian", "tophat"])
def test_signal_stays_inside_signal_range(background):
    rng = np.random.default_rng(3)
    img = (rng.integers(20, 230, (60, 70)) + 20 * np.linspace(0, 1, 70)).astype(np.uint8)
    cfg = ThresholdConfig(background=background, background_radius_px=6, smooth_sigma_px=1.0)
    lo, hi = signal_range(img, cfg)
    sig = marker_signal(img, cfg)
    assert lo <= sig.min() and sig.max() <= hi


# --------------------------------------------------------------------------------------------- counts over tiles
def test_overlap_counts_of_tiles_add_up_to_the_whole_image():
    inst = _blobs()
    rng = np.random.default_rng(4)
    mask = rng.random(inst.shape) < 0.3
    valid = np.ones(inst.shape, bool)
    valid[:, :10] = False
    ids = np.unique(inst[inst > 0])
    total = [np.zeros(len(ids), np.int64) for _ in range(3)]
    for b in tile_grid(inst.shape, 16):
        sl = (slice(b.y, b.y1), slice(b.x, b.x1))
        for acc, part in zip(total, overlap_counts(inst[sl], mask[sl], ids, valid=valid[sl])):
            acc += part
    whole = overlap_counts(inst, mask, ids, valid=valid)
    for a, b in zip(total, whole):
        np.testing.assert_array_equal(a, b)
    cfg = CellLabelConfig(negative_margin=0.05)
    tiled = labels_from_counts(ids, *total, config=cfg)
    direct = label_cells(inst, mask, valid=valid, config=cfg)
    np.testing.assert_array_equal(tiled.status, direct.status)
    np.testing.assert_allclose(tiled.overlap_fraction, direct.overlap_fraction, equal_nan=True)


def _cellset(inst: np.ndarray) -> CellSet:
    import cv2

    ids, contours, boxes = [], [], []
    for i in np.unique(inst[inst > 0]):
        cs, _ = cv2.findContours((inst == i).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        c = max(cs, key=len).reshape(-1, 2).astype(np.float64)
        ids.append(i)
        contours.append(c)
        boxes.append([c[:, 0].min(), c[:, 1].min(), c[:, 0].max() + 1, c[:, 1].max() + 1])
    n = len(ids)
    return CellSet(
        ids=np.array(ids), centroids=np.array([c.mean(0) for c in contours]), bboxes=np.array(boxes),
        contours=contours, area_px=np.array([(inst == i).sum() for i in ids]), class_ids=np.zeros(n, np.int64),
        class_probs=np.full(n, np.nan), mpp=HE_MPP,
    )  # fmt: skip


def test_rasterize_cells_tile_equals_crop_of_whole():
    cs = _cellset(_blobs(seed=5))
    whole = rasterize_cells(cs, (64, 96))
    for b in tile_grid((64, 96), 20):
        tile = rasterize_cells(cs, (b.height, b.width), origin=(b.x, b.y))
        np.testing.assert_array_equal(tile, whole[b.y : b.y1, b.x : b.x1])


# --------------------------------------------------------------------------------------------- real tissue slide
@pytest.fixture(scope="module")
def slide(consep_mosaic):
    pytest.importorskip("SimpleITK", reason="SimpleITK (cytoken[labeling]) not installed")
    he, inst, ids, truth = consep_mosaic(SLIDE_TILES, CONSEP)
    synth = synthesize_if(inst, ids[truth], he_mpp=HE_MPP, if_mpp=IF_MPP, seed=0)
    tr = register_tiled(
        he, synth.image, he_mpp=HE_MPP, tile_px=256, overview_mpp=1.0, config=RegistrationConfig(threads=1)
    )
    res = label_from_if_slide(
        he, synth.image, inst, he_mpp=HE_MPP, marker="MARKER", registration=tr, threshold_config=SIGNAL
    )
    return {"he": he, "inst": inst, "ids": ids, "truth": truth, "synth": synth, "tr": tr, "res": res}


@needs_shared
def test_slide_threshold_is_the_threshold_of_the_whole_image(slide):
    tr, res, img = slide["tr"], slide["res"], slide["synth"].image
    assert len(tr.tiles) == 3 and tr.n_refined == 3, tr.errors
    assert res.tiles_used.all() and res.stats["n_tiles_used"] == 3
    # the same signal computed on the whole image at once (no tiles), thresholded with all its values
    warped = tr.warp_if_to_he(img).channel("MARKER")
    overlap = tr.overlap_mask(img.shape)
    whole = marker_signal(warped, SIGNAL, valid=overlap)
    assert abs(res.threshold - compute_threshold(whole[overlap], SIGNAL)) < 1.0  # 8-bit units; threshold ~ 70
    ref = threshold_marker(warped, replace(SIGNAL, method="fixed", value=res.threshold), valid=overlap)
    assert (res.mask == ref.mask)[overlap].mean() > 0.995
    np.testing.assert_array_equal(res.overlap, overlap)


@needs_shared
def test_slide_labels_match_the_expert_types(slide):
    lab, truth = slide["res"].labels, slide["truth"]
    np.testing.assert_array_equal(lab.ids, slide["ids"])
    k = lab.kept
    assert k.mean() > 0.8
    pred, gt = lab.label[k] == 1, truth[k]
    tp, fp, fn = (pred & gt).sum(), (pred & ~gt).sum(), (~pred & gt).sum()
    assert (pred == gt).mean() >= 0.95
    assert 2 * tp / (2 * tp + fp + fn) >= 0.9


@needs_shared
def test_a_per_tile_threshold_would_label_noise_on_a_field_without_positives(slide):
    tr, res, img, inst = slide["tr"], slide["res"], slide["synth"].image, slide["inst"]
    b = tr.tiles[2]  # the field with no inflammatory cell, away from the positive one
    reg = tr.for_tile(2)
    sub = inst[b.y : b.y1, b.x : b.x1]
    ov = reg.overlap_mask(img.shape)
    per_tile = threshold_marker(reg.warp_if_to_he(img).channel("MARKER"), SIGNAL, valid=ov)  # Otsu of this tile
    lab_tile = label_cells(sub, per_tile.mask, valid=ov)
    assert per_tile.threshold < 0.5 * res.threshold
    assert (lab_tile.label[lab_tile.kept] == 1).mean() > 0.5  # per tile: most cells of the field called positive
    ids = np.unique(sub[sub > 0])
    slide_lab = res.labels.label[np.searchsorted(res.labels.ids, ids)]
    assert slide_lab.sum() <= 2  # one threshold for the slide: (almost) none


@needs_shared
def test_cells_as_cellset_and_refusals(slide):
    he, img, tr, res = slide["he"], slide["synth"].image, slide["tr"], slide["res"]
    cs = _cellset(slide["inst"])
    res2 = label_from_if_slide(he, img, cs, he_mpp=HE_MPP, marker="MARKER", registration=tr, threshold_config=SIGNAL)
    assert res2.threshold == res.threshold
    same = res2.labels.status == res.labels.status[np.searchsorted(res.labels.ids, res2.labels.ids)]
    assert same.mean() > 0.97
    none_ok = replace(tr, registrations=[None] * 3, errors=["refused"] * 3)
    with pytest.raises(CytokenError, match="no tile of the slide registered"):
        label_from_if_slide(he, img, slide["inst"], he_mpp=HE_MPP, marker="MARKER", registration=none_ok)
    with pytest.raises(CytokenError, match="slide marker mask is empty"):
        label_from_if_slide(
            he, img, slide["inst"], he_mpp=HE_MPP, marker="MARKER", registration=tr,
            threshold_config=replace(SIGNAL, method="fixed", value=1e4),
        )  # fmt: skip
    with pytest.raises(CytokenError, match="CD3"):
        label_from_if_slide(he, img, slide["inst"], he_mpp=HE_MPP, marker="CD3", registration=tr)


@needs_shared
def test_command_uses_one_threshold_for_the_slide(slide, tmp_path):
    import json

    import pyarrow.parquet as pq

    from cytoken.cli.main import main
    from cytoken.io.ifimage import write_ome_tiff

    tr = slide["tr"]
    back = read_registration(tr.save(tmp_path / "tiled.json"))
    assert isinstance(back, TiledRegistration) and back.errors == tr.errors
    pts = np.array([[10.0, 20.0], [200.0, 100.0]])
    np.testing.assert_allclose(back.for_tile(1).transform_points(pts), tr.for_tile(1).transform_points(pts), atol=1e-6)
    Image.fromarray(slide["he"]).save(tmp_path / "he.png")
    Image.fromarray(slide["inst"].astype(np.int32)).save(tmp_path / "cells.tif")
    write_ome_tiff(slide["synth"].image, tmp_path / "if.ome.tif")
    argv = ["label-from-if", "--he", str(tmp_path / "he.png"), "--he-mpp", str(HE_MPP), "--if",
            str(tmp_path / "if.ome.tif"), "--marker", "MARKER", "--cells", str(tmp_path / "cells.tif"),
            "--registration", str(tmp_path / "tiled.json"), "--background", "tophat:40", "--smooth-px", "1",
            "--min-object-px", "20", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["mode"] == "slide" and len(summary["tiles"]) == 3
    assert all(t["used"] for t in summary["tiles"])
    # the command's threshold is the one pooled threshold of the library call with the same settings
    assert summary["threshold"] == pytest.approx(slide["res"].threshold)
    assert summary["counts"] == slide["res"].labels.counts()
    table = pq.read_table(tmp_path / "out" / "labels.parquet")
    assert table.num_rows == len(slide["ids"])
    for f in ("registration.json", "marker_mask.tif", "labels.csv", "qc.png"):
        assert (tmp_path / "out" / f).is_file(), f
    assert isinstance(read_registration(tmp_path / "out" / "registration.json"), TiledRegistration)


@needs_shared
def test_file_backed_slide_gives_the_labels_of_the_in_memory_slide(slide, tmp_path, monkeypatch):
    """The slide read from files (H&E through open_slide tile by tile, IF and cells crop by crop, the mask written
    tile by tile to a tiled TIFF) labels exactly as the same slide in memory; the command runs that path, past the
    single-image reader's size cap."""
    import json

    import tifffile

    import cytoken.io.image as image_io
    from cytoken.cli.main import main
    from cytoken.io.ifimage import write_ome_tiff
    from cytoken.io.ifreader import open_if
    from cytoken.io.slide import open_slide

    tifffile.imwrite(tmp_path / "he.tif", slide["he"], tile=(128, 128), photometric="rgb")
    tifffile.imwrite(tmp_path / "cells.tif", slide["inst"].astype(np.int32), tile=(128, 128))
    write_ome_tiff(slide["synth"].image, tmp_path / "if.ome.tif")
    mem, cfg = slide["res"], RegistrationConfig(threads=1)
    with (
        open_slide(tmp_path / "he.tif", mpp=HE_MPP) as he,
        open_if(tmp_path / "if.ome.tif") as ifr,
        open_if(tmp_path / "cells.tif", mpp=HE_MPP) as cells,
    ):
        # the registration from downsampled and windowed reads of the files: the same overview; the tile
        # refinements agree up to ITK's run-to-run jitter (two in-memory fits differ as much)
        tr = register_tiled(he, ifr, he_mpp=HE_MPP, tile_px=256, overview_mpp=1.0, config=cfg)
        pts = np.array([[10.0, 20.0], [200.0, 100.0]])
        ref = mem.registration
        np.testing.assert_allclose(tr.overview.transform_points(pts), ref.overview.transform_points(pts))
        assert tr.overview.he_mpp == HE_MPP and tr.he_shape == ref.he_shape and tr.tiles == ref.tiles
        for i in range(len(tr.tiles)):
            np.testing.assert_allclose(tr.for_tile(i).transform_points(pts), ref.for_tile(i).transform_points(pts),
                                       atol=0.5)  # fmt: skip
        # with the same registration, the labels, the threshold and the mask are those of the in-memory slide
        disk = label_from_if_slide(he, ifr, cells, he_mpp=HE_MPP, marker="MARKER", registration=ref,
                                   threshold_config=SIGNAL, mask_path=tmp_path / "mask.tif")  # fmt: skip
    assert disk.mask is None and disk.overlap is None and disk.mask_path == tmp_path / "mask.tif"
    assert disk.threshold == mem.threshold
    np.testing.assert_array_equal(disk.labels.ids, mem.labels.ids)
    np.testing.assert_array_equal(disk.labels.status, mem.labels.status)
    np.testing.assert_array_equal(disk.labels.overlap_fraction, mem.labels.overlap_fraction)
    with tifffile.TiffFile(tmp_path / "mask.tif") as tf:
        assert tf.pages[0].is_tiled and tf.pages[0].tilewidth == 256
        np.testing.assert_array_equal(tf.asarray() > 0, mem.mask)
    assert disk.stats["valid_px"] == mem.overlap.sum() and disk.stats["positive_px"] == mem.mask.sum()
    assert (disk.labels.label[disk.labels.kept] == 1).sum() > 80  # the positive field is found (97 of its cells)

    # the command, with a single-image size cap the H&E exceeds: slide mode reads it tile by tile
    monkeypatch.setattr(image_io, "_max_pixels", lambda: 100_000)
    out = tmp_path / "out"
    argv = ["label-from-if", "--he", str(tmp_path / "he.tif"), "--he-mpp", str(HE_MPP), "--if",
            str(tmp_path / "if.ome.tif"), "--marker", "MARKER", "--cells", str(tmp_path / "cells.tif"),
            "--tile-px", "256", "--background", "tophat:40", "--smooth-px", "1", "--min-object-px", "20",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "slide" and len(summary["tiles"]) == 3
    assert set(p.name for p in out.iterdir()) == {
        "registration.json", "marker_mask.tif", "labels.parquet", "labels.csv", "qc.png", "summary.json"
    }  # fmt: skip
    import pyarrow.parquet as pq

    table = pq.read_table(out / "labels.parquet").to_pandas().set_index("cell_id").loc[mem.labels.ids]
    assert (table["status"].to_numpy() == mem.labels.status).mean() > 0.97  # its own (multi-threaded) registration
    assert Image.open(out / "qc.png").size == (768, 256)

    # without --cells, slide mode segments the slide with the streaming slide pipeline and keeps that output
    from cytoken.weights import file_sha256

    argv2 = [a for a in argv if a not in ("--cells", str(tmp_path / "cells.tif"))]
    argv2[argv2.index("--out") + 1] = str(tmp_path / "out2")
    assert main([*argv2, "--registration", str(out / "registration.json")]) == 0
    seg = tmp_path / "out2" / "segmentation" / "he"
    cells = pq.read_table(seg / "cells.parquet").to_pandas()
    labels = pq.read_table(tmp_path / "out2" / "labels.parquet")
    assert labels.schema.metadata[b"cytoken.cells_sha256"].decode() == file_sha256(seg / "cells.parquet")
    assert sorted(labels.column("cell_id").to_pylist()) == sorted(cells["id"]) and len(cells) > 100
    assert json.loads((tmp_path / "out2" / "summary.json").read_text())["mode"] == "slide"

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from cytoken.io.ifimage import IFImage
from cytoken.labeling import (
    CellLabelConfig,
    KnownWarp,
    Registration,
    RegistrationConfig,
    ThresholdConfig,
    compute_threshold,
    label_cells,
    label_from_if,
    marker_signal,
    qc_overlay,
    rasterize_cells,
    register,
    save_mask_png,
    subtract_background,
    synthesize_if,
    threshold_marker,
    write_outputs,
)
from cytoken.labeling.cell_labels import COLORS
from cytoken.types import CellSet, CytokenError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CONSEP = SHARED / "consep_patched" / "test"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")
sitk = pytest.importorskip("SimpleITK", reason="SimpleITK (cytoken[labeling]) not installed")

HE_MPP, IF_MPP = 0.25, 0.5
PROOF_TILES = ("test_13_005", "test_10_003")  # many / some inflammatory cells
SIGNAL = ThresholdConfig(background="tophat", background_radius_px=40, smooth_sigma_px=1.0, min_object_px=20)


# ---------------------------------------------------------------------------------------------- thresholding
def test_otsu_threshold_two_levels():
    img = np.zeros((20, 20))
    img[5:10, 5:10] = 1.0
    m = threshold_marker(img)
    assert 0 <= m.threshold < 1
    assert m.mask.sum() == 25 and m.mask[5:10, 5:10].all()
    assert m.stats["positive_fraction"] == pytest.approx(25 / 400)


def test_percentile_fixed_and_floor():
    img = np.arange(100, dtype=float).reshape(10, 10)
    assert threshold_marker(img, ThresholdConfig(method="percentile", value=90)).mask.sum() == 10
    assert threshold_marker(img, ThresholdConfig(method="fixed", value=49.5)).mask.sum() == 50
    # the floor wins over a lower data-driven threshold
    floor = threshold_marker(img, ThresholdConfig(method="percentile", value=10, min_threshold=89.5))
    assert floor.threshold == 89.5 and floor.mask.sum() == 10
    assert compute_threshold(np.array([0.0, 0, 1, 1]), ThresholdConfig(method="triangle")) <= 1


def test_empty_and_all_positive_masks_are_refused_with_stats():
    img = np.arange(100, dtype=float).reshape(10, 10)
    with pytest.raises(CytokenError, match=r"empty.*max=99"):
        threshold_marker(img, ThresholdConfig(method="fixed", value=1000))
    with pytest.raises(CytokenError, match=r"all positive.*positive_fraction=1"):
        threshold_marker(img, ThresholdConfig(method="fixed", value=-1))
    with pytest.raises(CytokenError, match="constant"):
        threshold_marker(np.ones((5, 5)))
    # an empty field is allowed when asked for (a slide-wide threshold applied to one field)
    ok = threshold_marker(img, ThresholdConfig(method="fixed", value=1000, min_positive_px=0))
    assert not ok.mask.any()


def test_valid_mask_excludes_pixels_from_threshold_and_mask():
    img = np.zeros((10, 10))
    img[:, :5] = 100.0  # bright but outside the valid area
    img[2:4, 6:8] = 10.0
    valid = np.zeros((10, 10), bool)
    valid[:, 5:] = True
    m = threshold_marker(img, valid=valid)
    assert not m.mask[:, :5].any()
    assert m.mask[2:4, 6:8].all() and m.mask.sum() == 4
    with pytest.raises(CytokenError, match="no valid pixels"):
        threshold_marker(img, valid=np.zeros((10, 10), bool))


def test_small_objects_removed_and_holes_filled():
    img = np.zeros((30, 30))
    img[2:12, 2:12] = 1.0
    img[6, 6] = 0.0  # a one-pixel hole
    img[20, 20] = 1.0  # a one-pixel speck
    m = threshold_marker(img, ThresholdConfig(min_object_px=5, fill_holes_px=3))
    assert not m.mask[20, 20]
    assert m.mask[6, 6]
    assert m.mask.sum() == 100


def test_background_subtraction_removes_ramp():
    ramp = np.tile(np.linspace(0, 50, 64), (64, 1))
    img = ramp.copy()
    img[30:34, 30:34] += 40
    assert np.median(img) > 20
    for method in ("tophat", "rolling_ball", "gaussian"):
        out = subtract_background(img, method, 8)
        assert out[31, 31] > 30, method
        assert np.median(out) < 3, method
    np.testing.assert_allclose(subtract_background(img, "none", 8), img, rtol=1e-6)


def test_save_mask_png_atomic(tmp_path):
    mask = np.zeros((5, 6), bool)
    mask[1, 2] = True
    p = save_mask_png(mask, tmp_path / "m.png")
    arr = np.asarray(Image.open(p))
    assert arr.dtype == np.uint8 and arr[1, 2] == 255 and arr.sum() == 255
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.png"]


def test_threshold_config_validation():
    with pytest.raises(ValueError, match="percentile"):
        ThresholdConfig(method="percentile")
    with pytest.raises(ValueError, match="method"):
        ThresholdConfig(method="magic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="background"):
        ThresholdConfig(background="blur")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- cell labels
def _cells_4():
    inst = np.zeros((10, 40), np.int32)
    inst[:, 0:10] = 1
    inst[:, 10:20] = 2
    inst[:, 20:30] = 3
    inst[:, 30:40] = 4
    mask = np.zeros((10, 40), bool)
    mask[:, 0:5] = True  # cell 1: 50 %
    mask[:, 10:11] = True
    mask[:5, 11] = True  # cell 2: 15 % exactly
    mask[:, 20] = True  # cell 3: 10 %
    return inst, mask  # cell 4: 0 %


def test_label_cells_fractions_and_default_threshold():
    inst, mask = _cells_4()
    lab = label_cells(inst, mask, marker="CD45")
    np.testing.assert_allclose(lab.overlap_fraction, [0.5, 0.15, 0.1, 0.0])
    assert lab.label.tolist() == [1, 1, 0, 0]  # >= 0.15 is positive
    assert lab.status.tolist() == ["positive", "positive", "negative", "negative"]
    assert lab.kept.all()
    assert lab.area_px.tolist() == [100] * 4


def test_label_cells_negative_margin_band():
    inst, mask = _cells_4()
    cfg = CellLabelConfig(positive_fraction=0.2, negative_margin=0.1)
    lab = label_cells(inst, mask, config=cfg)
    # 0.5 positive; 0.15 and 0.10 are in [0.1, 0.2) and > 0 -> ambiguous; 0.0 never ambiguous
    assert lab.status.tolist() == ["positive", "ambiguous", "ambiguous", "negative"]
    assert lab.kept.tolist() == [True, False, False, True]
    assert lab.label.tolist() == [1, 0, 0, 0]
    with pytest.raises(ValueError, match="negative_margin"):
        CellLabelConfig(positive_fraction=0.15, negative_margin=0.2)


def test_label_cells_coverage_missing_ids_and_order():
    inst, mask = _cells_4()
    valid = np.ones_like(mask)
    valid[:, 30:37] = False  # cell 4 only 30 % covered
    lab = label_cells(inst, mask, cell_ids=np.array([4, 1, 99]), valid=valid)
    assert lab.ids.tolist() == [4, 1, 99]
    assert lab.status.tolist() == ["no_coverage", "positive", "missing"]
    assert lab.coverage[0] == pytest.approx(0.3)
    assert np.isnan(lab.overlap_fraction[2])
    assert lab.counts() == {"positive": 1, "negative": 0, "ambiguous": 0, "no_coverage": 1, "missing": 1}


def test_label_cells_from_cellset_and_shape_mismatch():
    square = np.array([[0.0, 0], [9, 0], [9, 9], [0, 9]])
    cs = CellSet(
        ids=[5, 6],
        centroids=[[4.5, 4.5], [24.5, 4.5]],
        bboxes=[[0, 0, 10, 10], [20, 0, 30, 10]],
        contours=[square, square + np.array([20.0, 0.0])],
        area_px=[100, 100],
        class_ids=[0, 0],
        class_probs=[np.nan, np.nan],
        mpp=0.25,
    )
    raster = rasterize_cells(cs, (10, 40))
    assert (raster == 5).sum() == 100 and (raster == 6).sum() == 100
    mask = np.zeros((10, 40), bool)
    mask[:, :10] = True
    lab = label_cells(cs, mask)
    assert lab.ids.tolist() == [5, 6] and lab.label.tolist() == [1, 0]
    with pytest.raises(CytokenError, match="differs"):
        label_cells(np.zeros((5, 5), np.int32), np.zeros((6, 6), bool))


def test_label_table_writers_and_qc_overlay(tmp_path):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    inst, mask = _cells_4()
    lab = label_cells(inst, mask, marker="CD45", config=CellLabelConfig(negative_margin=0.1))
    t = pq.read_table(lab.write(tmp_path / "labels.parquet"))
    assert t.column_names == ["cell_id", "overlap_fraction", "label", "kept", "status", "area_px", "coverage", "marker"]
    assert t.column("label").to_pylist() == [1, 1, 0, 0]
    assert t.schema.metadata[b"cytoken.marker"] == b"CD45"
    c = pacsv.read_csv(lab.write(tmp_path / "labels.csv"))
    assert c.column("status").to_pylist() == ["positive", "positive", "ambiguous", "negative"]
    with pytest.raises(ValueError, match="parquet"):
        lab.write(tmp_path / "labels.txt")

    he = np.full((10, 40, 3), 255, np.uint8)
    rgb = qc_overlay(he, mask, inst, lab, tmp_path / "qc.png")
    assert (tmp_path / "qc.png").exists()
    assert tuple(rgb[5, 30]) == COLORS["negative"]  # left edge of cell 4
    assert tuple(rgb[5, 29]) == COLORS["dropped"]  # right edge of cell 3, which is ambiguous
    assert tuple(rgb[5, 9]) == COLORS["positive"]  # right edge of cell 1
    assert tuple(rgb[0, 4]) == COLORS["marker"]  # marker contour drawn last
    assert tuple(rgb[5, 5]) == (255, 255, 255)  # interior untouched


# ---------------------------------------------------------------------------------------------- registration geometry
def test_identity_registration_warp_geometry():
    """H&E pixel x at 0.25 µm/px sits at IF pixel x/2 at 0.5 µm/px (pixel centres at 0)."""
    ident = sitk.Transform(2, sitk.sitkIdentity)
    reg = Registration(ident, he_shape=(4, 4), he_mpp=0.25, if_mpp=0.5)
    mx, my = reg.if_coordinates()
    np.testing.assert_allclose(mx[0], [0, 0.5, 1, 1.5])
    np.testing.assert_allclose(my[:, 0], [0, 0.5, 1, 1.5])
    img = IFImage(np.array([[[0.0, 10.0], [20.0, 30.0]]]), ("DAPI",), mpp=0.5)
    out = reg.warp_if_to_he(img, fill_value=-1)
    np.testing.assert_allclose(out.data[0, 0, :3], [0, 5, 10])
    np.testing.assert_allclose(out.data[0, 2, 2], 30)
    assert out.mpp == 0.25
    assert out.data[0, 3, 3] == 30  # H&E pixel 3 -> IF 1.5, the outer edge of the last IF pixel
    wide = Registration(ident, he_shape=(5, 5), he_mpp=0.25, if_mpp=0.5)
    assert wide.overlap_mask((2, 2))[0].tolist() == [True, True, True, True, False]
    np.testing.assert_allclose(reg.transform_points(np.array([[2.0, 1.0]])), [[1.0, 0.5]])


def test_known_warp_is_exact_for_identity_parameters():
    w = KnownWarp(0.0, (0.0, 0.0), (0.0, 0.0), np.zeros((0, 2)), np.zeros((0, 2)), 1.0)
    he = np.array([[10.0, 20.0], [3.0, 4.0]])
    assert np.allclose(w.error_px(he, he * HE_MPP / IF_MPP, he_mpp=HE_MPP, if_mpp=IF_MPP), 0)


def test_register_requires_mpp_and_known_channel():
    he = np.full((32, 32, 3), 200, np.uint8)
    with pytest.raises(CytokenError, match="µm/px"):
        register(he, IFImage(np.zeros((1, 16, 16)), ("DAPI",)), he_mpp=0.25)
    with pytest.raises(CytokenError, match="available channels"):
        register(he, IFImage(np.zeros((1, 16, 16)), ("Hoechst",), mpp=0.5), he_mpp=0.25)
    with pytest.raises(ValueError, match="linear"):
        RegistrationConfig(linear="similarity")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- proof on real tissue
def _load(name: str):
    he = np.asarray(Image.open(CONSEP / "images" / f"{name}.jpg").convert("RGB"))
    inst = np.asarray(Image.open(CONSEP / "inst_maps" / f"{name}.png")).astype(np.int32)
    types = np.asarray(Image.open(CONSEP / "type_maps" / f"{name}.png"))
    ids = np.unique(inst[inst > 0])
    truth = np.array([np.bincount(types[inst == i]).argmax() == 2 for i in ids])
    return he, inst, ids, truth


@pytest.fixture(scope="module")
def proof():
    if not CONSEP.exists():
        pytest.skip("../shared/data not present")
    out = []
    for k, name in enumerate(PROOF_TILES):
        he, inst, ids, truth = _load(name)
        synth = synthesize_if(inst, ids[truth], he_mpp=HE_MPP, if_mpp=IF_MPP, seed=k)
        reg = register(he, synth.image, he_mpp=HE_MPP, config=RegistrationConfig(threads=1))
        out.append({"name": name, "he": he, "inst": inst, "ids": ids, "truth": truth, "synth": synth, "reg": reg})
    return out


@needs_shared
def test_registration_error_against_known_deformation(proof):
    errors, before = [], []
    for p in proof:
        c = np.array(ndi.center_of_mass(np.ones_like(p["inst"]), p["inst"], p["ids"]))[:, ::-1]
        errors.append(p["synth"].warp.error_px(c, p["reg"].transform_points(c), he_mpp=HE_MPP, if_mpp=IF_MPP))
        before.append(p["synth"].warp.error_px(c, c * HE_MPP / IF_MPP, he_mpp=HE_MPP, if_mpp=IF_MPP))
        q = p["reg"].quality
        assert q.nmi_after > q.nmi_before
        assert q.residual_px_after < q.residual_px_before
        assert q.residual_px_after <= RegistrationConfig().max_residual_px
    assert np.median(np.concatenate(before)) > 5  # the deformation is not trivial
    assert np.median(np.concatenate(errors)) < 1.5


@needs_shared
def test_labels_match_inflammatory_ground_truth(proof):
    # one threshold for all fields (as over a slide): Otsu of the pooled top-hat signal
    warped = [(p["reg"].warp_if_to_he(p["synth"].image), p["reg"].overlap_mask(p["synth"].image.shape)) for p in proof]
    pooled = np.concatenate([marker_signal(w.channel("MARKER"), SIGNAL, valid=ov)[ov] for w, ov in warped])
    fixed = replace(SIGNAL, method="fixed", value=compute_threshold(pooled, SIGNAL), min_positive_px=0)
    preds, truths = [], []
    for p, (w, ov) in zip(proof, warped):
        mask = threshold_marker(w.channel("MARKER"), fixed, valid=ov)
        lab = label_cells(p["inst"], mask.mask, cell_ids=p["ids"], valid=ov, marker="MARKER")
        preds.append(lab.label[lab.kept] == 1)
        truths.append(p["truth"][lab.kept])
        assert lab.kept.mean() > 0.7
    pred, truth = np.concatenate(preds), np.concatenate(truths)
    tp, fp, fn = (pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()
    assert (pred == truth).mean() >= 0.95
    assert 2 * tp / (2 * tp + fp + fn) >= 0.9


@needs_shared
def test_registration_save_load_roundtrip(proof, tmp_path):
    reg = proof[0]["reg"]
    back = Registration.load(reg.save(tmp_path / "reg.json"))
    pts = np.array([[10.0, 20.0], [200.0, 100.0], [128.0, 128.0]])
    np.testing.assert_allclose(back.transform_points(pts), reg.transform_points(pts), atol=1e-6)
    assert back.quality == reg.quality and back.he_shape == reg.he_shape
    img = proof[0]["synth"].image
    np.testing.assert_allclose(back.warp_if_to_he(img).data, reg.warp_if_to_he(img).data, atol=1e-3)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CytokenError, match="not a cytoken registration"):
        Registration.load(tmp_path / "bad.json")


@needs_shared
def test_unrelated_images_are_refused(proof):
    # H&E of one tile against the IF of another: no true overlap -> the guard must refuse with numbers
    cfg = RegistrationConfig(threads=1, bspline_grid_um=None)  # the guard does not depend on the B-spline stage
    with pytest.raises(CytokenError, match=r"registration failed.*residual|registration failed.*overlap"):
        register(proof[0]["he"], proof[1]["synth"].image, he_mpp=HE_MPP, config=cfg)


@needs_shared
def test_label_from_if_and_outputs(proof, tmp_path):
    import pyarrow.parquet as pq

    p = proof[1]
    res = label_from_if(
        p["he"],
        p["synth"].image,
        p["inst"],
        he_mpp=HE_MPP,
        marker="marker",
        registration=p["reg"],
        threshold_config=SIGNAL,
    )
    assert res.warped.data.shape == (2, *p["he"].shape[:2])
    paths = write_outputs(res, p["he"], tmp_path / "out")
    assert {k: v.exists() for k, v in paths.items()} == dict.fromkeys(paths, True)
    table = pq.read_table(paths["labels_parquet"])
    assert table.num_rows == len(p["ids"])
    assert Registration.load(paths["registration"]).he_shape == p["he"].shape[:2]


@pytest.mark.slow
@needs_shared
def test_register_tiled_overview_then_tiles():
    from cytoken.labeling import register_tiled

    (h1, i1, _, _), (h2, i2, _, _) = _load(PROOF_TILES[0]), _load(PROOF_TILES[1])
    he = np.concatenate([h1, h2], 1)  # a 256 x 512 "slide" of two fields
    inst = np.concatenate([i1, np.where(i2 > 0, i2 + 10_000, 0)], 1)
    ids = np.unique(inst[inst > 0])
    synth = synthesize_if(inst, ids[::3], he_mpp=HE_MPP, if_mpp=IF_MPP, seed=3)
    tr = register_tiled(
        he, synth.image, he_mpp=HE_MPP, tile_px=256, overview_mpp=1.0, config=RegistrationConfig(threads=1)
    )
    assert len(tr.tiles) == 2 and tr.errors == [None, None]
    c = np.array(ndi.center_of_mass(np.ones_like(inst), inst, ids))[:, ::-1]
    for i, b in enumerate(tr.tiles):
        sel = b.contains(c[:, 0], c[:, 1])
        local = c[sel] - [b.x, b.y]
        err = synth.warp.error_px(c[sel], tr.for_tile(i).transform_points(local), he_mpp=HE_MPP, if_mpp=IF_MPP)
        assert np.median(err) < 1.5
    warped = tr.warp_if_to_he(synth.image)
    assert warped.data.shape == (2, 256, 512)
    assert tr.overlap_mask(synth.image.shape).mean() > 0.8


@needs_shared
def test_failed_bspline_stage_keeps_the_linear_result(proof, monkeypatch):
    import cytoken.labeling.registration as registration

    def _raise(*args, **kwargs):
        raise RuntimeError("ITK ERROR: MattesMutualInformation: Too many samples map outside moving image buffer")

    p = proof[0]
    monkeypatch.setattr(registration, "run_bspline", _raise)
    reg = register(p["he"], p["synth"].image, he_mpp=HE_MPP, config=RegistrationConfig(threads=1, check=False))
    assert "Too many samples" in reg.quality.deformable_error
    assert reg.quality.residual_px_after < reg.quality.residual_px_before  # the linear stage still aligned it
    assert p["reg"].quality.deformable_error is None
    back = registration.Registration.from_dict(reg.to_dict())
    assert back.quality.deformable_error == reg.quality.deformable_error


@needs_shared
def test_tile_refinement_is_retried_with_every_pixel_sampled(monkeypatch):
    import cytoken.labeling.tiled as tiled
    from cytoken.labeling import register_tiled

    he, inst, ids, _ = _load(PROOF_TILES[0])
    synth = synthesize_if(inst, ids[::3], he_mpp=HE_MPP, if_mpp=IF_MPP, seed=3)
    real, seen = tiled.register, []

    def flaky(*args, config, initial=None, **kwargs):
        if initial is not None:  # a tile refinement (the overview has no initial transform)
            seen.append(config.sampling_fraction)
            if config.sampling_fraction < 1 or fail_dense:
                raise CytokenError(f"registration failed: sampling {config.sampling_fraction}")
        return real(*args, config=config, initial=initial, **kwargs)

    monkeypatch.setattr(tiled, "register", flaky)
    cfg = RegistrationConfig(threads=1)
    fail_dense = False
    tr = register_tiled(he, synth.image, he_mpp=HE_MPP, tile_px=256, overview_mpp=1.0, config=cfg)
    assert seen == [0.5, 1.0] and tr.n_refined == 1 and tr.errors == [None]
    seen.clear()
    fail_dense = True
    tr = register_tiled(he, synth.image, he_mpp=HE_MPP, tile_px=256, overview_mpp=1.0, config=cfg)
    assert seen == [0.5, 1.0] and tr.n_refined == 0
    assert (
        tr.errors[0]
        == "registration failed: sampling 0.5; then with every pixel sampled: registration failed: sampling 1.0"
    )


@needs_shared
def test_label_from_if_command(tmp_path):
    """The CLI end to end on a real CoNSeP tile with synthetic IF (cells given as the expert instance map)."""
    from cytoken.cli.main import main
    from cytoken.io.ifimage import write_ome_tiff

    name = PROOF_TILES[0]
    he, inst, ids, truth = _load(name)
    synth = synthesize_if(inst, ids[truth], he_mpp=HE_MPP, if_mpp=IF_MPP, seed=0)
    Image.fromarray(he).save(tmp_path / "he.png")
    Image.fromarray(inst.astype(np.uint16)).save(tmp_path / "cells.png")
    write_ome_tiff(synth.image, tmp_path / "if.ome.tif")
    argv = ["label-from-if", "--he", str(tmp_path / "he.png"), "--he-mpp", str(HE_MPP), "--if",
            str(tmp_path / "if.ome.tif"), "--marker", "MARKER", "--cells", str(tmp_path / "cells.png"),
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    for f in ("registration.json", "marker_mask.png", "labels.parquet", "labels.csv", "qc.png", "summary.json"):
        assert (tmp_path / "out" / f).is_file(), f
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "out" / "labels.parquet").to_pandas()
    kept = table[table["kept"]]
    pos = dict(zip(kept["cell_id"], kept["label"] == 1))
    truth_of = dict(zip(ids, truth))
    agree = np.mean([pos[i] == truth_of[i] for i in pos])
    assert agree >= 0.9, agree
    bad = argv.copy()
    bad[bad.index("MARKER")] = "CD3"
    assert main([*bad[:-1], str(tmp_path / "out2")]) == 2
    assert not (tmp_path / "out2").exists()


@needs_shared
def test_label_from_if_takes_a_segment_output_folder(tmp_path, capsys):
    """``--cells DIR``: the cells of a ``cytoken segment`` run (default model) are labelled, ids kept; then
    ``classifier dataset --if-labels`` turns the labels into a training set from that run's stored embeddings."""
    import pyarrow.parquet as pq

    from cytoken.cli.main import main
    from cytoken.io.ifimage import write_ome_tiff

    he, inst, ids, truth = _load(PROOF_TILES[0])
    synth = synthesize_if(inst, ids[truth], he_mpp=HE_MPP, if_mpp=IF_MPP, seed=0)
    Image.fromarray(he).save(tmp_path / "he.png")
    write_ome_tiff(synth.image, tmp_path / "if.ome.tif")
    assert main(["segment", str(tmp_path / "he.png"), "--mpp", str(HE_MPP), "--out", str(tmp_path / "seg")]) == 0
    seg = tmp_path / "seg" / "he"
    argv = ["label-from-if", "--he", str(tmp_path / "he.png"), "--he-mpp", str(HE_MPP), "--if",
            str(tmp_path / "if.ome.tif"), "--marker", "MARKER", "--cells", str(seg),
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    cells = pq.read_table(seg / "cells.parquet").to_pandas()
    table = pq.read_table(tmp_path / "out" / "labels.parquet").to_pandas()
    assert sorted(table["cell_id"]) == sorted(cells["id"])
    # a model cell is truly positive when its centroid lies on an expert inflammatory nucleus
    truth_of = dict(zip(ids, truth))
    xy = cells.set_index("id").loc[table["cell_id"], ["x", "y"]].to_numpy().round().astype(int)
    under = inst[np.clip(xy[:, 1], 0, inst.shape[0] - 1), np.clip(xy[:, 0], 0, inst.shape[1] - 1)]
    on_cell = under > 0
    gt = np.array([truth_of.get(i, False) for i in under])
    kept = table["kept"].to_numpy() & on_cell
    pred = table["label"].to_numpy() == 1
    assert kept.sum() > 50 and (pred[kept] == gt[kept]).mean() >= 0.9

    # the IF labels -> classifier route: labelled set from the stored embeddings (the model is not run), then train
    import pyarrow as pa

    from cytoken.pipeline.classifier import load_embedding_set

    labels_f = tmp_path / "out" / "labels.parquet"
    assert main(["classifier", "dataset", "--if-labels", str(tmp_path / "out"), "--cells", str(seg),
                 "--out", str(tmp_path / "set.npz")]) == 0  # the label-from-if folder; its labels.parquet is read
    lab, meta = load_embedding_set(tmp_path / "set.npz")
    rows = table[table["kept"]]
    assert lab.class_names == ("MARKER-", "MARKER+") and len(lab.labels) == len(rows)
    np.testing.assert_array_equal(lab.labels, rows["label"].to_numpy())
    emb = np.load(seg / "embeddings.npy")
    row_of = {int(i): r for r, i in enumerate(cells["id"])}
    np.testing.assert_array_equal(lab.embeddings, emb[[row_of[int(i)] for i in rows["cell_id"]]].astype(np.float32))
    assert set(lab.groups) == {"he"}
    assert meta["model_sha256"] == json.loads((seg / "run.json").read_text())["model"]["sha256"]
    # bad input: ids the output does not hold, a table without the columns, a missing --cells: one clear error each
    bad = table.copy()
    bad.loc[bad.index[0], "cell_id"] = 10**9
    bad = bad.assign(kept=True)
    pq.write_table(pa.Table.from_pandas(bad, preserve_index=False), tmp_path / "bad.parquet")
    pq.write_table(pa.table({"cell_id": [1]}), tmp_path / "nocols.parquet")
    # a table paired with another segment output (same small ids) is refused, not silently joined
    he2, *_ = _load(PROOF_TILES[1])
    Image.fromarray(he2).save(tmp_path / "he2.png")
    assert main(["segment", str(tmp_path / "he2.png"), "--mpp", str(HE_MPP), "--out", str(tmp_path / "seg")]) == 0
    capsys.readouterr()
    for extra, message in (
        (["--if-labels", str(labels_f), "--cells", str(tmp_path / "seg" / "he2")], "another segment output"),
        (["--if-labels", str(tmp_path / "bad.parquet"), "--cells", str(seg)], "cell ids (e.g. [1000000000])"),
        (["--if-labels", str(tmp_path / "nocols.parquet"), "--cells", str(seg)], "['label', 'kept', 'marker']"),
        (["--if-labels", str(labels_f)], "--if-labels and --cells go together"),
    ):
        assert main(["classifier", "dataset", *extra, "--out", str(tmp_path / "bad.npz")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad.npz").exists()


@needs_shared
def test_label_from_if_without_cells_keeps_the_segment_output_it_labelled(tmp_path):
    """No ``--cells``: the H&E is segmented (default model) into OUT/segmentation/<stem>/, a full ``cytoken
    segment`` output, its cells are labelled, and ``classifier dataset --if-labels OUT --cells`` that folder joins."""
    import pyarrow.parquet as pq

    from cytoken.cli.main import main
    from cytoken.io.ifimage import write_ome_tiff
    from cytoken.pipeline.classifier import load_embedding_set
    from cytoken.weights import file_sha256

    he, inst, ids, truth = _load(PROOF_TILES[0])
    synth = synthesize_if(inst, ids[truth], he_mpp=HE_MPP, if_mpp=IF_MPP, seed=0)
    Image.fromarray(he).save(tmp_path / "he.png")
    write_ome_tiff(synth.image, tmp_path / "if.ome.tif")
    out = tmp_path / "out"
    argv = ["label-from-if", "--he", str(tmp_path / "he.png"), "--he-mpp", str(HE_MPP), "--if",
            str(tmp_path / "if.ome.tif"), "--marker", "MARKER", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    seg = out / "segmentation" / "he"
    for f in ("cells.parquet", "cells.geojson", "embeddings.npy", "run.json"):
        assert (seg / f).is_file(), f
    table = pq.read_table(out / "labels.parquet")
    assert table.schema.metadata[b"cytoken.cells_sha256"].decode() == file_sha256(seg / "cells.parquet")
    cells = pq.read_table(seg / "cells.parquet").to_pandas()
    labels = table.to_pandas()
    assert sorted(labels["cell_id"]) == sorted(cells["id"]) and labels["kept"].sum() > 50
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cells"]["cells_output"] == str(seg)
    assert main(["classifier", "dataset", "--if-labels", str(out), "--cells", str(seg),
                 "--out", str(tmp_path / "set.npz")]) == 0  # fmt: skip
    lab, _ = load_embedding_set(tmp_path / "set.npz")
    kept = labels[labels["kept"]]
    assert len(lab.labels) == len(kept)
    np.testing.assert_array_equal(lab.labels, kept["label"].to_numpy())

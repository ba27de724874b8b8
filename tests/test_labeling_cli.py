"""``cytoken label-from-if`` through the command: refusals (non-overlap, unknown marker, empty / all-positive masks),
channel selection by index, one file per marker, registration options and the IF resampled onto the H&E grid.

Real CoNSeP H&E fields with synthetic IF (:func:`synthesize_if`): the "matching" IF is rendered from the H&E's own
expert nuclei; the "unrelated" IF from two other fields, so no transform can align it.
"""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cytoken.cli.main import main
from cytoken.io.ifimage import read_if, write_ome_tiff
from cytoken.labeling import (
    RegistrationConfig,
    label_from_if_slide,
    read_registration,
    register,
    register_tiled,
    synthesize_if,
)
from cytoken.types import CytokenError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CONSEP = SHARED / "consep_patched" / "test"
HE_MPP, IF_MPP = 0.25, 0.5
HE_FIELDS = ("test_13_005", "test_10_010")  # the H&E: two fields side by side (256 x 512)
OTHER_FIELDS = ("test_11_010", "test_5_005")  # the unrelated IF is made from these


@pytest.fixture(scope="module")
def data(tmp_path_factory, consep_mosaic):
    pytest.importorskip("SimpleITK", reason="SimpleITK (cytoken[labeling]) not installed")
    d = tmp_path_factory.mktemp("ifcli")
    he, inst, ids, pos = consep_mosaic(HE_FIELDS, CONSEP)
    _, other_inst, other_ids, other_pos = consep_mosaic(OTHER_FIELDS, CONSEP)
    match = synthesize_if(inst, ids[pos], he_mpp=HE_MPP, if_mpp=IF_MPP, seed=2).image
    unrelated = synthesize_if(other_inst, other_ids[other_pos], he_mpp=HE_MPP, if_mpp=IF_MPP, seed=1).image
    Image.fromarray(he).save(d / "he.png")
    Image.fromarray(inst.astype(np.int32)).save(d / "cells.tif")
    write_ome_tiff(match, d / "if.ome.tif")
    write_ome_tiff(unrelated, d / "unrelated.ome.tif")
    Image.fromarray(match.channel("DAPI")).save(d / "dapi.png")  # one single-channel file per channel
    Image.fromarray(match.channel("MARKER")).save(d / "cd3.png")
    cfg = RegistrationConfig(threads=1)
    register(he, match, he_mpp=HE_MPP, config=cfg).save(d / "reg_image.json")
    tr = register_tiled(he, match, he_mpp=HE_MPP, tile_px=256, overview_mpp=1.0, config=cfg)
    assert tr.n_refined == 2, tr.errors
    tr.save(d / "reg_slide.json")
    return {"dir": d, "he": he, "inst": inst, "match": match, "tr": tr}


def _argv(d: Path, out: Path, *extra: str, if_file: str = "if.ome.tif") -> list[str]:
    return ["label-from-if", "--he", str(d / "he.png"), "--he-mpp", str(HE_MPP), "--if", str(d / if_file),
            "--cells", str(d / "cells.tif"), "--out", str(out), *extra]  # fmt: skip


def _refused(capsys, argv: list[str], out: Path) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cytoken: error: ") and err.count("\n") == 1, err  # one line, no traceback
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*")), "a temporary output folder was left behind"
    return err


def test_unrelated_images_are_refused_in_every_mode(data, tmp_path, capsys):
    """H&E of two fields, IF of two other fields: image mode, slide mode with either --failed-tiles, all refuse with
    the measured residual and matched fraction and write nothing (--failed-tiles overview used to label them)."""
    d = data["dir"]
    for mode, extra in (
        ("image", ["--tile-px", "1024"]),
        ("skip", ["--tile-px", "256", "--failed-tiles", "skip"]),
        ("overview", ["--tile-px", "256", "--failed-tiles", "overview"]),
    ):
        out = tmp_path / f"out_{mode}"
        err = _refused(capsys, _argv(d, out, "--marker", "MARKER", *extra, if_file="unrelated.ome.tif"), out)
        assert "registration failed" in err and "median nucleus residual" in err, err
        assert "matched fraction" in err and "max_residual_px=4.0" in err, err
        if mode != "image":
            assert "no tile of the slide registered" in err
        if mode == "overview":
            assert "overview transform on this tile: registration failed" in err, err


def test_overview_stands_in_only_where_it_passes_the_guard(data, monkeypatch):
    """Refinement forced to fail on the matching pair: the overview passes the nucleus guard on both tiles and is
    used with --failed-tiles overview; a tile where it failed, or a file without the check, is still skipped."""
    import cytoken.labeling.tiled as tiled

    monkeypatch.setattr(tiled, "_refine_tile", lambda *a, **k: (None, "forced failure"))
    he, img, inst = data["he"], data["match"], data["inst"]
    tr = register_tiled(he, img, he_mpp=HE_MPP, tile_px=256, config=RegistrationConfig(threads=1))
    assert tr.n_refined == 0 and tr.overview_errors == [None, None]
    res = label_from_if_slide(he, img, inst, he_mpp=HE_MPP, marker="MARKER", registration=tr, failed_tiles="overview")
    assert res.tiles_used.tolist() == [True, True]
    with pytest.raises(CytokenError, match="no tile of the slide registered: tile 0: forced failure"):
        label_from_if_slide(he, img, inst, he_mpp=HE_MPP, marker="MARKER", registration=tr)
    one_bad = replace(tr, overview_errors=[None, "overview transform on this tile: registration failed"])
    res = label_from_if_slide(he, img, inst, he_mpp=HE_MPP, marker="MARKER", registration=one_bad,
                              failed_tiles="overview")  # fmt: skip
    assert res.tiles_used.tolist() == [True, False]
    unchecked = replace(tr, overview_errors=None)  # e.g. a registration file written before the check
    with pytest.raises(CytokenError, match="overview transform not checked"):
        label_from_if_slide(he, img, inst, he_mpp=HE_MPP, marker="MARKER", registration=unchecked,
                            failed_tiles="overview")  # fmt: skip


def test_overview_errors_are_saved_with_the_tiled_registration(data, tmp_path):
    tr = replace(data["tr"], overview_errors=[None, "overview transform on this tile: failed"])
    back = read_registration(tr.save(tmp_path / "r.json"))
    assert back.overview_errors == tr.overview_errors
    doc = json.loads((tmp_path / "r.json").read_text())
    del doc["overview_errors"]
    (tmp_path / "old.json").write_text(json.dumps(doc))
    assert read_registration(tmp_path / "old.json").overview_errors is None


def test_per_marker_files_channel_index_affine_and_warped_if(data, tmp_path):
    """--if NAME=FILE per channel (PNGs), --marker/--nuclear-channel by index, --transform affine: labels, the
    registration quality as a dict in summary.json, and the IF on the H&E grid with its channel names."""
    import pyarrow.parquet as pq

    d, out = data["dir"], tmp_path / "out"
    argv = ["label-from-if", "--he", str(d / "he.png"), "--he-mpp", str(HE_MPP), "--if", f"DAPI={d / 'dapi.png'}",
            "--if", f"CD3={d / 'cd3.png'}", "--if-mpp", str(IF_MPP), "--marker", "1", "--nuclear-channel", "0",
            "--transform", "affine", "--tile-px", "1024", "--cells", str(d / "cells.tif"),
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "image" and summary["marker"] == "CD3"
    q = summary["quality"]
    assert isinstance(q, dict) and q["residual_px_after"] <= 4.0 < q["residual_px_before"], q
    reg = json.loads((out / "registration.json").read_text())
    assert "AffineTransform" in reg["itk_transform"] and reg["nuclear_channel"] == "DAPI"
    warped = read_if(out / "if_on_he.ome.tif")
    assert warped.channel_names == ("DAPI", "CD3")
    assert warped.data.shape == (2, *data["he"].shape[:2]) and warped.mpp == pytest.approx(HE_MPP)
    labels = pq.read_table(out / "labels.parquet").to_pandas()
    assert set(labels["marker"]) == {"CD3"} and labels["kept"].mean() > 0.8


def test_registration_options_reach_the_config():
    from cytoken.cli.label_from_if import _registration_config
    from cytoken.cli.main import build_parser

    base = ["label-from-if", "--he", "h.png", "--if", "i.tif", "--marker", "CD3", "--out", "o"]
    cfg = _registration_config(build_parser().parse_args(base), "DAPI")
    assert (cfg.linear, cfg.bspline_grid_um, cfg.max_residual_px) == ("rigid", 32.0, 4.0)
    args = build_parser().parse_args([*base, "--transform", "affine", "--bspline-grid-um", "none",
                                      "--max-residual-px", "2.5"])  # fmt: skip
    cfg = _registration_config(args, "DAPI")
    assert (cfg.linear, cfg.bspline_grid_um, cfg.max_residual_px) == ("affine", None, 2.5)
    for text, grid in (("0", None), ("off", None), ("16", 16.0)):
        args = build_parser().parse_args([*base, "--bspline-grid-um", text])
        assert _registration_config(args, "DAPI").bspline_grid_um == grid
    for bad in (["--transform", "similarity"], ["--bspline-grid-um", "-3"], ["--max-residual-px", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*base, *bad])


@pytest.mark.parametrize("mode", ["image", "slide"])
def test_bad_inputs_are_refused_with_their_numbers(data, tmp_path, capsys, mode):
    """Unknown marker (name or index), an empty and an all-positive mask: exit 2, one line with the channels or the
    signal statistics, no output folder. The saved registration is reused, so nothing is fitted."""
    d = data["dir"]
    reg = ["--registration", str(d / f"reg_{mode}.json"), "--tile-px", "1024" if mode == "image" else "256"]
    prefix = "slide marker mask" if mode == "slide" else "marker mask"
    for name, extra, pattern in (
        ("unknown", ["--marker", "CD8"], r"channel 'CD8' not found.*available channels: \['DAPI', 'MARKER'\]"),
        ("index", ["--marker", "5"], r"channel index 5 out of range.*2 channels \['DAPI', 'MARKER'\]"),
        ("empty", ["--marker", "MARKER", "--threshold", "10000"],
         rf"{prefix} is empty \(0 positive px < min_positive_px=1\) with method 'fixed': n_valid=.*median="),
        ("all", ["--marker", "1", "--threshold", "0"],
         rf"{prefix} is \(almost\) all positive \(\d+\.\d% > max_positive_fraction=0.95\).*median="),
    ):  # fmt: skip
        out = tmp_path / f"out_{name}"
        err = _refused(capsys, _argv(d, out, *reg, *extra), out)
        assert __import__("re").search(pattern, err), err
    ok = tmp_path / "ok"
    assert main(_argv(d, ok, *reg, "--marker", "1")) == 0  # the same call with a usable marker works
    summary = json.loads((ok / "summary.json").read_text())
    assert summary["mode"] == mode and summary["marker"] == "MARKER"
    if mode == "slide":
        assert [t["used"] for t in summary["tiles"]] == [True, True]
        assert isinstance(summary["overview_quality"], dict)
        assert not (ok / "if_on_he.ome.tif").exists()  # a slide-sized float image is not written
    else:
        assert (ok / "if_on_he.ome.tif").is_file()

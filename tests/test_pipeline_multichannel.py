"""Multi-channel inputs through the segmentation pipeline: channels picked by name, per-channel scaling, C-channel
windows, outputs, the CLI (images, H&E + IF, whole-slide streaming) and clear errors.

Real data: a crop of the Vectra qptiff in ``if_sample/`` (channels DAPI, FITC, Cy3) and a MoNuSeg H&E tile with a
**synthetic** IF stack (DAPI and CD3 drawn from the tile's nucleus labels). The model is a tiny random ViT whose
nucleus bias is shifted so it finds some (meaningless) cells; what is tested is the plumbing, not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cytoken.cli.main import main
from cytoken.io.ifimage import IFImage, match_channels, read_if, write_ome_tiff
from cytoken.metrics import panoptic_quality
from cytoken.models import SegmenterConfig, build_segmenter, save_segmenter
from cytoken.models.multichannel import model_channels, stack_channels
from cytoken.pipeline.image import SegmentConfig, segment_image, segment_image_with_labels, select_model_channels
from cytoken.pipeline.predictor import Predictor, TileOutput
from cytoken.postprocess.hover import hv_targets
from cytoken.types import CytokenError

torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")
QPTIFF = SHARED / "if_sample" / "small_vectra.qptiff"
HE_NAME = "TCGA-2Z-A9J9-01A-01-TS1.png"
# the FITC and Cy3 planes of the file stand in for the model's CD3 and PanCK
MAPPING = ("CD3=FITC", "PanCK=Cy3")
TINY = {"encoder": "vit_tiny_test", "num_classes": 2, "tile_size": 64, "overlap": 16,
        "decoder_kwargs": {"width_factor": 0.125}}  # fmt: skip


def _calibrated(cfg: SegmenterConfig, x: np.ndarray) -> torch.nn.Module:
    """A random model whose nucleus bias puts ~30 % of ``x`` (C, H, W in [0, 1]) in the foreground."""
    torch.manual_seed(0)
    m = build_segmenter(cfg).eval()
    with torch.no_grad():
        out = m(m.preprocess(torch.from_numpy(x)[None]))
        d = (out.nuclei_logits[:, 1] - out.nuclei_logits[:, 0]).flatten()
        m.heads.nuclei.bias[1] -= float(torch.quantile(d, 0.7))
    return m


def _same_cells(a, b) -> None:
    assert len(a) == len(b) > 0
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.class_ids, b.class_ids)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert all(np.array_equal(p, q) for p, q in zip(a.contours, b.contours))


@pytest.fixture(scope="module")
def crop() -> IFImage:
    if not SHARED.exists():
        pytest.skip("../shared/data not present")
    img = read_if(QPTIFF)
    assert img.channel_names == ("DAPI", "FITC", "Cy3") and img.data.dtype == np.uint8
    return IFImage(img.data[:, 600:728, 800:928], img.channel_names, mpp=img.mpp)


@pytest.fixture(scope="module")
def if_model(crop: IFImage, tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    cfg = SegmenterConfig(in_chans=3, channels=["DAPI", "CD3", "PanCK"], mpp=crop.mpp, **TINY)
    x = model_channels(IFImage(crop.data, ("DAPI", "CD3", "PanCK")), cfg)
    m = _calibrated(cfg, x)
    return m, save_segmenter(m, tmp_path_factory.mktemp("m") / "if3.safetensors")


# ------------------------------------------------------------------------------------------------ unit level
def test_match_channels_rules_and_one_clear_error() -> None:
    avail = ("DAPI", "FITC", "Cy3")
    assert match_channels(avail, ("cy3", "dapi")) == [2, 0]
    assert match_channels(avail, ("DAPI", "CD3", "PanCK"), list(MAPPING)) == [0, 1, 2]
    assert match_channels(avail, ("DAPI", "CD3", "PanCK"), {"CD3": "cy3", "PanCK": 1}) == [0, 2, 1]
    assert match_channels(avail, ("a", "b", "c"), ["2", "Cy3", "dapi"]) == [2, 2, 0]
    with pytest.raises(CytokenError, match=r"lacks channel\(s\) the model reads: CD3, PanCK; available channels: "
                                           r"\['DAPI', 'FITC', 'Cy3'\]"):  # fmt: skip
        match_channels(avail, ("DAPI", "CD3", "PanCK"))
    with pytest.raises(CytokenError, match=r"CD3 \(mapped to 'CD8'\)"):
        match_channels(avail, ("DAPI", "CD3"), ["CD3=CD8"])
    with pytest.raises(CytokenError, match="does not read"):
        match_channels(avail, ("DAPI", "CD3"), ["CD45=FITC"])
    with pytest.raises(CytokenError, match="gives 2 channels; the model reads 3"):
        match_channels(avail, ("DAPI", "CD3", "PanCK"), ["DAPI", "FITC"])
    with pytest.raises(CytokenError, match="not a mix"):
        match_channels(avail, ("DAPI", "CD3"), ["DAPI", "CD3=FITC"])


@needs_data
@pytest.mark.parametrize("rule", ["dtype", "percentile"])
def test_scaling_matches_the_training_side_helper(crop: IFImage, rule: str) -> None:
    """The pipeline's per-channel scaling is bit-identical to models.multichannel.model_channels."""
    cfg = SegmenterConfig(in_chans=2, channels=["cy3", "DAPI"])
    data, plan = select_model_channels(crop, cfg, intensity=rule)
    assert data.shape == (128, 128, 2) and plan.sources == ("Cy3", "DAPI")
    np.testing.assert_array_equal(plan.to_unit(data), model_channels(crop, cfg, scale=rule))
    if rule == "dtype":
        assert plan.high == (255.0, 255.0)
    else:
        assert plan.low[1] == np.percentile(crop.data[0].astype(np.float32), 0.5)


class ChannelOracle(Predictor):
    """Perfect maps from instance ids stored in channel ``k`` of (B, C, H, W) float inputs (uint16 ids / 65535)."""

    def __init__(self, cfg: SegmenterConfig, k: int) -> None:
        self.model = type("M", (), {"config": cfg, "patch_size": 16})()
        self.device = "cpu"
        self.k = k
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, tiles: np.ndarray) -> list[TileOutput]:
        self.shapes.append(tiles.shape)
        outs = []
        for t in tiles:
            inst = np.rint(t[self.k] * 65535).astype(np.int32)
            h, w = inst.shape
            outs.append(TileOutput((inst > 0).astype(np.float32), hv_targets(inst), None,
                                   np.zeros((4, h // 16, w // 16), np.float32)))  # fmt: skip
        return outs


def test_c_channel_windows_keep_every_cell_once_and_ignore_file_order() -> None:
    rng = np.random.default_rng(0)
    lab = np.zeros((300, 350), np.int32)
    yy, xx = np.indices(lab.shape)
    k = 0
    for cy, cx in rng.integers(10, 290, (400, 2)):
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= 64
        if (lab[m] == 0).all():
            k += 1
            lab[m] = k
    noise = rng.integers(0, 65535, (3, *lab.shape), dtype=np.uint16)
    cfg = SegmenterConfig(encoder="vit_tiny_test", in_chans=4, channels=["DAPI", "Ki67", "CD3", "PanCK"], mpp=0.25,
                          tile_size=96, overlap=32)  # fmt: skip
    oracle = ChannelOracle(cfg, k=2)  # model channel 2 = CD3 carries the ids
    img = IFImage(np.stack([noise[0], lab.astype(np.uint16), noise[1], noise[2]]), ("PanCK", "cd3", "dapi", "Ki67"))
    cells, labels = segment_image_with_labels(img, oracle, mpp=0.25)
    assert oracle.shapes[0][1:] == (4, 96, 96)
    assert len(cells) == k and labels.shape == lab.shape
    assert sorted(np.unique(labels[labels > 0]).tolist()) == list(range(1, k + 1))
    pq = panoptic_quality(lab, labels)  # touching disks may trade a boundary pixel in HoVer decoding
    assert pq.tp == k and pq.fp == pq.fn == 0 and pq.sq > 0.99
    permuted = img.select(["Ki67", "dapi", "cd3", "PanCK"])
    again = segment_image(permuted, ChannelOracle(cfg, k=2), mpp=0.25)
    np.testing.assert_array_equal(again.centroids, cells.centroids)
    assert cells.meta["channels"]["map"] == {"DAPI": "dapi", "Ki67": "Ki67", "CD3": "cd3", "PanCK": "PanCK"}


# ------------------------------------------------------------------------------------------------ real qptiff
@needs_data
def test_real_qptiff_crop_by_name(crop: IFImage, if_model: tuple) -> None:
    model, _ = if_model
    cfg = SegmentConfig(channels=MAPPING)
    cells, labels = segment_image_with_labels(crop, model, config=cfg)
    assert labels.shape == crop.shape and labels.max() == len(cells)
    assert cells.embeddings.shape == (len(cells), 32) and (cells.centroids < 128).all()
    assert cells.meta["channels"]["map"] == {"DAPI": "DAPI", "CD3": "FITC", "PanCK": "Cy3"}
    # the same channels in another file order (and other letter case) give identical cells
    permuted = IFImage(crop.data[[2, 0, 1]], ("CY3", "dapi", "Fitc"), mpp=crop.mpp)
    _same_cells(segment_image(permuted, model, config=cfg), cells)
    # an (H, W, C) array in the model's order needs no names
    _same_cells(segment_image(np.moveaxis(crop.data, 0, -1), model, crop.mpp), cells)
    with pytest.raises(CytokenError, match=r"lacks channel\(s\) the model reads: CD3, PanCK; available"):
        segment_image(crop, model)


@needs_data
def test_cli_on_real_qptiff_crop_and_npy(crop: IFImage, if_model: tuple, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    _, weights = if_model
    ome = write_ome_tiff(crop, tmp_path / "crop.ome.tif")
    perm = tmp_path / "perm.npy"  # the same channels as a .npy stack in another order, names in a sidecar
    np.save(perm, crop.data[[1, 2, 0]])
    (tmp_path / "perm.channels.txt").write_text("FITC\nCy3\nDAPI\n")
    out = tmp_path / "out"
    base = ["--out", str(out), "--model", str(weights), "--channels", ",".join(MAPPING), "--quiet"]
    assert main(["segment", str(ome), *base]) == 0
    assert main(["segment", str(perm), "--mpp", str(crop.mpp), *base]) == 0
    a, b = out / "crop.ome", out / "perm"
    run = json.loads((a / "run.json").read_text())
    assert run["channels"]["map"] == {"DAPI": "DAPI", "CD3": "FITC", "PanCK": "Cy3"} and run["cells"] > 0
    assert run["image_size"] == [128, 128] and run["mpp"] == pytest.approx(crop.mpp)
    assert np.asarray(Image.open(a / "overlay.png")).shape[:2] == (128, 128)
    assert json.loads((b / "cells.json").read_text())["cells"] == json.loads((a / "cells.json").read_text())["cells"]
    assert np.array_equal(np.load(a / "embeddings.npy"), np.load(b / "embeddings.npy"))
    capsys.readouterr()
    assert main(["segment", str(ome), "--out", str(tmp_path / "bad"), "--model", str(weights), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("cytoken: error:") == 1 and "Traceback" not in err
    assert "CD3, PanCK" in err and "['DAPI', 'FITC', 'Cy3']" in err and not (tmp_path / "bad" / "crop.ome").exists()


@needs_data
def test_cli_streams_the_real_qptiff_as_a_slide(if_model: tuple, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    _, weights = if_model
    out = tmp_path / "out"
    argv = ["segment", str(QPTIFF), "--slide", "--roi", "800,600,96,96", "--out", str(out), "--model", str(weights),
            "--channels", "DAPI,FITC,Cy3", "--read-workers", "0", "--decode-workers", "0", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    run = json.loads((out / "small_vectra" / "run.json").read_text())
    assert run["channels"]["map"] == {"DAPI": "DAPI", "CD3": "FITC", "PanCK": "Cy3"} and run["tiles"] == 4
    cells = json.loads((out / "small_vectra" / "cells.json").read_text())["cells"]
    assert cells and all(790 <= c["centroid"][0] <= 906 and 590 <= c["centroid"][1] <= 706 for c in cells)
    capsys.readouterr()
    assert main([*argv[:-1], "--intensity", "percentile", "--quiet"]) == 2
    assert "not available for whole slides" in capsys.readouterr().err


@needs_data
def test_rgb_model_refuses_a_fluorescence_slide(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rgb = save_segmenter(build_segmenter(SegmenterConfig(**TINY)), tmp_path / "rgb.safetensors")
    assert main(["segment", str(QPTIFF), "--slide", "--out", str(tmp_path / "o"), "--model", str(rgb), "--quiet"]) == 2
    assert "the model reads RGB but the slide has 3 channel(s) of uint8 (DAPI, FITC, Cy3)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ H&E + IF
@pytest.fixture(scope="module")
def he_if() -> tuple[np.ndarray, IFImage]:
    """A real MoNuSeg H&E crop and a SYNTHETIC 2-channel uint16 IF image drawn from its nucleus labels."""
    if not SHARED.exists():
        pytest.skip("../shared/data not present")
    from scipy import ndimage as ndi

    he = np.array(Image.open(SHARED / "monuseg" / "test" / "images" / HE_NAME))[:128, :128]
    labels = np.array(Image.open(SHARED / "monuseg" / "test" / "labels" / HE_NAME))[:128, :128]
    ids = np.unique(labels[labels > 0])
    dapi = ndi.gaussian_filter((labels > 0).astype(np.float32), 1.0)
    cd3 = ndi.gaussian_filter(np.isin(labels, ids[::3]).astype(np.float32), 1.5)
    return he, IFImage((np.stack([cd3, dapi]) * 40000).astype(np.uint16), ("CD3", "DAPI"), mpp=0.25)


@needs_data
def test_he_plus_synthetic_if(he_if: tuple, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    he, if_img = he_if
    cfg = SegmenterConfig(in_chans=5, channels=["R", "G", "B", "DAPI", "CD3"], mpp=0.25, **TINY)
    stacked = stack_channels(he, if_img)  # the documented way to pre-stack: float [0, 1] channels R, G, B, CD3, DAPI
    m = _calibrated(cfg, model_channels(stacked, cfg))
    cells, labels = segment_image_with_labels(if_img, m, config=SegmentConfig(), he=he)
    assert labels.shape == (128, 128) and len(cells) > 0
    assert cells.meta["channels"]["high"] == [255.0] * 3 + [65535.0] * 2
    _same_cells(segment_image(stacked, m, mpp=0.25), cells)  # pre-stacked file == --he stacking
    # through the CLI: IF as OME-TIFF, H&E as PNG
    ome = write_ome_tiff(if_img, tmp_path / "if.ome.tif")
    Image.fromarray(he).save(tmp_path / "he.png")
    weights = save_segmenter(m, tmp_path / "he_if.safetensors")
    out = tmp_path / "out"
    assert main(["segment", str(ome), "--he", str(tmp_path / "he.png"), "--out", str(out), "--model", str(weights),
                 "--quiet"]) == 0  # fmt: skip
    run = json.loads((out / "if.ome" / "run.json").read_text())
    assert run["cells"] == len(cells) and run["channels"]["map"]["R"] == "R" and run["channels"]["map"]["CD3"] == "CD3"
    overlay = np.asarray(Image.open(out / "if.ome" / "overlay.png").convert("RGB"))
    assert overlay.shape == (128, 128, 3) and (overlay == he).mean() > 0.5  # drawn on the H&E image
    Image.fromarray(he[:100]).save(tmp_path / "he_small.png")
    capsys.readouterr()
    assert main(["segment", str(ome), "--he", str(tmp_path / "he_small.png"), "--out", str(out / "x"), "--model",
                 str(weights), "--quiet"]) == 2  # fmt: skip
    assert "register them onto one pixel grid" in capsys.readouterr().err
    with pytest.raises(CytokenError, match=r"lacks channel\(s\) the model reads: R, G, B"):
        segment_image(if_img, m)  # no H&E given

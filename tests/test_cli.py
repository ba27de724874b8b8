"""The command line: a full run, every bad input of `segment` (one clear error, exit 2, no partial output), and the
classifier workflow dataset -> train -> evaluate -> apply on real labelled data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cytoken.cli.main import main
from cytoken.models import SegmenterConfig, build_segmenter, save_segmenter
from cytoken.models.store import read_config
from cytoken.weights import get_entry

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    p = tmp_path / "img.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (100, 120, 3), dtype=np.uint8)).save(p)
    return p


def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("cytoken: error:")]
    assert len(errors) == 1, err  # one error (its message may list details on following lines)
    assert "Traceback" not in err
    return err[err.index("cytoken: error:") :]


def test_segment_writes_all_outputs(tmp_path: Path, image: Path, tiny_model: Path) -> None:
    assert main(["segment", str(image), "--mpp", "0.25", "--out", str(tmp_path / "o"), "--model", str(tiny_model),
                 "--quiet"]) == 0  # fmt: skip
    out = tmp_path / "o" / "img"
    for name in ("cells.geojson", "cells.json", "cell_detection.json", "cells.parquet", "overlay.png", "run.json"):
        assert (out / name).is_file(), name
    gj = json.loads((out / "cells.geojson").read_text())
    assert gj["type"] == "FeatureCollection"
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["sha256"] and run["mpp"] == 0.25
    assert run["amp"] is False


def test_segment_amp_flag_reaches_the_predictor(tmp_path: Path, image: Path, tiny_model: Path) -> None:
    assert main(["segment", str(image), "--mpp", "0.25", "--out", str(tmp_path / "o"), "--model", str(tiny_model),
                 "--amp", "--quiet"]) == 0  # fmt: skip
    run = json.loads((tmp_path / "o" / "img" / "run.json").read_text())
    assert run["amp"] is True


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("not_image", "not a readable image"),
        ("truncated", "truncated|corrupt|cannot"),
        ("tiny", "at least 32 px"),
        ("unknown_model", "unknown model 'no-such-model'"),
        ("wrong_arch", "do not fit|not a cytoken segmenter"),
        ("bad_mpp", "outside the plausible range"),
        ("negative_mpp", "positive"),
        ("zero_mpp", "positive"),
        ("nan_mpp", "positive"),
        ("tiny_mpp", "outside the plausible range"),
        ("text_mpp", "could not convert"),
        ("unwritable", "cannot|not a directory|exists"),
        ("no_mpp", "--mpp"),
        ("huge_png", r"is over 178,956,970 px, too large to read as a single image; .*`cytoken segment --slide`"),
        ("huge_unknown_extension", r"huge\.scan is over .* px, too large .*`cytoken segment --slide`"),
    ],
)
def test_segment_bad_inputs(case: str, pattern: str, tmp_path: Path, image: Path, tiny_model: Path,
                            capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    import re

    out = tmp_path / "out"
    argv = ["segment", str(image), "--mpp", "0.25", "--out", str(out), "--model", str(tiny_model), "--quiet"]
    if case == "not_image":
        bad = tmp_path / "notes.png"
        bad.write_text("hello, I am text")
        argv[1] = str(bad)
    elif case == "truncated":
        bad = tmp_path / "cut.png"
        bad.write_bytes(image.read_bytes()[:400])
        argv[1] = str(bad)
    elif case == "tiny":
        small = tmp_path / "small.png"
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(small)
        argv[1] = str(small)
    elif case == "unknown_model":
        argv[argv.index("--model") + 1] = "no-such-model"
    elif case == "wrong_arch":
        from safetensors.torch import load_file, save_file

        other = SegmenterConfig(encoder="vit_tiny_test", num_classes=5, tile_size=128, overlap=32)
        save_file(load_file(str(tiny_model)), str(tmp_path / "w.safetensors"),
                  metadata={"cytoken.segmenter_config": other.model_dump_json()})  # fmt: skip
        argv[argv.index("--model") + 1] = str(tmp_path / "w.safetensors")
    elif case == "bad_mpp":
        argv[argv.index("--mpp") + 1] = "12"
    elif case.endswith("_mpp") and case != "no_mpp":
        argv[argv.index("--mpp") + 1] = {"negative_mpp": "-0.25", "zero_mpp": "0", "nan_mpp": "nan",
                                         "tiny_mpp": "0.01", "text_mpp": "abc"}[case]  # fmt: skip
    elif case == "unwritable":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        argv[argv.index("--out") + 1] = str(blocker / "sub")
    elif case == "no_mpp":
        argv.remove("--mpp")
        argv.remove("0.25")
    elif case.startswith("huge"):  # a PNG header of 20000 x 10000 px: image mode refuses it, --slide is the way
        import struct
        import zlib

        ihdr = struct.pack(">IIBBBBB", 20000, 10000, 8, 2, 0, 0, 0)
        chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
        end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
        huge = tmp_path / ("huge.png" if case == "huge_png" else "huge.scan")
        huge.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk + end)
        argv[1] = str(huge)
    if case.endswith("_mpp") and case != "no_mpp":  # argparse rejects it: one line too, exit 2, no usage dump
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("cytoken: error: segment: argument --mpp: ") and err.count("\n") == 1, err
        assert re.search(pattern, err), err
        return
    msg = _error(capsys, argv)
    assert re.search(pattern, msg, re.IGNORECASE), msg
    left = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    assert left == [], f"partial output left: {left}"  # hidden temp folders and stray files count too


@needs_data
def test_classifier_workflow_on_real_labels(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture) -> None:
    """nucls_sample (CellViT++ detection layout, real labels): dataset -> train -> evaluate -> apply."""
    root = SHARED / "nucls_sample"
    data = tmp_path / "set.npz"
    # the embedded default model (a random one finds no cells to label)
    assert main(["classifier", "dataset", "--dataset", "cellvit", "--data-root", str(root), "--split", "train",
                 "--model", "cytoken-default", "--mpp", "0.25", "--out", str(data), "--quiet"]) == 0  # fmt: skip
    assert "labels matched" in capsys.readouterr().out
    bundle = tmp_path / "bundle"
    rc = main(["classifier", "train", "--data", str(data), "--out", str(bundle), "--epochs", "3", "--val-fraction",
               "0.3"])  # fmt: skip
    assert rc == 0 and (bundle / "weights.safetensors").is_file()
    report = tmp_path / "r"
    assert main(["classifier", "evaluate", "--bundle", str(bundle), "--data", str(data), "--out", str(report)]) == 0
    assert (tmp_path / "r" / "confusion.png").is_file()
    img = sorted((root / "train" / "images").glob("*.png"))[0]
    assert main(["segment", str(img), "--mpp", "0.25", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    out = tmp_path / "o" / img.stem
    assert main(["classifier", "apply", str(out), "--bundle", str(bundle)]) == 0
    names = json.loads((bundle / "labels.json").read_text())
    run = json.loads((out / "run.json").read_text())
    assert run["classifier"]["bundle"] == str(bundle)
    assert set(run["cells_per_class"]) <= set(names.get("class_names", names.get("names", [])) or run["class_names"])
    # a bundle from another segmentation model is refused
    torch.manual_seed(1)
    dim = read_config(get_entry("cytoken-default").path).encoder_kwargs["embed_dim"]
    kw = {"depth": 2, "embed_dim": dim, "num_heads": 2}
    same_width = SegmenterConfig(encoder="cytoken_s16", encoder_kwargs=kw, tile_size=128, overlap=32)
    other = save_segmenter(build_segmenter(same_width), tmp_path / "other.safetensors")  # same width, another sha256
    msg = _error(capsys, ["segment", str(img), "--mpp", "0.25", "--out", str(tmp_path / "o2"), "--model", str(other),
                          "--classifier", str(bundle), "--quiet"])  # fmt: skip
    assert "retrain the classifier" in msg


@needs_data
def test_segment_hover_config_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--hover-config overrides the default model's stored post-processing; run.json records what was used."""
    src = SHARED / "monuseg" / "test" / "images" / "TCGA-2Z-A9J9-01A-01-TS1.png"
    crop = tmp_path / "crop.png"
    Image.open(src).convert("RGB").crop((0, 0, 256, 256)).save(crop)
    base = ["segment", str(crop), "--mpp", "0.25", "--quiet", "--embeddings", "none"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    stored = json.loads((tmp_path / "a" / "crop" / "run.json").read_text())
    tuned = read_config(get_entry("cytoken-default").path).postprocess
    for key in ("fg_threshold", "marker_threshold", "min_mean_prob"):  # cytoken-default's tuned parameters
        assert stored["postprocess"][key] == tuned[key], key
    cfg = tmp_path / "hover.yaml"
    cfg.write_text("preset: cellvit\nfg_threshold: 0.9\nmin_object_px: 200\n")
    assert main([*base, "--out", str(tmp_path / "b"), "--hover-config", str(cfg)]) == 0
    run = json.loads((tmp_path / "b" / "crop" / "run.json").read_text())
    assert run["postprocess"]["fg_threshold"] == 0.9 and run["postprocess"]["min_object_px"] == 200
    assert run["cells"] < stored["cells"]  # a stricter foreground and minimum size keep fewer cells
    cfg.write_text("fg_treshold: 0.4\n")
    err = _error(capsys, [*base, "--out", str(tmp_path / "c"), "--hover-config", str(cfg)])
    assert "unknown post-processing parameters ['fg_treshold']" in err
    cfg.write_text("preset: fancy\n")
    assert "unknown preset 'fancy'" in _error(capsys, [*base, "--out", str(tmp_path / "c"), "--hover-config", str(cfg)])
    cfg.write_text("fg_threshold: 1.5\n")
    assert "fg_threshold" in _error(capsys, [*base, "--out", str(tmp_path / "c"), "--hover-config", str(cfg)])
    cfg.write_text("fg_threshold: 0.4\nmin_object_px: 20\nfg_threshold: 0.5\n")
    err = _error(capsys, [*base, "--out", str(tmp_path / "c"), "--hover-config", str(cfg)])
    assert "key 'fg_threshold' appears twice (lines 1 and 3)" in err


def test_models_lists_the_default_with_licence_classifier_and_metrics(capsys: pytest.CaptureFixture) -> None:
    entry = get_entry("cytoken-default")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"cytoken-default {entry.version}  [embedded]")
    assert f"licence: {entry.licence}" in out and "research use only" in entry.licence
    assert "default cell classifier: cytoken-default-types [embedded]" in out
    # per-class metrics print as "class value" pairs, not as a Python dict
    assert "consep_patched_test_type_f1: other " in out and "{" not in out
    assert f"model card: {entry.card}" in out


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture) -> None:
    for argv, command in ((["segment"], "segment"), (["classifier", "train", "--bogus"], "classifier train"), ([], "")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "usage:" not in err, err
        assert err.startswith(f"cytoken: error: {command + ': ' if command else ''}"), err
        assert f"(see 'cytoken {command + ' ' if command else ''}--help')" in err, err


def test_every_option_has_help() -> None:
    import argparse

    from cytoken.cli.main import build_parser

    missing = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{name} {sub_name}")
            elif not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "cytoken")
    assert not missing, f"options without a --help line: {missing}"

"""`cytoken evaluate` on saved predictions, and training: exact resume after an interruption, bad configs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cytoken.cli.main import main
from cytoken.types import CytokenError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")


@needs_data
def test_evaluate_predictions_folder(tmp_path: Path) -> None:
    labels = sorted((SHARED / "monuseg" / "test" / "labels").glob("*.png"))
    preds = tmp_path / "pred"
    preds.mkdir()
    for p in labels:  # perfect predictions, with ids permuted
        lab = np.array(Image.open(p)).astype(np.int64)
        ids = np.unique(lab)
        perm = np.zeros(ids.max() + 1, np.int64)
        perm[ids[1:]] = np.random.default_rng(0).permutation(len(ids) - 1) + 1
        Image.fromarray(perm[lab].astype(np.uint16)).save(preds / p.name)
    out = tmp_path / "metrics.json"
    argv = ["evaluate", "--dataset", "monuseg", "--data-root", str(SHARED / "monuseg"), "--split", "test",
            "--predictions", str(preds), "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    m = json.loads(out.read_text())
    assert m["n_images"] == 14 and m["n_true"] == m["n_pred"] == 6697
    for k in ("bpq", "bdq", "bsq", "dice", "aji", "aji_plus", "det_f1", "det_precision", "det_recall"):
        assert m[k] == pytest.approx(1.0), k
    assert "conventions" in m and m["data"]["split"] == "test"
    # one missing prediction file is named
    (preds / labels[3].name).unlink()
    assert main(argv) == 2


def test_evaluate_bad_root(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", "--dataset", "monuseg", "--data-root", str(tmp_path), "--out", str(tmp_path / "m.json"),
                 "--predictions", str(tmp_path)]) == 2  # fmt: skip
    assert str(tmp_path) in capsys.readouterr().err


def _config(tmp_path: Path, out: str, **kw):
    from cytoken.training.config import TrainConfig

    raw = {
        "model": {"encoder": "vit_tiny_test", "num_classes": 4,
                  "class_names": ["other", "inflammatory", "epithelial", "spindle-shaped"],
                  "decoder_kwargs": {"width_factor": 0.125, "shared": True, "out_stride": 2}},
        "data": [{"dataset": "consep_patched", "root": str(SHARED / "consep_patched"), "val_fraction": 0.1}],
        "out_dir": str(tmp_path / out), "crop_size": 64, "batch_size": 2, "epochs": 3, "steps_per_epoch": 2,
        "ema_decay": 0.9, "num_workers": 0, "seed": 3, "lr": 1e-3,
    }  # fmt: skip
    raw.update(kw)
    return TrainConfig.model_validate(raw)


@needs_data
def test_training_killed_and_resumed_matches_uninterrupted(tmp_path: Path, monkeypatch) -> None:
    import cytoken.training.loop as loop

    # validation on every val crop is slow on CPU; the resume logic does not depend on it
    monkeypatch.setattr(loop, "validate", lambda *a, **k: {"bpq": 0.5, "dice": 0.5, "det_f1": 0.5})
    torch.manual_seed(0)
    full = loop.train_segmenter(_config(tmp_path, "full"), progress=False)
    part = loop.train_segmenter(_config(tmp_path, "cut"), progress=False, stop_after_epochs=1)
    assert part.epochs_run == 1 and full.epochs_run == 3
    shutil.copy(tmp_path / "cut" / "last.pt", tmp_path / "cut_epoch1.pt")
    resumed = loop.train_segmenter(_config(tmp_path, "cut"), resume=True, progress=False)
    assert resumed.epochs_run == 3
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    # a different architecture cannot resume that run
    other = _config(tmp_path, "cut", model={"encoder": "vit_tiny_test", "num_classes": 0})
    with pytest.raises(CytokenError, match="different model architecture"):
        loop.train_segmenter(other, resume=True, progress=False)


def test_training_config_errors_name_keys(tmp_path: Path) -> None:
    from cytoken.training.config import load_train_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: []\nout_dir: x\nlearning_rat: 0.1\n")
    with pytest.raises(CytokenError) as e:
        load_train_config(cfg)
    assert "learning_rat: unknown key" in str(e.value)
    cfg.write_text("lr: 0.1\n")
    with pytest.raises(CytokenError, match="data: missing key"):
        load_train_config(cfg)
    # a key given twice (e.g. a pasted second model: section) is refused, not "the last one wins"
    cfg.write_text("data: []\nout_dir: x\nmodel: {encoder: vit_tiny_test}\nlr: 0.1\nmodel: {encoder: cytoken_s16}\n")
    with pytest.raises(CytokenError, match=r"key 'model' appears twice \(lines 3 and 5\)"):
        load_train_config(cfg)
    cfg.write_text("- data\n- out_dir\n")
    with pytest.raises(CytokenError, match="expected a mapping of config keys, got list"):
        load_train_config(cfg)


@needs_data
def test_training_without_nuclei_is_an_error(tmp_path: Path) -> None:
    from cytoken.training.data import load_sources

    root = tmp_path / "empty"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(np.zeros((64, 64), np.uint16)).save(root / "labels" / "a.png")
    cfg = _config(tmp_path, "o", data=[{"dataset": "folder", "root": str(root), "split": "all", "mpp": 0.25,
                                        "val_fraction": 0.0, "use_types": False}])  # fmt: skip
    with pytest.raises(CytokenError, match="yields no nuclei"):
        load_sources(cfg)


@needs_data
@pytest.mark.slow
def test_ddp_two_cpu_processes_gloo(tmp_path: Path) -> None:
    """The training loop under torchrun with 2 CPU processes (gloo): both ranks step, rank 0 writes once.

    With a CPU budget (and each rank measuring its own time) the ranks still stop at the same step.
    """
    import subprocess
    import sys

    cfg = _config(tmp_path, "ddp", epochs=2000, cpu_budget_minutes=0.05, val_every=100)
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    script = tmp_path / "run.py"
    script.write_text(
        "import json, sys\n"
        "import cytoken.training.loop as loop\n"
        "from cytoken.training.config import TrainConfig\n"
        "loop.validate = lambda *a, **k: {'bpq': 0.5, 'dice': 0.5, 'det_f1': 0.5}\n"
        "cfg = TrainConfig.model_validate_json(open(sys.argv[1]).read())\n"
        "r = loop.train_segmenter(cfg, progress=False)\n"
        "import torch.distributed as dist\n"
        "steps = sum(row['steps'] for row in r.history)\n"
        "out = f'RANK {dist.get_rank()} WORLD {dist.get_world_size()} EPOCHS {r.epochs_run} STEPS {steps}'\n"
        "open(sys.argv[1] + f'.rank{dist.get_rank()}', 'w').write(out)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         str(script), str(tmp_path / "cfg.json")],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    # one file per process: printed lines of two processes can interleave
    ranks = [(tmp_path / f"cfg.json.rank{r}").read_text() for r in (0, 1)]
    r0, r1 = ranks
    assert r0.startswith("RANK 0 WORLD 2") and r1.startswith("RANK 1 WORLD 2")
    assert r0.split("EPOCHS")[1] == r1.split("EPOCHS")[1]  # same epochs and steps on both ranks
    epochs, steps = int(r0.split()[5]), int(r0.split()[7])
    assert 1 < epochs < 2000 and steps > 2  # the 3-CPU-second budget ended the run, not the epoch cap
    history = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)["history"]
    assert history[-1]["cpu_s"] >= 3.0
    assert (tmp_path / "ddp" / "last.pt").is_file() and (tmp_path / "ddp" / "metrics.csv").is_file()


def test_evaluate_pannuke_uses_its_tissue_convention(tmp_path: Path) -> None:
    """PanNuke fold in the published layout; a perfect-instance oracle: bPQ 1, mPQ by PanNuke's convention."""
    import sys

    from cytoken.io.datasets import open_dataset
    from cytoken.models import SegmenterConfig
    from cytoken.pipeline.evaluate import EvaluateConfig, evaluate

    sys.path.insert(0, str(Path(__file__).parent))
    from test_pipeline_image import Oracle, _OracleModel, encode

    n = 3
    masks = np.zeros((n, 64, 64, 6), np.float64)
    masks[:, 4:14, 4:14, 0] = 1  # neoplastic
    masks[:, 30:40, 30:40, 1] = 2  # inflammatory
    masks[..., 5] = (masks[..., :5].sum(-1) == 0)
    inst = np.zeros((n, 64, 64), np.int64)
    inst[:, 4:14, 4:14] = 1
    inst[:, 30:40, 30:40] = 2
    folder = tmp_path / "fold1"
    folder.mkdir()
    np.save(folder / "images.npy", np.stack([encode(i) for i in inst]).astype(np.float64))
    np.save(folder / "masks.npy", masks)
    np.save(folder / "types.npy", np.array(["Breast", "Colon", "Colon"]))
    ds = open_dataset("pannuke", tmp_path, split="fold1")
    oracle = Oracle(tile=64, overlap=16)
    names = list(ds.class_names)
    cfg = SegmenterConfig(encoder="vit_tiny_test", num_classes=len(names), class_names=names, tile_size=64, overlap=16)
    oracle.model = _OracleModel(cfg)
    m = evaluate(ds, oracle, EvaluateConfig(), progress=False)
    assert m["bpq"] == pytest.approx(1.0) and m["det_f1"] == pytest.approx(1.0)
    assert m["mpq_convention"] == "pannuke" and m["mpq"] == pytest.approx(0.0)  # the oracle predicts no classes


def test_cpu_budget_schedule_follows_the_budget() -> None:
    from cytoken.training.budget import CpuBudget

    b = CpuBudget(1.0, warmup_steps=4)  # 60 CPU-s
    assert [b.lr_factor(s, "cosine", 0.9, 10) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    b.used, b.used_at_warmup_end = 10.0, 10.0
    assert b.lr_factor(4, "cosine", 0.9, 10) == pytest.approx(1.0)
    b.used = 35.0  # half of the budget after warm-up
    assert b.lr_factor(9, "cosine", 0.9, 10) == pytest.approx(0.51)
    b.used = 60.0
    assert b.exhausted and b.lr_factor(99, "cosine", 0.9, 10) == pytest.approx(0.02)
    assert b.lr_factor(24, "exponential", 0.9, 10) == pytest.approx(0.9**2)
    assert b.lr_factor(24, "constant", 0.9, 10) == 1.0
    with pytest.raises(ValueError, match="positive"):
        CpuBudget(0, warmup_steps=0)


@needs_data
def test_training_stops_when_the_cpu_budget_is_spent(tmp_path: Path, monkeypatch) -> None:
    import cytoken.training.budget as budget_mod
    import cytoken.training.loop as loop

    calls = []
    monkeypatch.setattr(loop, "validate", lambda *a, **k: calls.append(1) or {"bpq": 0.5, "dice": 0.5, "det_f1": 0.5})
    clock = iter(range(0, 10**6, 10))  # a fake process clock: every reading is 10 CPU-s later than the one before
    monkeypatch.setattr(budget_mod.time, "process_time", lambda: float(next(clock)))
    cfg = _config(tmp_path, "budget", epochs=50, warmup_epochs=1, cpu_budget_minutes=1.0, val_every=100)
    r = loop.train_segmenter(cfg, progress=False)
    # 2 steps per epoch, 10 s per step: the budget of 60 s ends after step 6 (mid-run, far before epoch 50)
    assert r.epochs_run == 3 and sum(row["steps"] for row in r.history) == 6
    assert r.history[-1]["cpu_s"] >= 60 and calls == [1]  # the last epoch validates although val_every is 100
    # warm-up ends at 20 s; each step's rate is set from the budget fraction used before it: the last step (at
    # 50 of 60 s) runs at 3/4 of the cosine
    assert r.history[-1]["lr"] == pytest.approx(1e-3 * (0.02 + 0.49 * (1 + np.cos(0.75 * np.pi))))
    ck = torch.load(tmp_path / "budget" / "last.pt", weights_only=False)
    assert ck["budget"]["used"] >= 60
    # resuming a spent budget trains no further
    again = loop.train_segmenter(cfg, resume=True, progress=False)
    assert len(again.history) == 3


@needs_data
def test_validation_split_does_not_follow_the_run_seed(tmp_path: Path) -> None:
    from cytoken.training.data import load_sources

    def val_groups(**kw) -> list[str]:
        (src,) = load_sources(_config(tmp_path, "o", **kw))
        return sorted({s.source_id.rsplit("_", 1)[0] for s in src.val})

    # a continuation with another seed must not train on its start's validation images
    assert val_groups(seed=0) == val_groups(seed=1) == val_groups(seed=7)
    data = [{"dataset": "consep_patched", "root": str(SHARED / "consep_patched"), "val_fraction": 0.1,
             "split_seed": 2}]  # fmt: skip
    assert val_groups(data=data) != val_groups()

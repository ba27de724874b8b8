import json
import subprocess
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch

from cytoken.classify import (
    CellClassifier,
    LabelledCells,
    TrainConfig,
    auroc_per_class,
    check_compatible,
    evaluate,
    label_cells_from_masks,
    load_bundle,
    macro_auroc,
    match_instances,
    match_points,
    plot_confusion,
    read_split_file,
    save_bundle,
    search,
    split_by_group,
    split_from_files,
    train_classifier,
    train_many,
)
from cytoken.classify.dataset import instance_types
from cytoken.types import CytokenError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")
SRC = str(Path(__file__).resolve().parents[1] / "src")
SHA_A, SHA_B = "a" * 64, "b" * 64


def blobs(n=600, d=16, c=3, sep=2.0, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    centres = rng.normal(size=(c, d)) * sep
    x = (centres[y] + rng.normal(size=(n, d))).astype(np.float32)
    return x, y


# ------------------------------------------------------------ metrics


def pairwise_auroc(y_bin, s):
    pos, neg = s[y_bin], s[~y_bin]
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (len(pos) * len(neg))


def reference_macro_auroc(y, p):
    try:
        from sklearn.metrics import roc_auc_score

        return roc_auc_score(y, p, multi_class="ovr", average="macro")
    except ImportError:
        return np.mean([pairwise_auroc(y == c, p[:, c]) for c in range(p.shape[1])])


def test_macro_auroc_matches_reference_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    logits = np.round(rng.normal(size=(300, 4)) + np.eye(4)[y], 1)  # rounding creates many ties
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert macro_auroc(y, p) == pytest.approx(reference_macro_auroc(y, p), abs=1e-12)
    per = auroc_per_class(y, p)
    for c in range(4):
        assert per[c] == pytest.approx(pairwise_auroc(y == c, p[:, c]), abs=1e-12)
    # stacked models give the per-model values
    stacked = np.stack([p, p[:, ::-1], np.full_like(p, 0.25)])
    batched = macro_auroc(y, stacked)
    assert batched[0] == pytest.approx(macro_auroc(y, p))
    assert batched[1] == pytest.approx(macro_auroc(y, p[:, ::-1]))
    assert batched[2] == pytest.approx(0.5)  # all tied


def test_macro_auroc_binary_and_undefined_class():
    assert macro_auroc([0, 0, 1, 1], np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    p = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0]])
    per = auroc_per_class([0, 1, 0], p)
    assert np.isnan(per[2]) and macro_auroc([0, 1, 0], p) == pytest.approx(1.0)


def test_evaluate_by_hand_and_plot(tmp_path):
    y = [0, 0, 1, 1, 2]
    p = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1], [0.1, 0.7, 0.2], [0.1, 0.2, 0.7]])
    r = evaluate(y, p, ["a", "b", "c"])
    assert r.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    np.testing.assert_allclose(r.precision, [1.0, 2 / 3, 1.0])
    np.testing.assert_allclose(r.recall, [0.5, 1.0, 1.0])
    np.testing.assert_allclose(r.f1, [2 / 3, 0.8, 1.0])
    assert r.macro_f1 == pytest.approx((2 / 3 + 0.8 + 1) / 3)
    assert r.weighted_f1 == pytest.approx((2 * 2 / 3 + 2 * 0.8 + 1) / 5)
    assert r.accuracy == pytest.approx(0.8)
    json.dumps(r.to_dict())
    from PIL import Image

    out = plot_confusion(r.confusion, r.class_names, tmp_path / "cm.png", backend="pil")
    img = Image.open(out)
    assert img.format == "PNG" and img.size[0] > 150
    with pytest.raises(ValueError, match="C = len"):
        plot_confusion(r.confusion, ["a"], tmp_path / "x.png")


# ------------------------------------------------------------ model + config


def test_cell_classifier_layout_matches_cellvit_linear_classifier():
    m = CellClassifier(384, 128, 4)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"fc1.weight": (128, 384), "fc1.bias": (128,), "fc2.weight": (4, 128), "fc2.bias": (4,)}
    sd = {k: torch.randn(v) for k, v in shapes.items()}
    m2 = CellClassifier.from_state_dict(sd).eval()
    x = torch.randn(3, 384)
    ref = torch.relu(x @ sd["fc1.weight"].T + sd["fc1.bias"]) @ sd["fc2.weight"].T + sd["fc2.bias"]
    torch.testing.assert_close(m2(x), ref)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 51}, "epochs"),
        ({"schedule": "cosine"}, "schedule"),
        ({"lr": 0}, "lr"),
        ({"hidden": 0}, "hidden"),
    ],
)
def test_train_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)
    cfg = TrainConfig(hidden=128)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"hiden": 3})


# ------------------------------------------------------------ training


def test_classifier_learns_separable_problem():
    x, y = blobs(800, 16, 3, sep=1.5)
    res = train_classifier(x[:600], y[:600], x[600:], y[600:], TrainConfig(hidden=32, lr=3e-3, epochs=8))
    assert res.val_auroc > 0.95
    assert res.val_report is not None and res.val_report.macro_auroc == pytest.approx(res.val_auroc, abs=1e-6)
    assert res.predict_proba(x[600:]).shape == (200, 3)
    assert 1 <= res.best_epoch <= len(res.history) <= 8


def test_batched_trainer_matches_single_model_reference():
    x, y = blobs(500, 12, 3, sep=0.8, seed=1)
    configs = [
        TrainConfig(hidden=16, lr=lr, weight_decay=wd, schedule=s, epochs=6, batch_size=64, patience=3)
        for lr, wd, s in [(1e-3, 1e-4, "constant"), (5e-3, 1e-3, "exponential"), (3e-4, 1e-5, "constant")]
    ]  # one stack (same hidden/batch/seed), dropout 0.1 active
    configs += [
        TrainConfig(hidden=8, lr=2e-3, epochs=4, batch_size=50, class_balance="loss_weights", seed=3),
        TrainConfig(hidden=8, lr=2e-3, epochs=4, batch_size=50, class_balance="sampler", seed=3, dropout=0.0),
    ]
    many = train_many(x[:400], y[:400], x[400:], y[400:], configs)
    for cfg, got in zip(configs, many):
        ref = train_classifier(x[:400], y[:400], x[400:], y[400:], cfg)
        assert got.config == cfg
        assert (got.status, got.best_epoch, len(got.history)) == (
            ref.status,
            ref.best_epoch,
            len(ref.history),
        )
        assert got.val_auroc == pytest.approx(ref.val_auroc, abs=1e-5)
        for k in ref.state_dict:
            torch.testing.assert_close(got.state_dict[k], ref.state_dict[k], atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(
            [h["train_loss"] for h in got.history], [h["train_loss"] for h in ref.history], rtol=1e-5
        )


def test_batched_trainer_bfloat16_and_pruning_hook():
    x, y = blobs(400, 12, 3, sep=1.0, seed=2)
    cfgs = [TrainConfig(hidden=16, lr=lr, epochs=5, batch_size=100) for lr in (3e-3, 1e-2, 1e-5)]
    f32 = train_many(x[:300], y[:300], x[300:], y[300:], cfgs)
    bf16 = train_many(x[:300], y[:300], x[300:], y[300:], cfgs, precision="bfloat16")
    for a, b in zip(f32, bf16):
        assert b.val_auroc == pytest.approx(a.val_auroc, abs=0.02)
    seen = []

    def prune_worst(indices, epoch, aucs):
        seen.append((epoch, list(indices)))
        return np.asarray(indices) == 2 if epoch == 2 else None

    res = train_many(x[:300], y[:300], x[300:], y[300:], cfgs, on_epoch=prune_worst)
    assert [r.status for r in res] == ["completed", "completed", "pruned"]
    assert len(res[2].history) == 2 and len(res[0].history) == 5
    assert seen[2] == (3, [0, 1])  # the pruned model left the stack


def test_training_input_errors():
    x, y = blobs(100, 8, 2)
    with pytest.raises(ValueError, match="dimension"):
        train_classifier(x, y, x[:, :4], y)
    with pytest.raises(ValueError, match="no training example"):
        train_classifier(x, y, x, y, num_classes=3)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        train_classifier(bad, y, x, y)


# ------------------------------------------------------------ search


def test_search_runs_and_resumes_from_sqlite(tmp_path):
    pytest.importorskip("optuna")
    x, y = blobs(250, 8, 2, sep=0.6, seed=4)
    db = tmp_path / "study.sqlite"
    base = TrainConfig(epochs=3, batch_size=100, patience=2)
    kw = {"storage": db, "study_name": "t", "base_config": base, "batch_trials": 3, "seed": 1}
    first = search(x[:200], y[:200], x[200:], y[200:], n_trials=4, **kw)
    assert (first.n_trials, first.n_new) == (4, 4) and db.exists()
    assert first.best_model is not None and first.best_model.val_auroc == pytest.approx(first.best_value)
    assert first.best_params["hidden"] in (128, 256, 512) and 1e-5 <= first.best_params["lr"] <= 1e-2

    import optuna

    study = optuna.load_study(study_name="t", storage=f"sqlite:///{db}")
    study.ask()  # a trial left running, as after a crash
    again = search(x[:200], y[:200], x[200:], y[200:], n_trials=7, **kw)
    assert (again.n_trials, again.n_new) == (7, 3)
    states = [t.state.name for t in optuna.load_study(study_name="t", storage=f"sqlite:///{db}").trials]
    assert states.count("FAIL") == 1 and len(states) == 8
    assert again.best_value >= first.best_value
    done = search(x[:200], y[:200], x[200:], y[200:], n_trials=7, **kw)
    assert done.n_new == 0 and done.best_model is None


def test_search_random_sampler_in_memory():
    pytest.importorskip("optuna")
    x, y = blobs(300, 8, 3, seed=5)
    res = search(
        x[:200], y[:200], x[200:], y[200:], n_trials=3, sampler="random",
        base_config=TrainConfig(epochs=2, batch_size=100), precision="float32",
    )  # fmt: skip
    assert res.n_trials == 3 and res.storage is None and res.precision == "float32"
    with pytest.raises(ValueError, match="sampler"):
        search(x[:200], y[:200], x[200:], y[200:], n_trials=1, sampler="grid")  # type: ignore[arg-type]


def test_search_without_optuna_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    x, y = blobs(60, 4, 2)
    with pytest.raises(CytokenError, match=r"cytoken\[automl\]"):
        search(x, y, x, y, n_trials=1)


# ------------------------------------------------------------ bundle


def test_bundle_round_trip_and_incompatibility(tmp_path):
    x, y = blobs(300, 8, 3, seed=6)
    res = train_classifier(x[:200], y[:200], x[200:], y[200:], TrainConfig(hidden=16, lr=3e-3, epochs=3))
    path = save_bundle(
        tmp_path / "clf", res, class_names=["tumor", "immune", "stroma"], embedding_model_sha256=SHA_A,
        embedding_dim=8,
    )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf"]  # no temporary folder left
    b = load_bundle(path, model_sha256=SHA_A, embedding_dim=8)
    np.testing.assert_allclose(b.predict_proba(x[200:]), res.predict_proba(x[200:]), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(
            torch.softmax(b.module()(torch.from_numpy(x[200:])), 1).numpy(),
            res.predict_proba(x[200:]),
            atol=1e-6,
        )
    ids, prob = b.predict_class_ids(x[200:])
    assert set(ids.tolist()) <= {1, 2, 3} and (prob > 0.3).all()
    assert b.class_names == ("tumor", "immune", "stroma") and len(b.class_colors) == 3
    assert b.config["train_config"]["hidden"] == 16 and "macro_f1" in b.metrics

    with pytest.raises(CytokenError, match=r"clf.*expects 8-d.*gives 384-d"):
        load_bundle(path, embedding_dim=384)
    with pytest.raises(CytokenError) as err:
        check_compatible(b, SHA_B, 8)
    assert str(path) in str(err.value) and SHA_A in str(err.value) and SHA_B in str(err.value)
    with pytest.raises(CytokenError, match="expects"):
        b.predict_proba(np.zeros((2, 5), np.float32))
    with pytest.raises(CytokenError, match="already exists"):
        save_bundle(path, res, class_names=["a", "b", "c"], embedding_model_sha256=SHA_A, embedding_dim=8)
    save_bundle(path, res, class_names=["a", "b", "c"], embedding_model_sha256=SHA_B, embedding_dim=8, overwrite=True)
    assert load_bundle(path).embedding_model_sha256 == SHA_B
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf"]
    with pytest.raises(ValueError, match="embedding_dim"):
        save_bundle(tmp_path / "x", res, class_names=["a", "b", "c"], embedding_model_sha256=SHA_A, embedding_dim=9)


# ------------------------------------------------------------ dataset helpers


def test_point_matching_hungarian_beats_greedy():
    # label-order greedy would give label 0 its nearest cell 0 (d=6) and leave label 1 without a cell;
    # the optimum matches all three labels
    labels = np.array([[0.0, 0.0], [10.0, 0.0], [-20.0, 0.0]])
    cells = np.array([[6.0, 0.0], [-8.0, 0.0], [-30.0, 0.0]])
    m = match_points(labels, cells, mpp=0.25)  # radius 15 px
    pairs = dict(zip(m.label_index.tolist(), m.cell_index.tolist()))
    assert pairs == {0: 1, 1: 0, 2: 2}
    assert m.report()["n_matched"] == 3 and m.report()["n_unmatched_labels"] == 0
    # shortest-pair-first greedy takes label 0 -> cell 0 (d=2); then label 1 can reach no cell (cell 1 is 26
    # px away) and only 1 pair results. Hungarian finds 2 pairs (12 px each).
    m2 = match_points([[0, 0], [14, 0]], [[2, 0], [-12, 0]], mpp=0.25)
    assert dict(zip(m2.label_index.tolist(), m2.cell_index.tolist())) == {0: 1, 1: 0}
    np.testing.assert_allclose(m2.distance, [12.0, 12.0])


def test_point_matching_radius_scales_with_mpp():
    labels, cells = [[0.0, 0.0]], [[10.0, 0.0]]
    assert match_points(labels, cells, mpp=0.25).n_matched == 1  # 15 px radius
    with pytest.raises(CytokenError, match=r"within 7\.5 px"):
        match_points(labels, cells, mpp=0.5)  # 7.5 px radius
    assert match_points(labels, cells, mpp=0.5, radius_um=6.0).radius_px == pytest.approx(12.0)
    with pytest.raises(CytokenError, match="1 of 2"):
        match_points([[0, 0], [100, 100]], cells, mpp=0.25, require_all=True)


def test_instance_matching_by_iou():
    gt = np.zeros((10, 10), np.int32)
    gt[0:4, 0:4] = 3  # 16 px
    gt[6:9, 6:9] = 8  # 9 px
    pred = np.zeros_like(gt)
    pred[0:4, 0:3] = 5  # IoU 12/16 = 0.75
    pred[6:9, 6:7] = 7  # IoU 3/9 < 0.5
    m = match_instances(gt, pred)
    assert (m.gt_ids.tolist(), m.pred_ids.tolist(), m.n_gt, m.n_pred) == ([3], [5], 2, 2)
    assert m.iou[0] == pytest.approx(0.75)
    typ = (gt == 3) * 2 + (gt == 8) * 1
    ids, cls, rep = label_cells_from_masks(gt, typ, pred)
    assert (ids.tolist(), cls.tolist(), rep["n_labelled"]) == ([5], [2], 1)
    with pytest.raises(ValueError, match=r"0\.5"):
        match_instances(gt, pred, iou_threshold=0.3)


@needs_data
def test_mask_labels_on_real_consep_patches():
    import scipy.io as sio
    from PIL import Image

    root = SHARED / "consep_patched" / "test"
    rng = np.random.default_rng(0)
    for path in sorted((root / "inst_maps").glob("*.png"))[:5]:
        gt = np.array(Image.open(path)).astype(np.int64)
        typ = np.array(Image.open(root / "type_maps" / path.name))
        mat = sio.loadmat(root / "type_mat" / path.with_suffix(".mat").name)
        ids, types = instance_types(gt, typ)
        # majority vote = the dataset's own per-instance types
        np.testing.assert_array_equal(types, mat["inst_type"].ravel())
        # "predictions": the same nuclei under shuffled ids, with one boundary pixel column removed
        perm = np.zeros(gt.max() + 1, np.int64)
        perm[ids] = rng.permutation(len(ids)) + 100
        pred = perm[gt]
        pred[:, 1:][gt[:, 1:] != gt[:, :-1]] = 0
        pred_ids, cls, rep = label_cells_from_masks(gt, typ, pred)
        big = np.bincount(gt.ravel())[ids] >= 30
        assert rep["n_matched"] >= big.sum()
        inv = np.zeros(perm.max() + 1, np.int64)
        inv[perm[ids]] = np.arange(len(ids))
        np.testing.assert_array_equal(cls, types[inv[pred_ids]])


def test_group_split_has_no_leakage(tmp_path):
    groups = np.repeat([f"img{i}" for i in range(10)], 7)
    s = split_by_group(groups, val_fraction=0.2, test_fraction=0.1, seed=3)
    parts = [set(groups[s.train]), set(groups[s.val]), set(groups[s.test])]
    assert all(not (a & b) for a, b in product(parts, parts) if a is not b)
    assert len(s.train) + len(s.val) + len(s.test) == len(groups)
    assert (len(s.val_groups), len(s.test_groups)) == (2, 1)
    assert split_by_group(groups, seed=3).val_groups == split_by_group(groups, seed=3).val_groups
    with pytest.raises(CytokenError, match="distinct groups"):
        split_by_group(["a", "a"], val_fraction=0.2)

    (tmp_path / "train.txt").write_text("img0\nimg1\n# comment\n\nimg2\n")
    (tmp_path / "val.txt").write_text("img3\n")
    assert read_split_file(tmp_path / "train.txt") == ["img0", "img1", "img2"]
    fs = split_from_files(groups, tmp_path / "train.txt", tmp_path / "val.txt")
    assert set(groups[fs.train]) == {"img0", "img1", "img2"} and set(groups[fs.val]) == {"img3"}
    assert len(fs.unassigned) == 6
    with pytest.raises(CytokenError, match="both"):
        split_from_files(groups, ["img0"], ["img0"])
    with pytest.raises(CytokenError, match="no labelled cell"):
        split_from_files(groups, ["img0"], ["slide99"])


def test_labelled_cells_clear_errors():
    x = np.zeros((5, 8), np.float32)
    cells = LabelledCells(x, [0, 0, 1, 1, 2], ["a"] * 5, ("t", "i", "s"))
    with pytest.raises(CytokenError, match=r"dimension 8.*384"):
        cells.check(embedding_dim=384)
    with pytest.raises(CytokenError, match="'s' \\(1\\)"):
        cells.check(embedding_dim=8)
    cells.subset(np.arange(4)).check(embedding_dim=8, min_per_class=0)
    with pytest.raises(ValueError, match="class indices"):
        LabelledCells(x, [0, 0, 1, 1, 3], ["a"] * 5, ("t", "i", "s"))


def test_dataset_and_metrics_do_not_import_torch():
    code = (
        "import sys, cytoken.classify.dataset, cytoken.classify.evaluation, cytoken.classify.bundle; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": SRC}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

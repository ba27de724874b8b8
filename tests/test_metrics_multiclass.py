"""Tests of cytoken.metrics multi-class PQ: per-image mPQ, PanNuke's mPQ/bPQ rules and CoNIC's mPQ+."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cytoken.metrics import MPQPlusAccumulator, mpq, pannuke_mpq, panoptic_quality

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")


def two_nuclei():
    """4 x 8: nucleus 1 (cols 0-3) of class 1, nucleus 2 (cols 4-7) of class 2."""
    inst = np.zeros((4, 8), np.int32)
    inst[:, :4] = 1
    inst[:, 4:] = 2
    typ = np.where(inst == 1, 1, 2).astype(np.uint8)
    return inst, typ


def test_mpq_by_hand():
    inst, typ = two_nuclei()
    # both nuclei predicted as class 1: class 1 has TP 1 + FP 1 -> PQ 2/3; class 2 has FN 1 -> 0; mPQ 1/3
    r = mpq(inst, typ, inst, np.ones_like(typ), num_classes=2)
    assert (r.per_class[0].tp, r.per_class[0].fp, r.per_class[0].fn) == (1, 1, 0)
    assert r.per_class[0].pq == pytest.approx(2 / 3)
    assert (r.per_class[1].tp, r.per_class[1].fn, r.per_class[1].pq) == (0, 1, 0.0)
    assert r.mpq == pytest.approx(1 / 3)
    # class 3 absent from both -> nan and skipped; perfect otherwise
    r = mpq(inst, typ, inst, typ, num_classes=3)
    assert np.isnan(r.per_class[2].pq) and r.mpq == 1.0


@needs_data
def test_mpq_matches_per_class_pq_on_real_labels_with_random_types():
    path = SHARED / "monuseg" / "test" / "labels" / "TCGA-HT-8564-01Z-00-DX1.png"
    inst = np.array(Image.open(path))[:400, :400].astype(np.int64)
    rng = np.random.default_rng(0)
    cls_of = rng.integers(1, 5, size=int(inst.max()) + 1)
    typ = np.where(inst > 0, cls_of[inst], 0)
    flipped = cls_of.copy()
    flip = rng.random(flipped.size) < 0.2
    flipped[flip] = rng.integers(1, 5, size=int(flip.sum()))
    pred = np.roll(inst, 1, axis=1)
    ptyp = np.where(pred > 0, flipped[pred], 0)
    r = mpq(inst, typ, pred, ptyp, num_classes=4)
    for c in range(1, 5):
        expected = panoptic_quality(np.where(typ == c, inst, 0), np.where(ptyp == c, pred, 0))
        assert r.per_class[c - 1] == expected
    assert r.mpq == pytest.approx(np.mean([x.pq for x in r.per_class]))
    assert 0.3 < r.mpq < 0.9


def pannuke_script_reference(true_inst, true_type, pred_inst, pred_type, tissues, n_cls):
    """The official run.py logic, transcribed loop by loop on top of panoptic_quality."""
    mpq_all, bpq_all = [], []
    for i in range(len(true_inst)):
        t_bin, p_bin = true_inst[i], pred_inst[i]
        pq_bin = np.nan if len(np.unique(t_bin)) == 1 else panoptic_quality(t_bin, p_bin).pq
        pq = []
        for c in range(1, n_cls + 1):
            t = np.where(true_type[i] == c, true_inst[i], 0)
            p = np.where(pred_type[i] == c, pred_inst[i], 0)
            pq.append(np.nan if len(np.unique(t)) == 1 else panoptic_quality(t, p).pq)
        mpq_all.append(pq)
        bpq_all.append(pq_bin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        img_mpq = [np.nanmean(x) if not np.all(np.isnan(x)) else np.nan for x in mpq_all]
        t_mpq, t_bpq = [], []
        for name in sorted(set(tissues)):
            idx = [k for k, x in enumerate(tissues) if x == name]
            vals = [img_mpq[k] for k in idx]
            t_mpq.append(np.nan if np.all(np.isnan(vals)) else np.nanmean(vals))
            vals = [bpq_all[k] for k in idx]
            t_bpq.append(np.nan if np.all(np.isnan(vals)) else np.nanmean(vals))
    return np.nanmean(t_mpq), np.nanmean(t_bpq)


def test_pannuke_rules_by_hand():
    inst, typ = two_nuclei()
    empty = np.zeros_like(inst)
    only1 = np.where(inst == 1, 1, 0)
    # image A (Breast): perfect -> class PQs [1, 1] -> mPQ 1, bPQ 1
    # image B (Breast): GT has only class 1; prediction adds a class-2 false positive.
    #   PanNuke skips class 2 (no GT) so the FP is not penalised: mPQ 1. bPQ: TP 1, FP 1 -> 2/3.
    # image C (Colon): GT both, prediction empty -> class PQs [0, 0] -> mPQ 0, bPQ 0.
    # image D (Colon): no GT at all, prediction empty -> all nan, skipped.
    r = pannuke_mpq(
        [inst, only1, inst, empty],
        [typ, np.where(only1 > 0, 1, 0), typ, empty],
        [inst, inst, empty, empty],
        [typ, typ, empty, empty],
        ["Breast", "Breast", "Colon", "Colon"],
        num_classes=2,
    )
    assert r.image_mpq[:3].tolist() == [1.0, 1.0, 0.0] and np.isnan(r.image_mpq[3])
    assert r.image_bpq[:3] == pytest.approx([1.0, 2 / 3, 0.0]) and np.isnan(r.image_bpq[3])
    assert np.isnan(r.image_class_pq[1, 1])
    assert r.tissue_mpq == {"Breast": 1.0, "Colon": 0.0}
    assert r.tissue_bpq == pytest.approx({"Breast": 5 / 6, "Colon": 0.0})
    assert r.mpq == 0.5 and r.bpq == pytest.approx(5 / 12)
    # class stats: class 1 PQs [1, 1, 0] -> 2/3; class 2 PQs [1, nan, 0] -> 1/2
    assert r.class_pq == pytest.approx((2 / 3, 1 / 2))


@pytest.mark.parametrize("seed", range(3))
def test_pannuke_matches_script_transcription(seed):
    rng = np.random.default_rng(seed)
    true_inst, true_type, pred_inst, pred_type, tissues = [], [], [], [], []
    for k in range(8):
        inst = np.zeros((48, 48), np.int32)
        typ = np.zeros((48, 48), np.int32)
        pi = np.zeros_like(inst)
        pt = np.zeros_like(typ)
        for n in range(rng.integers(0, 6)):
            y, x = rng.integers(0, 40, size=2)
            c = rng.integers(1, 4)
            inst[y : y + 6, x : x + 6] = n + 1
            typ[y : y + 6, x : x + 6] = c
            if rng.random() < 0.8:
                dy, dx = rng.integers(-2, 3, size=2)
                ys, xs = slice(max(y + dy, 0), y + dy + 6), slice(max(x + dx, 0), x + dx + 6)
                pi[ys, xs] = n + 10
                pt[ys, xs] = c if rng.random() < 0.7 else rng.integers(1, 4)
        true_inst.append(inst)
        true_type.append(typ)
        pred_inst.append(pi)
        pred_type.append(pt)
        tissues.append(["Liver", "Skin", "Lung"][k % 3])
    r = pannuke_mpq(true_inst, true_type, pred_inst, pred_type, tissues, num_classes=3)
    exp_mpq, exp_bpq = pannuke_script_reference(true_inst, true_type, pred_inst, pred_type, tissues, 3)
    assert r.mpq == pytest.approx(exp_mpq, abs=1e-12)
    assert r.bpq == pytest.approx(exp_bpq, abs=1e-12)


def test_mpq_plus_sums_over_images():
    inst, typ = two_nuclei()
    acc = MPQPlusAccumulator(num_classes=3)
    assert np.isnan(acc.mpq_plus)
    acc.add(inst, typ, inst, typ)  # class 1: TP 1; class 2: TP 1
    acc.add(inst, typ, inst, np.ones_like(typ))  # class 1: TP 1, FP 1; class 2: FN 1
    # class 1: TP 2, FP 1 -> DQ 0.8, SQ 1 -> 0.8; class 2: TP 1, FN 1 -> 2/3; class 3 never seen -> 0 (CoNIC)
    assert acc.tp.tolist() == [2, 1, 0] and acc.fp.tolist() == [1, 0, 0] and acc.fn.tolist() == [0, 1, 0]
    per = acc.per_class()
    assert per[0].pq == pytest.approx(0.8) and per[1].pq == pytest.approx(2 / 3) and np.isnan(per[2].pq)
    assert acc.mpq_plus == pytest.approx((0.8 + 2 / 3 + 0.0) / 3)
    assert acc.result().mpq == acc.mpq_plus


def test_mpq_plus_partial_overlap_iou_sum():
    # class 1 nucleus predicted 3/4 covered in two images: IoU 0.75 each -> SQ 0.75, DQ 1 -> PQ 0.75
    inst, typ = two_nuclei()
    pred = inst.copy()
    pred[:, 3] = 0
    pred[:, 7] = 0
    acc = MPQPlusAccumulator(num_classes=2)
    for _ in range(2):
        acc.add(inst, typ, pred, typ)
    assert acc.iou_sum.tolist() == pytest.approx([1.5, 1.5])
    assert acc.mpq_plus == pytest.approx(0.75)


def test_invalid_inputs():
    inst, typ = two_nuclei()
    with pytest.raises(ValueError, match="class id 2"):
        mpq(inst, typ, inst, typ, num_classes=1)
    with pytest.raises(ValueError, match="num_classes"):
        mpq(inst, typ, inst, typ, num_classes=0)
    with pytest.raises(ValueError, match="shape of its instance map"):
        mpq(inst, typ[:2], inst, typ, num_classes=2)
    with pytest.raises(ValueError, match="same length"):
        pannuke_mpq([inst], [typ], [inst], [typ], ["Breast", "Colon"], num_classes=2)
    with pytest.raises(ValueError, match="iou_threshold"):
        MPQPlusAccumulator(num_classes=3, iou_threshold=-0.1)
    acc = MPQPlusAccumulator(num_classes=3)
    with pytest.raises(ValueError, match="classes"):
        acc.add_result(mpq(inst, typ, inst, typ, num_classes=2))

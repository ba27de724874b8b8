"""Knowledge distillation (`TrainConfig.distill`) and partial initialisation across encoder widths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cytoken.models import SegmenterConfig, build_segmenter, save_segmenter
from cytoken.models.segmenter import HoverOutput
from cytoken.models.store import load_segmenter
from cytoken.training.config import DistillConfig, TrainConfig
from cytoken.training.distill import distill_loss, load_teacher, token_similarity
from cytoken.training.loop import _initial_model, train_segmenter
from cytoken.types import CytokenError

CLASSES = {"num_classes": 2, "class_names": ["a", "b"]}
TEACHER = {"encoder": "cytoken_s16", "encoder_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}, **CLASSES,
           "decoder_kwargs": {"width_factor": 0.125, "shared": True, "out_stride": 2}}  # fmt: skip
# a student of another encoder width and depth: the conv stem, most decoder layers and the heads fit the teacher
STUDENT = {**TEACHER, "encoder_kwargs": {"depth": 1, "embed_dim": 48, "num_heads": 2}}


def _teacher(tmp_path: Path) -> Path:
    torch.manual_seed(1)
    return save_segmenter(build_segmenter(SegmenterConfig(**TEACHER)).eval(), tmp_path / "teacher.safetensors")


def _folder(tmp_path: Path) -> Path:
    """A small labelled folder dataset (random texture, square nuclei) for training mechanics only."""
    root = tmp_path / "data"
    if root.exists():
        return root
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        img = rng.integers(150, 230, (96, 96, 3), dtype=np.uint8)
        lab = np.zeros((96, 96), np.uint16)
        for j, (y, x) in enumerate(rng.integers(4, 80, (6, 2)), start=1):
            lab[y : y + 10, x : x + 10] = j
            img[y : y + 10, x : x + 10] = (70, 40, 120)
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        Image.fromarray(lab).save(root / "labels" / f"{i}.png")
    return root


def _config(tmp_path: Path, **kw) -> TrainConfig:
    raw = {
        "model": STUDENT, "out_dir": str(tmp_path / "run"), "crop_size": 64, "batch_size": 2, "epochs": 2,
        "steps_per_epoch": 3, "num_workers": 0, "seed": 0, "val_every": 100, "augment": False,
        "data": [{"dataset": "folder", "root": str(_folder(tmp_path)), "split": "all", "mpp": 0.25,
                  "val_fraction": 0.0, "use_types": False}],
    }  # fmt: skip
    raw.update(kw)
    return TrainConfig.model_validate(raw)


def test_distill_loss_is_zero_only_for_the_teachers_own_maps() -> None:
    torch.manual_seed(0)
    teacher = build_segmenter(SegmenterConfig(**TEACHER)).eval()
    other = build_segmenter(SegmenterConfig(**TEACHER)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        t_out, o_out = teacher(x), other(x)
    cfg = DistillConfig(teacher="unused", nuclei=1.0, hv=1.0, hv_msge=1.0, types=1.0)
    own, terms = distill_loss(t_out, t_out, cfg)
    assert set(terms) == {"distill_nuclei", "distill_hv", "distill_hv_msge", "distill_types"}
    assert terms["distill_hv"] == 0 and terms["distill_hv_msge"] == 0
    # the soft cross-entropy of a distribution with itself is its entropy, the minimum over students
    diff, _ = distill_loss(o_out, t_out, cfg)
    assert own is not None and diff is not None and float(diff) > float(own)
    off, none = distill_loss(o_out, t_out, DistillConfig(teacher="unused", nuclei=0, hv=0, types=0))
    assert off is None and none == {}


def _tokens_only(tokens: torch.Tensor) -> HoverOutput:
    b, _, h, w = tokens.shape
    return HoverOutput(torch.zeros(b, 2, h, w), torch.zeros(b, 2, h, w), None, None, tokens)


def test_token_term_sees_only_the_geometry_of_the_embeddings() -> None:
    """Zero for a wider student whose tokens are a rotation, offset and scaling of the teacher's; > 0 otherwise."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 8, 4, 4, generator=g)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    wide = torch.cat([teacher, torch.zeros(2, 4, 4, 4)], 1)  # the same tokens in 12 dimensions
    student = 3.0 * torch.einsum("ij,bjhw->bihw", q, wide) + 5.0
    cfg = DistillConfig(teacher="unused", nuclei=0, hv=0, types=0, tokens=1.0)
    _, same = distill_loss(_tokens_only(student), _tokens_only(teacher), cfg)
    assert float(same["distill_tokens"]) < 1e-10
    _, other = distill_loss(_tokens_only(torch.randn(2, 12, 4, 4, generator=g)), _tokens_only(teacher), cfg)
    assert float(other["distill_tokens"]) > 0.01
    sim = token_similarity(teacher)
    assert sim.shape == (32, 32) and torch.allclose(sim.diagonal(), torch.ones(32))
    with pytest.raises(CytokenError, match=r"same token grid.*\(4, 4\).*\(5, 5\)"):
        distill_loss(_tokens_only(student), _tokens_only(torch.randn(2, 8, 5, 5)), cfg)


def test_distillation_moves_the_student_towards_the_teacher(tmp_path: Path) -> None:
    teacher_path = _teacher(tmp_path)
    # ground-truth terms off: the teacher is the only target, so the student's maps must come closer to its maps
    zero = {k: 0.0 for k in ("nuclei_ce", "nuclei_dice", "hv_mse", "hv_msge", "type_ce", "type_dice")}
    cfg = _config(tmp_path, loss=zero, lr=3e-3, epochs=4, steps_per_epoch=6,
                  distill={"teacher": str(teacher_path), "nuclei": 1.0, "hv": 2.5, "types": 0.5})  # fmt: skip
    torch.manual_seed(0)
    start = _initial_model(cfg, verbose=False).eval()
    result = train_segmenter(cfg, progress=False)
    assert {"distill_nuclei", "distill_hv", "distill_types"} <= set(result.history[-1])
    end = load_segmenter(result.out_dir / "final.safetensors")
    teacher = load_segmenter(teacher_path)
    x = torch.rand(2, 3, 64, 64)

    def gap(m: torch.nn.Module) -> float:
        with torch.no_grad():
            a, t = m(x), teacher(x)
        return float(((a.nuclei_prob - t.nuclei_prob) ** 2).mean() + ((a.hv - t.hv) ** 2).mean())

    assert gap(end) < 0.6 * gap(start)


def test_token_distillation_moves_the_students_embeddings_towards_the_teachers(tmp_path: Path) -> None:
    """The token term alone (no other target) brings the student's token geometry closer to the teacher's."""
    teacher_path = _teacher(tmp_path)
    zero = {k: 0.0 for k in ("nuclei_ce", "nuclei_dice", "hv_mse", "hv_msge", "type_ce", "type_dice")}
    cfg = _config(tmp_path, loss=zero, lr=1e-2, epochs=8, steps_per_epoch=8,
                  distill={"teacher": str(teacher_path), "nuclei": 0, "hv": 0, "types": 0, "tokens": 1.0})  # fmt: skip
    history = train_segmenter(cfg, progress=False).history
    assert "distill_tokens" in history[-1] and "distill_hv" not in history[-1]
    first, last = history[0]["distill_tokens"], history[-1]["distill_tokens"]
    assert last < 0.7 * first, (first, last)


def test_distill_teacher_must_match(tmp_path: Path) -> None:
    teacher_path = _teacher(tmp_path)
    with pytest.raises(CytokenError, match="model file not found"):
        load_teacher(_config(tmp_path, distill={"teacher": str(tmp_path / "no.safetensors")}), torch.device("cpu"))
    with pytest.raises(CytokenError, match="unknown model"):
        load_teacher(_config(tmp_path, distill={"teacher": "no-such-model"}), torch.device("cpu"))
    other_mpp = {**STUDENT, "mpp": 0.5}
    with pytest.raises(CytokenError, match="µm/px"):
        load_teacher(_config(tmp_path, model=other_mpp, distill={"teacher": str(teacher_path)}), torch.device("cpu"))
    other_classes = {**STUDENT, "class_names": ["b", "a"]}
    cfg = _config(tmp_path, model=other_classes, distill={"teacher": str(teacher_path)})
    with pytest.raises(CytokenError, match="classes"):
        load_teacher(cfg, torch.device("cpu"))
    cfg = _config(tmp_path, model=other_classes, distill={"teacher": str(teacher_path), "types": 0})
    teacher = load_teacher(cfg, torch.device("cpu"))  # no type term: the classes need not agree
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_init_skip_mismatched_loads_what_fits_across_widths(tmp_path: Path) -> None:
    teacher_path = _teacher(tmp_path)
    with pytest.raises(CytokenError, match="init_skip_mismatched"):
        _initial_model(_config(tmp_path, init_weights=str(teacher_path), init_strict=False), verbose=False)
    with pytest.raises(ValueError, match="init_strict: false"):
        _config(tmp_path, init_weights=str(teacher_path), init_skip_mismatched=True)
    cfg = _config(tmp_path, init_weights=str(teacher_path), init_strict=False, init_skip_mismatched=True)
    model = _initial_model(cfg, verbose=False)
    theirs = load_segmenter(teacher_path).state_dict()
    own = model.state_dict()
    same = [k for k in own if k in theirs and own[k].shape == theirs[k].shape]
    assert any(k.startswith("heads.") for k in same) and any(k.startswith("encoder.patch_embed.stem") for k in same)
    assert not any(k.startswith("encoder.blocks") for k in same)
    for k in same:
        assert torch.equal(own[k], theirs[k]), k


def test_a_config_that_trains_nothing_is_refused(tmp_path: Path) -> None:
    zero = {k: 0.0 for k in ("nuclei_ce", "nuclei_dice", "hv_mse", "hv_msge", "type_ce", "type_dice", "tissue_ce")}
    with pytest.raises(ValueError, match="every loss weight is 0"):
        _config(tmp_path, loss=zero)
    with pytest.raises(ValueError, match="every loss weight is 0"):
        _config(tmp_path, loss=zero, distill={"teacher": "x", "nuclei": 0, "hv": 0, "types": 0})
    assert _config(tmp_path, loss=zero, distill={"teacher": "x"}).distill is not None


def test_a_run_whose_weights_find_no_labels_stops_with_a_message(tmp_path: Path) -> None:
    # only the type terms are on, and the only source has no type labels: no loss term exists, which must not pass
    # as a silent zero loss
    only_types = {"nuclei_ce": 0.0, "nuclei_dice": 0.0, "hv_mse": 0.0, "hv_msge": 0.0, "type_ce": 1.0}
    with pytest.raises(CytokenError, match="no loss term applied in epoch 1"):
        train_segmenter(_config(tmp_path, loss=only_types), progress=False)

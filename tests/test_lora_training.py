"""Phase-2 LoRA fine-tuning in the segmenter trainer: frozen base, exact resume, EMA, merged outputs, DDP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cytoken.models import build_segmenter, load_segmenter, save_segmenter
from cytoken.models.lora import add_lora, load_lora, lora_layers, lora_state_dict, merged_state_dict
from cytoken.models.weights_io import read_state_dict
from cytoken.training.config import TrainConfig, load_train_config
from cytoken.types import CytokenError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]
needs_data = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data not present")

torch.set_num_threads(1)
PHASES = {"freeze_encoder_epochs": 1, "encoder_mode": "lora", "encoder_lr": 5e-3, "lora_rank": 2,
          "lora_alpha": 4.0, "lora_targets": ["qkv", "proj", "fc1"]}  # fmt: skip


def _config(tmp_path: Path, out: str, **kw) -> TrainConfig:
    raw = {
        "model": {"encoder": "vit_tiny_test", "num_classes": 4,
                  "class_names": ["other", "inflammatory", "epithelial", "spindle-shaped"],
                  "decoder_kwargs": {"width_factor": 0.125, "shared": True, "out_stride": 2}},
        "data": [{"dataset": "consep_patched", "root": str(SHARED / "consep_patched"), "val_fraction": 0.1}],
        "out_dir": str(tmp_path / out), "crop_size": 64, "batch_size": 2, "epochs": 3, "steps_per_epoch": 2,
        "ema_decay": 0.9, "num_workers": 0, "seed": 3, "lr": 1e-3, "warmup_epochs": 0, "phases": PHASES,
    }  # fmt: skip
    raw.update(kw)
    return TrainConfig.model_validate(raw)


def _is_lora(key: str) -> bool:
    return key.endswith((".lora_A", ".lora_B"))


def _lora_of(path: Path, key: str = "model") -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=False)[key]
    return {k: v for k, v in state.items() if _is_lora(k)}


def test_uni_lora_example_config_validates(tmp_path: Path) -> None:
    cfg = load_train_config(REPO / "configs" / "uni_lora_finetune.yaml")
    assert cfg.model.encoder == "uni" and cfg.model.decoder in ("dpt", "unetr")
    ph = cfg.phases
    assert ph.encoder_mode == "lora" and ph.lora_rank == 8 and 0 < ph.freeze_encoder_epochs < cfg.epochs
    assert ph.encoder_lr is not None and ph.encoder_lr != cfg.lr
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "data: [{dataset: monuseg, root: x}]\nout_dir: o\nphases: {encoder_mode: lora, lora_targets: [query]}\n"
    )
    with pytest.raises(CytokenError, match=r"phases.lora_targets: .*allowed are \['fc1'"):
        load_train_config(bad)


@needs_data
def test_lora_phases_frozen_base_exact_resume_ema_and_outputs(tmp_path: Path, monkeypatch) -> None:
    import cytoken.training.loop as loop

    monkeypatch.setattr(loop, "validate", lambda *a, **k: {"bpq": 0.5, "dice": 0.5, "det_f1": 0.5})
    sources = loop.load_sources(_config(tmp_path, "x"))  # read once: every run below has the same data config
    monkeypatch.setattr(loop, "load_sources", lambda config: sources)
    torch.manual_seed(0)
    init = save_segmenter(build_segmenter(_config(tmp_path, "x").model), tmp_path / "init.safetensors")
    base = read_state_dict(init)

    def cfg(out: str, **kw) -> TrainConfig:
        return _config(tmp_path, out, init_weights=str(init), **kw)

    full = loop.train_segmenter(cfg("full"), progress=False)
    assert full.epochs_run == 3
    # killed after phase 1, resumed, killed in the middle of phase 2, resumed again
    assert loop.train_segmenter(cfg("cut"), progress=False, stop_after_epochs=1).epochs_run == 1
    shutil.copy(tmp_path / "cut" / "last.pt", tmp_path / "epoch1.pt")
    assert loop.train_segmenter(cfg("cut"), resume=True, progress=False, stop_after_epochs=1).epochs_run == 2
    shutil.copy(tmp_path / "cut" / "last.pt", tmp_path / "epoch2.pt")
    assert loop.train_segmenter(cfg("cut"), resume=True, progress=False).epochs_run == 3

    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    assert any(_is_lora(k) for k in a["model"]) and set(a["model"]) == set(b["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    # the adapters' optimiser state (group 0, lr = encoder_lr) is checkpointed and resumed
    group0 = a["optimizer"]["param_groups"][0]
    assert group0["initial_lr"] == PHASES["encoder_lr"]
    n_lora = sum(_is_lora(k) for k in a["model"])
    assert len(group0["params"]) == n_lora == 2 * 3 * 2  # A and B of qkv, proj, fc1 in 2 blocks
    for i in group0["params"]:
        assert torch.equal(a["optimizer"]["state"][i]["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])

    e1 = torch.load(tmp_path / "epoch1.pt", weights_only=False)
    e2 = torch.load(tmp_path / "epoch2.pt", weights_only=False)
    # phase 1: adapters untouched (B = 0, no optimiser state), decoder trained
    assert all(not v.any() for k, v in e1["model"].items() if k.endswith(".lora_B"))
    assert not set(group0["params"]) & set(e1["optimizer"]["state"])
    dec = [k for k in base if k.startswith(("decoder.", "heads.")) and base[k].is_floating_point()]
    assert sum(not torch.equal(e1["model"][k], base[k]) for k in dec) > len(dec) // 2
    # phase 2: the base encoder never changes; adapters and decoder do
    for ck in (e1, e2, a):
        for k, v in base.items():
            if k.startswith("encoder."):
                assert torch.equal(ck["model"][k], v), k
                assert torch.equal(ck["ema"][f"module.{k}"], v), k
    changed = [k for k in _lora_of(tmp_path / "epoch2.pt") if not torch.equal(e2["model"][k], a["model"][k])]
    assert len(changed) == n_lora  # every A and B moved in the last epoch
    assert sum(not torch.equal(e2["model"][k], a["model"][k]) for k in dec) > len(dec) // 2

    # EMA averages the adapters too: its LoRA tensors lag the live ones
    ema_lora = {k[len("module.") :]: v for k, v in a["ema"].items() if _is_lora(k)}
    assert set(ema_lora) == set(_lora_of(tmp_path / "full" / "last.pt"))
    assert all(not torch.equal(v, a["model"][k]) for k, v in ema_lora.items())

    # final.safetensors = the merged EMA model: plain keys, no LoRA needed to load, same outputs
    out = tmp_path / "full"
    final = read_state_dict(out / "final.safetensors")
    assert set(final) == set(base)
    ema_model = load_segmenter(init)
    add_lora(ema_model.encoder, PHASES["lora_rank"], PHASES["lora_alpha"], PHASES["lora_targets"])
    ema_model.load_state_dict({k[len("module.") :]: v for k, v in a["ema"].items() if k != "n_averaged"})
    for k, v in merged_state_dict(ema_model).items():
        assert torch.equal(final[k], v.cpu()), k
    merged = load_segmenter(out / "final.safetensors")
    assert not lora_layers(merged)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want, got = ema_model.eval()(x), merged(x)
    assert (got.hv - want.hv).abs().max() < 1e-5 and (got.nuclei_logits - want.nuclei_logits).abs().max() < 1e-5
    assert not torch.equal(final["encoder.blocks.0.attn.qkv.weight"], base["encoder.blocks.0.attn.qkv.weight"])
    # the adapters alone, for the frozen foundation weights: load_lora on the encoder restores the EMA adapters
    plain = load_segmenter(init)
    load_lora(plain.encoder, out / "lora_adapters.safetensors")
    got_lora = lora_state_dict(plain.encoder)
    assert set(got_lora) == {k[len("encoder.") :] for k in ema_lora}
    assert all(torch.equal(v, ema_lora[f"encoder.{k}"]) for k, v in got_lora.items())
    from safetensors import safe_open

    with safe_open(str(out / "lora_adapters.safetensors"), framework="pt") as f:
        assert f.metadata()["epoch"] == "3" and f.metadata()["encoder"] == "vit_tiny_test"
    # best = epoch 1 (constant validation score): still phase 1, so its adapters are zero and its weights plain
    best = read_state_dict(out / "best.safetensors")
    assert all(torch.equal(best[k], v) for k, v in base.items() if k.startswith("encoder."))
    best_lora = read_state_dict(out / "best_lora_adapters.safetensors")
    assert all(not v.any() for k, v in best_lora.items() if k.endswith(".lora_B"))

    # a resume must keep the LoRA settings
    with pytest.raises(CytokenError, match="other LoRA settings"):
        loop.train_segmenter(cfg("cut", phases={**PHASES, "lora_rank": 4}), resume=True, progress=False)
    with pytest.raises(CytokenError, match="has LoRA adapters"):
        loop.train_segmenter(cfg("cut", phases={"freeze_encoder_epochs": 1}), resume=True, progress=False)


def test_lora_targets_missing_from_the_encoder_are_named(tmp_path: Path) -> None:
    from cytoken.training.loop import _add_lora

    cfg = _config(tmp_path, "o", phases={**PHASES, "lora_targets": ["lin1"]})  # SAM's MLP: not in a ViT
    with pytest.raises(CytokenError, match=r"encoder_mode 'lora' on encoder 'vit_tiny_test': .*fc1"):
        _add_lora(build_segmenter(cfg.model), cfg)


@needs_data
def test_lora_keeps_the_frozen_stems_batchnorm_statistics(tmp_path: Path, monkeypatch) -> None:
    import cytoken.training.loop as loop

    monkeypatch.setattr(loop, "validate", lambda *a, **k: {"bpq": 0.5})
    model = {"encoder": "cytoken_s16", "encoder_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2},
             "decoder_kwargs": {"width_factor": 0.125, "shared": True, "out_stride": 2}}  # fmt: skip
    torch.manual_seed(0)
    init = save_segmenter(build_segmenter(_config(tmp_path, "x", model=model).model), tmp_path / "init.safetensors")
    phases = {**PHASES, "freeze_encoder_epochs": 0}
    cfg = _config(tmp_path, "o", model=model, init_weights=str(init), epochs=1, ema_decay=None, phases=phases)
    loop.train_segmenter(cfg, progress=False)
    base, last = read_state_dict(init), torch.load(tmp_path / "o" / "last.pt", weights_only=False)["model"]
    stats = [k for k in base if k.startswith("encoder.") and "running_" in k]
    assert stats and all(torch.equal(last[k], base[k]) for k in stats)
    assert any(not torch.equal(last[k], base[k]) for k in base if k.startswith("decoder.") and "running_" in k)


@needs_data
@pytest.mark.slow
def test_lora_ddp_two_cpu_processes_sync_adapters(tmp_path: Path) -> None:
    """Under torchrun (2 CPU processes, gloo) both ranks end phase 2 with identical adapters and decoder."""
    cfg = _config(tmp_path, "ddp", epochs=2, ema_decay=None)
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch\n"
        "import torch.distributed as dist\n"
        "import cytoken.training.loop as loop\n"
        "from cytoken.training.config import TrainConfig\n"
        "built = []\n"
        "def build(c, _b=loop.build_segmenter):\n"
        "    m = _b(c)\n"
        "    built.append(m)\n"
        "    return m\n"
        "loop.build_segmenter = build\n"
        "loop.validate = lambda *a, **k: {'bpq': 0.5, 'dice': 0.5, 'det_f1': 0.5}\n"
        "cfg = TrainConfig.model_validate_json(open(sys.argv[1]).read())\n"
        "r = loop.train_segmenter(cfg, progress=False)\n"
        "params = {n: p.detach() for n, p in built[0].named_parameters()}  # (BN statistics are per rank)\n"
        "out = {'world': dist.get_world_size(), 'epochs': r.epochs_run, 'params': params}\n"
        "torch.save(out, f'{sys.argv[2]}/rank{dist.get_rank()}.pt')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29527",
         str(script), str(tmp_path / "cfg.json"), str(tmp_path)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["epochs"] == r1["epochs"] == 2
    r0, r1 = r0["params"], r1["params"]
    lora_b = [k for k in r0 if k.endswith(".lora_B")]
    assert lora_b and all(r0[k].any() for k in lora_b)  # phase 2 trained the adapters
    for k in r0:  # the ranks saw different crops: equal weights mean the gradients were all-reduced
        assert torch.equal(r0[k], r1[k]), k
    assert (tmp_path / "ddp" / "lora_adapters.safetensors").is_file()
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["phases"]["encoder_mode"] == "lora"

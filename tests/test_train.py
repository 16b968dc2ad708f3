"""train.py end to end on the tiny preset (CPU): the embedded default, resume, signals, bad input."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from backbones.registry import get_backbone
from lora_core import load_lora, read_lora
from backbones.objectives.flow import FlowObjectiveConfig
from backbones.spec import Batch
from lora_core.distributed import DistInfo
from lora_core.runtime.config import load_config
from lora_core.data.sample_data import make_sample_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    """The sample dataset and its latent cache, built once (the slow part: the VAE encode)."""
    root = tmp_path_factory.mktemp("shared")
    data = make_sample_dataset(root / "data")
    cache = root / "cache"
    assert train.main(["--preset", "tiny", "--data", str(data), "--output", str(root / "warm"),
                       "--cache-only", f"train.cache_dir={cache}"]) == 0
    return data, cache


def _run(shared, out, *extra):
    data, cache = shared
    return train.main(["--preset", "tiny", "--data", str(data), "--output", str(out),
                       f"train.cache_dir={cache}", "train.log_every=0", "validation.at_end=false", *extra])


def _losses(out):
    return [json.loads(line)["loss"] for line in open(Path(out) / "metrics.jsonl")]


def _cached_samples(shared):
    """(latents, context) of every sample, read through the trainer's own cache lookup."""
    data, cache = shared
    cfg, spec = train.resolve_config(train.parse_args(["--preset", "tiny", "--data", str(data),
                                                       f"train.cache_dir={cache}"]))
    info = DistInfo()
    ds = train.prepare_dataset(cfg, spec, info)
    cached = train.prepare_cache(cfg, spec, ds, info, torch.device("cpu"))
    return [(cached.cache.get(cached.media[i])["latents"], cached.cache.get(cached.text[i])["context"])
            for i in cached.usable]


def _eval_loss(dit, shared):
    """Mean flow-matching loss over every cached sample with fixed draws (no conditioning)."""
    spec = get_backbone("wan_ti2v")
    entries = _cached_samples(shared)
    assert entries
    cfg = FlowObjectiveConfig(first_frame_prob=0.0)
    with torch.no_grad():
        vals = [spec.training_loss({"dit": dit}, Batch({"latents": [lat], "context": [ctx]}, [{}], [900 + k]),
                                   cfg).item()
                for lat, ctx in entries for k in range(6)]
    return sum(vals) / len(vals)


def test_embedded_default_trains_and_loss_falls(shared, tmp_path):
    out = tmp_path / "run"
    assert _run(shared, out, "--max-steps", "60") == 0
    lora = out / "lora.safetensors"
    lf = read_lora(lora)
    assert lf.format == "comfyui" and lf.metadata["backbone"] == "wan_ti2v"
    assert len(lf.modules) == 2 * 10  # 2 blocks x the 10 default targets
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert {"loss", "lr", "grad_norm", "s_per_step", "samples_per_s", "peak_mem_gb"} <= set(rows[0])
    saved = load_config(out / "config.yaml")
    assert saved.train.max_steps == 60 and saved.optim.lr == pytest.approx(1e-3)
    spec = get_backbone("wan_ti2v")
    dit = spec.build("tiny", {"dit"}, spec.default_ckpt_dir("tiny"))["dit"]   # the base the run trained on
    before = _eval_loss(dit, shared)
    load_lora(dit, lora)
    after = _eval_loss(dit, shared)
    assert after < 0.75 * before, (before, after)


def test_resume_is_exact(shared, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _run(shared, straight, "--max-steps", "6", "optim.warmup_steps=2", "optim.schedule=constant",
                "lora.dropout=0.1") == 0
    assert _run(shared, resumed, "--max-steps", "3", "optim.warmup_steps=2", "optim.schedule=constant",
                "lora.dropout=0.1", "train.ckpt_every=3") == 0
    assert (resumed / "checkpoints" / "step-3" / "state.json").is_file()
    # warm-up then constant: the learning rate of a step does not depend on max_steps
    assert _run(shared, resumed, "--max-steps", "6", "optim.warmup_steps=2", "optim.schedule=constant",
                "lora.dropout=0.1", "--resume", "latest") == 0
    a, b = _losses(straight), _losses(resumed)
    assert len(b) == 3 + 3
    assert a[3:] == b[3:], (a, b)
    sa, sb = load_file(str(straight / "lora.safetensors")), load_file(str(resumed / "lora.safetensors"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resumed_cosine_schedule_follows_the_new_max_steps(shared, tmp_path):
    out = tmp_path / "cos"
    assert _run(shared, out, "--max-steps", "3", "optim.schedule=cosine", "train.ckpt_every=3") == 0
    assert _run(shared, out, "--max-steps", "6", "optim.schedule=cosine", "--resume", "latest") == 0
    lrs = [json.loads(line)["lr"] for line in open(out / "metrics.jsonl")]
    from lora_core.runtime.config import OptimConfig
    from lora_core.runtime.optim import lr_factor
    cfg = OptimConfig(lr=1e-3, schedule="cosine")
    assert lrs[3:] == pytest.approx([1e-3 * lr_factor(s, cfg, 6) for s in (3, 4, 5)])


def test_resume_latest_without_checkpoint_starts_fresh_and_bad_path_fails(shared, tmp_path):
    assert _run(shared, tmp_path / "fresh", "--max-steps", "2", "--resume", "latest") == 0
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _run(shared, tmp_path / "x", "--resume", str(tmp_path / "nowhere"))


def test_config_errors_name_the_key(shared, tmp_path):
    with pytest.raises(ValueError, match="optim.lrr"):
        _run(shared, tmp_path / "a", "optim.lrr=1")
    with pytest.raises(ValueError, match="train.max_steps"):
        _run(shared, tmp_path / "b", "train.max_steps=many")
    with pytest.raises(ValueError, match="optim.name"):
        _run(shared, tmp_path / "c", "optim.name=sgd")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lora:\n  rank: 4\n  alpha: 8\noptim:\n  lr: 1e-4\n")
    cfg = load_config(cfg_file, ["lora.rank=8"])
    assert cfg.lora.rank == 8 and cfg.lora.alpha == 8.0 and cfg.optim.lr == pytest.approx(1e-4)


def test_adamw8bit_and_grad_accum(shared, tmp_path, monkeypatch):
    """grad_accum=2: two forwards per optimizer step, the logged loss is their mean, and the optimizer steps once
    per step (an ignored grad_accum fails each of these)."""
    pytest.importorskip("bitsandbytes")
    spec = get_backbone("wan_ti2v")
    real = type(spec).training_loss
    micro_losses: list[float] = []

    def recording(self, *a, **k):
        loss = real(self, *a, **k)
        micro_losses.append(loss.item())
        return loss

    monkeypatch.setattr(type(spec), "training_loss", recording)
    import bitsandbytes as bnb
    real_step = bnb.optim.AdamW8bit.step
    steps = {"n": 0}

    def counting(self, *a, **k):
        steps["n"] += 1
        return real_step(self, *a, **k)

    monkeypatch.setattr(bnb.optim.AdamW8bit, "step", counting)
    out = tmp_path / "bnb"
    assert _run(shared, out, "--max-steps", "3", "optim.name=adamw8bit", "train.grad_accum=2",
                "--batch-size", "2") == 0
    logged = _losses(out)
    assert len(micro_losses) == 6 and steps["n"] == 3
    assert logged == pytest.approx([(micro_losses[2 * i] + micro_losses[2 * i + 1]) / 2 for i in range(3)],
                                   rel=1e-6)


def test_nonfinite_loss_stops_or_skips(shared, tmp_path, monkeypatch):
    spec = get_backbone("wan_ti2v")
    real = type(spec).training_loss
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        loss = real(self, *a, **k)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(type(spec), "training_loss", flaky)
    with pytest.raises(FloatingPointError, match="step 2"):
        _run(shared, tmp_path / "nan", "--max-steps", "4")
    calls["n"] = 0
    assert _run(shared, tmp_path / "skip", "--max-steps", "4", "train.skip_nonfinite=true") == 0
    assert [json.loads(line)["step"] for line in open(tmp_path / "skip" / "metrics.jsonl")] == [1, 3, 4]


def test_bad_data_fails_before_any_model_is_built(tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "clip.mp4").write_bytes(os.urandom(2000))
    (bad / "clip.txt").write_text("a caption")
    spec = get_backbone("wan_ti2v")

    def no_build(*a, **k):
        raise AssertionError("a model was built before the data was checked")

    monkeypatch.setattr(type(spec), "build", no_build)
    with pytest.raises(ValueError, match="bad"):
        train.main(["--preset", "tiny", "--data", str(bad), "--output", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train.main(["--preset", "tiny", "--ckpt-dir", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="needs --ckpt-dir"):
        train.main(["--preset", "5b", "--output", str(tmp_path / "o")])


def test_sigterm_writes_a_checkpoint_then_resume_continues(shared, tmp_path):
    data, cache = shared
    out = tmp_path / "sig"
    cmd = [sys.executable, str(ROOT / "train.py"), "--preset", "tiny", "--data", str(data), "--output", str(out),
           "--max-steps", "100000", f"train.cache_dir={cache}", "train.log_every=0", "validation.at_end=false"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()[-2000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    last = steps[-1]
    assert (out / "checkpoints" / f"step-{last}" / "trainable.safetensors").is_file()
    assert _run(shared, out, "--max-steps", str(last + 2), "--resume", "latest") == 0
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps[-2:] == [last + 1, last + 2]


def test_validation_samples_are_written_as_mp4(shared, tmp_path):
    from lora_core.data.video_io import read_video
    out = tmp_path / "val"
    assert _run(shared, out, "--max-steps", "2", "validation.every=2", "validation.prompts=[a red square]",
                "validation.steps=2", "validation.frames=9", "validation.height=32", "validation.width=64") == 0
    video = read_video(out / "samples" / "step000002_0.mp4")
    assert video.shape == (9, 32, 64, 3)


def test_resume_cuts_metrics_back_to_the_checkpoint(shared, tmp_path):
    out = tmp_path / "m"
    assert _run(shared, out, "--max-steps", "4", "train.ckpt_every=2") == 0
    assert [json.loads(x)["step"] for x in open(out / "metrics.jsonl")] == [1, 2, 3, 4]
    # a kill after step 4's row but before its checkpoint: resume from step 2 cuts rows 3-4, then logs 3-5
    import shutil
    shutil.rmtree(out / "checkpoints" / "step-4")
    assert _run(shared, out, "--max-steps", "5", "--resume", "latest") == 0
    assert [json.loads(x)["step"] for x in open(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_resume_refuses_a_changed_data_order(shared, tmp_path):
    out = tmp_path / "order"
    assert _run(shared, out, "--max-steps", "2", "train.ckpt_every=1") == 0
    with pytest.raises(ValueError, match=r"grad_accum: 1 -> 2"):
        _run(shared, out, "--max-steps", "4", "--resume", "latest", "train.grad_accum=2")
    with pytest.raises(ValueError, match=r"global_batch: 1 -> 2"):
        _run(shared, out, "--max-steps", "4", "--resume", "latest", "--batch-size", "2")
    saved = (out / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"LoRA scale \(lora.alpha: 32.0 -> 8.0\)"):
        _run(shared, out, "--max-steps", "4", "--resume", "latest", "lora.alpha=8")
    with pytest.raises(ValueError, match=r"changes lora.rank: 32 -> 8;"):  # the rank named, not "targets"
        _run(shared, out, "--max-steps", "4", "--resume", "latest", "lora.rank=8", "lora.alpha=8")
    with pytest.raises(ValueError, match=r"lora.targets: None -> \['ffn.0'\]"):
        _run(shared, out, "--max-steps", "4", "--resume", "latest", "lora.targets=[ffn.0]")
    assert (out / "config.yaml").read_text() == saved  # nothing was written before the refusals


@pytest.mark.parametrize("override,key", [
    ("lora.rank=0", "lora.rank"), ("lora.alpha=-1", "lora.alpha"), ("optim.lr=-1e-4", "optim.lr"),
    ("optim.lr=.nan", "optim.lr"), ("optim.betas=[0.9]", "optim.betas"), ("optim.betas=[0.9, 1.0]", "optim.betas"),
    ("train.grad_accum=0", "train.grad_accum"), ("train.ckpt_every=-1", "train.ckpt_every"),
    ("train.max_steps=0", "train.max_steps"), ("optim.warmup_steps=-2", "optim.warmup_steps"),
    ("objective.first_frame_prob=2", "objective.first_frame_prob"), ("lora.dropout=1.5", "lora.dropout"),
])
def test_every_numeric_field_is_checked_before_any_work(tmp_path, override, key, monkeypatch):
    spec = get_backbone("wan_ti2v")
    monkeypatch.setattr(type(spec), "build", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        train.main(["--preset", "tiny", "--data", str(tmp_path / "none"), "--output", str(tmp_path / "o"), override])
    assert not (tmp_path / "o").exists()


def test_yaml_regex_target_and_patterns_reach_injection(shared, tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text('lora:\n  targets: "blocks\\\\.0\\\\.self_attn\\\\.(q|k)"\n  rank: 4\n  alpha: 4\n'
                        '  rank_pattern: {"self_attn.k": 2}\n')
    out = tmp_path / "rx"
    assert _run(shared, out, "--config", str(cfg_file), "--max-steps", "1") == 0
    lf = read_lora(out / "lora.safetensors")
    mods = {stem: m for (_, stem), m in lf.modules.items()}
    assert sorted(mods) == ["blocks.0.self_attn.k", "blocks.0.self_attn.q"], sorted(mods)
    assert mods["blocks.0.self_attn.k"]["A"].shape[0] == 2
    assert mods["blocks.0.self_attn.q"]["A"].shape[0] == 4


def test_validation_builds_its_components_once(shared, tmp_path, monkeypatch):
    spec = get_backbone("wan_ti2v")
    real = type(spec).build
    asked: list[set] = []

    def counting(self, preset, parts, *a, **k):
        asked.append(set(parts))
        return real(self, preset, parts, *a, **k)

    monkeypatch.setattr(type(spec), "build", counting)
    assert _run(shared, tmp_path / "v", "--max-steps", "4", "validation.every=2", "validation.prompts=[a]",
                "validation.steps=1", "validation.frames=5", "validation.height=32", "validation.width=32") == 0
    assert sum(1 for p in asked if "vae" in p) == 1, asked


def test_print_config_lists_every_section(capsys):
    assert train.main(["--preset", "tiny", "--print-config"]) == 0
    text = capsys.readouterr().out
    for section in ("model:", "lora:", "data:", "optim:", "train:", "parallel:", "validation:", "objective:"):
        assert section in text
    assert "first_frame_prob: 0.2" in text and "frame_multiple: 4" in text


def test_user_errors_print_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--preset", "tiny", "lora.rank=0",
                        "--output", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr, r.stderr


def test_written_files_respect_the_umask(shared, tmp_path):
    """safetensors and temporary files are 0600; every file the run writes gets the umask's mode instead."""
    out = tmp_path / "perm"
    old = os.umask(0o022)
    try:
        assert _run(shared, out, "--max-steps", "1") == 0
    finally:
        os.umask(old)
    for f in [out / "lora.safetensors", *(out / "checkpoints").rglob("*.*")]:
        assert f.stat().st_mode & 0o777 == 0o644, (f, oct(f.stat().st_mode))


def test_random_5b_text_encoder_is_refused_before_allocating(monkeypatch):
    """Without weights only the tiny preset runs; the 5b refusal comes before 5.7B parameters are allocated."""
    from backbones.encoders import t5

    def no_alloc(*a, **k):
        raise AssertionError("the text encoder was allocated before the refusal")

    monkeypatch.setattr(t5.UMT5Encoder, "__init__", no_alloc)
    with pytest.raises(ValueError, match="needs --ckpt-dir"):
        get_backbone("wan_ti2v").build("5b", {"text_encoder"})


def test_broken_tensorboard_is_reported_as_broken(shared, tmp_path, monkeypatch, caplog):
    import builtins
    real_import = builtins.__import__

    def broken(name, *a, **k):
        if name == "torch.utils.tensorboard":
            raise RuntimeError("libprotobuf ABI mismatch")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", broken)
    with caplog.at_level(logging.WARNING, logger="train"):
        assert _run(shared, tmp_path / "tb", "--max-steps", "1") == 0
    assert "failed to import (RuntimeError: libprotobuf ABI mismatch)" in caplog.text
    assert "not installed" not in caplog.text


def test_bad_ulysses_fails_before_the_output_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"ulysses\(4\) != WORLD_SIZE\(2\)"):
        train.main(["--preset", "tiny", "--ulysses", "4", "--output", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_a_second_run_into_a_used_folder_is_refused(shared, tmp_path):
    """Without --resume a folder holding a run is refused (its checkpoints would be pruned by the old run's
    higher steps), naming both ways out; a folder holding only a cache is free."""
    out = tmp_path / "used"
    assert _run(shared, out, "--max-steps", "3", "train.ckpt_every=3") == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(ValueError, match=r"already holds a run .*--resume latest.*another --output"):
        _run(shared, out, "--max-steps", "2")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    data, cache = shared
    warm = tmp_path / "warm"
    assert train.main(["--preset", "tiny", "--data", str(data), "--output", str(warm), "--cache-only",
                       f"train.cache_dir={cache}"]) == 0
    assert _run(shared, warm, "--max-steps", "1") == 0


def test_a_concurrent_run_is_refused_naming_the_holder(shared, tmp_path):
    out = tmp_path / "busy"
    from lora_core.runtime.run_folder import RunLock
    holder = RunLock(out).acquire()
    try:
        with pytest.raises(ValueError, match=rf"in use by a running training .*\"pid\": {os.getpid()}"):
            _run(shared, out, "--max-steps", "1")
    finally:
        holder.release()
    assert _run(shared, out, "--max-steps", "1") == 0


def test_damaged_checkpoint_falls_back_and_leftovers_are_swept(shared, tmp_path, caplog):
    out = tmp_path / "dmg"
    assert _run(shared, out, "--max-steps", "4", "train.ckpt_every=2", "train.keep_last=3") == 0
    ck = out / "checkpoints"
    (ck / "step-4" / "optimizer.pt").write_bytes(b"PK\x03\x04 cut")
    (ck / ".step-6.abc.tmp").mkdir()
    (ck / "step-8").mkdir()                      # killed while pruning: no state.json
    with caplog.at_level(logging.WARNING):
        assert _run(shared, out, "--max-steps", "5", "--resume", "latest") == 0
    assert "step-4/optimizer.pt is unreadable" in caplog.text and "falling back" in caplog.text
    assert not (ck / ".step-6.abc.tmp").exists() and not (ck / "step-8").exists()
    assert [json.loads(x)["step"] for x in open(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    (ck / "step-5" / "state.json").write_text("{")
    with pytest.raises(ValueError, match=r"step-5/state.json is unreadable"):
        _run(shared, out, "--max-steps", "6", "--resume", str(ck / "step-5"))


def test_one_frame_samples_are_never_first_frame_conditioned():
    """An image (one latent frame) conditioned on its only frame has nothing to learn: never conditioned."""
    from backbones.objectives import flow
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 4, 1, 4, 4)
    _, _, mask, cond = flow.condition_training_batch(x0, torch.randn_like(x0), torch.full((8,), 0.5), 1.0, g)
    assert not cond.any() and mask.all()
    x0 = torch.randn(8, 4, 3, 4, 4)
    _, _, mask, cond = flow.condition_training_batch(x0, torch.randn_like(x0), torch.full((8,), 0.5), 1.0, g)
    assert cond.all() and not mask[:, :, 0].any()


def test_logs_to_a_file_are_plain_lines(shared, tmp_path):
    data, cache = shared
    with open(tmp_path / "log.txt", "w") as log_file:
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--preset", "tiny", "--data", str(data),
                            "--output", str(tmp_path / "o"), "--max-steps", "3", f"train.cache_dir={cache}",
                            "train.log_every=1", "validation.at_end=false"], cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, timeout=300)
    text = (tmp_path / "log.txt").read_text()
    assert r.returncode == 0, text[-3000:]
    assert "\r" not in text
    assert "step 3 loss" in text


def test_final_lora_dtype_follows_save_dtype(shared, tmp_path):
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32), ("fp16", torch.float16)):
        out = tmp_path / dtype
        assert _run(shared, out, "--max-steps", "1", f"lora.save_dtype={dtype}") == 0
        sd = load_file(str(out / "lora.safetensors"))
        assert {v.dtype for k, v in sd.items() if k.endswith(".weight")} == {torch_dtype}
        ck = load_file(str(out / "checkpoints" / "step-1" / "trainable.safetensors"))
        assert {v.dtype for v in ck.values()} == {torch.float32}   # the masters stay fp32


def test_kohya_file_carries_the_backbone_metadata(shared, tmp_path):
    out = tmp_path / "kohya"
    assert _run(shared, out, "--max-steps", "1", "lora.save_format=kohya") == 0
    meta = read_lora(out / "lora.safetensors").metadata
    assert meta["ss_network_module"] == "networks.lora_wan"
    assert meta["modelspec.architecture"] == "wan-2.2-ti2v-5b/lora" and meta["modelspec.title"] == "kohya"


@pytest.mark.parametrize("path", sorted(str(p) for p in (Path(__file__).parents[1] / "configs").glob("*/*.yaml")))
def test_every_shipped_config_resolves(path: str) -> None:
    """Each configs/<family>/*.yaml names a registered backbone and preset and passes every check of the config
    (the values a user starts from must not fail at step 0)."""
    cfg, spec = train.resolve_config(train.parse_args(["--config", path]))
    assert spec.name == cfg.model.backbone and cfg.model.preset in spec.presets
    assert Path(path).parent.name in (spec.name, spec.name.split("_")[0])

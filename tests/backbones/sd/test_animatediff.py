"""`--backbone animatediff` end to end on the tiny preset: motion LoRA and full motion-module training through
train.main from a WebVid-style CSV (cache, resume, validation GIFs, the three LoRA files, the motion-module
artifacts), the motion-module sources (original .ckpt / .safetensors, diffusers folder, adapters without a mid
block), LoRA interop (diffusers' AnimateDiffPipeline, the original MotionLoRA layout as the official code and
ComfyUI-AnimateDiff-Evolved read it, SWIFT checkpoints), a one-step loss against a hand-written SWIFT step,
infer.py (GIF, --merge, --save-merged) and the SD1.5 + v1-5-2 counts.

Oracles: diffusers 0.42 (`UNetMotionModel.from_unet2d`, `MotionAdapter`, `AnimateDiffPipeline.load_lora_weights`,
`DDIMScheduler`), the readers' key rules re-stated here, and hand-written formulas; never our writer read back by
our reader alone.

Shapes: tiny clips are 8 frames of 32x32 (latents [4, 8, 16, 16], the tiny VAE compresses 2x), text [77, 32].
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import infer
import train
from backbones.objectives.ddpm_samplers import DDIM_PRESETS, make_sampler
from backbones.registry import get_backbone
from backbones.sd import motion_checkpoint as mck
from backbones.sd.animatediff import AnimateDiffObjectiveConfig, set_motion_norm
from backbones.sd.motion import MOTION_ADAPTER_PRESETS, MotionAdapter
from backbones.sd.motion_keymap import motion_state_dict_to_original
from backbones.sd.unet_motion import UNetMotionModel
from backbones.spec import Batch, Sources
from lora_core.data.sample_data import make_sample_dataset
from lora_core.distributed import DistInfo
from lora_core.formats import load_lora, read_lora
from lora_core.inject import lora_layers, merge_lora
from tests.oracle import assert_same_training, randomize_, rel_err, torchrun_train

SPEC = get_backbone("animatediff")
TINY_MOTION = MOTION_ADAPTER_PRESETS["tiny"]
TINY_UNET_KW = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=8,
                    attention_head_dim=2)
TINY_ADAPTER_KW = dict(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                       motion_norm_num_groups=8, motion_max_seq_length=32)
# tiny motion modules: down 2 x 1, mid 1, up 2 x 2 = 7; 12 LoRA layers each
TINY_MODULES, TINY_LORA_LAYERS = 7, 84
STEPS = 12


def gif_frames(path: Path) -> list[np.ndarray]:
    im = Image.open(path)
    frames = []
    for i in range(getattr(im, "n_frames", 1)):
        im.seek(i)
        frames.append(np.asarray(im.convert("RGB")))
    return frames


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("animatediff")


@pytest.fixture(scope="module")
def webvid(root: Path) -> Path:
    """A WebVid-style CSV (`name`, `contentUrl`) whose videos live in another folder (data.media_root)."""
    videos = make_sample_dataset(root / "videos", num_clips=4)
    table = root / "results_2M_train.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["videoid", "contentUrl", "name"])
        w.writeheader()
        for i in range(4):
            caption = (videos / f"clip_{i:03d}.txt").read_text().strip()
            w.writerow({"videoid": str(1000 + i), "contentUrl": f"https://example.com/v/clip_{i:03d}.mp4",
                        "name": caption})
    return table


def ad_args(root: Path, webvid: Path, out: Path, *extra: str) -> list[str]:
    return ["--backbone", "animatediff", "--preset", "tiny", "--data", str(webvid), "--output", str(out),
            f"data.media_root={root / 'videos'}", f"train.cache_dir={root / 'cache'}", "train.log_every=0",
            *extra]


@pytest.fixture(scope="module")
def lora_run(root: Path, webvid: Path) -> Path:
    out = root / "lora_run"
    assert train.main(ad_args(root, webvid, out, "--max-steps", str(STEPS), "optim.lr=1e-2", "validation.every=6",
                              'validation.prompts=["a red square"]', "data.condition_dropout={caption: 0.1}")) == 0
    return out


@pytest.fixture(scope="module")
def full_run(root: Path, webvid: Path) -> Path:
    out = root / "full_run"
    assert train.main(ad_args(root, webvid, out, "--max-steps", "4", "components.unet.mode=full", "optim.lr=1e-3",
                              "objective.motion_norm=all_frames")) == 0
    return out


def tiny_unet() -> UNetMotionModel:
    return SPEC.build("tiny", {"unet"})["unet"]


# --------------------------------------------------------------------------------- 1. counts and targets
def test_sd15_counts_and_default_lora(capsys) -> None:
    from backbones.__main__ import main
    assert main(["info", "animatediff", "--preset", "sd15", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["components"]["unet"]["num_params"] == 1_312_730_244  # SD1.5 UNet + v1-5-2 adapter
    # SWIFT's motion LoRA (animatediff-sd15.md §6.4): 12 Linears x 21 modules at rank 8
    assert report["default_lora"] == {"component": "unet", "layers": 252, "rank": 8, "params": 5_135_360,
                                      "params_per_rank": 641_920}


def test_ddim_is_animatediffs() -> None:
    sampler = make_sampler("ddim", AnimateDiffObjectiveConfig(), **DDIM_PRESETS["animatediff"])
    sampler.set_timesteps(25)
    assert [int(t) for t in sampler.timesteps] == list(range(961, 0, -40))
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", steps_offset=1,
                                  clip_sample=False)
    torch.testing.assert_close(sampler.abar.float(), ref.alphas_cumprod.float())


# ------------------------------------------------------------------------------ 2. training end to end
def test_lora_run_trains_the_motion_modules_and_writes_three_files(lora_run: Path, root: Path, webvid: Path) -> None:
    assert len(losses(lora_run)) == STEPS
    native = read_lora(lora_run / "lora.safetensors")
    assert native.format == "native" and native.metadata["backbone"] == "animatediff"
    assert len(native.modules) == TINY_LORA_LAYERS
    assert all(".motion_modules." in stem for _, stem in native.modules)
    assert {e["alpha"] for e in native.modules.values()} == {32.0}
    diffusers_keys = load_file(str(lora_run / "lora_diffusers.safetensors"))
    assert all(k.startswith("unet.") and ".motion_modules." in k for k in diffusers_keys)
    original = load_file(str(lora_run / "motion_lora.safetensors"))
    assert len(original) == 2 * TINY_LORA_LAYERS
    assert all(".temporal_transformer." in k and re.search(r"_lora\.(down|up)\.weight$", k) for k in original)
    gifs = sorted((lora_run / "samples").glob("*.gif"))
    assert [g.name for g in gifs] == ["step000006_0.gif", "step000012_0.gif"]
    frames = gif_frames(gifs[-1])
    assert len(frames) == 8 and frames[0].shape == (32, 32, 3)
    assert not np.array_equal(frames[0], frames[-1])  # a video, not one image repeated

    # the objective on fixed draws falls once the LoRA is applied
    cfg, spec = train.resolve_config(train.parse_args(ad_args(root, webvid, root / "unused")))
    ds = train.prepare_dataset(cfg, spec, DistInfo())
    cached = train.prepare_cache(cfg, spec, ds, DistInfo(), torch.device("cpu"))
    entries = [(cached.cache.get(cached.media[i]), cached.cache.get(cached.text[i])) for i in cached.usable]
    assert entries[0][0]["latent_mean"].shape == (4, 8, 16, 16)
    draws = 6
    batch = Batch({"latent_mean": [m["latent_mean"] for m, _ in entries] * draws,
                   "latent_logvar": [m["latent_logvar"] for m, _ in entries] * draws,
                   "text": [t["text"] for _, t in entries] * draws},
                  [{}] * (draws * len(entries)), [500 + k for k in range(draws * len(entries))])
    unet = tiny_unet()
    with torch.no_grad():
        before = spec.training_loss({"unet": unet}, batch, cfg.objective).item()
        load_lora(unet, lora_run / "lora.safetensors", naming=spec.components("tiny")["unet"].naming)
        after = spec.training_loss({"unet": unet}, batch, cfg.objective).item()
    print(f"animatediff tiny: objective on fixed draws {before:.4f} -> {after:.4f} after {STEPS} steps")
    assert after < 0.9 * before, (before, after)


def test_resume_is_exact(root: Path, webvid: Path) -> None:
    straight, resumed = root / "straight", root / "resumed"
    common = ["data.condition_dropout={caption: 0.3}", "lora.save_dtype=fp32"]
    assert train.main(ad_args(root, webvid, straight, "--max-steps", "4", *common)) == 0
    assert train.main(ad_args(root, webvid, resumed, "--max-steps", "2", "train.ckpt_every=2", *common)) == 0
    assert train.main(ad_args(root, webvid, resumed, "--max-steps", "4", "--resume", "latest", *common)) == 0
    assert losses(straight) == losses(resumed)
    a, b = load_file(str(straight / "lora.safetensors")), load_file(str(resumed / "lora.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_full_mode_trains_only_the_motion_modules(full_run: Path) -> None:
    base = tiny_unet().state_dict()
    original = mck.locate_motion(full_run / "motion_module.safetensors")
    assert original.layout == "original"
    folder = mck.locate_motion(full_run / "motion_adapter")
    assert folder.layout == "diffusers"
    trained = SPEC.build("tiny", {"unet"}, Sources(extra={"motion_module": full_run / "motion_adapter"}))["unet"]
    again = SPEC.build("tiny", {"unet"}, Sources(extra={"motion_module": full_run / "motion_module.safetensors"}))
    after = trained.state_dict()
    spatial = [k for k in base if ".motion_modules." not in k]
    motion = [k for k in base if ".motion_modules." in k and not k.endswith(".pe")]
    assert all(torch.equal(base[k], after[k]) for k in spatial)        # the image UNet is bit-identical
    assert sum(not torch.equal(base[k], after[k]) for k in motion) > len(motion) // 2   # the motion modules moved
    assert all(torch.equal(after[k], again["unet"].state_dict()[k]) for k in after)     # both layouts agree
    # 588 entries in the v2 original file; here: every motion tensor, both tables per block
    raw = load_file(str(full_run / "motion_module.safetensors"))
    assert sum(k.endswith("pos_encoder.pe") for k in raw) == 2 * TINY_MODULES
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.MotionAdapter.from_pretrained(full_run / "motion_adapter")
    mine = {k: v for k, v in after.items() if ".motion_modules." in k}
    theirs = ref.state_dict()
    assert sorted(theirs) == sorted(mine)
    assert all(torch.equal(theirs[k], mine[k]) for k in mine)


# ------------------------------------------------------------------------------- 3. motion-module sources
def _random_motion_sd(cfg=TINY_MOTION, seed: int = 5) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        adapter = MotionAdapter(cfg)
    adapter.to_empty(device="cpu")
    randomize_(adapter, seed)
    for m in adapter.modules():
        if hasattr(m, "reset_parameters") and hasattr(m, "pe"):
            m.reset_parameters()
    return adapter.state_dict()


@pytest.mark.parametrize("layout", ["ckpt_flat", "ckpt_wrapped", "safetensors", "folder"])
def test_every_motion_layout_loads_the_same_weights(root: Path, layout: str) -> None:
    sd = _random_motion_sd()
    orig = motion_state_dict_to_original(sd)
    where = root / f"mm_{layout}"
    where.mkdir(exist_ok=True)
    if layout == "ckpt_flat":
        path = where / "mm.ckpt"
        torch.save(orig, path)
    elif layout == "ckpt_wrapped":
        path = where / "mm.ckpt"
        torch.save({"state_dict": orig, "global_step": 10}, path)
    elif layout == "safetensors":
        path = where / "mm.safetensors"
        save_file({k: v.clone().contiguous() for k, v in orig.items()}, str(path))
    else:
        path = mck.save_motion_adapter_folder(sd, TINY_MOTION, where / "adapter")
    unet = SPEC.build("tiny", {"unet"}, Sources(extra={"motion_module": path}))["unet"]
    got = unet.motion_state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in sd if not k.endswith(".pe"))


def test_adapters_without_a_mid_block_load_and_match_diffusers(root: Path) -> None:
    """v1/v3-style modules: no mid-block motion module, a 24-frame table (v1)."""
    from dataclasses import replace
    cfg = replace(TINY_MOTION, use_motion_mid_block=False, motion_max_seq_length=24)
    sd = _random_motion_sd(cfg)
    orig = motion_state_dict_to_original(sd)
    assert not any(k.startswith("mid_block.") for k in orig)
    path = root / "mm_v1.ckpt"
    torch.save(orig, path)
    got = mck.motion_config(mck.locate_motion(path), TINY_MOTION)
    assert got.use_motion_mid_block is False and got.motion_max_seq_length == 24
    unet = SPEC.build("tiny", {"unet"}, Sources(extra={"motion_module": path}))["unet"]
    assert not hasattr(unet.mid_block, "motion_modules")
    assert len(unet.units()) == len(tiny_unet().units()) - 1
    diffusers = pytest.importorskip("diffusers")
    d2 = diffusers.UNet2DConditionModel(**TINY_UNET_KW)
    adapter = diffusers.MotionAdapter(**{**TINY_ADAPTER_KW, "use_motion_mid_block": False,
                                         "motion_max_seq_length": 24})
    ref = diffusers.UNetMotionModel.from_unet2d(d2, adapter)
    ref.load_state_dict(unet.state_dict(), strict=True)
    set_motion_norm(unet, "all_frames")
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 6, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        want = ref(x, torch.tensor([10, 700]), ctx.repeat_interleave(6, 0)).sample  # diffusers: text per frame
        assert rel_err(unet(x, torch.tensor([10, 700]), ctx), want) < 1e-5


def test_bad_motion_sources_fail_before_any_build(root: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        SPEC.build("tiny", {"unet"}, Sources(extra={"motion_module": root / "nope.ckpt"}))
    sd = _random_motion_sd()
    orig = motion_state_dict_to_original(sd)
    truncated = root / "truncated.safetensors"
    save_file({k: v.clone().contiguous() for k, v in list(orig.items())[:-3]}, str(truncated))
    with pytest.raises(ValueError, match=r"truncated\.safetensors.*missing"):
        SPEC.check_sources("tiny", Sources(extra={"motion_module": truncated}), {"unet"})
    wrong = root / "not_motion.safetensors"
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(2, 2)}, str(wrong))
    with pytest.raises(ValueError, match=r"not_motion\.safetensors holds no motion-module keys"):
        SPEC.check_sources("tiny", Sources(extra={"motion_module": wrong}), {"unet"})
    from dataclasses import replace
    other = root / "sd15_sized.safetensors"  # a module for another UNet layout (3 levels)
    big = _random_motion_sd(replace(TINY_MOTION, block_out_channels=(32, 64, 64)))
    save_file({k: v.clone().contiguous() for k, v in motion_state_dict_to_original(big).items()}, str(other))
    with pytest.raises(ValueError, match=r"sd15_sized\.safetensors.*block_out_channels"):
        SPEC.check_sources("tiny", Sources(extra={"motion_module": other}), {"unet"})
    with pytest.raises(ValueError, match="needs --ckpt-dir"):
        SPEC.check_sources("sd15", Sources(extra={"motion_module": truncated}), {"unet"})


# -------------------------------------------------------------------------- 4. the objective, one step
def test_one_step_loss_equals_a_hand_written_swift_step() -> None:
    """SWIFT's step (§6.3) with diffusers' UNetMotionModel and DDIMScheduler.add_noise, fed the draws our
    objective takes from sample i's generator (latent ε, then t, then the noise)."""
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_unet()
    ref = diffusers.UNetMotionModel.from_unet2d(diffusers.UNet2DConditionModel(**TINY_UNET_KW),
                                                diffusers.MotionAdapter(**TINY_ADAPTER_KW))
    ref.load_state_dict(unet.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    means, logvars = torch.randn(2, 4, 6, 8, 8, generator=g), torch.randn(2, 4, 6, 8, 8, generator=g) - 3
    text = torch.randn(2, 77, 32, generator=g)
    batch = Batch({"latent_mean": list(means), "latent_logvar": list(logvars), "text": list(text)}, [{}, {}], [7, 8])
    cfg = AnimateDiffObjectiveConfig(motion_norm="all_frames")
    with torch.no_grad():
        ours = SPEC.training_loss({"unet": unet}, batch, cfg)
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="linear", steps_offset=1, clip_sample=False)
    noisy, noises, ts = [], [], []
    for i, seed in enumerate([7, 8]):
        gi = torch.Generator().manual_seed(seed)
        z = (means[i] + torch.exp(0.5 * logvars[i]) * torch.randn(means[i].shape, generator=gi)) * 0.18215
        t = torch.randint(0, 1000, (1,), generator=gi)
        eps = torch.randn(z.shape, generator=gi)
        noisy.append(sched.add_noise(z[None], eps[None], t)[0])
        noises.append(eps)
        ts.append(t)
    with torch.no_grad():
        pred = ref(torch.stack(noisy), torch.cat(ts), text.repeat_interleave(6, 0)).sample
    want = F.mse_loss(pred.float(), torch.stack(noises).float())
    assert abs(ours.item() - want.item()) <= 1e-5 * want.item(), (ours.item(), want.item())


# ------------------------------------------------------------------------------------- 5. LoRA interop
def test_diffusers_file_loads_in_animatediff_pipeline(lora_run: Path, root: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    base = root / "base_export"
    comps = SPEC.build("tiny", {"unet", "vae", "text_encoder"})
    SPEC.save_checkpoint(comps, base)
    pipe = diffusers.AnimateDiffPipeline(
        vae=diffusers.AutoencoderKL.from_pretrained(base / "vae"),
        text_encoder=transformers.CLIPTextModel.from_pretrained(base / "text_encoder"),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(base / "tokenizer"),
        unet=diffusers.UNet2DConditionModel.from_pretrained(base / "unet"),
        motion_adapter=diffusers.MotionAdapter.from_pretrained(base / "motion_adapter"),
        scheduler=diffusers.DDIMScheduler(beta_schedule="linear", steps_offset=1, clip_sample=False))
    # diffusers 0.42 calls the motion modules' proj_in / proj_out as `proj_in(input=...)`, which PEFT's LoRA wrapper
    # does not accept: its pipeline takes a motion LoRA everywhere but there (the README says so)
    sd = load_file(str(lora_run / "lora_diffusers.safetensors"))
    usable = root / "lora_diffusers_attention_ff.safetensors"
    save_file({k: v for k, v in sd.items() if ".proj_in." not in k and ".proj_out." not in k}, str(usable))
    pipe.load_lora_weights(str(usable))
    ours = comps["unet"]
    load_lora(ours, usable, naming=SPEC.components("tiny")["unet"].naming)
    set_motion_norm(ours, "all_frames")  # diffusers' GroupNorm
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(1, 4, 8, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        frames_ctx = ctx.repeat_interleave(8, 0)  # diffusers >= 0.31 takes the text per frame
        want = pipe.unet(x, torch.tensor([300]), frames_ctx).sample
        plain = diffusers.UNetMotionModel.from_unet2d(
            diffusers.UNet2DConditionModel.from_pretrained(base / "unet"),
            diffusers.MotionAdapter.from_pretrained(base / "motion_adapter"))(x, torch.tensor([300]), frames_ctx).sample
        got = ours(x, torch.tensor([300]), ctx)
    assert rel_err(want, plain) > 1e-3  # the LoRA does something there
    assert rel_err(got, want) < 1e-5


def _ade_merge(state: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], strength: float) -> dict:
    """ComfyUI-AnimateDiff-Evolved / AnimateDiff's rule for an original-layout motion LoRA: strip `processor.`,
    `_lora`, `down.`/`up.`, `to_out.` -> `to_out.0.`, add strength * up @ down to that original-named weight."""
    out = dict(state)
    for key, down in lora.items():
        if "up." in key:
            continue
        up = lora[key.replace(".down.", ".up.")]
        name = key.replace("processor.", "").replace("_lora", "").replace("down.", "").replace("up.", "")
        name = name.replace("to_out.", "to_out.0.")
        out[name] = out[name] + strength * (up.float() @ down.float())
    return out


def test_original_layout_merges_as_the_official_readers_do(lora_run: Path) -> None:
    unet = tiny_unet()
    before = {k: v.clone() for k, v in motion_state_dict_to_original(unet.motion_state_dict()).items()}
    want = _ade_merge(before, load_file(str(lora_run / "motion_lora.safetensors")), 0.7)
    load_lora(unet, lora_run / "motion_lora.safetensors", 0.7, naming=SPEC.components("tiny")["unet"].naming)
    merge_lora(unet)
    got = motion_state_dict_to_original({k: v for k, v in unet.state_dict().items()
                                         if ".motion_modules." in k and ".lora_" not in k})
    assert sorted(got) == sorted(want)
    changed = [k for k in want if not torch.equal(want[k], before[k])]
    assert len(changed) == TINY_LORA_LAYERS
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    # and the trained LoRA it came from: the same merged weights at strength 0.7
    ref = tiny_unet()
    load_lora(ref, lora_run / "lora.safetensors", 0.7, naming=SPEC.components("tiny")["unet"].naming)
    merge_lora(ref)
    for k, v in ref.state_dict().items():
        if ".lora_" not in k:  # the weights; the files' A/B differ by the folded scale
            torch.testing.assert_close(unet.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_motionlora_ckpt_and_swift_folder_load(lora_run: Path, root: Path) -> None:
    """An original MotionLoRA .ckpt (pickled, read weights-only) and a SWIFT checkpoint folder
    (default/adapter_model.bin with `lora_A.default` keys, r 8 / alpha 32 in adapter_config.json)."""
    native = load_file(str(lora_run / "lora.safetensors"))
    ckpt = root / "v2_lora_Mine.ckpt"
    torch.save(load_file(str(lora_run / "motion_lora.safetensors")), ckpt)
    swift = root / "swift" / "iter-12" / "default"
    swift.mkdir(parents=True)
    tensors = {}
    for key, t in native.items():
        if key.endswith(".lora_A"):
            tensors[key[:-len(".lora_A")] + ".lora_A.default.weight"] = t
        elif key.endswith(".lora_B"):
            tensors[key[:-len(".lora_B")] + ".lora_B.default.weight"] = t
    torch.save(tensors, swift / "adapter_model.bin")
    (swift / "adapter_config.json").write_text(json.dumps({"swift_type": "LORA", "r": 8, "lora_alpha": 32,
                                                           "lora_dropout": 0.05,
                                                           "target_modules": ".*motion_modules.*"}))
    naming = SPEC.components("tiny")["unet"].naming
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(1, 4, 8, 16, 16, generator=g), torch.randn(1, 77, 32, generator=g)
    outs = []
    for path in (lora_run / "lora.safetensors", ckpt, swift.parent):
        unet = tiny_unet()
        load_lora(unet, path, naming=naming)
        with torch.no_grad():
            outs.append(unet(x, torch.tensor([400]), ctx))
    # hand-written: W + (alpha / r) B A for every native module
    unet = tiny_unet()
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for key, a in native.items():
            if key.endswith(".lora_A"):
                name = key[:-len(".lora_A")]
                b, alpha = native[name + ".lora_B"].float(), native[name + ".alpha"].item()
                params[name + ".weight"].add_(alpha / a.shape[0] * (b @ a.float()))
        want = unet(x, torch.tensor([400]), ctx)
    for got in outs:
        assert rel_err(got, want) < 1e-5


def test_sd15_image_lora_applies_to_the_spatial_layers(root: Path) -> None:
    """A kohya SD1.5 LoRA (made for --backbone sd15) loads next to a motion LoRA."""
    from lora_core.formats import save_lora
    from lora_core.inject import inject_lora
    image = get_backbone("sd15").build("tiny", {"unet"})["unet"]
    inject_lora(image, ["to_q", "to_v"], 4, 4.0)
    for m in lora_layers(image).values():
        torch.nn.init.normal_(m.lora_B, std=0.02)
    path = save_lora(image, root / "image_lora.safetensors", format="kohya", backbone="sd15",
                     naming=get_backbone("sd15").components("tiny")["unet"].naming)
    unet = tiny_unet()
    names = load_lora(unet, path, naming=SPEC.components("tiny")["unet"].naming, backbone=SPEC.accepted_lora_backbones)
    assert len(names) == len(lora_layers(image)) and not any(".motion_modules." in n for n in names)


# ------------------------------------------------------------------------------------------ 6. infer.py
def test_infer_merges_writes_a_gif_and_exports(lora_run: Path, root: Path) -> None:
    plain, merged = root / "plain.gif", root / "merged.gif"
    common = ["--backbone", "animatediff", "--preset", "tiny", "--prompt", "a red square", "--frames", "8",
              "--negative-prompt", "bad quality"]
    assert infer.main([*common, "--output", str(plain)]) == plain
    assert infer.main([*common, "--lora", f"{lora_run / 'lora.safetensors'}:1.0", "--merge",
                       "--output", str(merged)]) == merged
    a, b = gif_frames(plain), gif_frames(merged)
    assert len(a) == len(b) == 8 and a[0].shape == (32, 32, 3)
    assert not np.array_equal(np.stack(a), np.stack(b))
    out = root / "merged_export"
    assert infer.main(["--backbone", "animatediff", "--preset", "tiny", "--lora", str(lora_run / "lora.safetensors"),
                       "--save-merged", str(out)]) == 0
    for f in ("unet/diffusion_pytorch_model.safetensors", "motion_adapter/config.json",
              "motion_adapter/diffusion_pytorch_model.safetensors", "motion_module.safetensors", "vae/config.json"):
        assert (out / f).is_file(), f
    # the export samples what the in-memory merge sampled (PNG frames: a GIF's adaptive palette amplifies 1e-6)
    merged_png, again_png = f"{root / 'merged_png'}/", f"{root / 'again_png'}/"
    infer.main([*common, "--lora", f"{lora_run / 'lora.safetensors'}:1.0", "--merge", "--output", merged_png])
    infer.main(["--backbone", "animatediff", "--preset", "tiny", "--ckpt-dir", str(out), "--prompt", "a red square",
                "--frames", "8", "--negative-prompt", "bad quality", "--output", again_png])
    x, y = (np.stack([np.asarray(Image.open(p)) for p in sorted(Path(d).glob("*.png"))]) for d in (merged_png, again_png))
    assert x.shape == y.shape == (8, 32, 32, 3)
    assert np.abs(x.astype(int) - y.astype(int)).max() <= 1


# ------------------------------------------------------------------------------------ 7. several processes
@pytest.mark.parametrize("mode,layout", [("lora", "ddp"), ("full", "fsdp")])
def test_torchrun_equals_one_process(root: Path, webvid: Path, mode: str, layout: str) -> None:
    """DDP (motion LoRA) and FSDP2 (full motion modules), both with gradient checkpointing, 2 processes x 1
    sample against 1 process x 2 samples: the same losses and the same trained tensors."""
    common = ["--max-steps", "3", "train.gradient_checkpointing=true", "lora.save_dtype=fp32",
              f"components.unet.mode={mode}", "optim.lr=1e-3"]
    single, multi = root / f"single_{mode}", root / f"{layout}_{mode}"
    assert train.main(ad_args(root, webvid, single, *common, "--batch-size", "2")) == 0
    torchrun_train(ad_args(root, webvid, multi, *common, "--batch-size", "1", "--parallel", layout))
    name = "lora.safetensors" if mode == "lora" else "motion_module.safetensors"
    assert_same_training(losses(single), losses(multi), load_file(str(single / name)), load_file(str(multi / name)),
                         lr=1e-3, steps=3)

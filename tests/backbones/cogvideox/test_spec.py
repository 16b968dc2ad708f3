"""`--backbone cogvideox` end to end on the tiny preset: training through train.main on a CogVideoX
prompts.txt + videos.txt folder (diffusers-format LoRA, objective falls, validation videos), the LoRA file in
diffusers' CogVideoXTransformer3DModel, infer.py (merge, --save-merged in the official layout, reloaded by
--ckpt-dir and by diffusers), a broken checkpoint refused before any load, and the 5B sizes.

Oracles: diffusers 0.42 (`CogVideoXTransformer3DModel`, its `load_lora_adapter` through PEFT,
`AutoencoderKLCogVideoX.from_pretrained`) with the same weights; never our writer read back by our reader alone.

Shapes (tiny): clips 9 frames x 64 x 96 -> latents [16, 3, 8, 12], text [226, 32]; transformer input
[B, 3, 16, 8, 12] (frames before channels).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import infer
import train
from backbones.cogvideox import checkpoint as ck
from backbones.cogvideox.spec import TRANSFORMER_NAMING, CogVideoXSpec
from backbones.cogvideox.transformer import TRANSFORMER_PRESETS, CogVideoXConfig
from backbones.registry import get_backbone
from backbones.spec import Batch, Sources
from lora_core.data.video_io import read_video
from lora_core.distributed import DistInfo
from lora_core.formats import load_lora, read_lora
from tests.oracle import assert_same_training, torchrun_train

TINY = TRANSFORMER_PRESETS["tiny"]
STEPS = 12
PROMPT = "a red ball"
TINY_LORA_MODULES = TINY.num_layers * 4  # attn1 to_q, to_k, to_v, to_out.0 per block


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]


def diffusers_kwargs(cfg: CogVideoXConfig) -> dict[str, object]:
    return dict(num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
                in_channels=cfg.in_channels, out_channels=cfg.out_channels, time_embed_dim=cfg.time_embed_dim,
                text_embed_dim=cfg.text_embed_dim, num_layers=cfg.num_layers, sample_width=cfg.sample_width,
                sample_height=cfg.sample_height, sample_frames=cfg.sample_frames, patch_size=cfg.patch_size,
                max_text_seq_length=cfg.max_text_seq_length,
                use_rotary_positional_embeddings=cfg.use_rotary_positional_embeddings,
                use_learned_positional_embeddings=cfg.use_learned_positional_embeddings)


def transformer_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, TINY.in_channels, 8, 12, generator=g)
    ctx = torch.randn(2, TINY.max_text_seq_length, TINY.text_embed_dim, generator=g)
    return x, ctx, torch.tensor([999, 321])


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cogvideox")


@pytest.fixture(scope="module")
def data(root: Path) -> Path:
    """Four sample clips (33 frames at 24 fps, 64 x 96) as a CogVideoX folder: prompts.txt + videos.txt."""
    from lora_core.data.sample_data import make_sample_dataset
    folder = root / "data"
    make_sample_dataset(folder / "videos", num_clips=4)
    clips = sorted((folder / "videos").glob("*.mp4"))
    captions = [c.with_suffix(".txt").read_text().strip() for c in clips]
    for c in clips:
        c.with_suffix(".txt").unlink()  # the captions live in prompts.txt only
    (folder / "prompts.txt").write_text("\n".join(captions) + "\n")
    (folder / "videos.txt").write_text("\n".join(f"videos/{c.name}" for c in clips) + "\n")
    return folder


def args(data: Path, out: Path, root: Path, *extra: str) -> list[str]:
    return ["--backbone", "cogvideox", "--preset", "tiny", "--data", str(data), "--output", str(out),
            f"train.cache_dir={root / 'cache'}", "train.log_every=0", *extra]


@pytest.fixture(scope="module")
def trained(data: Path, root: Path) -> Path:
    out = root / "run"
    assert train.main(args(data, out, root, "--max-steps", str(STEPS), "optim.lr=1e-2", "validation.every=6",
                           f"validation.prompts={json.dumps([PROMPT])}")) == 0
    return out


def tiny_transformer() -> torch.nn.Module:
    return get_backbone("cogvideox").build("tiny", {"transformer"})["transformer"]


# --------------------------------------------------------------------------------- 1. training
def test_trains_a_diffusers_format_lora_whose_objective_falls(trained: Path, data: Path, root: Path) -> None:
    lora = trained / "lora.safetensors"
    sd = load_file(str(lora))
    lf = read_lora(lora)
    assert lf.format == "diffusers" and lf.metadata["backbone"] == "cogvideox"
    assert len(lf.modules) == TINY_LORA_MODULES and len(sd) == 2 * TINY_LORA_MODULES
    assert all(k.startswith("transformer.transformer_blocks.") and ".attn1." in k for k in sd)
    key = "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"
    assert sd[key].shape == (8, TINY.inner_dim)  # the tiny preset's rank 8
    assert sd["transformer.transformer_blocks.1.attn1.to_out.0.lora_B.weight"].abs().max() > 0
    assert len(losses(trained)) == STEPS

    cfg, spec = train.resolve_config(train.parse_args(args(data, root / "unused", root)))
    ds = train.prepare_dataset(cfg, spec, DistInfo())
    assert len(ds) == 4
    cached = train.prepare_cache(cfg, spec, ds, DistInfo(), torch.device("cpu"))
    entries = [(cached.cache.get(cached.media[i]), cached.cache.get(cached.text[i])) for i in cached.usable]
    assert len(entries) == 4
    assert entries[0][0]["latent_mean"].shape == (16, 3, 8, 12)  # 9 frames -> 3 latent frames, 64x96 / 8
    assert entries[0][1]["text"].shape == (226, TINY.text_embed_dim)
    transformer = tiny_transformer()
    draws = 8
    batch = Batch({"latent_mean": [m["latent_mean"] for m, _ in entries] * draws,
                   "latent_logvar": [m["latent_logvar"] for m, _ in entries] * draws,
                   "text": [t["text"] for _, t in entries] * draws},
                  [{}] * (draws * len(entries)), [700 + k for k in range(draws * len(entries))])

    def eval_loss() -> float:
        with torch.no_grad():
            return spec.training_loss({"transformer": transformer}, batch, cfg.objective).item()

    before = eval_loss()
    load_lora(transformer, lora, naming=TRANSFORMER_NAMING)
    after = eval_loss()
    print(f"cogvideox tiny: objective on fixed draws {before:.4f} -> {after:.4f} after {STEPS} steps")
    assert after < 0.95 * before, (before, after)


def test_validation_videos_are_written(trained: Path) -> None:
    files = sorted((trained / "samples").glob("*.mp4"))
    assert [f.name for f in files] == ["step000006_0.mp4", "step000012_0.mp4"]
    videos = [read_video(f) for f in files]  # uint8 [F, H, W, 3]
    assert all(v.shape == (9, 64, 96, 3) and v.std() > 0 for v in videos)
    assert not np.array_equal(videos[0], videos[1])  # the LoRA changed between the two


# --------------------------------------------------------------------------------- 1b. image to video
# The 5B-I2V scheme at toy size: 16 noisy + 16 image-latent channels, a learned table for 9 x 64 x 96 plus RoPE.
TINY_I2V = CogVideoXConfig(**{**dataclasses.asdict(TINY), "in_channels": 32, "sample_frames": 9,
                              "use_rotary_positional_embeddings": True,
                              "use_learned_positional_embeddings": True})


def tiny_i2v() -> torch.nn.Module:
    from backbones.cogvideox.transformer import CogVideoXTransformer3DModel
    torch.manual_seed(3)
    model = CogVideoXTransformer3DModel(TINY_I2V)
    model.patch_embed.pos_embedding.normal_(0, 0.1)
    return model


def test_i2v_caches_an_augmented_first_frame_and_conditions_on_it(data: Path, root: Path) -> None:
    spec = CogVideoXSpec()
    assert [f.name for f in spec.cache_fields("5b-i2v")][-2:] == ["image_mean", "image_logvar"]
    assert [c.name for c in spec.conditions("5b-i2v")] == ["caption", "image"]
    assert spec.image_inputs("5b-i2v") and not spec.image_inputs("5b")
    assert spec.preset_overrides("5b-i2v")["data.condition_dropout"] == {"image": 0.05}
    comps = spec.build("tiny", {"vae", "text_encoder", "tokenizer"})
    video = torch.rand(3, 9, 64, 96) * 2 - 1
    plain = spec.encode_media(comps, {"video": video})
    assert set(plain) == {"latent_mean", "latent_logvar"}  # T2V caches no image
    i2v = spec.encode_media({**comps, "preset": "5b-i2v"}, {"video": video})
    again = spec.encode_media({**comps, "preset": "5b-i2v"}, {"video": video})
    assert i2v["image_mean"].shape == (16, 1, 8, 12)
    assert torch.equal(i2v["image_mean"], again["image_mean"])  # the augmentation draw is fixed by the content
    clean, _ = comps["vae"].encode(video[None, :, :1])
    diff = (i2v["image_mean"] - clean[0]).abs().max().item()
    assert 0 < diff  # noise-augmented before encoding

    text = spec.encode_text(comps, ["a red ball", "a blue sky"])
    model = tiny_i2v()
    cfg = spec.objective_config("5b-i2v")
    fields = {"latent_mean": [i2v["latent_mean"]] * 2, "latent_logvar": [i2v["latent_logvar"]] * 2,
              "image_mean": [i2v["image_mean"]] * 2, "image_logvar": [i2v["image_logvar"]] * 2,
              "text": [t["text"] for t in text]}
    kept = Batch(fields, [{}, {}], [5, 6], {"image": [False, False]})
    loss = spec.training_loss({"transformer": model}, kept, cfg)
    loss.backward()
    assert torch.isfinite(loss) and model.patch_embed.proj.weight.grad[:, 16:].abs().max() > 0  # image channels

    # the same loss by hand: posterior draws, then t and noise, from each sample's generator
    from backbones.objectives import ddpm
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    m, lv = torch.stack(fields["latent_mean"]), torch.stack(fields["latent_logvar"])
    x0 = (m + torch.exp(0.5 * lv) * torch.stack([torch.randn(m.shape[1:], generator=g) for g in gens])) * 0.7
    im, ilv = torch.stack(fields["image_mean"]), torch.stack(fields["image_logvar"])
    z = (im + torch.exp(0.5 * ilv) * torch.stack([torch.randn(im.shape[1:], generator=g) for g in gens])) * 0.7
    x0, z = x0.permute(0, 2, 1, 3, 4), z.permute(0, 2, 1, 3, 4)
    z = torch.cat([z, torch.zeros(2, 2, 16, 8, 12)], dim=1)
    inp = ddpm.training_inputs(x0, cfg, gens)
    with torch.no_grad():
        pred = model(torch.cat([inp.x_t, z], dim=2), torch.stack(fields["text"]), inp.t)
        want = (pred - inp.target).square().mean()
        assert abs(spec.training_loss({"transformer": model}, kept, cfg).item() - want.item()) < 1e-6
        half = Batch(fields, [{}, {}], [5, 6], {"image": [True, False]})
        assert spec.training_loss({"transformer": model}, half, cfg).item() != loss.item()

    # sampling: the image is required and matters
    from backbones.spec import SampleRequest
    comps["transformer"] = model.eval()
    with pytest.raises(ValueError, match="--image"):
        spec.sample(comps, SampleRequest(prompts=[PROMPT], frames=9, height=64, width=96, steps=2))
    outs = [spec.sample(comps, SampleRequest(prompts=[PROMPT], images={"image": video[:, k]}, frames=9, height=64,
                                             width=96, steps=2)) for k in (0, 5)]
    assert outs[0].shape == (1, 3, 9, 64, 96) and not torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("size", [2, 3])
def test_training_loss_is_the_same_under_sequence_parallel(size: int) -> None:
    """The spec's objective through the transformer's Ulysses seams (ranks simulated by threads): every rank
    gets the single-process loss (video tokens sharded, 3 x 4 x 6 = 72 of them, text replicated)."""
    from tests.oracle import ThreadSP
    spec = CogVideoXSpec()
    assert spec.sequence_parallel("tiny") == TINY.num_attention_heads and spec.sequence_parallel("5b") == 48
    transformer = tiny_transformer().eval()
    g = torch.Generator().manual_seed(2)
    batch = Batch({"latent_mean": list(torch.randn(2, 16, 3, 8, 12, generator=g)),
                   "latent_logvar": list(torch.full((2, 16, 3, 8, 12), -4.0)),
                   "text": list(torch.randn(2, 226, TINY.text_embed_dim, generator=g))}, [{}, {}], [11, 12])
    cfg = spec.objective_config("tiny")

    class Loss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tr = transformer

        @property
        def sp(self):
            return self.tr.sp

        @sp.setter
        def sp(self, value) -> None:
            self.tr.sp = value

        def forward(self) -> torch.Tensor:
            return spec.training_loss({"transformer": self.tr}, batch, cfg)

    with torch.no_grad():
        plain = spec.training_loss({"transformer": transformer}, batch, cfg)
    outs = ThreadSP(size).run(Loss())
    assert all(abs(o.item() - plain.item()) <= 1e-5 * plain.item() for o in outs), (outs, plain)


# --------------------------------------------------------------------------------- 2. diffusers interop
def test_lora_file_gives_the_same_output_in_diffusers(trained: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    ours = tiny_transformer().eval()
    ref = diffusers.CogVideoXTransformer3DModel(**diffusers_kwargs(TINY)).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x, ctx, t = transformer_inputs()
    with torch.no_grad():
        base = ours(x, ctx, t)
        assert rel_err(ref(x, ctx, t, return_dict=False)[0], base) <= 1e-5
    lora = trained / "lora.safetensors"
    ref.load_lora_adapter(load_file(str(lora)), prefix="transformer", adapter_name="trained")
    load_lora(ours, lora, naming=TRANSFORMER_NAMING)
    with torch.no_grad():
        mine, theirs = ours(x, ctx, t), ref(x, ctx, t, return_dict=False)[0]
    err, delta = rel_err(mine, theirs), rel_err(mine - base, theirs - base)
    print(f"cogvideox LoRA in diffusers: rel err {err:.2e}, of the LoRA's effect {delta:.2e}")
    assert (theirs - base).abs().max() > 1e-4  # the LoRA does something
    assert err <= 1e-5 and delta <= 1e-4


# --------------------------------------------------------------------------------- 3. infer
def video_array(path: Path) -> np.ndarray:
    return read_video(path).astype(np.float32)  # [F, H, W, 3]


def test_infer_merges_and_exports_the_official_layout(trained: Path, root: Path) -> None:
    lora = trained / "lora.safetensors"
    plain, merged = root / "plain.mp4", root / "merged.mp4"
    assert infer.main(["--backbone", "cogvideox", "--preset", "tiny", "--prompt", PROMPT, "--output",
                       str(plain)]) == plain
    assert infer.main(["--backbone", "cogvideox", "--preset", "tiny", "--lora", str(lora), "--merge",
                       "--prompt", PROMPT, "--output", str(merged)]) == merged
    a, b = video_array(plain), video_array(merged)
    assert a.shape == b.shape and b.std() > 0
    assert not np.array_equal(a, b)

    out = root / "merged_folder"
    assert infer.main(["--backbone", "cogvideox", "--preset", "tiny", "--lora", str(lora), "--save-merged",
                       str(out)]) == 0
    for f in ("transformer/diffusion_pytorch_model.safetensors", "transformer/config.json",
              "vae/diffusion_pytorch_model.safetensors", "vae/config.json", "text_encoder/model.safetensors",
              "text_encoder/config.json", "tokenizer/spiece.model", "scheduler/scheduler_config.json",
              "model_index.json"):
        assert (out / f).is_file(), f
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["snr_shift_scale"] == 3.0

    spec = CogVideoXSpec()
    want = tiny_transformer()
    load_lora(want, lora, naming=TRANSFORMER_NAMING)
    x, ctx, t = transformer_inputs(1)
    back = spec.build("tiny", {"transformer", "vae", "text_encoder", "tokenizer"}, Sources(ckpt_dir=out))
    with torch.no_grad():
        assert rel_err(back["transformer"](x, ctx, t), want(x, ctx, t)) <= 1e-5
    fresh = spec.build("tiny", {"vae", "text_encoder"})
    for part in ("vae", "text_encoder"):
        a_sd, b_sd = back[part].state_dict(), fresh[part].state_dict()
        assert sorted(a_sd) == sorted(b_sd) and all(torch.equal(a_sd[k], b_sd[k]) for k in a_sd)

    # --ckpt-dir of the export samples what the in-memory merge sampled
    again = root / "again.mp4"
    assert infer.main(["--backbone", "cogvideox", "--preset", "tiny", "--ckpt-dir", str(out), "--prompt", PROMPT,
                       "--output", str(again)]) == again
    assert np.abs(video_array(again) - b).max() <= 1

    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.CogVideoXTransformer3DModel.from_pretrained(out / "transformer")
    sd = back["transformer"].state_dict()
    assert sorted(ref.state_dict()) == sorted(sd)
    assert all(torch.equal(ref.state_dict()[k], sd[k]) for k in sd)
    vae = diffusers.AutoencoderKLCogVideoX.from_pretrained(out / "vae")
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in back["vae"].state_dict().items())
    assert vae.config.scaling_factor == pytest.approx(0.7)


def test_sampler_options(root: Path) -> None:
    spec = CogVideoXSpec()
    comps = spec.build("tiny", {"transformer", "vae", "text_encoder", "tokenizer"})
    from backbones.spec import SampleRequest
    outs = {}
    for name, extras in (("ddim", {}), ("dpm", {"sampler": "dpm"}), ("dyn", {"dynamic_cfg": True})):
        req = SampleRequest(prompts=[PROMPT], frames=9, height=64, width=96, steps=3, extras=extras)
        outs[name] = spec.sample(comps, req)
        assert outs[name].shape == (1, 3, 9, 64, 96) and outs[name].abs().max() <= 1
    assert not torch.equal(outs["ddim"], outs["dpm"]) and not torch.equal(outs["ddim"], outs["dyn"])


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_sampling_matches_diffusers_pipeline_on_the_exported_folder(sharded: Path, kind: str) -> None:
    """CogVideoXPipeline.from_pretrained(export) (transformers' T5 and T5Tokenizer, diffusers' VAE, transformer
    and scheduler) against spec.sample on the same folder: text encoding, negative prompt, CFG, noise, sampler,
    scaling and decode."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    pipe = diffusers.CogVideoXPipeline.from_pretrained(sharded)
    if kind == "dpm":
        pipe.scheduler = diffusers.CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
    size = dict(num_frames=9, height=64, width=96)
    with torch.no_grad():
        ref = pipe(prompt=PROMPT, num_inference_steps=3, guidance_scale=6.0, generator=torch.Generator().manual_seed(4),
                   output_type="pt", return_dict=False, **size)[0]  # [1, F, 3, H, W] in [0, 1]
    spec = CogVideoXSpec()
    from backbones.spec import SampleRequest
    comps = spec.build("tiny", {"transformer", "vae", "text_encoder", "tokenizer"}, Sources(ckpt_dir=sharded))
    ours = spec.sample(comps, SampleRequest(prompts=[PROMPT], frames=9, height=64, width=96, steps=3, guidance=6.0,
                                            seed=4, extras={"sampler": kind}))
    ours = (ours / 2 + 0.5).permute(0, 2, 1, 3, 4)
    err = (ours - ref).abs().max().item()
    print(f"cogvideox tiny vs CogVideoXPipeline ({kind}): max abs err {err:.2e}")
    assert ours.shape == ref.shape and err <= 1e-4


def test_i2v_sampling_matches_the_image_to_video_pipeline(sharded: Path) -> None:
    """CogVideoXImageToVideoPipeline (diffusers' I2V transformer with our tiny I2V weights, the exported VAE,
    T5 and tokenizer, the 5B schedule) against spec.sample with the same first frame and seed: the image
    posterior draw, its scaling and zero padding, the channel concatenation under CFG."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    ours_tr = tiny_i2v().eval()
    ref_tr = diffusers.CogVideoXTransformer3DModel(**diffusers_kwargs(TINY_I2V)).eval()
    ref_tr.load_state_dict(ours_tr.state_dict(), strict=True)
    sched = diffusers.CogVideoXDPMScheduler.from_pretrained(sharded / "scheduler", snr_shift_scale=1.0)
    pipe = diffusers.CogVideoXImageToVideoPipeline(
        tokenizer=transformers.T5Tokenizer.from_pretrained(sharded / "tokenizer"),
        text_encoder=transformers.T5EncoderModel.from_pretrained(sharded / "text_encoder"),
        vae=diffusers.AutoencoderKLCogVideoX.from_pretrained(sharded / "vae"), transformer=ref_tr,
        scheduler=sched)
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(8))  # [0, 1]
    with torch.no_grad():
        ref = pipe(image=image[None], prompt=PROMPT, num_frames=9, height=64, width=96, num_inference_steps=3,
                   guidance_scale=6.0, generator=torch.Generator().manual_seed(4), output_type="pt",
                   return_dict=False)[0]
    spec = CogVideoXSpec()
    from backbones.spec import SampleRequest
    comps = spec.build("tiny", {"vae", "text_encoder", "tokenizer"}, Sources(ckpt_dir=sharded))
    comps["transformer"] = ours_tr
    ours = spec.sample(comps, SampleRequest(prompts=[PROMPT], images={"image": image * 2 - 1}, frames=9,
                                            height=64, width=96, steps=3, guidance=6.0, seed=4))
    ours = (ours / 2 + 0.5).permute(0, 2, 1, 3, 4)
    err = (ours - ref).abs().max().item()
    print(f"cogvideox tiny I2V vs CogVideoXImageToVideoPipeline: max abs err {err:.2e}")
    assert ours.shape == ref.shape and err <= 1e-4


# --------------------------------------------------------------------------------- 4. broken checkpoints
@pytest.fixture(scope="module")
def sharded(root: Path) -> Path:
    """The tiny model exported with small shards (the 5B's transformer layout: index + several files)."""
    spec = CogVideoXSpec()
    out = root / "sharded"
    spec.save_checkpoint(spec.build("tiny", {"transformer", "vae", "text_encoder", "tokenizer"}), out,
                         max_shard_bytes=64 * 1024)
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (out / "text_encoder" / "model.safetensors.index.json").is_file()
    return out


def test_sharded_export_loads_back(sharded: Path) -> None:
    spec = CogVideoXSpec()
    back = spec.build("tiny", {"transformer", "text_encoder"}, Sources(ckpt_dir=sharded))
    fresh = spec.build("tiny", {"transformer", "text_encoder"})
    for part in ("transformer", "text_encoder"):
        a, b = back[part].state_dict(), fresh[part].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_shard_missing_a_key_fails_before_any_load(sharded: Path, root: Path, monkeypatch) -> None:
    import shutil
    broken = root / "broken"
    shutil.copytree(sharded, broken)
    index = json.loads((broken / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    key = "transformer_blocks.1.attn1.to_k.weight"
    shard = broken / "transformer" / index["weight_map"][key]
    tensors = load_file(str(shard))
    del tensors[key]
    save_file(tensors, str(shard))

    def no_load(*a, **k):
        raise AssertionError("a weight was loaded before the checkpoint was checked")

    monkeypatch.setattr(ck, "load_safetensors_into", no_load)
    spec = CogVideoXSpec()
    with pytest.raises(ValueError) as e:
        spec.build("tiny", {"transformer", "vae", "text_encoder", "tokenizer"}, Sources(ckpt_dir=broken))
    assert shard.name in str(e.value) and key in str(e.value), str(e.value)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        infer.resolve(infer.parse_args(["--backbone", "cogvideox", "--preset", "tiny", "--ckpt-dir", str(broken),
                                        "--prompt", PROMPT, "--output", str(root / "x.mp4")]))


def test_a_mismatched_preset_is_refused(sharded: Path) -> None:
    with pytest.raises(ValueError, match="num_attention_heads.*preset '2b'"):
        CogVideoXSpec().check_sources("2b", Sources(ckpt_dir=sharded), {"transformer"})
    with pytest.raises(FileNotFoundError, match="vae"):
        CogVideoXSpec().check_sources("tiny", Sources(ckpt_dir=sharded / "transformer"), {"vae"})


# --------------------------------------------------------------------------------- 5. sizes
def test_info_reports_the_5b_sizes(capsys) -> None:
    from backbones.__main__ import main
    assert main(["info", "cogvideox", "--preset", "5b", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    counts = {n: c["num_params"] for n, c in report["components"].items()}
    # cogvideox.md §1, §3.7, §4.1 (counted on diffusers / transformers meta models)
    assert counts == {"transformer": 5_570_283_072, "vae": 215_583_907, "text_encoder": 4_762_310_656}
    assert report["default_targets"] == ["to_q", "to_k", "to_v", "to_out.0"]
    lora = report["default_lora"]
    assert lora["layers"] == 42 * 4 and lora["params_per_rank"] == 1_032_192  # §7.1: 1,032,192 r
    assert lora["rank"] == 128 and lora["params"] == 1_032_192 * 128


# ------------------------------------------------------------------------ I2V, validation, several processes
def test_tiny_i2v_trains_end_to_end_and_infers_from_an_image(data: Path, root: Path) -> None:
    """`--preset tiny-i2v` (the I2V scheme at test size) through train.main with `:::`-separated validation
    prompts, two videos per prompt, then infer.py --image with the LoRA merged."""
    from PIL import Image
    image = root / "first.png"
    pixels = np.zeros((64, 96, 3), np.uint8)
    pixels[:, :48] = (200, 30, 30)
    Image.fromarray(pixels).save(image)
    out = root / "i2v_run"
    assert train.main(["--backbone", "cogvideox", "--preset", "tiny-i2v", "--data", str(data), "--output", str(out),
                       f"train.cache_dir={root / 'cache_i2v'}", "train.log_every=0", "--max-steps", "6",
                       "validation.every=6", "validation.prompts=a red ball ::: a blue cube",
                       "validation.videos_per_prompt=2", f"validation.images={{image: {image}}}"]) == 0
    assert len(losses(out)) == 6
    names = sorted(p.name for p in (out / "samples").glob("*.mp4"))
    assert names == [f"step000006_{i}_{k}.mp4" for i in range(2) for k in range(2)]
    a, b = (video_array(out / "samples" / n) for n in names[:2])
    assert not np.array_equal(a, b)  # two seeds
    lf = read_lora(out / "lora.safetensors")
    assert lf.format == "diffusers" and len(lf.modules) == TINY_LORA_MODULES
    plain, merged = root / "i2v_plain.mp4", root / "i2v_merged.mp4"
    common = ["--backbone", "cogvideox", "--preset", "tiny-i2v", "--prompt", PROMPT, "--image", str(image)]
    assert infer.main([*common, "--output", str(plain)]) == plain
    assert infer.main([*common, "--lora", str(out / "lora.safetensors"), "--merge", "--output", str(merged)]) == merged
    x, y = video_array(plain), video_array(merged)
    assert x.shape == y.shape and x.shape[0] == 9 and not np.array_equal(x, y)
    with pytest.raises(ValueError, match="--image"):
        infer.main([*common[:6], "--output", str(root / "no_image.mp4")])


@pytest.mark.parametrize("layout", ["ddp", "ulysses"])
def test_torchrun_equals_one_process(data: Path, root: Path, layout: str) -> None:
    """2 processes (DDP x 1 sample each, or Ulysses over the joint sequence: text replicated, video sharded, 2
    samples) against 1 process x 2 samples: the same losses and LoRA."""
    common = ["--max-steps", "3", "lora.save_dtype=fp32", "optim.lr=1e-3", "train.gradient_checkpointing=true"]
    single, multi = root / f"single_{layout}", root / f"multi_{layout}"
    assert train.main(args(data, single, root, *common, "--batch-size", "2")) == 0
    flags = ["--parallel", "ddp", "--batch-size", "1"] if layout == "ddp" else ["--ulysses", "2", "--batch-size", "2"]
    torchrun_train(args(data, multi, root, *common, *flags))
    assert_same_training(losses(single), losses(multi), load_file(str(single / "lora.safetensors")),
                         load_file(str(multi / "lora.safetensors")), lr=1e-3, steps=3)


def test_kohya_cogvideox_fun_file_merges_as_written(root: Path) -> None:
    """A CogVideoX-Fun / kohya file (`lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight`, `.alpha`),
    written here by hand: the merged weight is W + strength * alpha / r * up @ down."""
    from lora_core.inject import merge_lora
    g = torch.Generator().manual_seed(4)
    model = tiny_transformer()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    sd, want = {}, dict(base)
    for i in range(TINY.num_layers):
        for leaf in ("to_q", "to_v"):
            name = f"transformer_blocks.{i}.attn1.{leaf}"
            w = base[name + ".weight"]
            down, up = torch.randn(4, w.shape[1], generator=g), torch.randn(w.shape[0], 4, generator=g) * 0.1
            key = "lora_unet_" + name.replace(".", "_")
            sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)})
            want[name + ".weight"] = w + 0.5 * 2.0 / 4 * (up @ down)
    path = root / "fun_lora.safetensors"
    save_file(sd, str(path))
    assert read_lora(path).format == "kohya"
    load_lora(model, path, 0.5, naming=TRANSFORMER_NAMING)
    merge_lora(model)
    got = model.state_dict()
    for k in base:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)

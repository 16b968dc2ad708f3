"""Pretrain the tiny Wan2.2 TI2V base shipped in `backbones/wan/tiny_base/` (the embedded default).

    python -m backbones.wan.pretrain_tiny --out backbones/wan/tiny_base      # about 28 minutes on 2 CPU cores

Deterministic from `--seed` (same torch build and thread count). Three parts, the `tiny` preset's architecture:
1. VAE (the codec), trained on reconstruction of random scenes: one square or circle of a random colour moving
   in one of four directions across one of the palette's backgrounds (jittered), random 5-frame windows of a
   17-frame crossing at 64x64 (one image chunk and one 4-frame chunk, what the causal chunked codec repeats);
   L1 + MSE, the latent perturbed by noise (so the decoder tolerates a sampler's errors) and kept small;
   residual branches zero-initialised (`zero_init_branches`); then fewer steps on whole 17-frame clips, so
   every later chunk, decoded with the previous chunks' caches, is trained too (without them the error grew
   from chunk to chunk). Afterwards its
   latents are normalised to zero mean and unit variance per channel by folding the statistics into its 1x1
   `conv1` (mean half) and `conv2`, which is exact, so the latents the DiT sees suit the flow objective's unit
   noise. The codec sees every colour; the concept is held out of the generative model.
2. Text encoder: the preset's deterministic random umT5 (seed 2), kept as is: a fixed, distinct encoding of
   every caption, which the DiT learns to read through cross-attention; its tokenizer is the tiny one plus one
   whole-word piece per word of the captions (spelled letter by letter, the colour was a few characters
   among fifty and the DiT did not learn to read it). Words outside the captions ("sks", "magenta") are
   still spelled from letters.
3. DiT, trained with the fine-tuning objective itself (`WanTI2VSpec.training_loss`: flow matching, logit-normal
   sigma, first-frame conditioning with probability 0.2) on the latents of every named scene of
   `lora_core.demo.scenes` (2 shapes x 6 colours x 4 motions x 4 backgrounds, 17 frames), captions dropped to
   the empty text 10% of the time (classifier-free guidance's unconditional). Magenta is never shown to it:
   the demo's LoRA teaches it under a trigger word.
The folder is written in the official layout (`spec.save_checkpoint`), with `pretraining.json` recording the
command, seeds, steps, losses and timings.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lora_core.demo import scenes as sc
from lora_core.demo.pretrain import train_loop, write_record
from lora_core.runtime.batch import Batch

from ..encoders.t5_tokenizer import WanTokenizer, build_tiny_tokenizer
from ..registry import get_backbone
from ..spec import SampleRequest
from .vae import WanVAE

log = logging.getLogger("pretrain_tiny")
DEFAULT_OUT = Path(__file__).parent / "tiny_base"
SIZE, FRAMES, VAE_FRAMES = 64, 17, 5


def to_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> [3, F, H, W] float in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def random_scene(rng: np.random.Generator) -> sc.Scene:
    """A scene for the codec: a shape of any colour (at least 80 RGB units from the background) on one of the
    palette's backgrounds (each channel jittered by up to 20), on the demo's path."""
    bgs = list(sc.BACKGROUNDS.values())
    bg = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in bgs[rng.integers(len(bgs))])
    while True:
        fg = tuple(int(v) for v in rng.integers(0, 256, 3))
        if np.linalg.norm(np.subtract(fg, bg)) > 80:
            break
    return sc.Scene(shape=sc.SHAPES[rng.integers(2)], colour="any", motion=sc.MOTIONS[rng.integers(4)],
                    background="any", rgb=fg, bg_rgb=bg)


def zero_init_branches(vae: WanVAE) -> None:
    """Zero the last conv of every residual branch, resampler and attention block: each encoder (decoder) stage
    then starts as its parameter-free AvgDown3D (DupUp3D) shortcut, an average-pool (nearest-upsample) pyramid,
    and learns its branches from there; several times faster to train than the default init at this width."""
    from .vae import AttentionBlock, Resample, ResidualBlock
    with torch.no_grad():
        for m in vae.modules():
            conv = (m.residual[6] if isinstance(m, ResidualBlock) else m.resample[1] if isinstance(m, Resample)
                    else m.proj if isinstance(m, AttentionBlock) else None)
            if conv is not None:
                conv.weight.zero_()
                conv.bias.zero_()


def train_vae(vae: WanVAE, steps: int, batch: int, lr: float, seed: int, frames: int, name: str) -> dict:
    """Reconstruction steps on random `frames`-frame windows of FRAMES-frame crossings."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    vae.train()

    def clip() -> torch.Tensor:
        start = int(rng.integers(0, FRAMES - frames + 1))
        return to_video(sc.render(random_scene(rng), SIZE, SIZE, FRAMES)[start:start + frames])

    def loss_fn(step: int) -> torch.Tensor:
        x = torch.stack([clip() for _ in range(batch)])
        mu = vae.encode(x)
        z = mu + 0.05 * mu.detach().std() * torch.randn(mu.shape, generator=g)
        y = vae.decode(z, clamp=False)
        return (y - x).abs().mean() + (y - x).pow(2).mean() + 1e-4 * mu.pow(2).mean()

    out = train_loop(name, vae.parameters(), loss_fn, steps, lr, log_every=50)
    vae.eval()
    return {**out, "batch": batch, "frames": frames}


@torch.no_grad()
def normalise_latents(vae: WanVAE, videos: torch.Tensor) -> dict:
    """Fold per-channel latent mean/std (over `videos`) into conv1's mean half and conv2: encode then gives
    zero-mean unit-variance latents and decode undoes it, exactly (both convs are 1x1x1)."""
    mu = torch.cat([vae.encode(v[None]) for v in videos])                      # [N, Z, f, h, w]
    m = mu.mean(dim=(0, 2, 3, 4))
    s = mu.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    z = vae.cfg.z_dim
    w1, b1 = vae.conv1.weight, vae.conv1.bias
    w1[:z] /= s.view(-1, 1, 1, 1, 1)
    b1[:z] = (b1[:z] - m) / s
    w2, b2 = vae.conv2.weight, vae.conv2.bias
    b2 += (w2[:, :, 0, 0, 0] @ m)
    w2 *= s.view(1, -1, 1, 1, 1)
    return {"channel_mean": [round(float(v), 4) for v in m], "channel_std": [round(float(v), 4) for v in s]}


@torch.no_grad()
def psnr(vae: WanVAE, videos: torch.Tensor) -> float:
    err = torch.stack([(vae.decode(vae.encode(v[None]))[0] - v).pow(2).mean() for v in videos]).mean()
    return round(float(10 * torch.log10(4.0 / err)), 2)


def train_dit(spec, dit: torch.nn.Module, latents: list[torch.Tensor], contexts: list[torch.Tensor],
              empty: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> dict:
    cfg = spec.objective_config("tiny")
    g = torch.Generator().manual_seed(seed)
    dit.train()

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.randint(len(latents), (batch,), generator=g).tolist()
        drop = (torch.rand(batch, generator=g) < 0.1).tolist()
        ctx = [empty if d else contexts[i] for i, d in zip(idx, drop)]
        b = Batch({"latents": [latents[i] for i in idx], "context": ctx}, [{}] * batch,
                  [seed * 1_000_003 + step * batch + k for k in range(batch)])
        return spec.training_loss({"dit": dit}, b, cfg)

    out = train_loop("dit", dit.parameters(), loss_fn, steps, lr, weight_decay=0.01, log_every=100)
    dit.eval()
    return out


@torch.no_grad()
def evaluate(spec, comps: dict, scenes: list[sc.Scene], steps: int = 10) -> dict:
    """How well the base follows captions: sampled at the demo's settings (10 UniPC steps, guidance 5, seed 0),
    the share of scenes whose object colour is within 70 RGB units of the caption's and whose motion points
    the caption's way (cosine > 0.8); and the object colour it draws for the demo prompt (trigger word)."""
    from lora_core.demo import motion_direction, object_colour

    from .spec import DEMO_PROMPT
    colour_ok = direction_ok = 0
    for scene in scenes:
        video = spec.sample(comps, SampleRequest(prompts=[scene.caption()], frames=FRAMES, height=SIZE, width=SIZE,
                                                 steps=steps, seed=0))[0]
        got, d = object_colour(video), motion_direction(video)
        colour_ok += got is not None and float(np.linalg.norm(got - scene.colour_rgb())) < 70
        direction_ok += d is not None and float(np.dot(d, sc.DIRECTIONS[scene.motion])) > 0.8
    video = spec.sample(comps, SampleRequest(prompts=[DEMO_PROMPT], frames=FRAMES, height=SIZE, width=SIZE,
                                             steps=steps, seed=0))[0]
    demo = object_colour(video)
    return {"scenes": len(scenes), "colour_right": colour_ok, "direction_right": direction_ok,
            "demo_prompt": DEMO_PROMPT, "demo_prompt_colour": None if demo is None else [round(float(v)) for v in demo]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=2500)
    p.add_argument("--vae-batch", type=int, default=6)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-long-steps", type=int, default=700,
                   help="then steps on whole 17-frame clips (every chunk of the causal codec, with its caches)")
    p.add_argument("--vae-long-batch", type=int, default=2)
    p.add_argument("--vae-long-lr", type=float, default=5e-4)
    p.add_argument("--dit-steps", type=int, default=4000)
    p.add_argument("--dit-batch", type=int, default=32)
    p.add_argument("--dit-lr", type=float, default=1.5e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vae-from", type=Path, default=None,
                   help="take the VAE (already normalised) from this folder instead of training it (for iterating "
                        "on the DiT; the record says so)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    # late in training, with a small learning rate, denormal floats made CPU steps 20x slower
    torch.set_flush_denormal(True)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    spec = get_backbone("wan_ti2v")
    comps = spec.build("tiny", {"vae", "text_encoder"})  # the preset's seeded random init
    vae: WanVAE = comps["vae"]
    record: dict = {"command": "python -m backbones.wan.pretrain_tiny " + " ".join(argv if argv is not None
                                                                                   else sys.argv[1:]),
                    "seed": args.seed, "architecture": "wan_ti2v preset tiny", "size": [FRAMES, SIZE, SIZE]}

    named = sc.named_scenes()
    held = [sc.Scene(s.shape, c, s.motion, s.background) for c in sc.HELD_OUT for s in named[:32]]
    videos = torch.stack([to_video(sc.render(s, SIZE, SIZE, FRAMES)) for s in named])
    if args.vae_from is not None:
        import json
        vae.load_state_dict(torch.load(args.vae_from / "Wan2.2_VAE.pth", weights_only=True))
        earlier = json.loads((args.vae_from / "pretraining.json").read_text())
        record.update({k: v for k, v in earlier.items() if k.startswith("vae")})
        record["stages"] = [*earlier.get("stages", [earlier["command"]]), record["command"]]
    else:
        log.info("1/3 VAE: %d steps of %d random %d-frame scenes", args.vae_steps, args.vae_batch, VAE_FRAMES)
        zero_init_branches(vae)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            record["vae"] = train_vae(vae, args.vae_steps, args.vae_batch, args.vae_lr, args.seed, VAE_FRAMES, "vae")
        # normalised after each stage, so a run split into stages with --vae-from does exactly the same
        record["vae"]["latent_stats"] = normalise_latents(vae, videos)
    if args.vae_long_steps:
        log.info("1/3 VAE: %d steps of %d random %d-frame scenes", args.vae_long_steps, args.vae_long_batch, FRAMES)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed + 1)
            record["vae_long"] = train_vae(vae, args.vae_long_steps, args.vae_long_batch, args.vae_long_lr,
                                           args.seed + 1, FRAMES, "vae (17 frames)")
        record["vae_long"]["latent_stats"] = normalise_latents(vae, videos)
    record["vae"]["psnr_named_scenes_db"] = psnr(vae, videos[::8])
    record["vae"]["psnr_held_out_colour_db"] = psnr(vae, torch.stack(
        [to_video(sc.render(s, SIZE, SIZE, FRAMES)) for s in held[::4]]))
    log.info("VAE: PSNR %.2f dB on the named scenes, %.2f dB on the held-out colour",
             record["vae"]["psnr_named_scenes_db"], record["vae"]["psnr_held_out_colour_db"])

    captions = [s.caption() for s in named]
    # the tokenizer's vocabulary gains the captions' words (the tiny one spells words letter by letter)
    words = tuple(sorted({w for c in captions for w in c.split()}))
    comps["tokenizer"] = WanTokenizer.from_tokenizer(build_tiny_tokenizer(extra_words=words))
    record["tokenizer_words"] = list(words)
    log.info("2/3 text: encoding %d captions with the seeded umT5", len(named))
    enc = spec.encode_text(comps, captions + [""])
    contexts, empty = [e["context"] for e in enc[:-1]], enc[-1]["context"]
    with torch.no_grad():
        latents = [spec.encode_video(comps, v[None])[0] for v in videos]

    log.info("3/3 DiT: %d steps of %d on %d scenes", args.dit_steps, args.dit_batch, len(named))
    dit = spec.random_dit("tiny", seed=args.seed)
    with torch.random.fork_rng(devices=[]) if args.dit_steps else contextlib.nullcontext():
        torch.manual_seed(args.seed)
        record["dit"] = (train_dit(spec, dit, latents, contexts, empty, args.dit_steps, args.dit_batch,
                                   args.dit_lr, args.seed) if args.dit_steps else {"steps": 0})
    record["dit"]["scenes"] = len(named)
    record["dit"]["colours"] = list(sc.COLOURS)
    record["held_out"] = {k: list(v) for k, v in sc.HELD_OUT.items()}
    comps["dit"] = dit
    if args.dit_steps:
        record["evaluation"] = evaluate(spec, comps, named[::7])   # 28 scenes, every colour, motion, background
        log.info("evaluation: %s", record["evaluation"])
    record["total_seconds"] = round(time.perf_counter() - start, 1)
    for m in comps.values():
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False)
    spec.save_checkpoint(comps, args.out)
    write_record(args.out, record)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    log.info("wrote %s (%.1f MB) in %.1f min", args.out, size / 2**20, record["total_seconds"] / 60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

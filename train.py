"""Train a LoRA on a video diffusion backbone.

    python train.py --backbone wan_ti2v --preset tiny                 # embedded default, CPU, ~1 minute
    python train.py --preset 5b --ckpt-dir Wan2.2-TI2V-5B --data my_clips/ --output runs/mine
    torchrun --nproc_per_node=4 train.py --preset 5b ... --parallel fsdp --ulysses 2
    python train.py ... --resume latest                             # continue a killed run exactly

Any config field can be overridden as key=value (e.g. optim.lr=5e-5 lora.rank=16); see configs/.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from backbones.attention import set_attention_backend
from backbones.registry import backbone_names, get_backbone
from backbones.spec import BackboneSpec, Components
from lora_core.runtime import checkpoint as ckpt
from lora_core import distributed as parallel
from lora_core.cache import LatentCache, build_cache, cache_keys
from lora_core.runtime.config import Config, load_config, save_config, to_dict
from lora_core.data import VideoDataset, apply_caption_dropout, caption_dropped, epoch_batches, load_dataset
from lora_core.formats import load_lora, save_lora
from lora_core.inject import inject_lora, lora_parameters
from lora_core.runtime.optim import build_optimizer, build_scheduler
from lora_core.data.sample_data import make_sample_dataset

log = logging.getLogger("train")
EMPTY_CAPTION_KEY = "__empty_caption__"


# ---------------------------------------------------------------------------------------- config
def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", choices=backbone_names())
    ap.add_argument("--preset", help="model size, e.g. tiny or 5b")
    ap.add_argument("--ckpt-dir", help="official checkpoint folder (random weights when omitted; tiny only)")
    ap.add_argument("--data", help="dataset folder or metadata file (default: a small sample set made on the fly)")
    ap.add_argument("--output", help="run folder")
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--batch-size", type=int, help="per data-parallel rank")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--parallel", choices=["ddp", "fsdp"])
    ap.add_argument("--ulysses", type=int, help="sequence-parallel degree (divides the heads)")
    ap.add_argument("--resume", nargs="?", const="latest", help="'latest' or a checkpoints/step-N folder")
    ap.add_argument("--config", help="YAML file with config values")
    ap.add_argument("--cache-only", action="store_true", help="build the latent cache and exit")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4")
    args = ap.parse_intermixed_args(argv)  # key=value overrides may sit between flags
    return args, args.overrides


_FLAG_KEYS = {"backbone": "model.backbone", "preset": "model.preset", "ckpt_dir": "model.ckpt_dir",
              "data": "data.path", "output": "train.output", "max_steps": "train.max_steps",
              "batch_size": "train.batch_size", "seed": "train.seed", "parallel": "parallel.mode",
              "ulysses": "parallel.ulysses"}


def resolve_config(args: argparse.Namespace, overrides: list[str]) -> Config:
    """defaults < the backbone preset's implied values < --config YAML < flags < key=value overrides."""
    flags = [f"{key}={json.dumps(getattr(args, attr))}" for attr, key in _FLAG_KEYS.items()
             if getattr(args, attr) is not None]
    first = load_config(args.config, flags + overrides)  # only to learn the backbone and preset
    spec = get_backbone(first.model.backbone)
    implied: dict[str, Any] = {}
    for key, value in spec.preset_overrides(first.model.preset).items():
        section, field_name = key.split(".", 1)
        implied.setdefault(section, {})[field_name] = value
    if "train" not in implied or "output" not in implied.get("train", {}):
        implied.setdefault("train", {})["output"] = f"runs/{spec.name}_{first.model.preset}"
    return load_config(args.config, flags + overrides, base=implied)


# ------------------------------------------------------------------------------------------ data
def prepare_dataset(cfg: Config, info: parallel.DistInfo) -> VideoDataset:
    """Scan and probe the media (fails with a clear error before any model is loaded)."""
    if not cfg.data.path:
        folder = Path(cfg.train.output) / "sample_data"
        if info.is_main:
            make_sample_dataset(folder)
            log.info("no --data given: training on the embedded sample dataset in %s", folder)
        parallel.barrier(info)
        cfg.data.path = str(folder)
    return load_dataset(cfg.data, seed=cfg.train.seed, progress=info.is_main)


def encoder_id(cfg: Config) -> str:
    src = str(Path(cfg.model.ckpt_dir).resolve()) if cfg.model.ckpt_dir else "random-seeded"
    return f"{cfg.model.backbone}:{cfg.model.preset}:{src}"


def prepare_cache(cfg: Config, spec: BackboneSpec, dataset: VideoDataset, info: parallel.DistInfo,
                  device: torch.device) -> LatentCache:
    """Encode every sample once (VAE latents + text encodings); later runs reuse the files. The encoders
    are loaded only if something is missing, and freed before the DiT is built."""
    cache = LatentCache(cfg.train.cache_dir or Path(cfg.train.output) / "cache", encoder_id(cfg))
    if info.is_main:
        comps: dict[str, Components] = {}

        def encoders() -> Components:
            if "c" not in comps:
                log.info("loading the VAE and text encoder to fill the latent cache")
                comps["c"] = spec.build(cfg.model.preset, {"vae", "text_encoder"}, cfg.model.ckpt_dir,
                                        device=device, dtype=model_dtype(cfg, device))
            return comps["c"]

        def encode(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
            c = encoders()
            latents = spec.encode_video(c, batch["video"]).cpu()
            context = spec.encode_text(c, batch["caption"])
            assert len(context) == 1, "the cache encodes one sample at a time"
            return {"latents": latents, "context": context[0][None].cpu()}

        build_cache(dataset, encode, cache, batch_size=1)
        if not cache.has(EMPTY_CAPTION_KEY):  # caption dropout trains on the empty prompt's encoding
            cache.put(EMPTY_CAPTION_KEY, {"context": spec.encode_text(encoders(), [""])[0].cpu()})
        comps.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    parallel.barrier(info)
    return cache


def model_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.model.dtype]


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    mp = cfg.train.mixed_precision
    if mp == "fp32" or (mp == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


@dataclass
class Batches:
    """The global batch of micro-step m is a pure function of (seed, m); each data-parallel rank takes
    its slice, so the samples, their noise and their crops do not depend on the number of processes."""

    buckets: list[Any]
    global_size: int
    seed: int

    def __post_init__(self) -> None:
        self.per_epoch = len(epoch_batches(self.buckets, self.global_size, self.seed, 0))

    def global_batch(self, micro: int) -> list[int]:
        epoch, pos = divmod(micro, self.per_epoch)
        batch = epoch_batches(self.buckets, self.global_size, self.seed, epoch)[pos]
        return [batch[i % len(batch)] for i in range(self.global_size)]  # a short last batch wraps around


def sample_seed(seed: int, micro: int, position: int) -> int:
    """Seed of the random draws (σ, noise, conditioning) of one sample of one micro-step."""
    return (seed * 1_000_003 + micro) * 65_537 + position


def load_micro_batch(cache: LatentCache, keys: dict[int, str], empty: torch.Tensor, indices: list[int],
                     positions: list[int], micro: int, cfg: Config, device: torch.device,
                     ) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    latents, context, seeds = [], [], []
    for idx, pos in zip(indices, positions):
        entry = cache.get(keys[idx])
        if entry is None:
            raise ValueError(f"latent cache entry {keys[idx]} vanished from {cache.dir}; rerun to rebuild it")
        latents.append(entry["latents"])
        dropped = caption_dropped(cfg.train.seed, micro, idx, cfg.data.caption_dropout)
        context.append(empty if dropped else entry["context"])
        seeds.append(sample_seed(cfg.train.seed, micro, pos))
    return torch.stack(latents).to(device), [c.to(device) for c in context], seeds


# ------------------------------------------------------------------------------------------ loop
class StopRequest:
    """SIGTERM / Ctrl-C set a flag; the loop writes a checkpoint at the end of the step and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("received signal %d: finishing this step, writing a checkpoint, then exiting", signum)

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def tensorboard_writer(folder: Path) -> Any:
    """A SummaryWriter when TensorBoard is installed; metrics.jsonl is written either way."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(str(folder))


def save_final(model: torch.nn.Module, cfg: Config, spec: BackboneSpec, path: Path) -> Path:
    return save_lora(model, path, format=cfg.lora.save_format, backbone=spec.name,
                     metadata={"preset": cfg.model.preset, "config": json.dumps(to_dict(cfg))})


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args, overrides = parse_args(argv)
    cfg = resolve_config(args, overrides)
    spec = get_backbone(cfg.model.backbone)
    set_attention_backend(cfg.model.attention)
    head_count = spec.component_specs(cfg.model.preset)["dit"].config.num_heads  # type: ignore[union-attr]
    info = parallel.init_distributed(cfg.parallel.ulysses, head_count)
    parallel.check_options(info, mode=cfg.parallel.mode, optimizer=cfg.optim.name,
                           validation_every=cfg.validation.every)
    if not info.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    device = info.device
    out = Path(cfg.train.output)
    torch.manual_seed(cfg.train.seed)

    # 1. everything that can fail on user input, before any model is loaded
    if cfg.model.ckpt_dir:
        spec.check_checkpoint(cfg.model.preset, cfg.model.ckpt_dir, {"dit", "vae", "text_encoder"})
    elif cfg.model.preset != "tiny":
        raise ValueError(f"--preset {cfg.model.preset} needs --ckpt-dir (the downloaded official folder); "
                         "only the tiny preset runs on random weights")
    resume_from = ckpt.resolve_resume(args.resume, out / "checkpoints") if args.resume else None
    dataset = prepare_dataset(cfg, info)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    # 2. latents and text encodings, cached on disk
    cache = prepare_cache(cfg, spec, dataset, info, device)
    if args.cache_only:
        log.info("cache ready in %s", cache.dir)
        parallel.shutdown()
        return 0
    keys = cache_keys(dataset, cache)
    empty = cache.get(EMPTY_CAPTION_KEY)["context"]  # type: ignore[index]

    # 3. the model: DiT + LoRA, then parallelism (sequence parallel -> checkpointing -> FSDP2/DDP)
    dtype = model_dtype(cfg, device)
    targets = cfg.lora.targets or list(spec.default_targets)

    def add_lora(dit: torch.nn.Module) -> list[str]:
        adapted = inject_lora(dit, targets, cfg.lora.rank, cfg.lora.alpha, dropout=cfg.lora.dropout,
                              exclude=cfg.lora.exclude, use_rslora=cfg.lora.use_rslora)
        if cfg.lora.init_from:
            load_lora(dit, cfg.lora.init_from)
        return adapted

    grad_ckpt = bool(cfg.train.gradient_checkpointing)
    if parallel.shards_weights(cfg.parallel.mode, info):
        # FSDP2: shard the model while it is on the meta device, then fill every rank's shards from one
        # full copy that only rank 0 loads (on the CPU), tensor by tensor
        dit = spec.component_specs(cfg.model.preset)["dit"].to(dtype)
        adapted = add_lora(dit)
        model = parallel.parallelize(dit, spec.blocks(dit), info, mode="fsdp", gradient_checkpointing=grad_ckpt)
        full = spec.build(cfg.model.preset, {"dit"}, cfg.model.ckpt_dir, dtype=dtype).dit if info.is_main else None
        if full is not None:
            add_lora(full)
        parallel.load_full_state(dit, full, info)
        del full
    else:
        dit = spec.build(cfg.model.preset, {"dit"}, cfg.model.ckpt_dir, device=device, dtype=dtype).dit
        assert dit is not None
        adapted = add_lora(dit)
        model = parallel.parallelize(dit, spec.blocks(dit), info, mode=cfg.parallel.mode,
                                     gradient_checkpointing=grad_ckpt)
    n_train = sum(p.numel() for p in lora_parameters(dit))
    log.info("LoRA on %d modules, %s trainable parameters (rank %d, alpha %g)", len(adapted), f"{n_train:,}",
             cfg.lora.rank, cfg.lora.alpha)
    optimizer = build_optimizer(lora_parameters(dit), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)

    # 4. resume
    start = 0
    if resume_from is not None:
        state = ckpt.load_state(resume_from)
        with parallel.full_lora(dit, writeback=True):  # FSDP2: gathered, loaded, scattered back
            load_lora(dit, resume_from / "lora.safetensors")
        parallel.load_optimizer_state_dict(dit, optimizer, ckpt.load_tensors(resume_from / "optimizer.pt"))
        start = state["step"]
        # the schedule is a function of (step, config): rebuilt, so a resumed run may change max_steps
        for group in optimizer.param_groups:
            group.pop("initial_lr", None)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps, last_step=start)
        ckpt.set_rng_state(ckpt.load_tensors(resume_from / "rng.pt"))
        log.info("resumed from %s at step %d", resume_from, start)
    elif args.resume:
        log.info("--resume %s: no checkpoint yet in %s, starting fresh", args.resume, out / "checkpoints")

    # 5. the loop
    batches = Batches(dataset.buckets, cfg.train.batch_size * info.dp_size, cfg.train.seed)
    amp = autocast_dtype(cfg, device)
    metrics = open(out / "metrics.jsonl", "a") if info.is_main else None
    board = tensorboard_writer(out / "tensorboard") if info.is_main else None
    lo = info.dp_rank * cfg.train.batch_size
    mine = list(range(lo, lo + cfg.train.batch_size))

    def write_checkpoint(step: int) -> None:
        # every rank takes part: under FSDP2 the LoRA and the optimizer state are gathered to rank 0
        optim_state = parallel.optimizer_state_dict(dit, optimizer)
        with parallel.full_lora(dit):
            if info.is_main:
                path = ckpt.save_checkpoint(
                    out / "checkpoints", step,
                    files={"lora.safetensors": lambda p: save_lora(dit, p, format="native", backbone=spec.name),
                           "optimizer.pt": optim_state, "rng.pt": ckpt.rng_state()},
                    state={"step": step, "data_position": step * cfg.train.grad_accum, "config": to_dict(cfg)},
                    keep_last=cfg.train.keep_last)
                log.info("checkpoint written: %s", path)
        parallel.barrier(info)

    model.train()
    bar = tqdm(range(start, cfg.train.max_steps), initial=start, total=cfg.train.max_steps,
               disable=not info.is_main, desc="training")
    step = start
    with StopRequest() as stop:
        for step in bar:
            t0 = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            total = torch.zeros((), device=device)
            for a in range(cfg.train.grad_accum):
                micro = step * cfg.train.grad_accum + a
                gbatch = batches.global_batch(micro)
                latents, context, seeds = load_micro_batch(cache, keys, empty, [gbatch[i] for i in mine], mine,
                                                           micro, cfg, device)
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None), \
                        parallel.maybe_offload_activations(cfg.train.offload_activations):
                    loss = spec.training_loss(model, latents, context, seeds, cfg.train)
                (loss / cfg.train.grad_accum).backward()
                total += loss.detach() / cfg.train.grad_accum
            loss_val = float(parallel.all_reduce_mean(total, info))
            if not math.isfinite(loss_val):
                optimizer.zero_grad(set_to_none=True)
                if not cfg.train.skip_nonfinite:
                    raise FloatingPointError(f"non-finite loss {loss_val} at step {step + 1}; lower optim.lr or "
                                             "set train.skip_nonfinite=true to skip such steps")
                log.warning("step %d: non-finite loss %s, step skipped", step + 1, loss_val)
                continue
            grad_norm = parallel.clip_grad_norm(lora_parameters(dit), cfg.optim.grad_clip)  # FSDP2 shards too
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            dt = time.perf_counter() - t0
            record = {"step": step + 1, "loss": loss_val, "lr": lr, "grad_norm": grad_norm, "s_per_step": dt,
                      "samples_per_s": cfg.train.batch_size * info.dp_size * cfg.train.grad_accum / dt,
                      "peak_mem_gb": peak_memory_gb(device)}
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if board is not None:
                    for k, v in record.items():
                        if k != "step":
                            board.add_scalar(f"train/{k}", v, record["step"])
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}")
                if cfg.train.log_every and (step + 1) % cfg.train.log_every == 0:
                    log.info("step %d loss %.5f grad_norm %.4f lr %.3e %.2f s/step %.2f samples/s peak %.2f GB",
                             step + 1, loss_val, grad_norm, lr, dt, record["samples_per_s"], record["peak_mem_gb"])
            done = step + 1
            if cfg.train.ckpt_every and done % cfg.train.ckpt_every == 0 and done < cfg.train.max_steps:
                write_checkpoint(done)
            if cfg.validation.every and done % cfg.validation.every == 0 and info.is_main:
                validate(cfg, spec, dit, out, done, device)
            if parallel.any_rank(stop.signal is not None, info):  # all ranks stop at the same step
                write_checkpoint(done)
                bar.close()
                log.warning("stopped by signal at step %d; resume with --resume latest", done)
                parallel.shutdown()
                return 128 + (stop.signal or signal.SIGTERM)  # ranks told by another rank
    bar.close()
    if metrics is not None:
        metrics.close()
    if board is not None:
        board.close()
    final = cfg.train.max_steps
    if start < final:
        write_checkpoint(final)
    with parallel.full_lora(dit):  # FSDP2: every LoRA tensor gathered in full, rank 0 writes
        if info.is_main:
            path = save_final(dit, cfg, spec, out / "lora.safetensors")
            log.info("LoRA written to %s (%s format)", path, cfg.lora.save_format)
    parallel.shutdown()
    return 0


def validate(cfg: Config, spec: BackboneSpec, dit: torch.nn.Module, out: Path, step: int,
             device: torch.device) -> None:
    """Sample the validation prompts with the current LoRA and write mp4s under OUTPUT/samples/."""
    from lora_core.data.video_io import write_video
    v = cfg.validation
    comps = spec.build(cfg.model.preset, {"vae", "text_encoder"}, cfg.model.ckpt_dir, device=device,
                       dtype=model_dtype(cfg, device))
    comps.dit = dit
    image = None
    if v.image:
        from infer import load_image
        image = load_image(v.image, v.height, v.width)
    was_training = dit.training
    dit.eval()
    try:
        for i, prompt in enumerate(v.prompts):
            video = spec.sample(comps, [prompt], image=image, frames=v.frames, height=v.height, width=v.width,
                                steps=v.steps, guidance=v.guidance, seed=v.seed, device=device,
                                autocast_dtype=autocast_dtype(cfg, device))
            path = write_video(video[0], out / "samples" / f"step{step:06d}_{i}.mp4", fps=spec.media_rules(
                cfg.model.preset).fps)
            log.info("validation sample: %s", path)
    finally:
        dit.train(was_training)


if __name__ == "__main__":
    sys.exit(main())

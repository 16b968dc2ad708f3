"""Train a LoRA (or fully fine-tune components) of a diffusion backbone.

    python train.py --backbone NAME --preset tiny                      # a family's embedded default, CPU
    python train.py --backbone NAME --preset P --ckpt-dir FOLDER --data my_clips/ --output runs/mine
    torchrun --nproc_per_node=4 train.py ... --parallel fsdp --ulysses 2
    python train.py ... --resume latest                                # continue a killed run exactly
    python train.py --backbone NAME --preset P --print-config          # every config key with its value
    python train.py --backbone NAME --preset P ... --plan [--gpu-memory 24GB] [--world-size 8]   # will it fit?

Any config field can be overridden as section.key=value (e.g. optim.lr=5e-5 lora.rank=16); see configs/, the
README and --print-config. Sections: model, lora, components, data, optim, train, parallel, validation, objective.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
import yaml
from tqdm.auto import tqdm

from backbones.attention import set_attention_backend
from backbones.registry import backbone_names, get_backbone
from backbones.spec import BackboneSpec, Components, SampleRequest, Sources, objective_from_dict
from lora_core import distributed as parallel
from lora_core import fused
from lora_core.cache import FeatureCache, build_media_cache, build_text_cache, media_keys, path_identity
from lora_core.data import GlobalBatches, VideoDataset, load_dataset, resolve_data_config
from lora_core.data.sample_data import (make_concept_dataset, make_sample_dataset, make_sample_images,
                                        make_sample_pairs)
from lora_core.formats import load_lora, save_lora
from lora_core.runtime import checkpoint as ckpt
from lora_core.runtime import run_folder
from lora_core.runtime.batch import BatchReader, DropRule, FieldSource, dropout_seed
from lora_core.runtime.config import Config, load_config, save_config, to_dict
from lora_core.runtime.loss_scale import LossScaler
from lora_core.runtime.optim import build_optimizer, build_scheduler
from lora_core.runtime.trainable import (TrainPlan, apply_plan, load_trainable_state, param_groups, plan_training,
                                         trainable_parameters, trainable_state)

log = logging.getLogger("train")
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"


# ---------------------------------------------------------------------------------------- config
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", choices=backbone_names(), help="model family (default: the registry's default)")
    ap.add_argument("--preset", help="model size, e.g. tiny")
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
    ap.add_argument("--print-config", action="store_true", help="print the resolved config (every key) and exit")
    ap.add_argument("--plan", action="store_true",
                    help="print the planned GPU memory and FLOPs of this run per GPU (no weights loaded) and exit")
    ap.add_argument("--world-size", type=int, default=None,
                    help="with --plan: the number of GPUs to plan for (default: WORLD_SIZE or 1)")
    ap.add_argument("--gpu-memory", help="with --plan: the GPU's memory, e.g. 24GB; prints whether it fits and "
                    "the cheapest changes that make it fit (exit 1 when it does not)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=1e-4")
    return ap.parse_intermixed_args(argv)  # key=value overrides may sit between flags


_FLAG_KEYS = {"backbone": "model.backbone", "preset": "model.preset", "ckpt_dir": "model.ckpt_dir",
              "data": "data.path", "output": "train.output", "max_steps": "train.max_steps",
              "batch_size": "train.batch_size", "seed": "train.seed", "parallel": "parallel.mode",
              "ulysses": "parallel.ulysses"}


def resolve_config(args: argparse.Namespace) -> tuple[Config, BackboneSpec]:
    """defaults < the backbone preset's implied values < --config YAML < flags < key=value overrides; then the
    backbone's objective section and media rules are applied, every value checked."""
    flags = [f"{key}={json.dumps(getattr(args, attr))}" for attr, key in _FLAG_KEYS.items()
             if getattr(args, attr) is not None]
    first = load_config(args.config, flags + args.overrides)  # only to learn the backbone and preset
    spec = get_backbone(first.model.backbone)
    preset = first.model.preset
    spec.check_preset(preset)
    implied: dict[str, Any] = {"model": {"backbone": spec.name}}
    for key, value in spec.preset_overrides(preset).items():
        section, field_name = key.split(".", 1)
        implied.setdefault(section, {})[field_name] = value
    cfg = load_config(args.config, flags + args.overrides, base=implied)
    shipped = spec.default_ckpt_dir(preset)
    if cfg.model.ckpt_dir is None and shipped is not None:
        cfg.model.ckpt_dir = str(shipped)   # the shipped tiny base (the demo)
    if not cfg.train.output:
        cfg.train.output = f"runs/{spec.name}_{preset}"
    cfg.objective = objective_from_dict(spec.objective_config(preset), cfg.objective)
    cfg.data = resolve_data_config(cfg.data, spec.media_rules(preset))
    cfg.data.captions = spec.uses_text
    conditions = [c.name for c in spec.conditions(preset)]
    for name in cfg.data.condition_dropout:
        if name not in conditions:
            raise ValueError(f"data.condition_dropout.{name}: backbone {spec.name!r} has no droppable condition "
                             f"{name!r}; its conditions: {', '.join(conditions) or 'none'}")
    if cfg.train.gradient_checkpointing is None:
        cfg.train.gradient_checkpointing = False
    return cfg, spec


def sources_of(cfg: Config) -> Sources:
    return Sources(ckpt_dir=Path(cfg.model.ckpt_dir) if cfg.model.ckpt_dir else None,
                   extra={k: Path(v) for k, v in cfg.model.sources.items()})


def show_progress(info: parallel.DistInfo) -> bool:
    """Progress bars on rank 0 of a terminal only: redirected to a file, tqdm's carriage returns would fill it,
    so progress is logged as plain lines instead (`train.log_every`)."""
    return info.is_main and sys.stderr.isatty()


def model_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.model.dtype]


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    mp = cfg.train.mixed_precision
    if mp == "fp32" or (mp == "auto" and device.type != "cuda"):
        return None
    return torch.float16 if mp == "fp16" else torch.bfloat16


# ------------------------------------------------------------------------------------------ data
def prepare_dataset(cfg: Config, spec: BackboneSpec, info: parallel.DistInfo) -> VideoDataset:
    """Scan and probe the media (fails with a clear error before any model is loaded)."""
    if not cfg.data.path:
        folder = Path(cfg.train.output) / "sample_data"
        if info.is_main:
            rules = spec.media_rules(cfg.model.preset)
            if rules.kind == "image":
                make_sample_images(folder)
            elif spec.embedded_sample == "pairs":
                make_sample_pairs(folder, frames=rules.default_frames)
            elif spec.embedded_sample == "concept":
                make_concept_dataset(folder, height=rules.default_height, width=rules.default_width,
                                     num_frames=rules.default_frames)
            else:
                make_sample_dataset(folder)
            log.info("no --data given: training on the embedded sample dataset in %s", folder)
        parallel.barrier(info)
        cfg.data.path = str(folder)
    return load_dataset(cfg.data, seed=cfg.train.seed, progress=show_progress(info),
                        rules=spec.media_rules(cfg.model.preset))


def trained_set(cfg: Config, spec: BackboneSpec) -> frozenset[str]:
    """The components that train in this run (mode lora or full)."""
    return frozenset(n for n, p in plan_training(cfg, spec.components(cfg.model.preset)).items() if p.mode != "frozen")


def encoder_ids(cfg: Config, spec: BackboneSpec, device: torch.device) -> dict[str, str]:
    """What decides the cached tensors of each kind: backbone, preset, encoder weights (files, sizes, mtimes)
    and the dtype the encoders run in."""
    src = sources_of(cfg)
    paths = [p for p in [src.ckpt_dir, *src.extra.values()] if p is not None]
    weights = path_identity(paths) if paths else "random-seeded"
    dtype = str(model_dtype(cfg, device)).removeprefix("torch.")
    trained = trained_set(cfg, spec)
    fields = spec.cache_fields(cfg.model.preset, trained)

    def names(kind: str) -> str:  # an entry holding other fields (a spec change) must miss, never KeyError later
        return ",".join(sorted(f.name for f in fields if f.keyed_by == kind))
    return {kind: f"{spec.name}:{cfg.model.preset}:{kind}:"
                  f"{','.join(sorted(spec.encoder_parts(cfg.model.preset, kind, trained)))}:{names(kind)}:"
                  f"{weights}:{dtype}" for kind in ("media", "text")}


@dataclass
class Cached:
    cache: FeatureCache
    media: dict[int, str]       # dataset index -> media entry key
    text: dict[int, str]        # dataset index -> text entry key
    empty_text: str | None      # key of the empty text's entry (condition dropout)
    usable: list[int]           # indices with every entry present


def prepare_cache(cfg: Config, spec: BackboneSpec, dataset: VideoDataset, info: parallel.DistInfo,
                  device: torch.device) -> Cached:
    """Encode every sample once, media and text apart; later runs reuse the entries. Ranks share the work; the
    encoders are loaded only if something is missing and freed before the trained model is built."""
    preset = cfg.model.preset
    cache = FeatureCache(cfg.train.cache_dir or Path(cfg.train.output) / "cache")
    trained = trained_set(cfg, spec)
    kinds = {f.keyed_by for f in spec.cache_fields(preset, trained)}
    ids = encoder_ids(cfg, spec, device)
    built: dict[str, Components] = {}

    def encoders(kind: str) -> Components:
        if kind not in built:
            parts = spec.encoder_parts(preset, kind, trained)
            log.info("loading %s to fill the %s cache", ", ".join(sorted(parts)), kind)
            built[kind] = spec.build(preset, parts, sources_of(cfg), device=device, dtype=model_dtype(cfg, device))
        return built[kind]

    if "media" in kinds:
        build_media_cache(dataset, cache, ids["media"], lambda item: spec.encode_media(encoders("media"), item),
                          rank=info.rank, world=info.world_size, progress=show_progress(info))
    text: dict[int, str] = {}
    empty = None
    if "text" in kinds:
        captions = {i: dataset.caption(i) for i in range(len(dataset))}
        texts = sorted(set(captions.values()) | {""})
        build_text_cache(texts, cache, ids["text"], lambda batch: spec.encode_text(encoders("text"), batch, trained),
                         rank=info.rank, world=info.world_size, progress=show_progress(info))
        text = {i: cache.text_key(c, ids["text"]) for i, c in captions.items()}
        empty = cache.text_key("", ids["text"])
    built.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    parallel.barrier(info)
    # after the barrier: the other ranks' file hashes are read from the shared content index
    media = media_keys(dataset, cache, ids["media"], progress=show_progress(info)) if "media" in kinds else {}
    # a sample that failed to encode (on any rank) or whose file vanished has no entry: it is left out
    usable = [i for i in range(len(dataset)) if ("media" not in kinds or (i in media and cache.has(media[i])))
              and ("text" not in kinds or (i in text and cache.has(text[i])))]
    left = len(dataset) - len(usable)
    if left:
        log.warning("%d sample(s) could not be encoded and are left out (see the warnings above)", left)
    if not usable:
        raise ValueError(f"no sample of {cfg.data.path} could be encoded; fix or replace the files")
    return Cached(cache, media, text, empty, usable)


# ------------------------------------------------------------------------------------------ model
@dataclass
class Trainer:
    models: dict[str, nn.Module]      # the in-training components (parameters live here)
    wrapped: dict[str, nn.Module]     # what the objective calls (DDP wrappers, or the modules themselves)
    plans: dict[str, TrainPlan]
    container: nn.ModuleDict          # all models under one root, for name-keyed optimizer state
    optimizer: torch.optim.Optimizer
    scheduler: Any
    names: list[str]                  # '<component>/<parameter>' of every trained tensor
    frozen: dict[str, nn.Module] = dataclasses.field(default_factory=dict)  # called by the objective, not trained


def build_models(cfg: Config, spec: BackboneSpec, info: parallel.DistInfo) -> Trainer:
    """The in-training components with their LoRA (or full) training applied, then parallelized: sequence
    parallel -> activation checkpointing -> FSDP2/DDP; then the optimizer with one group per component."""
    device, preset = info.device, cfg.model.preset
    dtype = model_dtype(cfg, device)
    plans = plan_training(cfg, spec.components(preset))
    names = list(plans)
    models: dict[str, nn.Module] = {}
    wrapped: dict[str, nn.Module] = {}
    sharded = parallel.shards_weights(cfg.parallel.mode, info)
    if sharded:
        # FSDP2: shard while on the meta device, then fill every rank's shards from one full copy that only
        # rank 0 loads (on the CPU), tensor by tensor
        metas = spec.component_specs(preset)
        full = spec.build(preset, set(names), sources_of(cfg), dtype=dtype) if info.is_main else None
        for name in names:
            module = metas[name].to(dtype)
            apply_plan(module, plans[name])
            wrapped[name] = parallel.parallelize(module, spec.units(name, module), info, mode="fsdp",
                                                 gradient_checkpointing=bool(cfg.train.gradient_checkpointing),
                                                 compile=bool(cfg.train.compile))
            src = None
            if full is not None:
                src = full[name]
                apply_plan(src, plans[name])
            parallel.load_full_state(module, src, info)
            models[name] = module
        del full
    else:
        comps = spec.build(preset, set(names), sources_of(cfg), device=device, dtype=dtype)
        for name in names:
            module = comps[name]
            apply_plan(module, plans[name])
            models[name] = module
        for name in names:
            wrapped[name] = parallel.parallelize(models[name], spec.units(name, models[name]), info,
                                                 mode=cfg.parallel.mode,
                                                 gradient_checkpointing=bool(cfg.train.gradient_checkpointing),
                                                 compile=bool(cfg.train.compile))
    lora_parts = [n for n in names if plans[n].mode == "lora"]
    if cfg.lora.init_from and lora_parts:  # start from an existing LoRA file (every LoRA component it holds)
        declared = spec.components(preset)
        with contextlib.ExitStack() as stack:
            for n in lora_parts:
                stack.enter_context(parallel.full_lora(models[n], writeback=True))
            if len(lora_parts) == 1:
                load_lora(models[lora_parts[0]], cfg.lora.init_from, naming=declared[lora_parts[0]].naming,
                          backbone=spec.accepted_lora_backbones)
            else:
                load_lora({n: models[n] for n in lora_parts}, cfg.lora.init_from,
                          naming={n: declared[n].naming for n in lora_parts}, backbone=spec.accepted_lora_backbones)
    for name, m in models.items():
        n = sum(p.numel() for p in m.parameters() if p.requires_grad)
        p = plans[name]
        how = f"LoRA rank {p.rank}, alpha {p.alpha:g}" if p.mode == "lora" else p.mode
        log.info("%s: %s, %s trainable parameters", name, how, f"{n:,}")
    # frozen components the objective calls (Framer's ControlNet with objective.controlnet): a full copy on every
    # rank, no gradients, so nothing to wrap or shard
    extra = sorted(spec.frozen_in_training(preset, cfg.objective, trained_set(cfg, spec)) - set(names))
    frozen: dict[str, nn.Module] = {}
    if extra:
        built = spec.build(preset, set(extra), sources_of(cfg), device=device, dtype=dtype)
        for name in extra:
            frozen[name] = built[name].eval().requires_grad_(False)
            wrapped[name] = frozen[name]
            log.info("%s: frozen, called by the objective", name)
    container = nn.ModuleDict(models)
    optimizer = build_optimizer(param_groups(models, plans, cfg.optim.lr), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    return Trainer(models, wrapped, plans, container, optimizer, scheduler, list(trainable_parameters(models)),
                   frozen)


def gathered(trainer: Trainer, writeback: bool = False) -> contextlib.ExitStack:
    """Every trained tensor full and plain inside the block (FSDP2: a collective, every rank enters)."""
    stack = contextlib.ExitStack()
    gather = parallel.full_trainable
    for m in trainer.models.values():
        stack.enter_context(gather(m, writeback=writeback))
    return stack


def save_artifacts(cfg: Config, spec: BackboneSpec, trainer: Trainer, out: Path) -> list[Path]:
    """The run's result: the LoRA file (all LoRA components in one file, `lora.save_format`) and, for fully
    trained components, the backbone's artifact of each."""
    written = []
    lora = {n: m for n, m in trainer.models.items() if trainer.plans[n].mode == "lora"}
    components = spec.components(cfg.model.preset)
    if lora:
        meta = {"preset": cfg.model.preset, "config": json.dumps(to_dict(cfg), default=str),
                "modelspec.title": out.name, **spec.lora_file_metadata}
        naming = {n: components[n].naming for n in lora}
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.lora.save_dtype]
        if len(lora) == 1:
            (name, module), = lora.items()
            written.append(save_lora(module, out / "lora.safetensors", format=cfg.lora.save_format,
                                     backbone=spec.name, naming=naming[name], metadata=meta, dtype=dtype))
        else:
            written.append(save_lora(lora, out / "lora.safetensors", format=cfg.lora.save_format,
                                     backbone=spec.name, naming=naming, metadata=meta, dtype=dtype))
        written += spec.export_lora(lora, out, written[-1], meta, dtype)
    for name, m in trainer.models.items():
        if trainer.plans[name].mode == "full":
            trained = [k.split("/", 1)[1] for k in trainer.names if k.startswith(f"{name}/")]
            written += spec.save_full(name, m, out, trained)
    return written


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


def planned_peak_gb(cfg: Config, spec: BackboneSpec, info: parallel.DistInfo) -> float | None:
    """On a GPU, the planner's training-step peak per GPU (GiB, `python train.py ... --plan`), which every step
    log shows beside the measured `torch.cuda.max_memory_allocated`, so a first log line confirms or corrects
    the plan. None on the CPU (its peak is the process RSS, not comparable) or when planning fails."""
    if info.device.type != "cuda":
        return None
    try:
        from backbones.plan import plan_run
        plan = plan_run(cfg, spec, info.world_size, suggest=False, phases=False)
    except Exception as e:  # noqa: BLE001 (the plan is advice; training goes on without it)
        log.warning("planning the step's memory failed (%s: %s); training without the planned figure",
                    type(e).__name__, e)
        return None
    gb = (plan.step_peak_bytes - plan.overhead_bytes) / 2**30  # the allocator counts no CUDA context
    log.info("planned training-step peak %.2f GB per GPU (allocated tensors; see --plan)", gb)
    return gb


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class Metrics:
    """metrics.jsonl (one row per step; a resumed run first cuts the rows after its checkpoint) and, when
    installed, TensorBoard."""

    def __init__(self, out: Path, start: int, enabled: bool) -> None:
        self.file = self.board = None
        if not enabled:
            return
        path = out / "metrics.jsonl"
        rows = []
        if start > 0 and path.is_file():
            rows = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start]
        path.write_text("".join(r + "\n" for r in rows))
        self.file = open(path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ModuleNotFoundError:
            log.info("TensorBoard is not installed (pip install tensorboard); metrics go to %s only", path)
        except Exception as e:  # noqa: BLE001 (a broken install: say what broke, keep training)
            log.warning("TensorBoard is installed but failed to import (%s: %s); metrics go to %s only",
                        type(e).__name__, e, path)
        else:
            self.board = SummaryWriter(str(out / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for k, v in record.items():
                if k != "step":
                    self.board.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        for f in (self.file, self.board):
            if f is not None:
                f.close()


class Validator:
    """Samples with the current weights; the encoders and decoders are built once and kept."""

    def __init__(self, cfg: Config, spec: BackboneSpec, trainer: Trainer, device: torch.device,
                 dataset: VideoDataset | None = None) -> None:
        self.cfg, self.spec, self.trainer, self.device = cfg, spec, trainer, device
        self.comps: Components | None = None
        v = cfg.validation
        unknown = sorted(set(v.images) - set(spec.image_inputs(cfg.model.preset)))
        if unknown:
            raise ValueError(f"validation.images.{unknown[0]}: backbone {spec.name!r} takes the images "
                             f"{', '.join(spec.image_inputs(cfg.model.preset)) or '(none)'}")
        from lora_core.data import load_image
        self.images = {k: load_image(p, v.height, v.width) for k, p in v.images.items()}
        if not self.images and dataset is not None:  # none given: the backbone's inputs from the first sample
            self.images = self.sample_images(cfg, spec, dataset)

    @staticmethod
    def sample_images(cfg: Config, spec: BackboneSpec, dataset: VideoDataset) -> dict[str, torch.Tensor]:
        v = cfg.validation
        wanted = spec.image_inputs(cfg.model.preset)
        if not wanted:
            return {}
        item = dataset[0]
        images = spec.images_from_sample(cfg.model.preset, item["video"])
        if images:
            import torch.nn.functional as tf
            images = {k: tf.interpolate(x[None].float(), size=(v.height, v.width), mode="bilinear",
                                        antialias=True, align_corners=False)[0].clamp(-1, 1)
                      for k, x in images.items()}
            log.info("validation: %s from %s (set validation.images to choose)", ", ".join(images),
                     dataset.samples[item["index"]].path)
        return images

    def _components(self) -> Components:
        spec, preset = self.spec, self.cfg.model.preset
        if self.comps is None:
            parts = set(spec.components(preset)) - set(self.trainer.models) - set(self.trainer.frozen)
            self.comps = spec.build(preset, parts, sources_of(self.cfg), device=self.device,
                                    dtype=model_dtype(self.cfg, self.device))
        return {**self.comps, **self.trainer.frozen, **self.trainer.models}

    def _samples(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(prompt index, video index, video [3, F, H, W]) of every validation prompt, models in eval mode."""
        cfg, spec, v = self.cfg, self.spec, self.cfg.validation
        comps = self._components()
        was = {n: m.training for n, m in self.trainer.models.items()}
        for m in self.trainer.models.values():
            m.eval()
        prompts = v.prompts if spec.uses_text else [None]
        cuda = self.device.type == "cuda"
        if cuda:   # the sampling phase's own peak, logged beside the planner's figure for it
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            for i, prompt in enumerate(prompts):
                for k in range(v.videos_per_prompt):
                    req = SampleRequest(prompts=[prompt] if prompt is not None else None, images=self.images,
                                        frames=v.frames, height=v.height, width=v.width, steps=v.steps,
                                        guidance=v.guidance, seed=v.seed + k, extras=dict(v.extras))
                    video = spec.sample(comps, req, device=self.device,
                                        autocast_dtype=autocast_dtype(cfg, self.device))
                    yield i, k, video[0]
        finally:
            for n, m in self.trainer.models.items():
                m.train(was[n])
        if cuda:
            planned = self.planned_gb()
            log.info("validation sampling peak %.2f GB%s", torch.cuda.max_memory_allocated(self.device) / 2**30,
                     "" if planned is None else f" (planned {planned:.2f} GB, see --plan)")

    def planned_gb(self) -> float | None:
        """The planner's validation-sampling peak (GiB, allocated tensors), planned once; None if it fails."""
        if not hasattr(self, "_planned"):
            self._planned = None
            try:
                from backbones.plan import plan_run
                cfg = dataclasses.replace(self.cfg, validation=dataclasses.replace(self.cfg.validation,
                                                                                  every=max(1, self.cfg.validation.every)))
                plan = plan_run(cfg, self.spec, 1, suggest=False, phases=True)
                phase = plan.encoder_phases.get("validation sampling")   # the allocator counts no CUDA context
                self._planned = None if phase is None else (phase - plan.overhead_bytes) / 2**30
            except Exception as e:  # noqa: BLE001 (advice only)
                log.warning("planning the validation phase failed (%s: %s)", type(e).__name__, e)
        return self._planned

    def _write(self, video: torch.Tensor, path: Path) -> Path:
        from lora_core.data.video_io import write_video
        rules = self.spec.media_rules(self.cfg.model.preset)
        suffix = ".png" if rules.kind == "image" else self.spec.video_suffix
        return write_video(video, path.with_name(path.name + suffix), fps=rules.fps)

    def __call__(self, out: Path, step: int) -> None:
        many = self.cfg.validation.videos_per_prompt > 1
        for i, k, video in self._samples():
            path = self._write(video, out / "samples" / (f"step{step:06d}_{i}" + (f"_{k}" if many else "")))
            log.info("validation sample: %s", path)

    def final(self, out: Path) -> list[Path]:
        """validation.at_end: every prompt sampled after training, next to the LoRA (after*.mp4); with
        validation.compare_base the same requests without the LoRA (before*.mp4) and a contact sheet of both."""
        from lora_core.demo import contact_sheet
        from lora_core.inject import disable_lora, lora_layers

        def name(stem: str, i: int, k: int) -> Path:
            return out / (stem + (f"_{i}" if i else "") + (f"_{k}" if k else ""))
        after = {(i, k): video for i, k, video in self._samples()}
        written = [self._write(video, name("after", i, k)) for (i, k), video in after.items()]
        compare = self.cfg.validation.compare_base
        if compare and not any(lora_layers(m) for m in self.trainer.models.values()):
            log.info("validation.compare_base: skipped, nothing trains as LoRA (a fully trained module has no base "
                     "to switch back to in memory); sample the base with infer.py")
            compare = False
        if compare:
            with contextlib.ExitStack() as stack:
                for m in self.trainer.models.values():
                    stack.enter_context(disable_lora(m))
                before = {(i, k): video for i, k, video in self._samples()}
            written += [self._write(video, name("before", i, k)) for (i, k), video in before.items()]
            rows = {}
            prompts = self.cfg.validation.prompts if self.spec.uses_text else [""]
            for (i, k), video in after.items():
                label = (prompts[i] if i < len(prompts) else "") + (f" (seed +{k})" if k else "")
                rows[f"base: {label}"] = before[i, k]
                rows[f"LoRA: {label}"] = video
            written.append(contact_sheet(rows, out / "before_after.png"))
        return written


def check_resume(state: dict[str, Any], cfg: Config, info: parallel.DistInfo, source: Path) -> None:
    """The data order is a function of the global batch size and grad_accum: a resumed run continues exactly,
    so a change of either is refused, naming it."""
    was = state.get("data", {})
    now = {"global_batch": cfg.train.batch_size * info.dp_size, "grad_accum": cfg.train.grad_accum,
           "seed": cfg.train.seed}
    changed = [f"{k}: {was[k]} -> {v}" for k, v in now.items() if k in was and was[k] != v]
    if changed:
        raise ValueError(f"--resume {source}: the data order changed ({'; '.join(changed)}; global_batch = "
                         "train.batch_size x data-parallel ranks); resume with the values the run started with, or "
                         "start a new run in another --output")


@dataclass
class Run:
    """The claimed output folder: its lock, and the checkpoint (and its state) a --resume continues."""

    out: Path
    lock: run_folder.RunLock | None
    resume_from: Path | None
    state: dict[str, Any] | None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def start_processes(cfg: Config, spec: BackboneSpec) -> parallel.DistInfo:
    """The attention backend and the (dp, sp) process mesh; combinations this build cannot run fail here."""
    set_attention_backend(cfg.model.attention)
    info = parallel.init_distributed(cfg.parallel.ulysses, spec.sequence_parallel(cfg.model.preset))
    parallel.check_options(info, mode=cfg.parallel.mode, optimizer=cfg.optim.name,
                           validation_every=cfg.validation.every)
    if not info.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    torch.manual_seed(cfg.train.seed)
    return info


def claim_output(cfg: Config, spec: BackboneSpec, args: argparse.Namespace, info: parallel.DistInfo) -> Run:
    """Everything that can fail on user input before any model is loaded: the weight sources, the training plan,
    the output folder (locked; a folder holding another run is refused) and the checkpoint to resume (intact,
    same shapes, scale and data order)."""
    spec.check_sources(cfg.model.preset, sources_of(cfg), set(spec.components(cfg.model.preset)))
    plan_training(cfg, spec.components(cfg.model.preset))
    out = Path(cfg.train.output)
    lock = None
    if info.is_main:
        lock = run_folder.RunLock(out).acquire()
        try:
            run_folder.check_fresh(out, args.resume)
        except ValueError:
            lock.release()
            raise
        ckpt.sweep_leftovers(out / "checkpoints")
    parallel.barrier(info)
    run = Run(out, lock, None, None)
    try:
        if args.resume:
            run.resume_from = ckpt.resolve_resume(args.resume, out / "checkpoints",
                                                  (TRAINABLE_FILE, OPTIMIZER_FILE, RNG_FILE))
        if run.resume_from is not None:
            run.state = ckpt.load_state(run.resume_from)
            run_folder.check_resume_config(run.state.get("config", {}), to_dict(cfg), run.resume_from)
            check_resume(run.state, cfg, info, run.resume_from)
        elif args.resume:
            log.info("--resume %s: no checkpoint yet in %s, starting fresh", args.resume, out / "checkpoints")
    except BaseException:
        run.release()
        raise
    return run


def resume(trainer: Trainer, run: Run, cfg: Config, scaler: LossScaler | None = None) -> int:
    """Trained tensors, optimizer state, schedule and RNG of the checkpoint; returns its step (0: fresh run)."""
    if run.resume_from is None or run.state is None:
        return 0
    src = run.resume_from
    with gathered(trainer, writeback=True):  # FSDP2: gathered, loaded, scattered back
        load_trainable_state(trainer.models, ckpt.load_safetensors(src / TRAINABLE_FILE), str(src / TRAINABLE_FILE),
                             trainer.names)
    parallel.load_optimizer_state_dict(trainer.container, trainer.optimizer, ckpt.load_tensors(src / OPTIMIZER_FILE))
    start = int(run.state["step"])
    # the schedule is a function of (step, config): rebuilt, so a resumed run may change max_steps
    for group in trainer.optimizer.param_groups:
        group.pop("initial_lr", None)
    trainer.scheduler = build_scheduler(trainer.optimizer, cfg.optim, cfg.train.max_steps, last_step=start)
    ckpt.set_rng_state(ckpt.load_tensors(src / RNG_FILE))
    if scaler is not None and scaler.enabled and "loss_scale" in run.state:
        scaler.load_state_dict(run.state["loss_scale"])
    log.info("resumed from %s at step %d", src, start)
    return start


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    cfg, spec = resolve_config(args)                          # config: every value checked
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    if args.plan:
        from backbones.plan import format_plan, plan_run
        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        plan = plan_run(cfg, spec, world, gpu_memory=args.gpu_memory)
        print(format_plan(plan))
        return 0 if plan.fits in (None, True) else 1
    info = start_processes(cfg, spec)
    run = claim_output(cfg, spec, args, info)                # 1. user input checked, output folder claimed
    try:
        dataset = prepare_dataset(cfg, spec, info)           # 2. media scanned and probed
        spec.check_dataset(cfg.model.preset, dataset, trained_set(cfg, spec), cfg.objective)
        if info.is_main:
            run.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run.out / "config.yaml")
        cached = prepare_cache(cfg, spec, dataset, info, info.device)   # 3. encoded once, media and text apart
        if args.cache_only:
            log.info("cache ready in %s", cached.cache.dir)
            return 0
        trainer = build_models(cfg, spec, info)              # 4. trained components, parallelized; optimizer
        validate = (Validator(cfg, spec, trainer, info.device, dataset)
                    if cfg.validation.every or cfg.validation.at_end else None)
        planned = planned_peak_gb(cfg, spec, info)          # GPU: the planner's figure, logged beside the measured
        scaler = LossScaler(autocast_dtype(cfg, info.device) == torch.float16)   # fp16: dynamic loss scaling
        start = resume(trainer, run, cfg, scaler)            # 5. a checkpoint's state
        rc = train_loop(cfg, spec, trainer, dataset, cached, info, run.out, start, validate, scaler, planned)  # 6.
        if rc:
            return rc
        with gathered(trainer):                              # 7. the artifacts (FSDP2: gathered, rank 0 writes)
            if info.is_main:
                for path in save_artifacts(cfg, spec, trainer, run.out):
                    log.info("written: %s", path)
        if validate is not None and cfg.validation.at_end and info.is_main:
            if (cfg.parallel.mode == "fsdp" and info.distributed) or info.sp_size > 1:   # rank 0 cannot drive it alone
                log.info("validation.at_end: skipped (a sharded model); sample %s with infer.py",
                         run.out / "lora.safetensors")
            else:
                for path in validate.final(run.out):
                    log.info("written: %s", path)
        parallel.barrier(info)  # the ranks tear the process group down together, after rank 0 has written
        return 0
    finally:
        run.release()
        parallel.shutdown()


def train_loop(cfg: Config, spec: BackboneSpec, trainer: Trainer, dataset: VideoDataset, cached: Cached,
               info: parallel.DistInfo, out: Path, start: int, validate: Validator | None,
               scaler: LossScaler | None = None, planned: float | None = None) -> int:
    device, preset = info.device, cfg.model.preset
    usable = cached.usable
    batches = GlobalBatches([dataset.batch_buckets[i] for i in usable], cfg.train.batch_size * info.dp_size,
                            cfg.train.seed, repeats=cfg.data.repeats)
    lo = info.dp_rank * cfg.train.batch_size
    mine = list(range(lo, lo + cfg.train.batch_size))

    def plan(micro: int) -> tuple[list[int], list[int]]:
        gbatch = batches.global_batch(micro)
        return [usable[gbatch[i]] for i in mine], mine

    drops = [DropRule(c.name, c.fields, c.null, float(cfg.data.condition_dropout.get(c.name, 0.0)))
             for c in spec.conditions(preset)]
    reader = BatchReader(cached.cache.get, cached.media, cached.text, cached.empty_text,
                         [FieldSource(f.name, f.keyed_by) for f in spec.cache_fields(preset, trained_set(cfg, spec))],
                         drops,
                         meta=lambda i: dataset.meta(i), seed=cfg.train.seed,
                         describe=lambda i: str(dataset.samples[i].path), prefetch=cfg.train.prefetch)
    amp = autocast_dtype(cfg, device)
    scaler = scaler or LossScaler(False)
    metrics = Metrics(out, start, enabled=info.is_main)
    params = list(trainable_parameters(trainer.models).values())

    def write_checkpoint(step: int) -> None:
        # every rank takes part: under FSDP2 the trained tensors and the optimizer state are gathered to rank 0
        optim_state = parallel.optimizer_state_dict(trainer.container, trainer.optimizer)
        with gathered(trainer):
            if info.is_main:
                sd = trainable_state(trainer.models, trainer.names)
                path = ckpt.save_checkpoint(
                    out / "checkpoints", step,
                    files={TRAINABLE_FILE: lambda p: ckpt.save_tensors(sd, p), OPTIMIZER_FILE: optim_state,
                           RNG_FILE: ckpt.rng_state()},
                    state={"step": step, "config": to_dict(cfg), **({"loss_scale": scaler.state_dict()}
                                                                      if scaler.enabled else {}),
                           "data": {"micro_steps": step * cfg.train.grad_accum,
                                    "global_batch": cfg.train.batch_size * info.dp_size,
                                    "grad_accum": cfg.train.grad_accum, "seed": cfg.train.seed}},
                    keep_last=cfg.train.keep_last)
                log.info("checkpoint written: %s", path)
        parallel.barrier(info)

    sync = parallel.gradient_sync
    for m in trainer.models.values():
        m.train()
    bar = tqdm(range(start, cfg.train.max_steps), initial=start, total=cfg.train.max_steps,
               disable=not show_progress(info), desc="training")
    try:
        with StopRequest() as stop:
            for step in bar:
                t0 = time.perf_counter()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                total = torch.zeros((), device=device)
                for a in range(cfg.train.grad_accum):
                    micro = step * cfg.train.grad_accum + a
                    batch = reader.get(micro, plan).to(device)
                    last = a == cfg.train.grad_accum - 1
                    no_sync = contextlib.ExitStack()
                    if not last:  # gradients are all-reduced once per optimizer step
                        for w in trainer.wrapped.values():
                            no_sync.enter_context(sync(w, False))
                    with no_sync, fused.dropout_scope([dropout_seed(s) for s in batch.seeds]), \
                            torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None), \
                            parallel.maybe_offload_activations(cfg.train.offload_activations):
                        loss = spec.training_loss(trainer.wrapped, batch, cfg.objective)
                        scaler.scale(loss / cfg.train.grad_accum).backward()
                    total += loss.detach() / cfg.train.grad_accum
                loss_val = float(parallel.all_reduce_mean(total, info))
                if not math.isfinite(loss_val):
                    trainer.optimizer.zero_grad(set_to_none=True)
                    if not cfg.train.skip_nonfinite:
                        raise FloatingPointError(f"non-finite loss {loss_val} at step {step + 1}; lower optim.lr "
                                                 "or set train.skip_nonfinite=true to skip such steps")
                    log.warning("step %d: non-finite loss %s, step skipped", step + 1, loss_val)
                    continue
                scaler.unscale_(params)
                grad_norm = parallel.clip_grad_norm(params, cfg.optim.grad_clip)  # global, FSDP2 shards too
                # fp16: a non-finite global norm is an overflow, decided alike on every rank (the step is skipped
                # and its gradients dropped, so what clipping did to them does not matter)
                stepped = scaler.update(grad_norm)
                lr = trainer.scheduler.get_last_lr()[0]
                if stepped:
                    trainer.optimizer.step()
                    trainer.scheduler.step()
                else:
                    log.warning("step %d: fp16 gradients overflowed; step skipped, loss scale now %g", step + 1,
                                scaler.scale_value)
                trainer.optimizer.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                record = {"step": step + 1, "loss": loss_val, "lr": lr, "grad_norm": grad_norm, "s_per_step": dt,
                          "samples_per_s": cfg.train.batch_size * info.dp_size * cfg.train.grad_accum / dt,
                          "peak_mem_gb": peak_memory_gb(device),
                          **({"planned_peak_gb": planned} if planned is not None else {}),
                          **({"loss_scale": scaler.scale_value} if scaler.enabled else {})}
                metrics.write(record)
                if info.is_main:
                    bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}")
                    if cfg.train.log_every and (step + 1) % cfg.train.log_every == 0:
                        log.info("step %d loss %.5f grad_norm %.4f lr %.3e %.2f s/step %.2f samples/s peak %.2f GB%s",
                                 step + 1, loss_val, grad_norm, lr, dt, record["samples_per_s"],
                                 record["peak_mem_gb"], "" if planned is None else f" (planned {planned:.2f} GB)")
                done = step + 1
                if cfg.train.ckpt_every and done % cfg.train.ckpt_every == 0 and done < cfg.train.max_steps:
                    write_checkpoint(done)
                if (validate is not None and cfg.validation.every and done % cfg.validation.every == 0
                        and info.is_main):
                    validate(out, done)
                if parallel.any_rank(stop.signal is not None, info):  # all ranks stop at the same step
                    write_checkpoint(done)
                    bar.close()
                    log.warning("stopped by signal at step %d; resume with --resume latest", done)
                    return 128 + (stop.signal or signal.SIGTERM)  # ranks told by another rank
        bar.close()
        if start < cfg.train.max_steps:
            write_checkpoint(cfg.train.max_steps)
    finally:
        reader.close()
        metrics.close()
    return 0


def cli(argv: list[str] | None = None) -> int:
    """main() with user errors as one `error:` line (tracebacks are kept for bugs)."""
    try:
        return main(argv)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        logging.getLogger("train").debug("user error", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())

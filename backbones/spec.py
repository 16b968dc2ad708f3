"""The backbone contract: what a family supplies so that train.py, infer.py, the data pipeline, the cache and
the parallel code never name a family's components or objective.

A spec declares
- its components (`components`): the networks and encoders it builds, which of them the objective calls during
  training, how each may be trained (LoRA, full by parameter pattern, frozen) and how its LoRA keys are named in
  each file format;
- its weight sources (`sources`): `--ckpt-dir` is the common one, others come from `model.sources`; all are
  checked (`check_sources`) before anything is built; `random_presets` may run without any;
- its media rules (`media_rules`) that drive the data pipeline (image or video, frames by fps or by stride,
  frame and size multiples, defaults);
- its cache fields (`cache_fields`): what `encode_media` / `encode_text` compute once per sample, keyed by the
  media or by the text alone, and its droppable conditions (`conditions`) with their null values;
- its objective (`objective_config` + `training_loss`), a module of `backbones.objectives` with its own typed
  config section `objective.*`;
- its units (`units`) for checkpointing and FSDP, and its sequence-parallel capability (`sequence_parallel`);
- its sampling (`sample` from a `SampleRequest`), with the options and image inputs infer.py exposes.

Shapes: B batch, C/F/H/W video channels/frames/height/width.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from lora_core.data.rules import MediaRules
from lora_core.formats import LoRANaming
from lora_core.runtime.batch import Batch

__all__ = ["BackboneSpec", "Batch", "CacheField", "Component", "Components", "Condition", "MediaRules",
           "SampleOption", "SampleRequest", "Sources"]

Components = dict[str, Any]   # component name -> built module (or a tokenizer); only the parts asked for
TrainMode = Literal["lora", "full", "frozen"]


@dataclass(frozen=True)
class Component:
    """One part of a backbone.

    `modes` lists how it may be trained, the default first ("frozen" alone: never trained). `in_training`: the
    objective calls it every step, so train.py builds it (the trained networks and any frozen network they need);
    encoders used only to fill the cache say False, and join training when the config trains them (e.g. a text
    encoder with LoRA: its outputs can then no longer be cached, see `cache_fields(preset, trained)`). `lora_targets`: default LoRA target patterns (PEFT matching);
    `full_patterns`: regexes of the parameter names "full" mode trains (empty: all of them). `naming`: the key
    prefixes (and key map) of its LoRA modules in each file format."""

    name: str
    modes: tuple[TrainMode, ...] = ("frozen",)
    in_training: bool = False
    lora_targets: tuple[str, ...] | str = ()   # names (suffix match) or one regex (full match), as lora.targets
    full_patterns: tuple[str, ...] = ()
    naming: LoRANaming | None = None
    description: str = ""

    @property
    def default_mode(self) -> TrainMode:
        return self.modes[0]


@dataclass(frozen=True)
class CacheField:
    """A tensor computed once per sample and cached: keyed by the media file and its preprocessing ("media",
    e.g. VAE latents) or by the text alone ("text", e.g. a caption's encoding), so editing a caption never
    re-runs the VAE."""

    name: str
    keyed_by: Literal["media", "text"]


@dataclass(frozen=True)
class Condition:
    """A condition that classifier-free-guidance training drops with probability `data.condition_dropout[name]`.

    When sample i's condition is dropped its `fields` are replaced by the null: the cached encoding of the empty
    text ("empty_text"), zeros of the same shape ("zeros"), or left to the objective ("objective", which reads
    `batch.dropped[name]`, e.g. for conditioning computed per step)."""

    name: str
    fields: tuple[str, ...] = ()
    null: Literal["empty_text", "zeros", "objective"] = "zeros"


@dataclass(frozen=True)
class Sources:
    """Where weights come from: `ckpt_dir` (the common case, `--ckpt-dir`) and named extra paths
    (`model.sources`, e.g. a motion module or a separate VAE)."""

    ckpt_dir: Path | None = None
    extra: dict[str, Path] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return self.ckpt_dir is None and not self.extra


@dataclass(frozen=True)
class SampleOption:
    """A backbone-specific infer.py option (`--<name>` with dashes), e.g. `--shift` for flow backbones. The
    value lands in `SampleRequest.extras[name]` (None when not given: the backbone's default applies)."""

    name: str
    type: type = float
    help: str = ""
    choices: tuple[Any, ...] | None = None
    default: Any = None
    valid: Callable[[Any], bool] | None = None   # checked by infer.py before any build
    expected: str = ""                           # what `valid` wants, for the error message

    def check(self, value: Any) -> None:
        if self.valid is not None and not self.valid(value):
            raise ValueError(f"--{self.name.replace('_', '-')} {value}: must be {self.expected}")


@dataclass
class SampleRequest:
    """What to sample: prompts (None for a backbone without text), named input images ([3, H, W] in [-1, 1],
    already at (height, width)), control inputs, and backbone-specific extras (`sample_options`)."""

    prompts: list[str] | None = None
    negative_prompt: str | None = None
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    controls: dict[str, Any] = field(default_factory=dict)
    frames: int = 1
    height: int = 64
    width: int = 64
    steps: int = 10
    guidance: float | None = None
    seed: int = 0
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return len(self.prompts) if self.prompts else 1


class BackboneSpec:
    """Base class; one subclass per family, registered in `backbones.registry`."""

    name: str = ""
    presets: tuple[str, ...] = ()
    random_presets: tuple[str, ...] = ("tiny",)   # presets that may run on deterministic random weights
    default_rank: int = 32
    default_alpha: float = 32.0
    uses_text: bool = True                        # prompts are an input (infer.py --prompt, validation prompts)
    lora_file_metadata: dict[str, str] = {}       # extra metadata in every LoRA file (e.g. kohya network module)
    lora_backbones: tuple[str, ...] = ()          # other backbones whose LoRA files apply (AnimateDiff: sd15)
    video_suffix: str = ".mp4"                    # validation samples and infer.py's default output of videos
    # what train.py makes without --data: "clips", "pairs" or "concept" (the demo: a held-out colour under a
    # trigger word, `lora_core.data.sample_data.make_concept_dataset`)
    embedded_sample: str = "clips"

    @property
    def accepted_lora_backbones(self) -> tuple[str, ...]:
        return (self.name, *self.lora_backbones)

    # ---- declarations
    def components(self, preset: str) -> dict[str, Component]:
        raise NotImplementedError

    def media_rules(self, preset: str) -> MediaRules:
        raise NotImplementedError

    def cache_fields(self, preset: str, trained: frozenset[str] = frozenset()) -> list[CacheField]:
        """What is cached; `trained` names the components that train in this run (an encoder that trains cannot
        have its outputs cached, so the spec caches its inputs instead)."""
        raise NotImplementedError

    def conditions(self, preset: str) -> list[Condition]:
        return []

    def objective_config(self, preset: str) -> Any:
        """A dataclass instance: the `objective.*` config section with this preset's defaults."""
        raise NotImplementedError

    def preset_overrides(self, preset: str) -> dict[str, Any]:
        """Config values (dotted keys) a preset implies, e.g. gradient checkpointing on for 5b."""
        return {}

    def sequence_parallel(self, preset: str) -> int | None:
        """The attention head count Ulysses splits, or None when the denoiser has no sequence-parallel seam."""
        return None

    def units(self, name: str, module: nn.Module) -> list[nn.Module]:
        """The repeated blocks of a trained component (activation checkpointing and FSDP units)."""
        return list(getattr(module, "blocks", []))

    def sample_options(self, preset: str) -> list[SampleOption]:
        return []

    def image_inputs(self, preset: str) -> dict[str, str]:
        """Named input images sampling accepts (infer.py `--<name>`, validation.images), name -> help."""
        return {}

    def default_steps(self, preset: str) -> int:
        return 50

    def images_from_sample(self, preset: str, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """The `image_inputs` taken from a training sample's known frames (video [3, K, H, W] in [-1, 1]), for
        validation when validation.images is not set; {} when a sample cannot supply them."""
        return {}

    def default_guidance(self, preset: str) -> float:
        return 5.0

    def default_ckpt_dir(self, preset: str) -> Path | None:
        """A checkpoint folder shipped with the project that --ckpt-dir defaults to for this preset (the tiny
        pretrained base of the embedded demo), or None (random weights or a required --ckpt-dir)."""
        return None

    def sources(self, preset: str) -> dict[str, str]:
        """Named extra weight sources (`model.sources.<name>`) besides --ckpt-dir, name -> help."""
        return {}

    def check_preset(self, preset: str) -> None:
        if preset not in self.presets:
            raise ValueError(f"backbone {self.name!r} has no preset {preset!r}; choose one of "
                             f"{', '.join(self.presets)}")

    def encoder_parts(self, preset: str, keyed_by: str, trained: frozenset[str] = frozenset()) -> set[str]:
        """Components `encode_media` ("media") or `encode_text` ("text") needs."""
        return set()

    def frozen_in_training(self, preset: str, objective: Any, trained: frozenset[str]) -> set[str]:
        """Frozen components the objective calls in training besides the trained ones (built once, never
        wrapped for gradients, passed to `training_loss` with the others); e.g. Framer's ControlNet when
        `objective.controlnet` is on."""
        return set()

    def check_dataset(self, preset: str, dataset: Any, trained: frozenset[str], objective: Any) -> None:
        """Refuse (ValueError naming the value or file) a dataset this run cannot train on, before any model is
        loaded; `dataset` is the probed `VideoDataset` (its `meta(i)` per sample)."""

    # ---- building and loading
    def check_sources(self, preset: str, sources: Sources, parts: set[str]) -> None:
        """Fail fast (FileNotFoundError/ValueError naming the file) when the sources cannot provide `parts`;
        reads headers and small files only."""
        if sources.empty and preset not in self.random_presets:
            raise ValueError(f"--preset {preset} of backbone {self.name!r} needs --ckpt-dir (the downloaded "
                             f"official folder); only {', '.join(self.random_presets) or 'no preset'} runs on "
                             "random weights")
        unknown = sorted(set(sources.extra) - set(self.sources(preset)))
        if unknown:
            known = ", ".join(self.sources(preset)) or "none"
            raise ValueError(f"model.sources.{unknown[0]} is not a weight source of backbone {self.name!r} "
                             f"(its sources: {known})")

    def build(self, preset: str, parts: set[str], sources: Sources | None = None,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Components:
        """Build the asked-for components; weights from the sources (validated before any compute) or, without
        any, deterministic random weights (the random presets only)."""
        raise NotImplementedError

    def component_specs(self, preset: str) -> dict[str, nn.Module]:
        """Each module component built on the meta device (no memory), for `python -m backbones info`."""
        raise NotImplementedError

    def save_checkpoint(self, comps: Components, out_dir: str | Path, sources: Sources | None = None,
                        max_shard_bytes: int = 10 * 2**30) -> Path:
        """Write the components as a checkpoint folder in the official layout (`--ckpt-dir` loads it)."""
        raise ValueError(f"exporting a checkpoint folder is not implemented for backbone {self.name!r}")

    def save_full(self, name: str, module: nn.Module, out_dir: Path, trained: list[str]) -> list[Path]:
        """The artifact of a fully trained component (mode "full"; `trained`: its trained parameter names): by
        default those parameters as one safetensors state dict; families override this to write their official
        layouts."""
        from lora_core.runtime.checkpoint import save_tensors
        params = dict(module.named_parameters())
        sd = {k: params[k].detach().cpu() for k in trained}
        return [save_tensors(sd, out_dir / f"{name}.safetensors", metadata={"backbone": self.name})]

    def export_lora(self, models: dict[str, nn.Module], out_dir: Path, written: Path, metadata: dict[str, str],
                    dtype: torch.dtype) -> list[Path]:
        """Further LoRA files beside the one `lora.save_format` wrote (`written`), in the family's other layouts
        (AnimateDiff: diffusers and the original MotionLoRA layout); `models`: the LoRA-trained components."""
        return []

    # ---- data
    @torch.no_grad()
    def encode_media(self, comps: Components, item: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One dataset item (video [C, F, H, W] in [-1, 1], meta) -> its media-keyed cache fields."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_text(self, comps: Components, texts: list[str],
                    trained: frozenset[str] = frozenset()) -> list[dict[str, torch.Tensor]]:
        """Texts -> their text-keyed cache fields, one dict each."""
        return [{} for _ in texts]

    # ---- objective
    def training_loss(self, models: dict[str, nn.Module], batch: Batch, cfg: Any) -> torch.Tensor:
        """Scalar loss of a batch; `models` holds the in-training components (parallelized); cfg is the
        `objective` section. Every random draw of sample i comes from batch.seeds[i]."""
        raise NotImplementedError

    # ---- sampling
    @torch.no_grad()
    def sample(self, comps: Components, request: SampleRequest, *, device: torch.device | str = "cpu",
               autocast_dtype: torch.dtype | None = None, offload: bool = False,
               progress: bool = False) -> torch.Tensor:
        """Outputs [B, C, F, H, W] float32 in [-1, 1] (F = 1 for image backbones)."""
        raise NotImplementedError


def objective_from_dict(default: Any, values: dict[str, Any] | None, prefix: str = "objective") -> Any:
    """The objective section: the spec's defaults with `values` on top, type-checked (unknown keys name the
    key and the valid ones)."""
    from lora_core.runtime.config import from_dict
    merged = {**dataclasses.asdict(default), **(values or {})}
    return from_dict(type(default), merged, prefix)

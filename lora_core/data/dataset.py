"""The training dataset: probed samples -> [C, F, H, W] tensors in [-1, 1], with their plan and metadata.

Letters: B batch, C channels (3, RGB), F frames, H height, W width.

What a sample becomes (its bucket, frames, resize and crop) is a `ClipPlan`, a pure function of
(config, sample metadata, seed, index); the latent cache keys on it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from lora_core.data.config import DataConfig, require_resolved, resolve_data_config
from lora_core.data.images import open_image, resize_crop
from lora_core.data.layouts import DataReport, Sample, scan_dataset
from lora_core.data.probe import clip_frames, frame_stride, probe_samples, sampled_fps
from lora_core.data.rules import MediaRules
from lora_core.data.sampling import (make_buckets, nearest_bucket, resize_crop_plan, sample_rng, select_frames,
                                     with_trigger)
from lora_core.data.video_io import _short, decode_frames, open_reader

logger = logging.getLogger(__name__)

# Bump when reading/resizing changes the tensors, so caches are rebuilt. 2: images with alpha are
# composited on white, 16-bit images are read (they were all white).
PREPROCESS_VERSION = 2


@dataclass(frozen=True)
class ClipPlan:
    """Everything that decides a sample's tensor; a pure function of (cfg, sample, seed, index)."""

    bucket: tuple[int, int, int]  # (F, H, W)
    frames: list[int]  # source frame indices
    resize: tuple[int, int]  # (H, W) before the crop
    crop: tuple[int, int]  # (top, left)
    flip: bool = False  # mirrored left-right after the crop


class SampleReadError(ValueError):
    """A file that probed fine failed to decode later."""


class VideoDataset(Dataset):
    """Probed samples -> dict(video=[C, F, H, W] float in [-1, 1], caption, key, path, index, meta).

    Items of one bucket (F, H, W) stack; batch them by bucket (`epoch_batches`, `GlobalBatches`)
    and `collate`. The caption has the trigger applied but no dropout: dropout depends on the step,
    which only the trainer knows (`caption_dropped`). `cfg` must be resolved (`resolve_data_config`).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        cfg: DataConfig,
        seed: int = 0,
        report: DataReport | None = None,
        progress: bool = True,
    ) -> None:
        cfg.validate()
        require_resolved(cfg, "VideoDataset")
        assert cfg.height is not None and cfg.width is not None and cfg.size_multiple is not None
        self.cfg, self.seed = cfg, seed
        self.report = report or DataReport(cfg.strict)
        self.samples = probe_samples(samples, cfg, self.report, progress)
        if not self.samples:
            raise ValueError(
                f"none of the {len(samples)} samples of {cfg.path or 'the dataset'} can be used "
                "(see the warnings above for each file); fix or replace the files"
            )
        table = [(cfg.height, cfg.width)]
        if cfg.buckets:
            table = make_buckets(cfg.height, cfg.width, cfg.size_multiple, cfg.max_aspect)
        self.buckets: list[tuple[int, int, int]] = [
            (clip_frames(s, cfg), *nearest_bucket(s.height, s.width, table)) for s in self.samples
        ]
        assert all(b[0] >= 1 for b in self.buckets), "probe_samples keeps only samples with a valid frame count"
        self._bad: set[int] = set()
        counts: dict[tuple[int, int, int], int] = {}
        for b in self.buckets:
            counts[b] = counts.get(b, 0) + 1
        logger.info(
            "dataset: %d samples in %d buckets (F, H, W): %s; %d file(s) skipped",
            len(self.samples),
            len(counts),
            ", ".join(f"{b}x{n}" for b, n in sorted(counts.items())),
            len(self.report.skipped),
        )

    def __len__(self) -> int:
        return len(self.samples)

    def caption(self, index: int) -> str:
        return with_trigger(self.samples[index].caption or "", self.cfg.trigger)

    def plan(self, index: int, src_size: tuple[int, int] | None = None) -> ClipPlan:
        s, cfg = self.samples[index], self.cfg
        f, h, w = self.buckets[index]
        if s.is_image:
            frames = [0]
        else:
            frames = select_frames(
                s.num_frames, s.fps, cfg.fps or 0.0, f, self.seed, index, cfg.clip_start, stride=frame_stride(cfg)
            )
        sh, sw = src_size or (s.height, s.width)
        rh, rw, top, left = resize_crop_plan(sh, sw, h, w, self.seed, index, cfg.crop == "random")
        flip = bool(cfg.flip) and bool(sample_rng(self.seed, index, "flip").random() < 0.5)
        return ClipPlan((f, h, w), frames, (rh, rw), (top, left), flip)

    def preprocess_params(self, index: int, include_caption: bool = True) -> dict[str, Any]:
        """What decides the tensors of sample `index`, for cache keys."""
        p = self.plan(index)
        out: dict[str, Any] = dict(
            version=PREPROCESS_VERSION, bucket=list(p.bucket), frames=p.frames, resize=list(p.resize), crop=list(p.crop)
        )
        if p.flip:  # only when set, so caches of unflipped runs keep their keys
            out["flip"] = True
        if include_caption:
            out["caption"] = self.caption(index)
        return out

    def meta(self, index: int, plan: ClipPlan | None = None) -> dict[str, Any]:
        """Per-sample metadata a backbone may condition on: `fps` (rate of the sampled frames; 0 for
        images or an unknown rate), `frame_indices` (source indices), `num_frames`, `source_fps`, `is_image`."""
        s, plan = self.samples[index], plan or self.plan(index)
        return dict(
            fps=sampled_fps(s, self.cfg), frame_indices=list(plan.frames), num_frames=plan.bucket[0],
            source_fps=s.fps, is_image=s.is_image,
        )  # fmt: skip

    def load(self, index: int) -> dict[str, Any]:
        """Read sample `index`; raise SampleReadError naming the file when it cannot be decoded."""
        s = self.samples[index]
        try:
            if s.is_image:
                frames = open_image(s.path)[None]  # [1, H, W, 3]
            else:
                frames = decode_frames(open_reader(s.path, self.cfg.decode_threads), self.plan(index).frames)
        except Exception as e:
            raise SampleReadError(f"cannot decode {s.path}: {_short(e)}") from e
        plan = self.plan(index, frames.shape[1:3])  # decoded size wins if the probe was stale
        video = resize_crop(frames, plan.resize, plan.crop, (plan.bucket[1], plan.bucket[2]))
        if plan.flip:
            video = video.flip(-1)  # [C, F, H, W]: the width
        return dict(
            video=video, caption=self.caption(index), key=s.key, path=str(s.path), index=index,
            meta=self.meta(index, plan),
        )  # fmt: skip

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return self.load(index)
        except SampleReadError as e:
            self.report.skip(self.samples[index].path, str(e), fix="re-export or delete the file")
            self._bad.add(index)
        # Another sample of the same bucket keeps the batch stackable; chosen without randomness.
        n = len(self)
        for k in range(1, n):
            j = (index + k) % n
            if j not in self._bad and self.buckets[j] == self.buckets[index]:
                try:
                    return self.load(j)
                except SampleReadError as e:
                    self.report.skip(self.samples[j].path, str(e))
                    self._bad.add(j)
        raise ValueError(f"no readable sample left in bucket {self.buckets[index]}; fix the files reported above")


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensor fields (video -> [B, C, F, H, W]); other fields become lists."""
    out: dict[str, Any] = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        if isinstance(vals[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in vals}
            if len(shapes) != 1:
                raise ValueError(
                    f"a batch mixes {k!r} shapes {sorted(shapes)}; batch by bucket (epoch_batches / GlobalBatches) "
                    "so each batch holds one bucket"
                )
            out[k] = torch.stack(vals)
        else:
            out[k] = vals
    return out


def load_dataset(
    cfg: DataConfig, seed: int = 0, progress: bool = True, rules: MediaRules | None = None
) -> VideoDataset:
    """scan_dataset + probe: a ready VideoDataset for `cfg` (fails before any model is loaded).

    With `rules` (the backbone's `media_rules(preset)`), cfg's None fields are filled from them first;
    without, cfg must already be resolved. The dataset's `cfg` is the resolved one.
    """
    cfg = resolve_data_config(cfg, rules) if rules is not None else cfg
    cfg.validate()
    require_resolved(cfg, "load_dataset")
    report = DataReport(cfg.strict)
    samples = scan_dataset(
        cfg.path,
        strict=cfg.strict,
        video_extensions=cfg.video_extensions,
        image_extensions=cfg.image_extensions,
        media_root=cfg.media_root or None,
        report=report,
        captions=cfg.captions,
    )
    return VideoDataset(samples, cfg, seed=seed, report=report, progress=progress)


"""The training dataset: probed samples -> [C, F, H, W] tensors in [-1, 1], with their plan and metadata.

Letters: B batch, C channels (3, RGB), F frames, H height, W width.

What a sample becomes (its bucket, frames, resize and crop) is a `ClipPlan`, a pure function of
(config, sample metadata, seed, index); the latent cache keys on it.

A start/end image pair stands for a clip of data.pair_frames frames of which only the first and the
last are known: its `video` holds just those two frames (the middle is never invented), and
`meta["known_frames"]` says where they sit in the clip, so a backbone can condition on them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from lora_core.data.config import DataConfig, require_resolved, resolve_data_config
from lora_core.data.images import open_image, resize_crop
from lora_core.data.layouts import DataReport, Sample, scan_dataset, sidecar_path
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
    source_size: tuple[int, int] | None = None  # (h, w) the resize was planned from (a pair: its start image)


class SampleReadError(ValueError):
    """A file that probed fine failed to decode later."""


class VideoDataset(Dataset):
    """Probed samples -> dict(video=[C, F, H, W] float in [-1, 1], caption, key, path, index, meta).

    Items of one bucket (F, H, W) stack, except that a pair's video holds 2 frames whatever its
    bucket's F: batch by `batch_buckets` (the bucket, with pairs apart) through `epoch_batches` /
    `GlobalBatches`, and `collate`. The caption has the trigger applied but no dropout: dropout
    depends on the step, which only the trainer knows (`caption_dropped`). `cfg` must be resolved
    (`resolve_data_config`).
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
        # What stacks: a pair's video has 2 frames, so it never shares a batch with the clips of its bucket.
        self.batch_buckets: list[tuple[Any, ...]] = [
            (*b, "pair") if s.is_pair else b for s, b in zip(self.samples, self.buckets)
        ]
        self._bad: set[int] = set()
        self._hashes: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime_ns) -> sha256
        counts: dict[tuple[Any, ...], int] = {}
        for b in self.batch_buckets:
            counts[b] = counts.get(b, 0) + 1
        logger.info(
            "dataset: %d samples in %d buckets (F, H, W): %s; %d file(s) skipped",
            len(self.samples),
            len(counts),
            ", ".join(f"{b}x{n}" for b, n in sorted(counts.items(), key=repr)),
            len(self.report.skipped),
        )

    def __len__(self) -> int:
        return len(self.samples)

    def caption(self, index: int) -> str:
        return with_trigger(self.samples[index].caption or "", self.cfg.trigger)

    def plan(self, index: int, src_size: tuple[int, int] | None = None) -> ClipPlan:
        """The plan of sample `index`, from the probed size or `src_size` (h, w) when given. A pair's
        `frames` are [0, 1] (its start and end image) and its resize and crop are its start image's
        (`end_plan` gives the end image's)."""
        s, cfg = self.samples[index], self.cfg
        f, h, w = self.buckets[index]
        if s.is_image or s.is_pair:
            frames = [0, 1] if s.is_pair else [0]
        else:
            frames = select_frames(
                s.num_frames, s.fps, cfg.fps or 0.0, f, self.seed, index, cfg.clip_start, stride=frame_stride(cfg)
            )
        sh, sw = src_size or (s.height, s.width)
        rh, rw, top, left = resize_crop_plan(sh, sw, h, w, self.seed, index, cfg.crop == "random")
        flip = bool(cfg.flip) and bool(sample_rng(self.seed, index, "flip").random() < 0.5)
        return ClipPlan((f, h, w), frames, (rh, rw), (top, left), flip, (sh, sw))

    def end_plan(self, index: int, plan: ClipPlan, end_size: tuple[int, int] | None = None) -> ClipPlan:
        """The plan of the end image of pair `index` (size `end_size`, default the probed one), given its
        start image's `plan`: resized to cover the same bucket from its own size, cropped at the same
        fraction of the slack as the start image (the same crop when both have one size), flipped alike."""
        s = self.samples[index]
        eh, ew = end_size or (s.end_height, s.end_width)
        start = plan.source_size or (s.height, s.width)
        if (eh, ew) == tuple(start):
            return ClipPlan(plan.bucket, [1], plan.resize, plan.crop, plan.flip, (eh, ew))
        _, h, w = plan.bucket
        rh, rw, top, left = resize_crop_plan(eh, ew, h, w, self.seed, index, random_crop=False)
        if self.cfg.crop == "random":
            # The start's crop as a fraction of its slack (centre when it has none), applied to the end's slack.
            def at(c: int, slack: int, new_slack: int) -> int:
                return round((c / slack if slack else 0.5) * new_slack)

            top = at(plan.crop[0], plan.resize[0] - h, rh - h)
            left = at(plan.crop[1], plan.resize[1] - w, rw - w)
        return ClipPlan(plan.bucket, [1], (rh, rw), (top, left), plan.flip, (eh, ew))

    def sidecars(self, index: int) -> dict[str, Path]:
        """The declared sidecar files (data.sidecars) of sample `index` that exist, by suffix."""
        s = self.samples[index]
        found = ((x, sidecar_path(s, x)) for x in self.cfg.sidecars or ())
        return {x: p for x, p in found if p.is_file()}

    def _sha256(self, path: Path) -> str:
        """Content hash of `path`, remembered per (path, size, mtime) for this dataset's lifetime."""
        resolved = path.resolve(strict=True)
        st = resolved.stat()
        sig = (str(resolved), st.st_size, st.st_mtime_ns)
        if sig not in self._hashes:
            with open(resolved, "rb") as f:
                self._hashes[sig] = hashlib.file_digest(f, "sha256").hexdigest()
        return self._hashes[sig]

    def preprocess_params(self, index: int, include_caption: bool = True) -> dict[str, Any]:
        """What decides the tensors of sample `index`, for cache keys (the cache adds the main file's hash,
        a pair's start image's). Entries only present when they apply, so keys of other samples stay
        as they were: `end` (a pair: its end image's sha256), `sidecars` ({suffix: sha256} of the sidecar
        files that exist), `extra` (the metadata row's extra columns). Raises FileNotFoundError when a
        pair's end image is gone."""
        s, p = self.samples[index], self.plan(index)
        out: dict[str, Any] = dict(
            version=PREPROCESS_VERSION, bucket=list(p.bucket), frames=p.frames, resize=list(p.resize), crop=list(p.crop)
        )
        if p.flip:  # only when set, so caches of unflipped runs keep their keys
            out["flip"] = True
        if s.end is not None:
            out["end"] = self._sha256(s.end)
        side = {x: self._sha256(path) for x, path in self.sidecars(index).items()}
        if side:
            out["sidecars"] = side
        if s.extra:
            out["extra"] = dict(s.extra)
        if include_caption:
            out["caption"] = self.caption(index)
        return out

    def meta(self, index: int, plan: ClipPlan | None = None, end_plan: ClipPlan | None = None) -> dict[str, Any]:
        """Per-sample metadata a backbone may condition on:

        `fps` (rate of the sampled frames; 0 for images or an unknown rate; a pair: data.fps),
        `frame_indices` (source indices; a pair: [0, 1], its start and end image), `num_frames` (F of the
        bucket: the clip length, for a pair data.pair_frames), `source_fps`, `is_image`, `is_pair`,
        `known_frames` (positions within the F-frame clip of the frames `video` holds: all of them for
        clips and images, [0, F-1] for a pair), `sidecars` ({suffix: path} of the declared sidecar files
        that exist), `extra` (the metadata row's extra columns), and `geometry`: how source pixels land
        on the training frames, dict(source_size=[sh, sw], resize=[rh, rw], crop=[top, left], flip, size=[H, W]);
        a pair also gets `end_geometry`, its end image's.

        Geometry convention: continuous pixel coordinates with (0, 0) the top-left corner of the image,
        x along the width; pixel (row i, column j) covers [j, j+1) x [i, i+1), so its centre is
        (j + 0.5, i + 0.5). A source point (x, y) lands at x' = x * rw / sw - left, y' = y * rh / sh - top,
        then with flip x' -> W - x'. This is exactly how `resize_crop` maps pixels (bilinear with
        align_corners=False aligns pixel corners, not centres). In pixel indices: column j of the source
        lands at j' = (j + 0.5) * rw / sw - 0.5 - left, flipped j' -> W - 1 - j'; rows alike without flip.
        """
        s, plan = self.samples[index], plan or self.plan(index)
        f, h, w = plan.bucket
        out = dict(
            fps=sampled_fps(s, self.cfg), frame_indices=list(plan.frames), num_frames=f,
            source_fps=s.fps, is_image=s.is_image,
        )  # fmt: skip
        out.update(
            is_pair=s.is_pair,
            known_frames=[0, f - 1] if s.is_pair else list(range(f)),
            geometry=_geometry(plan, plan.source_size or (s.height, s.width)),
            sidecars={x: str(p) for x, p in self.sidecars(index).items()},
            extra=dict(s.extra),
        )
        if s.is_pair:
            ep = end_plan or self.end_plan(index, plan)
            out["end_geometry"] = _geometry(ep, ep.source_size or (s.end_height, s.end_width))
        return out

    def load(self, index: int) -> dict[str, Any]:
        """Read sample `index`; raise SampleReadError naming the file when it cannot be decoded."""
        s = self.samples[index]
        if s.end is not None:
            return self._load_pair(index)
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

    def _load_pair(self, index: int) -> dict[str, Any]:
        """A pair's item: video [3, 2, H, W] = (start, end), each resized and cropped by its own plan."""
        s = self.samples[index]
        assert s.end is not None
        images = []
        for path in (s.path, s.end):
            try:
                images.append(open_image(path)[None])  # [1, h, w, 3]
            except Exception as e:
                raise SampleReadError(f"cannot decode {path}: {_short(e)}") from e
        plan = self.plan(index, images[0].shape[1:3])  # decoded sizes win if the probe was stale
        end_plan = self.end_plan(index, plan, images[1].shape[1:3])
        size = (plan.bucket[1], plan.bucket[2])
        video = torch.cat([resize_crop(im, p.resize, p.crop, size) for im, p in zip(images, (plan, end_plan))], dim=1)
        if plan.flip:
            video = video.flip(-1)
        return dict(
            video=video, caption=self.caption(index), key=s.key, path=str(s.path), index=index,
            meta=self.meta(index, plan, end_plan),
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
            if j not in self._bad and self.batch_buckets[j] == self.batch_buckets[index]:
                try:
                    return self.load(j)
                except SampleReadError as e:
                    self.report.skip(self.samples[j].path, str(e))
                    self._bad.add(j)
        raise ValueError(f"no readable sample left in bucket {self.batch_buckets[index]}; fix the files reported above")


def _geometry(plan: ClipPlan, source_size: tuple[int, int]) -> dict[str, Any]:
    """`meta["geometry"]` of one plan (the convention is in `VideoDataset.meta`)."""
    return dict(
        source_size=[int(source_size[0]), int(source_size[1])], resize=list(plan.resize), crop=list(plan.crop),
        flip=bool(plan.flip), size=[plan.bucket[1], plan.bucket[2]],
    )  # fmt: skip


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
        pairs=bool(cfg.pairs),
        sidecars=cfg.sidecars or (),
    )
    return VideoDataset(samples, cfg, seed=seed, report=report, progress=progress)


"""Training data: layouts, probing, pure sampling functions, the dataset, batching, images and video io.

    layouts.py   find (media, caption) pairs and start/end image pairs; Sample, DataReport, sidecar paths
    probe.py     open every file once; drop the broken and the too short
    sampling.py  pure functions of (seed, index, ...): frames, buckets, crops, caption dropout
    dataset.py   VideoDataset -> [C, F, H, W] tensors in [-1, 1]; collate; load_dataset
    batching.py  the global batch of each micro-step
    rules.py     MediaRules, what a backbone accepts; config.py fills DataConfig from them
    images.py    the one image loader and the one resize + crop
"""

from lora_core.data.batching import GlobalBatches, epoch_batches, sample_seed
from lora_core.data.config import DataConfig, pair_frame_count, resolve_data_config
from lora_core.data.dataset import (
    PREPROCESS_VERSION,
    ClipPlan,
    SampleReadError,
    VideoDataset,
    collate,
    load_dataset,
)
from lora_core.data.images import load_image, open_image, resize_crop
from lora_core.data.layouts import ACCEPTED_LAYOUTS, DataReport, Sample, TextDecodeError, scan_dataset, sidecar_path
from lora_core.data.probe import probe_samples
from lora_core.data.rules import MediaRules
from lora_core.data.sample_data import make_sample_dataset, make_sample_images, make_sample_pairs
from lora_core.data.sampling import (
    apply_caption_dropout,
    available_frames,
    caption_dropped,
    frame_count,
    make_buckets,
    nearest_bucket,
    resize_crop_plan,
    sample_generator,
    sample_rng,
    select_frames,
    with_trigger,
)

__all__ = [
    "ACCEPTED_LAYOUTS", "PREPROCESS_VERSION", "ClipPlan", "DataConfig", "DataReport", "GlobalBatches",
    "MediaRules", "Sample", "SampleReadError", "TextDecodeError", "VideoDataset", "apply_caption_dropout",
    "available_frames", "caption_dropped", "collate", "epoch_batches", "frame_count", "load_dataset",
    "load_image", "make_buckets", "make_sample_dataset", "make_sample_images", "make_sample_pairs",
    "nearest_bucket", "open_image", "pair_frame_count", "probe_samples", "resize_crop", "resize_crop_plan",
    "resolve_data_config", "sample_generator", "sample_rng", "sample_seed", "scan_dataset", "select_frames",
    "sidecar_path", "with_trigger",
]  # fmt: skip

"""Dataset layouts, frame/fps sampling, buckets, bad input and determinism, on real encoded clips."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from lora_core.data import (
    BucketBatchSampler,
    DataConfig,
    VideoDataset,
    apply_caption_dropout,
    available_frames,
    caption_dropped,
    collate,
    epoch_batches,
    frame_count,
    load_dataset,
    make_buckets,
    nearest_bucket,
    sample_generator,
    scan_dataset,
    select_frames,
    with_trigger,
)


def make_clip(
    path: Path, w: int = 64, h: int = 32, n: int = 20, fps: int = 24, codec: str = "libx264", levels: bool = False
) -> Path:
    """Encode a real clip with PyAV. With `levels`, frame k is flat grey 8*k (its index is readable back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:h, 0:w]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "0"} if codec == "libx264" else ({"qscale": "1"} if codec == "mpeg4" else {})
        for k in range(n):
            if levels:
                a = np.full((h, w, 3), 8 * k, np.uint8)
            else:
                a = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, (10 * k) % 256)], -1).astype(np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def make_image(path: Path, w: int = 40, h: int = 30) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def cfg_for(path: Path, **kw) -> DataConfig:
    base = dict(path=str(path), num_frames=9, height=32, width=32, fps=24)
    base.update(kw)
    return DataConfig(**base)


def pairs(samples) -> list[tuple[str, str | None]]:
    return sorted((s.path.name, s.caption) for s in samples)


# ----------------------------------------------------------------------------- layouts


def test_folder_with_txt_captions_recursive(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_clip(tmp_path / "a.mp4")
    (tmp_path / "a.txt").write_text("a clip\n")
    make_clip(tmp_path / "sub" / "b.avi", codec="mpeg4")
    (tmp_path / "sub" / "b.txt").write_text("clip b")
    make_image(tmp_path / "sub" / "c.png")
    (tmp_path / "sub" / "c.txt").write_text("an image")
    make_clip(tmp_path / "nocap.mkv", codec="mpeg4")
    (tmp_path / ".hidden").mkdir()
    make_clip(tmp_path / ".hidden" / "x.mp4")  # hidden folders (caches, ._ forks) are ignored
    with caplog.at_level(logging.WARNING):
        samples = scan_dataset(tmp_path)
    assert pairs(samples) == [("a.mp4", "a clip"), ("b.avi", "clip b"), ("c.png", "an image"), ("nocap.mkv", None)]
    assert {s.key for s in samples} == {"a.mp4", "sub/b.avi", "sub/c.png", "nocap.mkv"}
    assert [s.is_image for s in sorted(samples, key=lambda s: s.key)] == [False, False, False, True]
    assert "nocap.mkv" in caplog.text and "no caption" in caplog.text
    with pytest.raises(ValueError, match="nocap.mkv"):
        scan_dataset(tmp_path, strict=True)


def test_cogvideox_prompts_and_videos(tmp_path: Path) -> None:
    make_clip(tmp_path / "videos" / "1.mp4")
    make_clip(tmp_path / "videos" / "2.mp4")
    (tmp_path / "prompts.txt").write_text("first prompt\nsecond prompt\n")
    (tmp_path / "videos.txt").write_text("videos/1.mp4\nvideos/2.mp4\n\n")
    expected = [("1.mp4", "first prompt"), ("2.mp4", "second prompt")]
    assert pairs(scan_dataset(tmp_path)) == expected
    assert pairs(scan_dataset(tmp_path / "prompts.txt")) == expected
    (tmp_path / "prompts.txt").write_text("only one\n")
    with pytest.raises(ValueError, match="line-aligned"):
        scan_dataset(tmp_path)


def test_webvid_csv(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # WebVid's results_*.csv columns; clips saved as <page_dir>/<videoid>.mp4 or by contentUrl name.
    make_clip(tmp_path / "videos" / "001" / "1066.mp4")
    make_clip(tmp_path / "videos" / "stock-footage-waves.mp4")
    (tmp_path / "results_2M_val.csv").write_text(
        "videoid,contentUrl,duration,page_dir,name\n"
        "1066,https://ak.picdn.net/shutterstock/videos/1066/preview/stock-footage-forest.mp4,PT00H00M10S,001,Aerial forest\n"
        "2077,https://ak.picdn.net/shutterstock/videos/2077/preview/stock-footage-waves.mp4,PT00H00M12S,002,\"Waves, slow motion\"\n"
        "3088,https://ak.picdn.net/shutterstock/videos/3088/preview/stock-footage-gone.mp4,PT00H00M09S,003,Missing clip\n"
    )
    with caplog.at_level(logging.WARNING):
        samples = scan_dataset(tmp_path)
    assert pairs(samples) == [("1066.mp4", "Aerial forest"), ("stock-footage-waves.mp4", "Waves, slow motion")]
    assert caplog.text.count("3088") == 1  # the missing clip is reported once, by name
    with pytest.raises(ValueError, match="3088"):
        scan_dataset(tmp_path / "results_2M_val.csv", strict=True)


@pytest.mark.parametrize("header", ["video,prompt", "file,caption"])
def test_simple_csv(tmp_path: Path, header: str) -> None:
    make_clip(tmp_path / "clips" / "a.mp4")
    make_image(tmp_path / "clips" / "b.jpg")
    (tmp_path / "metadata.csv").write_text(f"{header}\nclips/a.mp4,a video\nclips/b.jpg,a still\n,no file\n")
    samples = scan_dataset(tmp_path)
    assert pairs(samples) == [("a.mp4", "a video"), ("b.jpg", "a still")]
    assert [s.is_image for s in sorted(samples, key=lambda s: s.key)] == [False, True]
    with pytest.raises(ValueError, match="metadata.csv:4"):  # the row with an empty media cell
        scan_dataset(tmp_path, strict=True)
    (tmp_path / "metadata.csv").write_text("title,caption\nx,y\n")
    with pytest.raises(ValueError, match="no media column"):
        scan_dataset(tmp_path)


def test_csv_with_separate_media_root(tmp_path: Path) -> None:
    make_clip(tmp_path / "media" / "a.mp4")
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "train.csv").write_text("video,prompt\na.mp4,hello\n")
    assert pairs(scan_dataset(tmp_path / "meta" / "train.csv", media_root=tmp_path / "media")) == [("a.mp4", "hello")]


def test_json_and_jsonl(tmp_path: Path) -> None:
    for n in ("a", "b", "c"):
        make_clip(tmp_path / f"{n}.mp4")
    rows = [{"video": "a.mp4", "caption": "cap a"}, {"file_path": "b.mp4", "prompt": "cap b"}, {"file_path": "c.mp4", "text": "cap c"}]
    (tmp_path / "metadata.json").write_text(json.dumps(rows))
    expected = [("a.mp4", "cap a"), ("b.mp4", "cap b"), ("c.mp4", "cap c")]
    assert pairs(scan_dataset(tmp_path)) == expected
    (tmp_path / "metadata.json").unlink()
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert pairs(scan_dataset(tmp_path)) == expected
    assert pairs(scan_dataset(tmp_path / "train.jsonl")) == expected
    (tmp_path / "train.jsonl").write_text('{"video": "a.mp4", "caption": "x"}\n{broken\n')
    with pytest.raises(ValueError, match=r"train.jsonl:2"):
        scan_dataset(tmp_path / "train.jsonl")


def test_nothing_usable_names_the_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "data.bin").write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match=rf"{tmp_path.name}(.|\n)*accepted dataset layouts"):
        scan_dataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        scan_dataset(tmp_path / "nope")


# ----------------------------------------------------------------------------- frames, fps, buckets


def test_frame_arithmetic() -> None:
    assert available_frames(30, 30.0, 24.0) == 24  # 1 s at 30 fps holds 24 frames at 24 fps
    assert available_frames(49, 24.0, 24.0) == 49
    assert available_frames(10, 12.0, 24.0) == 19  # upsampling repeats frames
    assert available_frames(10, 0.0, 24.0) == 10  # unknown source rate: no resampling
    assert [frame_count(a, 49) for a in (1, 4, 5, 8, 48, 49, 100)] == [1, 1, 5, 5, 45, 49, 49]
    assert frame_count(40, 49, multiple=8) == 33
    assert select_frames(30, 30.0, 24.0, 5, seed=0, index=0, start="head") == [0, 1, 2, 3, 5]
    assert select_frames(10, 12.0, 24.0, 5, seed=0, index=0, start="head") == [0, 0, 1, 1, 2]
    starts = {select_frames(100, 24.0, 24.0, 9, seed=s, index=0)[0] for s in range(20)}
    assert len(starts) > 1 and all(0 <= s <= 91 for s in starts)


def test_fps_resampling_reads_the_right_frames(tmp_path: Path) -> None:
    make_clip(tmp_path / "c30.mp4", w=64, h=64, n=30, fps=30, levels=True)
    (tmp_path / "c30.txt").write_text("grey ramp")
    ds = load_dataset(cfg_for(tmp_path, num_frames=49, clip_start="head", buckets=False), progress=False)
    item = ds[0]
    assert ds.buckets[0] == (21, 32, 32)  # 24 frames at 24 fps -> longest 4n+1 is 21
    assert item["video"].shape == (3, 21, 32, 32)
    levels = ((item["video"].mean(dim=(0, 2, 3)) + 1) * 127.5).numpy()
    expected = 8 * np.floor(np.arange(21) * 30 / 24)
    assert np.abs(levels - expected).max() < 3, (levels, expected)


def test_shapes_multiples_of_32_and_bucket_aspect(tmp_path: Path) -> None:
    make_clip(tmp_path / "wide.avi", w=70, h=50, n=12, codec="mpeg4")  # odd-ish size, 7:5
    make_clip(tmp_path / "tall.mp4", w=32, h=96, n=12)
    make_image(tmp_path / "img.webp", w=90, h=30)
    for n in ("wide", "tall", "img"):
        (tmp_path / f"{n}.txt").write_text(n)
    cfg = cfg_for(tmp_path, height=64, width=64, num_frames=9)
    ds = load_dataset(cfg, progress=False)
    table = make_buckets(64, 64, 32, 4.0)
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in table)
    for i, s in enumerate(ds.samples):
        f, h, w = ds.buckets[i]
        assert (h, w) == nearest_bucket(s.height, s.width, table)
        assert ds[i]["video"].shape == (3, f, h, w)
        assert ds[i]["video"].dtype == torch.float32
        assert -1.0 <= ds[i]["video"].min() and ds[i]["video"].max() <= 1.0
    by_name = {s.path.name: b for s, b in zip(ds.samples, ds.buckets)}
    assert by_name["tall.mp4"][1] > by_name["tall.mp4"][2]  # tall clip -> tall bucket
    assert by_name["img.webp"] == (1, 32, 128)  # images are 1-frame clips; 3:1 -> 1:4 is nearest
    assert by_name["wide.avi"][0] == 9


@pytest.mark.skipif("libvpx-vp9" not in av.codecs_available, reason="this PyAV build has no VP9 encoder")
def test_vp9_webm_clip(tmp_path: Path) -> None:
    make_clip(tmp_path / "v.webm", w=64, h=32, n=10, codec="libvpx-vp9")
    (tmp_path / "v.txt").write_text("vp9")
    ds = load_dataset(cfg_for(tmp_path, num_frames=9), progress=False)
    assert ds[0]["video"].shape == (3, 9, 32, 32)


def test_short_clip_shorten_vs_skip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_clip(tmp_path / "five.mp4", n=5)
    make_clip(tmp_path / "long.mp4", n=20)
    for n in ("five", "long"):
        (tmp_path / f"{n}.txt").write_text(n)
    with caplog.at_level(logging.INFO):
        ds = load_dataset(cfg_for(tmp_path, num_frames=17), progress=False)
    assert sorted(ds.buckets) == [(5, 32, 32), (17, 32, 32)]
    assert caplog.text.count("five.mp4") == 1 and "training it with 5 frames" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        ds = load_dataset(cfg_for(tmp_path, num_frames=17, short_clips="skip"), progress=False)
    assert [s.path.name for s in ds.samples] == ["long.mp4"]
    assert caplog.text.count("five.mp4") == 1 and "skipped file" in caplog.text


# ----------------------------------------------------------------------------- bad input


def _bad_files(root: Path) -> list[str]:
    make_clip(root / "good.mp4", n=12)
    (root / "random.mp4").write_bytes(np.random.default_rng(1).bytes(4096))
    (root / "empty.mp4").write_bytes(b"")
    full = make_clip(root / "full_tmp.mp4", n=30).read_bytes()
    (root / "full_tmp.mp4").unlink()
    (root / "truncated.mp4").write_bytes(full[: len(full) // 2])
    (root / "notanimage.png").write_bytes(b"PNG? no")
    for n in ["good", "random", "empty", "truncated", "notanimage"]:
        (root / f"{n}.txt").write_text(n)
    return ["random.mp4", "empty.mp4", "truncated.mp4", "notanimage.png"]


def test_corrupt_empty_truncated_reported_once_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad = _bad_files(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lora_core"):
        ds = load_dataset(cfg_for(tmp_path), progress=False)
        for i in range(len(ds)):
            ds[i]
    assert [s.path.name for s in ds.samples] == ["good.mp4"]
    for name in bad:
        assert sum(str(tmp_path / name) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 1, name
    assert set(ds.report.skipped) == {str(tmp_path / name) for name in bad}


@pytest.mark.parametrize("name", ["random.mp4", "empty.mp4", "truncated.mp4", "notanimage.png"])
def test_strict_raises_naming_the_file(tmp_path: Path, name: str) -> None:
    _bad_files(tmp_path)
    for other in {"random.mp4", "empty.mp4", "truncated.mp4", "notanimage.png"} - {name}:
        (tmp_path / other).unlink()
    with pytest.raises(ValueError, match=name):
        load_dataset(cfg_for(tmp_path, strict=True), progress=False)


def test_all_files_broken_raises(tmp_path: Path) -> None:
    (tmp_path / "x.mp4").write_bytes(b"garbage" * 100)
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="none of the 1 samples"):
        load_dataset(cfg_for(tmp_path), progress=False)


def test_file_broken_after_probe_is_substituted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for n in ("a", "b"):
        make_clip(tmp_path / f"{n}.mp4", n=12)
        (tmp_path / f"{n}.txt").write_text(n)
    ds = load_dataset(cfg_for(tmp_path), progress=False)
    (tmp_path / "a.mp4").write_bytes(b"broken now")
    with caplog.at_level(logging.WARNING):
        item = ds[0]
    assert item["key"] == "b.mp4" and "a.mp4" in caplog.text
    strict = load_dataset(cfg_for(tmp_path / "b.mp4", strict=True), progress=False)
    (tmp_path / "b.mp4").write_bytes(b"broken too")
    with pytest.raises(ValueError, match="b.mp4"):
        strict[0]


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"num_frames=50.*49"):
        DataConfig(num_frames=50)
    with pytest.raises(ValueError, match=r"height=100"):
        DataConfig(height=100)
    with pytest.raises(ValueError, match="short_clips"):
        DataConfig(short_clips="pad")
    with pytest.raises(ValueError, match="caption_dropout"):
        DataConfig(caption_dropout=1.5)
    DataConfig(num_frames=33, frame_multiple=8, height=48, width=80, size_multiple=16)


# ----------------------------------------------------------------------------- determinism


def _crop_dataset(root: Path, seed: int) -> VideoDataset:
    make_clip(root / "a.mp4", w=96, h=64, n=30)
    make_clip(root / "b.mp4", w=96, h=64, n=30)
    for n in ("a", "b"):
        (root / f"{n}.txt").write_text(n)
    return load_dataset(cfg_for(root, num_frames=9, buckets=False), seed=seed, progress=False)


def test_same_seed_and_index_same_sample(tmp_path: Path) -> None:
    ds = _crop_dataset(tmp_path, seed=3)
    first = ds[1]["video"]
    ds[0]
    assert torch.equal(ds[1]["video"], first)  # not affected by what was read before
    again = load_dataset(ds.cfg, seed=3, progress=False)
    assert torch.equal(again[1]["video"], first)
    plans = {(tuple(p.frames), p.crop) for p in (VideoDataset(ds.samples, ds.cfg, seed=s).plan(1) for s in range(8))}
    assert len(plans) > 1  # the seed does move the window and the crop


def test_dataloader_workers_do_not_change_samples(tmp_path: Path) -> None:
    ds = _crop_dataset(tmp_path, seed=5)
    sampler = BucketBatchSampler(ds.buckets, batch_size=2, seed=5)
    one = [b["video"] for b in torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate)]
    two = [b["video"] for b in torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=2)]
    assert len(one) == 1 and one[0].shape == (2, 3, 9, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


def test_caption_dropout_and_trigger() -> None:
    draws = [caption_dropped(7, 100, i, 0.3) for i in range(2000)]
    assert draws == [caption_dropped(7, 100, i, 0.3) for i in range(2000)]
    assert 0.25 < np.mean(draws) < 0.35
    assert draws != [caption_dropped(7, 101, i, 0.3) for i in range(2000)]  # new step, new draw
    assert not caption_dropped(7, 0, 0, 0.0) and caption_dropped(7, 0, 0, 1.0)
    assert apply_caption_dropout("sks a dog", 7, 0, 0, 1.0) == ""
    assert with_trigger("a dog running", "sks") == "sks a dog running"
    assert with_trigger("photo of [trigger] running", "sks") == "photo of sks running"
    assert with_trigger("", "sks") == "sks" and with_trigger("a dog", "") == "a dog"


def test_per_sample_torch_generator() -> None:
    a = torch.randn(4, generator=sample_generator(1, 5, "noise", step=3))
    assert torch.equal(a, torch.randn(4, generator=sample_generator(1, 5, "noise", step=3)))
    assert not torch.equal(a, torch.randn(4, generator=sample_generator(1, 6, "noise", step=3)))
    assert not torch.equal(a, torch.randn(4, generator=sample_generator(1, 5, "timestep", step=3)))


def test_batch_order_is_a_pure_function_of_seed_and_epoch() -> None:
    buckets = [(5, 32, 32)] * 7 + [(9, 32, 64)] * 5 + [(1, 64, 32)] * 3
    a = epoch_batches(buckets, 2, seed=1, epoch=0)
    assert a == epoch_batches(buckets, 2, seed=1, epoch=0)
    assert a != epoch_batches(buckets, 2, seed=1, epoch=1) and a != epoch_batches(buckets, 2, seed=2, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(15))  # every sample once per epoch
    assert all(len({buckets[i] for i in b}) == 1 for b in a)  # one bucket per batch
    assert all(len(b) == 2 for b in epoch_batches(buckets, 2, 1, 0, drop_last=True))
    assert sorted(i for b in epoch_batches(buckets, 2, 1, 0, repeats=2) for i in b) == sorted(list(range(15)) * 2)


def test_sampler_ranks_partition_and_resume() -> None:
    buckets = [(5, 32, 32)] * 7 + [(9, 32, 64)] * 4
    glob = epoch_batches(buckets, 2, seed=4, epoch=2)  # 6 batches
    ranks = [BucketBatchSampler(buckets, 2, seed=4, num_replicas=4, rank=r) for r in range(4)]
    for s in ranks:
        s.set_epoch(2)
    per_rank = [list(s) for s in ranks]
    assert {len(p) for p in per_rank} == {2}  # 6 padded to 8: all ranks step equally
    interleaved = [per_rank[r][k] for k in range(2) for r in range(4)]
    assert interleaved[:6] == glob and interleaved[6:] == glob[:2]
    s = BucketBatchSampler(buckets, 2, seed=4)
    s.set_epoch(2, start_batch=4)
    assert list(s) == glob[4:] and len(s) == 2

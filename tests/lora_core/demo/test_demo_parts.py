"""The demo's parts without a model: scenes render what their captions say, the measures read the colour and the
direction back from rendered (and H.264-encoded) frames, the contact sheet, and the concept dataset."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_core.data.sample_data import DEMO_HELD_OUT_SCENE, concept_scenes, make_concept_dataset
from lora_core.data.video_io import read_video
from lora_core.demo import contact_sheet, motion_direction, object_colour
from lora_core.demo.measure import colour_progress
from lora_core.demo.scenes import BACKGROUNDS, COLOURS, DIRECTIONS, HELD_OUT, MOTIONS, Scene, named_scenes, render



@pytest.mark.parametrize("motion", MOTIONS)
def test_measures_read_back_colour_and_direction(motion: str) -> None:
    for colour, rgb in [("red", COLOURS["red"]), ("magenta", HELD_OUT["magenta"])]:
        for bg in BACKGROUNDS:
            video = render(Scene("circle", colour, motion, bg), 64, 64, 17)
            assert np.abs(object_colour(video) - rgb).max() < 12, (colour, bg)   # edge pixels blend a little
            assert np.allclose(motion_direction(video), DIRECTIONS[motion], atol=1e-3)


def test_measures_read_tensors_in_sampler_layout() -> None:
    import torch
    video = render(Scene("square", "green", "left to right", "black"), 64, 64, 9)
    tensor = torch.from_numpy(video).permute(3, 0, 1, 2).float() / 127.5 - 1    # [3, F, H, W] in [-1, 1]
    assert np.allclose(object_colour(tensor), object_colour(video), atol=1e-3)
    assert object_colour(np.full((4, 8, 8, 3), 90, np.uint8)) is None            # nothing stands out
    assert motion_direction(np.full((4, 8, 8, 3), 90, np.uint8)) is None


def test_colour_progress() -> None:
    target = (200, 0, 200)
    assert colour_progress(np.array([0, 200, 0.0]), np.array([200, 0, 200.0]), target) == pytest.approx(1.0)
    assert colour_progress(np.array([0, 200, 0.0]), np.array([0, 200, 0.0]), target) == pytest.approx(0.0)
    assert colour_progress(np.array([100, 100, 100.0]), np.array([150, 50, 150.0]), target) == pytest.approx(0.5)


def test_named_scenes_and_captions() -> None:
    scenes = named_scenes()
    assert len(scenes) == 2 * len(COLOURS) * len(MOTIONS) * len(BACKGROUNDS) == 192
    assert not {s.colour for s in scenes} & set(HELD_OUT)       # the concept stays out of pretraining
    assert Scene("circle", "orange", "top to bottom", "grey").caption() == \
        "an orange circle moving top to bottom on a grey background"
    assert Scene("circle", "magenta", "top to bottom", "grey").caption(trigger="sks") == \
        "a sks circle moving top to bottom on a grey background"


def test_concept_dataset(tmp_path: Path) -> None:
    out = make_concept_dataset(tmp_path / "d", num_clips=8, num_frames=17)
    clips = sorted(out.glob("*.mp4"))
    assert len(clips) == 8
    assert all((s.shape, s.motion, s.background) != DEMO_HELD_OUT_SCENE for s in concept_scenes())
    for clip in clips:
        caption = clip.with_suffix(".txt").read_text().strip()
        assert caption.startswith("a sks ") and "magenta" not in caption
        frames = read_video(clip)
        assert frames.shape == (17, 64, 64, 3)
        # through H.264 (yuv420p) the measure still reads the concept's colour
        assert np.linalg.norm(object_colour(frames) - HELD_OUT["magenta"]) < 40
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    make_concept_dataset(tmp_path / "d", num_clips=8, num_frames=17)        # idempotent
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_contact_sheet(tmp_path: Path) -> None:
    a = render(Scene("square", "red", "left to right", "black"), 32, 48, 9)
    b = render(Scene("circle", "cyan", "top to bottom", "navy"), 32, 48, 9)
    path = contact_sheet({"base": a, "LoRA": b}, tmp_path / "sheet.png", columns=3, scale=2)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (2 * (14 + 64), 3 * 96 + 2 * 2, 3)
    # the first tile of the second row is frame 0 of b, enlarged 2x
    assert np.array_equal(img[14 + 64 + 14 : 14 + 64 + 14 + 64 : 2, 0:96:2], b[0])
    with pytest.raises(ValueError, match="at least one video"):
        contact_sheet({}, tmp_path / "x.png")

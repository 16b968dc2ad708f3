"""The embedded demo end to end: the README's first command fine-tunes the shipped tiny pretrained base on a
colour it never saw (magenta, under the trigger word "sks") and writes before/after videos and a contact sheet;
measured in those frames, the LoRA moves the object's colour most of the way to magenta and the base does not.
Also: the shipped base loads through the normal --ckpt-dir checks and follows its captions' colours and motions."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train
from backbones.registry import get_backbone
from backbones.spec import SampleRequest
from backbones.wan.spec import DEMO_PROMPT, TINY_BASE
from lora_core.data.video_io import read_video
from lora_core.demo import colour_progress, motion_direction, object_colour
from lora_core.demo.scenes import COLOURS, HELD_OUT

MAGENTA = HELD_OUT["magenta"]


def _dist(colour: np.ndarray | None, target: tuple[int, int, int]) -> float:
    return float("inf") if colour is None else float(np.linalg.norm(colour - np.asarray(target)))


def test_shipped_base_is_an_official_folder() -> None:
    spec = get_backbone("wan_ti2v")
    assert spec.default_ckpt_dir("tiny") == TINY_BASE
    spec.check_checkpoint("tiny", TINY_BASE, {"dit", "vae", "text_encoder"})     # the --ckpt-dir checks
    record = json.loads((TINY_BASE / "pretraining.json").read_text())
    assert record["dit"]["final_loss"] < record["dit"]["first_loss"]
    size = sum(f.stat().st_size for f in TINY_BASE.rglob("*") if f.is_file())
    assert size < 10 * 2**20, f"the shipped base grew to {size / 2**20:.1f} MB"


@pytest.fixture(scope="module")
def base():
    spec = get_backbone("wan_ti2v")
    return spec, spec.build("tiny", {"dit", "vae", "text_encoder"}, TINY_BASE)


# three captions of the pretraining set (the base's rates over 28 of them are in its pretraining.json)
@pytest.mark.parametrize("colour,shape,motion,background,direction", [
    ("cyan", "square", "left to right", "black", (1, 0)),
    ("yellow", "circle", "bottom to top", "navy", (0, -1)),
    ("white", "circle", "left to right", "dark green", (1, 0)),
])
def test_base_follows_its_captions(base, colour, shape, motion, background, direction) -> None:
    spec, comps = base
    prompt = f"a {colour} {shape} moving {motion} on a {background} background"
    video = spec.sample(comps, SampleRequest(prompts=[prompt], frames=17, height=64, width=64, steps=10, seed=0))
    got = object_colour(video[0])
    assert _dist(got, COLOURS[colour]) < 70, (prompt, got)
    assert _dist(got, MAGENTA) > 100, (prompt, got)
    d = motion_direction(video[0])
    assert d is not None and float(np.dot(d, direction)) > 0.8, (prompt, d)


def test_main_job_teaches_the_held_out_colour(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert train.main(["--backbone", "wan_ti2v", "--preset", "tiny", "--output", str(out)]) == 0
    before, after = read_video(out / "before.mp4"), read_video(out / "after.mp4")
    assert before.shape == after.shape == (17, 64, 64, 3)
    cb, ca = object_colour(before), object_colour(after)
    progress = colour_progress(cb, ca, MAGENTA)
    print(f"\nconcept '{DEMO_PROMPT}': base colour {cb}, LoRA colour {ca}, target {MAGENTA}, progress {progress:.2f}")
    assert _dist(cb, MAGENTA) > 100, f"the base alone already draws the concept: {cb}"
    assert progress > 0.6, f"the LoRA moved the colour only {progress:.0%} of the way: {cb} -> {ca}"
    # it learned the colour, not one clip: the prompt (a circle moving left to right on black) is a combination
    # none of the 8 clips shows, and it still moves the way the prompt says
    d = motion_direction(after)
    assert d is not None and d[0] > 0.8, d
    sheet = Image.open(out / "before_after.png")
    assert sheet.size[0] > 64 * 5 and sheet.size[1] > 2 * 64


def test_before_after_files_for_any_backbone(tmp_path: Path) -> None:
    """validation.at_end + compare_base are backbone-independent: an image backbone writes PNGs."""
    out = tmp_path / "sd"
    assert train.main(["--backbone", "sd15", "--preset", "tiny", "--output", str(out), "--max-steps", "4",
                       "train.log_every=0", "validation.at_end=true", "validation.compare_base=true",
                       "validation.prompts=[a red square]", "validation.steps=2"]) == 0
    before, after = np.asarray(Image.open(out / "before.png")), np.asarray(Image.open(out / "after.png"))
    assert before.shape == after.shape and before.ndim == 3
    assert not np.array_equal(before, after)        # the same seed, with and without the 4-step LoRA
    sheet = Image.open(out / "before_after.png")
    assert sheet.size[1] == 2 * (14 + 2 * before.shape[0])

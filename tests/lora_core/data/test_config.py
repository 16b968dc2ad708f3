"""MediaRules arithmetic, DataConfig validation, and filling the config from a backbone's rules."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lora_core.data import DataConfig, MediaRules, resolve_data_config
from tests.lora_core.data.media import IMAGE_LIKE, STRIDE_LIKE, WAN_LIKE

COGVIDEOX_LIKE = replace(WAN_LIKE, frame_multiple=8, default_frames=49, size_multiple=16)


def test_media_rules_frame_counts() -> None:
    assert [WAN_LIKE.is_valid_frames(n) for n in (0, 1, 4, 5, 17, 18)] == [False, True, False, True, True, False]
    assert [WAN_LIKE.largest_frames(n) for n in (0, 1, 8, 9, 50)] == [1, 1, 5, 9, 49]
    assert [WAN_LIKE.nearest_frames(n) for n in (0, 2, 4, 50, 120)] == [1, 1, 5, 49, 121]
    assert [COGVIDEOX_LIKE.largest_frames(n) for n in (9, 16, 17, 48)] == [9, 9, 17, 41]
    anim = STRIDE_LIKE  # any count >= 1
    assert all(anim.is_valid_frames(n) for n in (1, 2, 15, 16)) and not anim.is_valid_frames(0)
    assert anim.largest_frames(15) == 15 and anim.nearest_frames(0) == 1
    mult4 = replace(WAN_LIKE, frame_offset=0, default_frames=16)  # k*4 with k >= 1
    assert mult4.smallest_frames == 4 and mult4.largest_frames(3) == 4 and not mult4.is_valid_frames(1)
    assert [WAN_LIKE.nearest_size(n) for n in (1, 47, 48, 100)] == [32, 32, 64, 96]


def test_media_rules_refuse_inconsistent_declarations() -> None:
    with pytest.raises(ValueError, match="default_frames=18"):
        replace(WAN_LIKE, default_frames=18)
    with pytest.raises(ValueError, match="frame_sampling='every'"):
        replace(WAN_LIKE, frame_sampling="every")
    with pytest.raises(ValueError, match="default_frames=17.*image"):
        replace(IMAGE_LIKE, default_frames=17)
    with pytest.raises(ValueError, match="default_height=50"):
        replace(WAN_LIKE, default_height=50)


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"data\.num_frames=50.*4k\+1.*49 or 53"):
        DataConfig(num_frames=50, frame_multiple=4, frame_offset=1)
    with pytest.raises(ValueError, match=r"data\.height=100.*multiple of data.size_multiple=32, e\.g\. 96"):
        DataConfig(height=100, size_multiple=32)
    with pytest.raises(ValueError, match="data.short_clips"):
        DataConfig(short_clips="pad")
    with pytest.raises(ValueError, match=r"data\.condition_dropout\.caption=1\.5.*\[0, 1\]"):
        DataConfig(condition_dropout={"caption": 1.5})
    with pytest.raises(ValueError, match="data.frame_sampling='every'"):
        DataConfig(frame_sampling="every")
    with pytest.raises(ValueError, match=r"data\.num_frames=17.*kind='image'"):
        DataConfig(kind="image", num_frames=17)
    DataConfig(num_frames=33, frame_multiple=8, frame_offset=1, height=48, width=80, size_multiple=16)


def test_unresolved_config_checks_only_what_is_set() -> None:
    DataConfig(num_frames=50)  # valid or not depends on the backbone: checked when resolved
    DataConfig(height=100)
    with pytest.raises(ValueError, match="data.num_frames=0"):
        DataConfig(num_frames=0)
    assert set(DataConfig().unresolved()) == {
        "kind", "frame_sampling", "fps", "frame_stride", "num_frames", "frame_multiple", "frame_offset",
        "height", "width", "size_multiple",
    }  # fmt: skip


def test_resolve_fills_none_fields_and_keeps_user_values() -> None:
    cfg = resolve_data_config(DataConfig(path="d", num_frames=9), WAN_LIKE)
    assert (cfg.kind, cfg.frame_sampling, cfg.fps, cfg.frame_stride) == ("video", "fps", 24.0, 1)
    assert (cfg.num_frames, cfg.frame_multiple, cfg.frame_offset) == (9, 4, 1)
    assert (cfg.height, cfg.width, cfg.size_multiple) == (64, 64, 32) and cfg.unresolved() == []
    assert resolve_data_config(cfg, WAN_LIKE) == cfg  # idempotent
    anim = resolve_data_config(DataConfig(), STRIDE_LIKE)
    assert (anim.frame_sampling, anim.frame_stride, anim.num_frames, anim.frame_offset) == ("stride", 4, 16, 0)
    # A coarser frame multiple still gives counts Wan accepts (8k+1 is 4k+1).
    assert resolve_data_config(DataConfig(frame_multiple=8, num_frames=33), WAN_LIKE).frame_multiple == 8


def test_resolve_rejects_what_the_backbone_cannot_take() -> None:
    with pytest.raises(ValueError, match=r"data\.num_frames=50.*4k\+1.*49 or 53"):
        resolve_data_config(DataConfig(num_frames=50), WAN_LIKE)
    with pytest.raises(ValueError, match=r"data\.height=100.*e\.g\. 96"):
        resolve_data_config(DataConfig(height=100), WAN_LIKE)
    with pytest.raises(ValueError, match=r"data\.frame_multiple=2.*4k\+1.*data\.frame_multiple=4"):
        resolve_data_config(DataConfig(frame_multiple=2, num_frames=9), WAN_LIKE)
    with pytest.raises(ValueError, match=r"data\.frame_offset=0.*4k\+1"):
        resolve_data_config(DataConfig(frame_offset=0, num_frames=8), WAN_LIKE)
    with pytest.raises(ValueError, match=r"data\.size_multiple=16.*multiples of 32"):
        resolve_data_config(DataConfig(size_multiple=16, height=64, width=64), WAN_LIKE)


def test_resolve_image_backbones_get_one_frame() -> None:
    cfg = resolve_data_config(DataConfig(), IMAGE_LIKE)
    assert (cfg.kind, cfg.num_frames) == ("image", 1)
    with pytest.raises(ValueError, match=r"data\.num_frames=17.*kind='image'"):
        resolve_data_config(DataConfig(num_frames=17), IMAGE_LIKE)
    with pytest.raises(ValueError, match=r"data\.kind='video'.*images only"):
        resolve_data_config(DataConfig(kind="video"), IMAGE_LIKE)
    # A video backbone asked to train on stills only: 1-frame samples, no clips.
    stills = resolve_data_config(DataConfig(kind="image"), WAN_LIKE)
    assert (stills.kind, stills.num_frames) == ("image", 1)


def test_media_rules_is_frozen() -> None:
    with pytest.raises(AttributeError):
        WAN_LIKE.fps = 30.0  # type: ignore[misc]
    assert isinstance(WAN_LIKE, MediaRules)

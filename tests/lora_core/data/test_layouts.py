"""Dataset layouts (folders, prompts.txt + videos.txt, CSV, JSON/JSONL) and strict text decoding."""

from __future__ import annotations

import codecs
import json
import logging
from pathlib import Path

import pytest

from lora_core.data import TextDecodeError, scan_dataset
from lora_core.data.layouts import read_text
from tests.lora_core.data.media import make_clip, make_image, pairs


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
    rows = [
        {"video": "a.mp4", "caption": "cap a"}, {"file_path": "b.mp4", "prompt": "cap b"},
        {"file_path": "c.mp4", "text": "cap c"},
    ]  # fmt: skip
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


# ----------------------------------------------------------------------------- text decoding

CAPTION = "café ☕ — naïve clip"
ENCODINGS = {
    "utf-8": CAPTION.encode("utf-8"),
    "utf-8-bom": codecs.BOM_UTF8 + CAPTION.encode("utf-8"),
    "utf-16-le-bom": codecs.BOM_UTF16_LE + CAPTION.encode("utf-16-le"),
    "utf-16-be-bom": codecs.BOM_UTF16_BE + CAPTION.encode("utf-16-be"),
}


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_captions_in_utf8_and_utf16_decode_exactly(tmp_path: Path, encoding: str) -> None:
    make_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(ENCODINGS[encoding])
    (caption,) = [s.caption for s in scan_dataset(tmp_path)]
    assert caption == CAPTION  # no U+FFFD, no NULs, no BOM


def test_latin1_caption_is_reported_with_offset_and_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_image(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("fine", encoding="utf-8")
    make_image(tmp_path / "bad.png")
    data = "a café".encode("latin-1")  # é is the single byte 0xe9: invalid UTF-8 at offset 5
    (tmp_path / "bad.txt").write_bytes(data)
    with caplog.at_level(logging.WARNING):
        samples = scan_dataset(tmp_path)
    assert pairs(samples) == [("good.png", "fine")]
    assert "bad.txt" in caplog.text and "byte offset 5" in caplog.text and "0xe9" in caplog.text
    with pytest.raises(ValueError, match=r"bad\.txt.*byte offset 5"):
        scan_dataset(tmp_path, strict=True)


def test_utf16_without_bom_is_not_read_as_nul_garbage(tmp_path: Path) -> None:
    f = tmp_path / "x.txt"
    f.write_bytes("hi".encode("utf-16-le"))  # b"h\0i\0": valid UTF-8, but NULs
    with pytest.raises(TextDecodeError, match=r"x\.txt.*NUL.*byte offset 1") as e:
        read_text(f)
    assert e.value.offset == 1 and e.value.path == f
    f.write_bytes(codecs.BOM_UTF8 + b"ok \xff")  # offsets count the BOM
    with pytest.raises(TextDecodeError, match="byte offset 6"):
        read_text(f)


def test_prompts_and_videos_lists_decode_or_fail_with_offset(tmp_path: Path) -> None:
    make_clip(tmp_path / "1.mp4")
    (tmp_path / "videos.txt").write_bytes(codecs.BOM_UTF16_LE + "1.mp4\n".encode("utf-16-le"))
    (tmp_path / "prompts.txt").write_bytes(codecs.BOM_UTF16_BE + "crème brûlée\n".encode("utf-16-be"))
    assert pairs(scan_dataset(tmp_path)) == [("1.mp4", "crème brûlée")]
    (tmp_path / "prompts.txt").write_bytes("crème\n".encode("latin-1"))  # 0xe8 at offset 2
    with pytest.raises(ValueError, match=r"prompts\.txt.*byte offset 2"):
        scan_dataset(tmp_path)  # not strict: the list is the whole dataset


@pytest.mark.parametrize("name", ["metadata.csv", "metadata.json", "train.jsonl"])
def test_metadata_files_decode_or_fail_with_offset(tmp_path: Path, name: str) -> None:
    make_clip(tmp_path / "a.mp4")
    if name.endswith(".csv"):
        text = "video,caption\na.mp4,señal\n"
    else:
        row = {"video": "a.mp4", "caption": "señal"}
        text = json.dumps([row] if name.endswith(".json") else row, ensure_ascii=False) + "\n"
    f = tmp_path / name
    f.write_bytes(codecs.BOM_UTF16_LE + text.encode("utf-16-le"))
    assert pairs(scan_dataset(tmp_path)) == [("a.mp4", "señal")]
    latin = text.encode("latin-1")
    f.write_bytes(latin)
    offset = latin.index("ñ".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{name}.*byte offset {offset}"):
        scan_dataset(f)
    if name != "train.jsonl":  # metadata.* is read as the dataset even when found in the folder
        with pytest.raises(ValueError, match=rf"{name}.*byte offset"):
            scan_dataset(tmp_path)


def test_undecodable_stray_table_is_reported_not_silently_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("an image")
    (tmp_path / "notes.csv").write_bytes("name,comment\nx,très\n".encode("latin-1"))
    with caplog.at_level(logging.WARNING):
        assert pairs(scan_dataset(tmp_path)) == [("a.png", "an image")]  # the folder layout still works
    assert "notes.csv" in caplog.text and "byte offset" in caplog.text
    with pytest.raises(ValueError, match=r"notes\.csv.*byte offset"):
        scan_dataset(tmp_path, strict=True)

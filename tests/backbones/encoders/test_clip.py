"""CLIP-L text encoder + CLIP BPE tokenizer: parity with transformers, clip-l key/shape contract, LDM names.

transformers is a test-only oracle here; the runtime modules never import it. A pure-Python copy of
the original (slow) CLIP BPE algorithm below is a second tokenizer oracle that shares no code with
the `tokenizers` library.
"""
from __future__ import annotations

import json
import math
import re
import unicodedata
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from backbones.encoders.clip import (CLIP_TEXT_PRESETS, POSITION_IDS_KEY, CLIPTextConfig, CLIPTextModel,
                                     clip_file_key, clip_from_ldm, clip_ldm_file_key, clip_state_dict_from_ldm,
                                     clip_to_ldm, is_ldm_clip_key)
from backbones.encoders.clip_tokenizer import (TINY_CLIP_VOCAB_SIZE, CLIPTokenizer, build_tiny_clip_tokenizer,
                                               bytes_to_unicode)
from backbones.loading import load_safetensors_into

PARAMS_CLIP_L = 123_060_480  # reference/animatediff-sd15.md §3.2, counted on transformers' meta model


def _reference_file(name: str) -> Path | None:
    """Golden tables: a copy next to this test, else the shared reference folder of the project."""
    for folder in (Path(__file__).parent, Path(__file__).parents[1] / "sd", Path("/work/shared/reference")):
        if (folder / name).is_file():
            return folder / name
    return None


KEYS_FILE = _reference_file("clip_l_keys.txt")
LDM_MAP_FILE = _reference_file("sd15_ldm_key_map.tsv")


def _transformers():
    return pytest.importorskip("transformers", reason="transformers is the parity oracle")


def _hf_config(cfg: CLIPTextConfig, **extra: object):
    return _transformers().CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings, hidden_act=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps, attention_dropout=0.0, **extra)


def _hf_tiny():
    cfg = _hf_config(CLIP_TEXT_PRESETS["tiny"], bos_token_id=TINY_CLIP_VOCAB_SIZE - 2,
                     eos_token_id=TINY_CLIP_VOCAB_SIZE - 1, pad_token_id=TINY_CLIP_VOCAB_SIZE - 1)
    cfg._attn_implementation = "eager"  # the path that builds and adds the causal mask explicitly
    torch.manual_seed(0)
    hf = _transformers().CLIPTextModel(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name and name.endswith("weight"):  # non-unit norms, so a dropped norm shows
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2 if "embedding" in name else 0.15)
    return hf


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _ids(batch: int = 3, length: int = 77) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, TINY_CLIP_VOCAB_SIZE, (batch, length), generator=g)


PROMPTS = [
    "A Photo of 3 Cats!!! (masterpiece:1.2), best-quality; it's DON'T we'll",
    "string running ... ÄÖÜ straße Café naïve Ångström",
    "  Hello\n\tWORLD   日本語 🐱 İstanbul x&amp;y ½ ² ",
    "",
    "   \n\t ",
    "a <|endoftext|> b <|startoftext|> c",
    "a red fox jumping over the lazy dog in the city at night, " * 8,  # > 75 tokens: truncated
]


# ---------------------------------------------------------------- encoder parity

def test_parity_with_transformers_last_hidden_state_and_clip_skip(tmp_path: Path) -> None:
    hf = _hf_tiny()
    ours = CLIPTextModel(CLIP_TEXT_PRESETS["tiny"]).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # any transformers version's names (pre-hook)
    ids = torch.cat([CLIPTokenizer(build_tiny_clip_tokenizer(tmp_path))(PROMPTS), _ids()])  # [10, 77]
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
        out = ours(ids)
        final_ln = getattr(hf, "text_model", hf).final_layer_norm
        # kohya: final_layer_norm(hidden_states[-clip_skip]); diffusers' clip_skip=1 is hidden_states[-2] too
        skip2 = final_ln(ref.hidden_states[-2])
        out2 = ours(ids, clip_skip=2)
        ours_hidden = ours.hidden_states(ids)
    assert out.shape == (10, 77, 32)
    err, err2 = _rel_err(out, ref.last_hidden_state), _rel_err(out2, skip2)
    print(f"max rel err vs transformers: last {err:.3e}, clip_skip=2 {err2:.3e}")
    assert err <= 1e-5 and err2 <= 1e-5
    assert _rel_err(out2, out) > 1e-2  # clip skip really changes the output
    assert len(ours_hidden) == len(ref.hidden_states) == 3
    assert max(_rel_err(a, b) for a, b in zip(ours_hidden, ref.hidden_states)) <= 1e-5


def test_attention_is_causal_and_sequences_are_independent() -> None:
    torch.manual_seed(0)
    enc = CLIPTextModel(CLIP_TEXT_PRESETS["tiny"]).eval()
    ids = _ids(2)
    changed = ids.clone()
    changed[:, 40] = (changed[:, 40] + 1) % TINY_CLIP_VOCAB_SIZE
    with torch.no_grad():
        a, b = enc(ids), enc(changed)
        short = enc(ids[:, :41])  # fewer slots than 77 are fine and give the same prefix
    assert torch.equal(a[:, :40], b[:, :40])  # nothing before position 40 sees it
    assert not torch.allclose(a[:, 40:], b[:, 40:])
    assert torch.allclose(short, a[:, :41], atol=1e-6)


def test_bf16_runs_close_to_fp32() -> None:
    torch.manual_seed(0)
    enc = CLIPTextModel(CLIP_TEXT_PRESETS["tiny"]).eval()
    with torch.no_grad():
        ref = enc(_ids())
        out = enc.to(torch.bfloat16)(_ids())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert _rel_err(out.float(), ref) < 5e-2


def test_forward_argument_errors() -> None:
    enc = CLIPTextModel(CLIP_TEXT_PRESETS["tiny"])
    with pytest.raises(ValueError, match=r"clip_skip=3; expected an int in 1\.\.2"):
        enc(_ids(), clip_skip=3)
    with pytest.raises(ValueError, match="clip_skip=0"):
        enc(_ids(), clip_skip=0)
    with pytest.raises(ValueError, match="78 token slots"):
        enc(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        enc(torch.zeros(1, 77))
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        CLIPTextConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="not divisible"):
        CLIPTextConfig(hidden_size=100, num_attention_heads=12)


# ---------------------------------------------------------------- loading / names

def _disk_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What SD1.5's text_encoder/model.safetensors holds: `text_model.*` plus an old position_ids."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd[POSITION_IDS_KEY] = torch.arange(77)[None]
    return sd


def test_loads_disk_names_and_ignores_position_ids_even_corrupted(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = CLIPTextModel(CLIP_TEXT_PRESETS["tiny"]).eval()
    sd = _disk_state_dict(src)
    assert next(iter(src.state_dict())) == "text_model.embeddings.token_embedding.weight"
    # A float, off-by-epsilon copy as in some merged SD1.5 files: must not change anything.
    sd[POSITION_IDS_KEY] = torch.arange(77, dtype=torch.float32)[None] - 1e-4
    dst = CLIPTextModel(CLIP_TEXT_PRESETS["tiny"]).eval()
    dst.load_state_dict(sd, strict=True)
    assert POSITION_IDS_KEY not in dst.state_dict()
    with torch.no_grad():
        assert torch.equal(dst(_ids()), src(_ids()))
    # The project loader on a real safetensors file, into a model built on meta.
    from safetensors.torch import save_file
    save_file({**sd, POSITION_IDS_KEY: torch.arange(77)[None]}, str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        lazy = CLIPTextModel(CLIP_TEXT_PRESETS["tiny"])
    load_safetensors_into(lazy, [tmp_path / "model.safetensors"], rename=clip_file_key)
    with torch.no_grad():
        assert torch.equal(lazy.eval()(_ids()), src(_ids()))
    # Garbage still fails a strict load: only position_ids is forgiven.
    with pytest.raises(RuntimeError, match="text_model.extra"):
        dst.load_state_dict({**sd, "text_model.extra": torch.zeros(1)}, strict=True)


def test_file_key_and_nested_prefix() -> None:
    assert clip_file_key("encoder.layers.3.mlp.fc1.weight") == "text_model.encoder.layers.3.mlp.fc1.weight"
    assert clip_file_key("text_model.final_layer_norm.bias") == "text_model.final_layer_norm.bias"
    assert clip_file_key("embeddings.position_ids") is None and clip_file_key(POSITION_IDS_KEY) is None
    assert clip_file_key("logit_scale") == "logit_scale"  # unknown: left for strict loading to reject
    torch.manual_seed(0)
    src = CLIPTextModel(CLIP_TEXT_PRESETS["tiny"])
    flat = {k[len("text_model."):]: v for k, v in src.state_dict().items()}  # transformers >= 5 spelling
    parent = nn.ModuleDict({"te": CLIPTextModel(CLIP_TEXT_PRESETS["tiny"])})
    parent.load_state_dict({f"te.{k}": v for k, v in flat.items()}, strict=True)
    assert torch.equal(parent["te"].text_model.encoder.layers[1].mlp.fc2.weight,
                       src.text_model.encoder.layers[1].mlp.fc2.weight)


def test_ldm_names_and_single_file_extraction() -> None:
    name = "text_model.encoder.layers.11.self_attn.out_proj.bias"
    ldm = "cond_stage_model.transformer." + name
    assert clip_to_ldm(name) == ldm and clip_from_ldm(ldm) == name
    # SD1.x files without `text_model.` (NAI-derived merges) map to the same names
    assert clip_from_ldm("cond_stage_model.transformer.final_layer_norm.weight") == "text_model.final_layer_norm.weight"
    assert clip_ldm_file_key("model.diffusion_model.out.0.weight") is None
    assert clip_ldm_file_key("cond_stage_model.transformer.text_model.embeddings.position_ids") is None
    assert is_ldm_clip_key(ldm) and not is_ldm_clip_key("first_stage_model.encoder.conv_in.weight")
    with pytest.raises(ValueError, match="model.diffusion_model.out.0.weight"):
        clip_from_ldm("model.diffusion_model.out.0.weight")
    with pytest.raises(ValueError, match="text_model"):
        clip_to_ldm("encoder.layers.0.mlp.fc1.weight")
    torch.manual_seed(0)
    src = CLIPTextModel(CLIP_TEXT_PRESETS["tiny"])
    single = {clip_to_ldm(k): v for k, v in _disk_state_dict(src).items()}
    single["model.diffusion_model.out.0.weight"] = torch.zeros(4)
    single["alphas_cumprod"] = torch.zeros(1000)
    extracted = clip_state_dict_from_ldm(single)
    assert extracted.keys() == src.state_dict().keys()
    CLIPTextModel(CLIP_TEXT_PRESETS["tiny"]).load_state_dict(extracted, strict=True)


@pytest.mark.skipif(LDM_MAP_FILE is None, reason="reference table sd15_ldm_key_map.tsv not present")
def test_ldm_map_matches_every_text_encoder_row_of_reference_table() -> None:
    rows = [line.split("\t") for line in LDM_MAP_FILE.read_text().splitlines() if line and not line.startswith("#")]
    rows = [r for r in rows if r[0] == "text_encoder"]
    assert len(rows) == 196
    for _, ours, ldm, _shape in rows:
        assert clip_from_ldm(ldm) == ours and clip_to_ldm(ours) == ldm
        assert clip_ldm_file_key(ldm) == ours
    with torch.device("meta"):
        enc = CLIPTextModel(CLIP_TEXT_PRESETS["clip-l"])
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert {r[1]: tuple(json.loads("[" + r[3].strip("()").rstrip(",") + "]")) for r in rows} == shapes


# ---------------------------------------------------------------- clip-l contract on meta

def _read_keys_file(file: Path) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in file.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"(\S+) \(([\d, ]+)\)", line.strip())
        assert m, f"unparsed line in {file}: {line!r}"
        out[m.group(1)] = tuple(int(x) for x in m.group(2).split(",") if x.strip())
    return out


def test_clip_l_on_meta_param_count_and_transformers_keys() -> None:
    with torch.device("meta"):
        enc = CLIPTextModel(CLIP_TEXT_PRESETS["clip-l"])
        hf = _transformers().CLIPTextModel(_hf_config(CLIP_TEXT_PRESETS["clip-l"]))
    assert sum(p.numel() for p in enc.parameters()) == PARAMS_CLIP_L
    ours = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert len(ours) == 196
    hf_names = {clip_file_key(k): tuple(v.shape) for k, v in hf.state_dict().items()}
    assert ours == {k: v for k, v in hf_names.items() if k is not None}


@pytest.mark.skipif(KEYS_FILE is None, reason="reference key list clip_l_keys.txt not present")
def test_clip_l_keys_equal_reference_file_in_order() -> None:
    with torch.device("meta"):
        enc = CLIPTextModel(CLIP_TEXT_PRESETS["clip-l"])
    ours = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    expected = _read_keys_file(KEYS_FILE)
    assert len(expected) == 196
    assert list(ours) == list(expected)
    assert ours == expected


def test_config_from_hf_json() -> None:
    hf_json = _hf_config(CLIP_TEXT_PRESETS["clip-l"], projection_dim=768).to_dict()
    assert CLIPTextConfig.from_hf(hf_json) == CLIP_TEXT_PRESETS["clip-l"]
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig.from_hf({k: v for k, v in hf_json.items() if k != "hidden_act"})


# ---------------------------------------------------------------- tokenizer

def _slow_clip_reference(folder: Path, texts: list[str], length: int = 77) -> torch.Tensor:
    """The original CLIP BPE in plain Python (OpenAI simple_tokenizer / transformers' old slow tokenizer
    with ftfy's default NFC): specials split first, whitespace collapsed, lowercased, regex-split, bytes
    mapped to symbols, pairs merged lowest rank first."""
    regex = pytest.importorskip("regex", reason="the slow reference needs \\p{L} classes")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(m.split()) for m in (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] if m]
    ranks = {m: i for i, m in enumerate(merges)}
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    byte_char = {b: chr(b) for b in bs} | {b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in bs)}
    pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
                        r"""|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    def bpe(word: list[str]) -> list[str]:
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda p: ranks.get(p, math.inf))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    rows = []
    for text in texts:
        ids = []
        for part in re.split(r"(<\|startoftext\|>|<\|endoftext\|>)", text):
            if part in ("<|startoftext|>", "<|endoftext|>"):
                ids.append(vocab[part])
                continue
            part = re.sub(r"\s+", " ", unicodedata.normalize("NFC", part)).strip().lower()
            for piece in pat.findall(part):
                chars = [byte_char[b] for b in piece.encode("utf-8")]
                ids += [vocab.get(t, vocab["<|endoftext|>"]) for t in bpe(chars[:-1] + [chars[-1] + "</w>"])]
        row = [vocab["<|startoftext|>"]] + ids[: length - 2] + [vocab["<|endoftext|>"]]
        rows.append(row + [vocab["<|endoftext|>"]] * (length - len(row)))
    return torch.tensor(rows)


def test_tokenizer_matches_transformers_and_slow_reference(tmp_path: Path) -> None:
    transformers = _transformers()
    folder = build_tiny_clip_tokenizer(tmp_path / "tokenizer")
    ids = CLIPTokenizer(tmp_path)(PROMPTS)  # a checkpoint root holding tokenizer/ works too
    # transformers >= 5 has only the tokenizers-backed CLIPTokenizer; 4.x names that one ...Fast.
    hf_cls = getattr(transformers, "CLIPTokenizerFast", transformers.CLIPTokenizer)
    hf = hf_cls.from_pretrained(str(folder))
    ref = hf(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, ref)
    assert torch.equal(ids, _slow_clip_reference(folder, PROMPTS))
    # A tokenizer.json (as transformers saves it) is read when present, with the same ids.
    saved = tmp_path / "saved"
    hf.save_pretrained(str(saved))
    for f in ("vocab.json", "merges.txt"):
        (saved / f).unlink(missing_ok=True)
    assert (saved / "tokenizer.json").is_file()
    assert torch.equal(CLIPTokenizer(saved)(PROMPTS), ids)


def test_tokenizer_layout_truncation_and_empty(tmp_path: Path) -> None:
    tok = CLIPTokenizer(build_tiny_clip_tokenizer(tmp_path))
    bos, eos = TINY_CLIP_VOCAB_SIZE - 2, TINY_CLIP_VOCAB_SIZE - 1
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == \
        (TINY_CLIP_VOCAB_SIZE, bos, eos, eos)
    assert TINY_CLIP_VOCAB_SIZE == CLIP_TEXT_PRESETS["tiny"].vocab_size
    ids = tok(PROMPTS)
    assert ids.shape == (7, 77) and ids.dtype == torch.long and (ids[:, 0] == bos).all()
    assert ids[3].tolist() == [bos] + [eos] * 76 and ids[4].tolist() == ids[3].tolist()  # "" and whitespace
    content = tok.encode_ids(PROMPTS)
    assert len(content[6]) > 75 and ids[6, 1:76].tolist() == content[6][:75] and ids[6, 76] == eos
    for i, c in enumerate(content[:3]):
        assert ids[i, 1: 1 + len(c)].tolist() == c and (ids[i, 1 + len(c):] == eos).all()
        assert eos not in c  # every byte has a symbol: nothing fell to unk
    assert tok.decode(ids[0].tolist()).startswith("a photo of 3 cats !!! ( masterpiece : 1 . 2 ),")
    # the byte table is the one the tokenizers library's ByteLevel uses
    from tokenizers import pre_tokenizers
    assert set(bytes_to_unicode().values()) == set(pre_tokenizers.ByteLevel.alphabet())


def test_tokenizer_reads_sd15_style_configs_and_pad_token(tmp_path: Path) -> None:
    folder = build_tiny_clip_tokenizer(tmp_path)
    added = {"content": "<|startoftext|>", "lstrip": False, "normalized": True, "rstrip": False,
             "single_word": False, "__type": "AddedToken"}
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": added, "pad_token": "!"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16, "pad_token": "<|endoftext|>"}))
    tok = CLIPTokenizer(folder)
    assert tok.pad_token_id == 0 and tok.model_max_length == 16  # SD2-style "!" pad wins from the map
    assert tok(["a cat"]).tolist() == [[638] + tok.encode_ids(["a cat"])[0] + [639] + [0] * 12]
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": int(1e30)}))
    assert CLIPTokenizer(folder).model_max_length == 77  # transformers' "no limit" sentinel
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(ValueError, match="pad_token '<pad>' is not in the vocabulary"):
        CLIPTokenizer(folder)


def test_tokenizer_missing_files_and_bad_input(tmp_path: Path) -> None:
    folder = build_tiny_clip_tokenizer(tmp_path / "tokenizer")
    (folder / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{folder} is missing merges.txt")):
        CLIPTokenizer(folder)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tmp_path / 'nope'} does not exist")):
        CLIPTokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty is missing vocab.json and merges.txt"):
        CLIPTokenizer(tmp_path / "empty")
    tok = CLIPTokenizer(build_tiny_clip_tokenizer(tmp_path / "ok"))
    with pytest.raises(ValueError, match=r"\[prompt\]"):
        tok("a cat")

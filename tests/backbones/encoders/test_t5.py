"""umT5 encoder + tokenizer of Wan2.2: parity with transformers, 5B key/shape contract, tokenizer.

transformers is a test-only oracle here; the runtime modules never import it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from backbones.encoders.t5 import (T5_PRESETS, T5V11Config, T5V11Encoder, UMT5Config, UMT5Encoder,
                                   convert_t5_state_dict, encode_prompts, relative_position_bucket, t5_from_hf,
                                   t5_to_hf)
from backbones.encoders.t5_tokenizer import (WanTokenizer, build_tiny_tokenizer, clean_text, save_tiny_tokenizer,
                                     save_tokenizer)

KEYS_FILE = Path(__file__).parents[1] / "wan" / "wan_t5_keys.txt"
PARAMS_5B = 5_680_910_336


def _hf_tiny():
    transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")
    cfg = transformers.UMT5Config(
        vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0)
    # eager: the path that adds UMT5's per-layer position bias with scaling 1.0
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.UMT5EncoderModel(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:  # non-unit norm weights, so a dropped/misplaced norm shows up
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3 if "relative_attention_bias" in name else 0.15)
    return hf


def _padded_batch(lens: list[int], length: int, vocab: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (len(lens), length), generator=g)
    mask = torch.zeros(len(lens), length, dtype=torch.long)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------- encoder parity / key map

def test_parity_with_transformers_umt5_padded_batch() -> None:
    hf = _hf_tiny()
    ours = UMT5Encoder(T5_PRESETS["tiny"]).eval()
    ours.load_state_dict(convert_t5_state_dict(hf.state_dict(), to="upstream"), strict=True)
    # 300 slots: distances beyond max_dist 128 exercise the log buckets and their clamp.
    lens = [300, 171, 9, 1]
    ids, mask = _padded_batch(lens, 300)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        out = ours(ids, mask.bool())
    assert out.shape == (4, 300, 64)
    errs = [_rel_err(out[i, :n], ref[i, :n]) for i, n in enumerate(lens)]
    print(f"max rel err vs transformers: {max(errs):.3e}")
    assert max(errs) <= 1e-5, errs


def test_hf_state_dict_loads_directly_with_tied_duplicate() -> None:
    hf = _hf_tiny()
    hf_sd = hf.state_dict()
    assert {"shared.weight", "encoder.embed_tokens.weight"} <= hf_sd.keys()
    ours = UMT5Encoder(T5_PRESETS["tiny"]).eval()
    ours.load_state_dict(hf_sd, strict=True)  # the pre-hook renames HF keys
    assert torch.equal(ours.token_embedding.weight, hf_sd["shared.weight"])
    assert torch.equal(ours.blocks[1].ffn.gate[0].weight, hf_sd["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"])
    # A file that kept only one of the tied names, and an encoder nested under a prefix.
    only_embed = {k: v for k, v in hf_sd.items() if k != "shared.weight"}
    parent = nn.ModuleDict({"te": UMT5Encoder(T5_PRESETS["tiny"])})
    parent.load_state_dict({f"te.{k}": v for k, v in only_embed.items()}, strict=True)
    assert torch.equal(parent["te"].token_embedding.weight, hf_sd["shared.weight"])
    # Round trip: upstream -> hf equals HF's own key set, and back is the identity.
    up = ours.state_dict()
    as_hf = convert_t5_state_dict(up, to="hf")
    assert as_hf.keys() == hf_sd.keys()
    assert convert_t5_state_dict(as_hf, to="upstream").keys() == up.keys()


def test_key_map_names_and_errors() -> None:
    assert t5_to_hf("blocks.3.ffn.fc1.weight") == "encoder.block.3.layer.1.DenseReluDense.wi_1.weight"
    assert t5_to_hf("blocks.0.pos_embedding.embedding.weight") == \
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    assert t5_to_hf("norm.weight") == "encoder.final_layer_norm.weight"
    assert t5_from_hf("encoder.embed_tokens.weight") == "token_embedding.weight"
    assert t5_from_hf("encoder.block.7.layer.0.layer_norm.weight") == "blocks.7.norm1.weight"
    with pytest.raises(ValueError, match="blocks.0.ffn.gate.weight"):
        t5_to_hf("blocks.0.ffn.gate.weight")
    with pytest.raises(ValueError, match="encoder.block.0.layer.2"):
        t5_from_hf("encoder.block.0.layer.2.layer_norm.weight")
    with pytest.raises(ValueError, match="'diffusers'"):
        convert_t5_state_dict({}, to="diffusers")


def test_relative_position_buckets_match_transformers() -> None:
    hf = _hf_tiny()
    attn = hf.encoder.block[0].layer[0].SelfAttention
    rel = torch.arange(600)[None, :] - torch.arange(600)[:, None]
    assert torch.equal(relative_position_bucket(600, 600, 32, 128), attn._relative_position_bucket(rel))


def test_bf16_runs_close_to_fp32() -> None:
    torch.manual_seed(0)
    enc = UMT5Encoder(T5_PRESETS["tiny"]).eval()
    ids, mask = _padded_batch([40, 12], 64)
    with torch.no_grad():
        ref = enc(ids, mask)
        out = enc.to(torch.bfloat16)(ids, mask)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    assert _rel_err(out[1, :12].float(), ref[1, :12]) < 5e-2


def test_umt5_equals_t5_v11_when_every_layer_shares_block_0s_bias() -> None:
    """The two encoders share all math; only the bias location differs (per layer vs block 0)."""
    cfg = dict(vocab=256, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=3)
    umt5 = UMT5Encoder(UMT5Config(**cfg)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in umt5.named_parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if "norm" in name
                    else 0.3 * torch.randn(p.shape, generator=g))
        for block in umt5.blocks[1:]:
            block.pos_embedding.embedding.weight.copy_(umt5.blocks[0].pos_embedding.embedding.weight)
    hf_names = convert_t5_state_dict(umt5.state_dict(), to="hf")
    v11 = T5V11Encoder(T5V11Config(**cfg)).eval()
    v11.load_state_dict({k: v for k, v in hf_names.items()
                         if "relative_attention_bias" not in k or ".block.0." in k}, strict=True)
    ids, mask = _padded_batch([150, 7], 150, vocab=256)
    with torch.no_grad():
        assert torch.equal(umt5(ids, mask), v11(ids, mask))
        assert torch.equal(umt5(ids), v11(ids))


def test_config_errors_name_their_class() -> None:
    with pytest.raises(ValueError, match=r"^UMT5Config: dim_attn \(10\)"):
        UMT5Config(dim_attn=10, num_heads=4)
    with pytest.raises(ValueError, match=r"^T5V11Config: num_buckets \(7\)"):
        T5V11Config(num_buckets=7)


# ---------------------------------------------------------------- 5B contract on meta

def _read_keys_file() -> dict[str, tuple[int, ...]]:
    out = {}
    for line in KEYS_FILE.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"(\S+) \[([\d, ]+)\]", line.strip())
        assert m, f"unparsed line in {KEYS_FILE}: {line!r}"
        out[m.group(1)] = tuple(int(x) for x in m.group(2).split(","))
    return out


@pytest.mark.skipif(not KEYS_FILE.is_file(), reason=f"reference key list {KEYS_FILE} not present")
def test_5b_on_meta_matches_official_keys_and_param_count() -> None:
    with torch.device("meta"):
        enc = UMT5Encoder(T5_PRESETS["5b"])
    ours = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    expected = _read_keys_file()
    assert len(expected) == 242
    assert list(ours) == list(expected)  # same order as the official file, too
    assert ours == expected
    assert sum(p.numel() for p in enc.parameters()) == PARAMS_5B


def test_5b_key_map_matches_transformers_on_meta() -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is the key-set oracle")
    cfg = transformers.UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                  num_heads=64, feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        hf = transformers.UMT5EncoderModel(cfg)
        enc = UMT5Encoder(T5_PRESETS["5b"])
    ours = {k: v.shape for k, v in convert_t5_state_dict(enc.state_dict(), to="hf").items()}
    assert ours == {k: v.shape for k, v in hf.state_dict().items()}
    assert len(ours) == 243


# ---------------------------------------------------------------- tokenizer

PROMPTS = ["A cat &amp;amp; a dog run   on\tthe\n beach.", "  Hello world 日本 café ÄÖ ", "",
           "token " * 700]


def test_tokenizer_padding_eos_truncation(tmp_path: Path) -> None:
    file = save_tiny_tokenizer(tmp_path)
    assert file == tmp_path / "google" / "umt5-xxl" / "tokenizer.json"
    tok = WanTokenizer(tmp_path)
    assert tok.vocab_size <= 512 and tok.pad_id == 0 and tok.eos_id == 1
    ids, mask = tok(PROMPTS)
    assert ids.shape == mask.shape == (4, 512) and ids.dtype == torch.long
    lens = mask.sum(1).tolist()
    assert lens[2] == 1 and lens[3] == 512  # empty prompt is just </s>; long one is truncated
    for i, n in enumerate(lens):
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert ids[i, n - 1] == 1  # </s> ends every prompt, even a truncated one
        assert (ids[i, n:] == 0).all()
        assert (ids[i, : n - 1] != 1).all()
    assert tok(PROMPTS, max_length=16)[0].shape == (4, 16)
    # Byte fallback: non-ASCII text round-trips through the tiny vocab.
    assert tok.tok.decode(ids[1, : lens[1] - 1].tolist()) == "Hello world 日本 café ÄÖ"


def test_tokenizer_cleaning() -> None:
    assert clean_text("a &amp;amp; b") == "a & b"  # unescaped twice, as upstream
    assert clean_text("  a \n\t b   c ") == "a b c"
    tok = WanTokenizer.from_tokenizer(build_tiny_tokenizer())
    a, _ = tok(["a &amp;lt;b&amp;gt;   c"])
    b, _ = tok(["a <b> c"])
    assert torch.equal(a, b)


def test_tokenizer_matches_transformers_fast_tokenizer(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is the tokenizer oracle")
    file = save_tiny_tokenizer(tmp_path)
    ids, mask = WanTokenizer(tmp_path)(PROMPTS)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(file), pad_token="<pad>", eos_token="</s>",
                                              unk_token="<unk>")
    for h in (hf, transformers.AutoTokenizer.from_pretrained(str(file.parent))):
        # Upstream cleans before calling the HF tokenizer with exactly these arguments.
        ref = h([clean_text(p) for p in PROMPTS], padding="max_length", truncation=True, max_length=512,
                add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        assert torch.equal(ref["input_ids"], ids)
        assert torch.equal(ref["attention_mask"], mask)


def test_tokenizer_without_post_processor_appends_eos_itself(tmp_path: Path) -> None:
    spec = json.loads(build_tiny_tokenizer().to_str())
    spec["post_processor"] = None
    file = tmp_path / "tokenizer.json"
    file.write_text(json.dumps(spec))
    plain = WanTokenizer(tmp_path)  # a folder holding tokenizer.json (diffusers layout) also works
    assert not plain.post_processor_adds_eos
    with_pp = WanTokenizer.from_tokenizer(build_tiny_tokenizer())
    assert with_pp.post_processor_adds_eos
    for a, b in zip(plain(PROMPTS), with_pp(PROMPTS)):
        assert torch.equal(a, b)


def test_tokenizer_missing_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "google" / "umt5-xxl" / "tokenizer.json"))):
        WanTokenizer(tmp_path)


def test_tokenizer_rejects_bare_string() -> None:
    tok = WanTokenizer.from_tokenizer(build_tiny_tokenizer())
    with pytest.raises(ValueError, match=r"\[prompt\]"):
        tok("a cat")


# ---------------------------------------------------------------- encode_prompts

def test_encode_prompts_trims_to_real_length_and_masks_padding(tmp_path: Path) -> None:
    torch.manual_seed(0)
    enc = UMT5Encoder(T5_PRESETS["tiny"]).eval()
    save_tokenizer(build_tiny_tokenizer(), tmp_path)
    tok = WanTokenizer(tmp_path)
    prompts = ["a red fox", "a much longer prompt about a red fox jumping over a lazy dog", ""]
    out = encode_prompts(enc, tok, prompts)
    ids, mask = tok(prompts)
    lens = mask.sum(1).tolist()
    assert [tuple(o.shape) for o in out] == [(n, 64) for n in lens]
    assert not out[0].requires_grad
    for i, n in enumerate(lens):
        # Same rows as an unpadded run: padding is masked out of every real token's attention.
        with torch.no_grad():
            alone = enc(ids[i: i + 1, :n], mask[i: i + 1, :n])[0]
        assert _rel_err(out[i], alone) < 1e-5
    with pytest.raises(ValueError, match=r"\[prompt\]"):
        encode_prompts(enc, tok, "a red fox")

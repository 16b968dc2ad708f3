"""T5 v1.1 encoder + SentencePiece tokenizer of CogVideoX: parity with transformers, xxl contract, loading.

transformers (and sentencepiece, for training a real model and as the oracle's converter) are
test-only; the runtime modules never import them.
"""
from __future__ import annotations

import copy
import json
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from backbones.cogvideox.transformer import TRANSFORMER_PRESETS
from backbones.encoders.spm_tokenizer import (T5SpmTokenizer, parse_spm_model, save_spm_tokenizer_folder,
                                              save_tiny_t5_tokenizer, serialize_spm_model, tiny_spm_pieces)
from backbones.encoders.t5 import (T5_V11_PRESETS, T5V11Config, T5V11Encoder, encode_prompts_t5, keep_wo_in_fp32,
                                   load_t5_v11, relative_position_bucket)
from tests.oracle import rel_err, randomize_

KEYS_FILE = Path(__file__).parent / "cogvideox_t5_encoder_keys.txt"
PARAMS_XXL = 4_762_310_656  # cogvideox.md §4.1, counted on meta from the t5-v1_1-xxl config


def _hf_config(cfg: T5V11Config):
    transformers = pytest.importorskip("transformers", reason="transformers is the parity oracle")
    hf_cfg = transformers.T5Config(
        vocab_size=cfg.vocab, d_model=cfg.dim, d_kv=cfg.head_dim, d_ff=cfg.dim_ffn, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=cfg.max_dist, feed_forward_proj="gated-gelu",
        layer_norm_epsilon=cfg.eps, dropout_rate=0.0, tie_word_embeddings=False)
    hf_cfg._attn_implementation = "eager"
    return transformers, hf_cfg


def _hf_tiny() -> nn.Module:
    transformers, hf_cfg = _hf_config(T5_V11_PRESETS["tiny"])
    return randomize_(transformers.T5EncoderModel(hf_cfg), seed=0).eval()


def _padded_batch(lens: list[int], length: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (len(lens), length), generator=g)
    mask = torch.zeros(len(lens), length, dtype=torch.long)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


# ---------------------------------------------------------------- encoder parity

def test_tiny_matches_cogvideox_tiny_text_width() -> None:
    assert T5_V11_PRESETS["tiny"].dim == TRANSFORMER_PRESETS["tiny"].text_embed_dim
    assert T5_V11_PRESETS["xxl"].dim == TRANSFORMER_PRESETS["2b"].text_embed_dim == 4096


def test_parity_with_transformers_t5_encoder_with_and_without_mask() -> None:
    hf = _hf_tiny()
    ours = T5V11Encoder(T5_V11_PRESETS["tiny"]).eval()
    hf_sd = hf.state_dict()
    ours.load_state_dict(hf_sd, strict=True)  # names are transformers' verbatim
    # 226 slots as CogVideoX; distances beyond max_dist 128 exercise the log buckets' clamp.
    lens = [226, 131, 9, 1]
    ids, mask = _padded_batch(lens, 226, T5_V11_PRESETS["tiny"].vocab)
    with torch.no_grad():
        ref_plain = hf(input_ids=ids).last_hidden_state
        ref_masked = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        out_plain = ours(ids)
        out_masked = ours(ids, mask)
    assert out_plain.shape == (4, 226, 32)
    err_plain = rel_err(out_plain, ref_plain)  # pad rows included: CogVideoX uses them all
    err_masked = max(rel_err(out_masked[i, :n], ref_masked[i, :n]) for i, n in enumerate(lens))
    print(f"rel err vs transformers: no mask {err_plain:.2e}, masked {err_masked:.2e}")
    assert err_plain <= 1e-5 and err_masked <= 1e-5
    assert rel_err(out_masked[2, :9], out_plain[2, :9]) > 1e-2  # the mask really changes the result


def test_bias_is_shared_from_block_0_only() -> None:
    enc = T5V11Encoder(T5_V11_PRESETS["tiny"])
    tables = [n for n in enc.state_dict() if "relative_attention_bias" in n]
    assert tables == ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    # Changing the table changes every layer's attention, e.g. a 1-layer-deeper output differs.
    ids = torch.randint(3, 256, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = enc(ids)
        enc.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(3)
        b = enc(ids)
    assert rel_err(a, b) > 1e-3


def test_state_dict_variants_load_strict() -> None:
    hf_sd = _hf_tiny().state_dict()
    assert set(hf_sd) == set(T5V11Encoder(T5_V11_PRESETS["tiny"]).state_dict())
    for drop in ("shared.weight", "encoder.embed_tokens.weight"):  # a file may store either tied name
        ours = T5V11Encoder(T5_V11_PRESETS["tiny"])
        ours.load_state_dict({k: v for k, v in hf_sd.items() if k != drop}, strict=True)
        assert ours.encoder.embed_tokens is ours.shared
        assert torch.equal(ours.shared.weight, hf_sd["shared.weight"])
    # Nested under a prefix, with a full seq2seq checkpoint's decoder keys that are ignored.
    parent = nn.ModuleDict({"te": T5V11Encoder(T5_V11_PRESETS["tiny"])})
    sd = {f"te.{k}": v for k, v in hf_sd.items() if k != "encoder.embed_tokens.weight"}
    sd["te.decoder.block.0.layer.0.SelfAttention.q.weight"] = torch.zeros(32, 32)
    parent.load_state_dict(sd, strict=True)
    assert torch.equal(parent["te"].encoder.embed_tokens.weight, hf_sd["shared.weight"])


def test_fp16_keeps_wo_in_fp32_like_transformers() -> None:
    hf = _hf_tiny()
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # FFN outputs past fp16's 65504, as T5 v1.1 XXL produces: a plain .half() clamps them away.
        for block in hf.encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(1e5)
        enc = T5V11Encoder(T5_V11_PRESETS["tiny"]).eval()
        enc.load_state_dict(hf.state_dict())
        ref = enc(ids)
        plain = copy.deepcopy(enc).half()(ids)
        half = keep_wo_in_fp32(copy.deepcopy(enc).half())
        assert half.encoder.block[1].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
        assert half.encoder.block[1].layer[1].DenseReluDense.wi_0.weight.dtype == torch.float16
        out = half(ids)
        bf16 = copy.deepcopy(enc).bfloat16()(ids)
        # transformers in fp16 as from_pretrained(dtype=float16) leaves it: `wo` fp32 (_keep_in_fp32_modules)
        hf16 = hf.half()
        for block in hf16.encoder.block:
            block.layer[1].DenseReluDense.wo.float()
        ref16 = hf16(input_ids=ids).last_hidden_state
    print(f"fp16 rel err vs fp32: plain {rel_err(plain, ref):.2e}, wo in fp32 {rel_err(out, ref):.2e} "
          f"(vs transformers fp16 {rel_err(out, ref16):.2e}); bf16 {rel_err(bf16, ref):.2e}")
    assert rel_err(plain, ref) > 0.5  # the failure the fp32 `wo` exists for
    assert out.dtype == ref16.dtype == torch.float16 and torch.isfinite(out).all()
    assert rel_err(out, ref) < 2e-2
    assert rel_err(out, ref16) < 5e-3  # ours softmaxes in fp32, transformers' eager path in fp16
    assert torch.isfinite(bf16).all() and rel_err(bf16, ref) < 1e-1


# ---------------------------------------------------------------- xxl contract on meta

def _read_keys_file() -> dict[str, tuple[int, ...]]:
    out = {}
    for line in KEYS_FILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            m = re.fullmatch(r"(\S+) \[([\d, ]+)\]", line.strip())
            assert m, f"unparsed line in {KEYS_FILE}: {line!r}"
            out[m.group(1)] = tuple(int(x) for x in m.group(2).split(","))
    return out


@pytest.mark.skipif(not KEYS_FILE.is_file(), reason=f"reference key list {KEYS_FILE} not present")
def test_xxl_on_meta_matches_reference_keys_and_param_count() -> None:
    with torch.device("meta"):
        enc = T5V11Encoder(T5_V11_PRESETS["xxl"])
    ours = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    expected = _read_keys_file()
    assert len(expected) == 220
    assert list(ours) == list(expected)  # the transformers order, too
    assert ours == expected
    assert sum(p.numel() for p in enc.parameters()) == PARAMS_XXL


def test_xxl_key_set_matches_transformers_on_meta() -> None:
    transformers, hf_cfg = _hf_config(T5_V11_PRESETS["xxl"])
    with torch.device("meta"):
        hf = transformers.T5EncoderModel(hf_cfg)
        ours = T5V11Encoder(T5_V11_PRESETS["xxl"])
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    assert sum(p.numel() for p in hf.parameters()) == PARAMS_XXL


def test_buckets_match_transformers_t5() -> None:
    hf = _hf_tiny()
    attn = hf.encoder.block[0].layer[0].SelfAttention
    rel = torch.arange(300)[None, :] - torch.arange(300)[:, None]
    assert torch.equal(relative_position_bucket(300, 300, 32, 128), attn._relative_position_bucket(rel))


# ---------------------------------------------------------------- HF-style sharded folder

def _write_text_encoder(folder: Path, sd: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> None:
    """Two shards + index, the tied alias left out, as transformers' save_pretrained writes."""
    folder.mkdir(parents=True)
    sd = {k: v.to(dtype).contiguous() for k, v in sd.items() if k != "encoder.embed_tokens.weight"}
    keys = list(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(folder / name))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    cfg = T5_V11_PRESETS["tiny"]
    (folder / "config.json").write_text(json.dumps(
        {"architectures": ["T5EncoderModel"], "d_model": cfg.dim, "d_ff": cfg.dim_ffn, "d_kv": cfg.head_dim,
         "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "vocab_size": cfg.vocab,
         "feed_forward_proj": "gated-gelu"}))


def test_load_sharded_text_encoder_folder(tmp_path: Path) -> None:
    hf = _hf_tiny()
    _write_text_encoder(tmp_path / "text_encoder", hf.state_dict())
    enc = load_t5_v11(tmp_path, "tiny")  # the checkpoint root works as well as text_encoder/
    assert not enc.training and enc.encoder.embed_tokens is enc.shared
    ids = torch.randint(3, 256, (2, 226), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(enc(ids), hf(input_ids=ids).last_hidden_state) <= 1e-5
    half = load_t5_v11(tmp_path / "text_encoder", "tiny", dtype=torch.float16)
    assert half.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert half.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float16
    bf = load_t5_v11(tmp_path / "text_encoder", "tiny", dtype=torch.bfloat16)
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}


def test_load_folder_errors_name_the_problem(tmp_path: Path) -> None:
    sd = _hf_tiny().state_dict()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_t5_v11(tmp_path, "tiny")
    _write_text_encoder(tmp_path / "text_encoder", sd)
    with pytest.raises(ValueError, match=r"vocab_size=256 but preset 'xxl' has 32128"):
        load_t5_v11(tmp_path, "xxl")
    with pytest.raises(ValueError, match="unknown preset 'base'"):
        load_t5_v11(tmp_path, "base")
    (tmp_path / "text_encoder" / "config.json").unlink()
    with pytest.raises(ValueError, match="mis-shaped"):  # shapes checked from the headers
        load_t5_v11(tmp_path, "xxl")
    (tmp_path / "text_encoder" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_t5_v11(tmp_path, "tiny")


# ---------------------------------------------------------------- tokenizer

PROMPTS = [
    "A panda, dressed in a small red jacket, strums a guitar by a serene pond in a bamboo forest.",
    "  Hello   world\t\n café  日本語のテキスト  ", "",
    "Zürich — ÄÖÜ ß ½ ﬁ ① Ｆｕｌｌ\u3000ｗｉｄｔｈ\u00a0x\u200by",  # NFKC folds, odd spaces
    "x <extra_id_0> y </s> z<unk> <pad>", "Hello,world!!  ...?;:(a)[b]{c} 'q' \"dq\" 1.5e-3 #tag @user",
    "cinematic slow motion video " * 60,  # > 226 tokens: truncated, still ends in </s>
]


def _training_text() -> str:
    rng = random.Random(0)
    words = ("the quick brown fox jumps over lazy dog a cat sleeps on mat dreaming of fish video red car "
             "driving highway sunset cinematic slow motion camera pans across forest river mountain city "
             "night lights rain umbrella woman man walking running dancing panda guitar bamboo").split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) + rng.choice(".,!?;") for _ in range(400)]
    lines += ["Café au lait, naïve résumé; 日本語のテキスト。 Zürich — ÄÖÜ ß ½ ﬁ ①"] * 20
    return "\n".join(lines)


@pytest.fixture(scope="module")
def trained_spm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real nmt_nfkc Unigram model (precompiled charsmap included), trained like T5's: pad 0, eos 1, unk 2."""
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece trains the real-model fixture")
    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text(_training_text())
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "m"), vocab_size=300,
                                   hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, character_coverage=1.0, minloglevel=2)
    return save_spm_tokenizer_folder(d / "tokenizer", (d / "m.model").read_bytes())


def _hf_ids(folder: Path, prompts: list[str], max_length: int = 226) -> tuple[torch.Tensor, torch.Tensor]:
    transformers = pytest.importorskip("transformers", reason="transformers' T5Tokenizer is the oracle")
    pytest.importorskip("sentencepiece", reason="transformers reads spiece.model with sentencepiece's protobuf")
    tok = transformers.T5Tokenizer.from_pretrained(str(folder))
    # CogVideoX `_get_t5_prompt_embeds` arguments
    out = tok(prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
              return_attention_mask=True, return_tensors="pt")
    return out["input_ids"], out["attention_mask"]


@pytest.mark.parametrize("which", ["tiny", "trained"])
def test_tokenizer_ids_equal_transformers_t5_tokenizer(which: str, tmp_path: Path, request) -> None:
    folder = save_tiny_t5_tokenizer(tmp_path / "tokenizer") if which == "tiny" else request.getfixturevalue(
        "trained_spm")
    ours = T5SpmTokenizer(folder)
    ids, mask = ours(PROMPTS)
    ref_ids, ref_mask = _hf_ids(folder, PROMPTS)
    assert ids.shape == (len(PROMPTS), 226)
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    lens = mask.sum(1).tolist()
    assert lens[2] == 1 and lens[-1] == 226  # "" is just </s>; the long prompt is truncated
    assert all(ids[i, n - 1] == 1 and (ids[i, n:] == 0).all() for i, n in enumerate(lens))
    assert ours.tok.token_to_id("<extra_id_0>") == ours.vocab_size - 1  # sentinels in reverse, as T5
    short = ours(PROMPTS, max_length=8)[0]
    assert torch.equal(short, _hf_ids(folder, PROMPTS, 8)[0])


def test_tokenizer_matches_sentencepiece_on_plain_text(trained_spm: Path) -> None:
    """The legacy slow tokenizer's engine: same ids on text without special tokens or truncation."""
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(trained_spm / "spiece.model"))
    ours = T5SpmTokenizer(trained_spm)
    plain = [p for p in PROMPTS if "<" not in p and len(p) < 200]
    for p, row in zip(plain, ours.encode_ids(plain)):
        assert row == sp.encode(p) + [1], p


def test_tiny_tokenizer_folder_and_parser(tmp_path: Path) -> None:
    folder = save_tiny_t5_tokenizer(tmp_path / "tokenizer")
    assert {f.name for f in folder.iterdir()} == {"spiece.model", "tokenizer_config.json",
                                                  "special_tokens_map.json", "added_tokens.json"}
    model = parse_spm_model((folder / "spiece.model").read_bytes())
    assert [(p, k) for p, _, k in model.pieces] == [(p, k) for p, _, k in tiny_spm_pieces()]
    assert model.unk_id == 2 and model.normalizer_name == "identity" and not model.precompiled_charsmap
    tok = T5SpmTokenizer(tmp_path)  # checkpoint root with tokenizer/ works too
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert tok.vocab_size == 234 <= T5_V11_PRESETS["tiny"].vocab
    assert json.loads((folder / "added_tokens.json").read_text())["<extra_id_0>"] == 233


def test_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "spiece.model"))):
        T5SpmTokenizer(tmp_path)
    (tmp_path / "spiece.model").write_bytes(b"\xff\xff\xff")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        T5SpmTokenizer(tmp_path)
    folder = save_tiny_t5_tokenizer(tmp_path / "t")
    (folder / "added_tokens.json").write_text(json.dumps({"<extra_id_0>": 32099}))
    with pytest.raises(ValueError, match="added_tokens.json.*32099"):
        T5SpmTokenizer(folder)
    (folder / "added_tokens.json").unlink()
    with pytest.raises(ValueError, match=r"\[prompt\]"):
        T5SpmTokenizer(folder)("a cat")
    assert serialize_spm_model([("<unk>", 0.0, 2)], unk_id=0)  # the writer itself needs no pieces beyond unk


# ---------------------------------------------------------------- encode_prompts_t5

def test_encode_prompts_t5_is_unmasked_and_226_long(tmp_path: Path) -> None:
    enc = randomize_(T5V11Encoder(T5_V11_PRESETS["tiny"]), seed=5).eval()
    tok = T5SpmTokenizer(save_tiny_t5_tokenizer(tmp_path))
    prompts = ["a red fox", "", "a much longer prompt about a red fox jumping over a lazy dog"]
    out = encode_prompts_t5(enc, tok, prompts)
    assert out.shape == (3, 226, 32) and not out.requires_grad
    ids, mask = tok(prompts)
    with torch.no_grad():
        assert torch.equal(out, enc(ids))  # no attention mask, as the CogVideoX pipeline
        assert rel_err(out[0, :4], enc(ids, mask)[0, :4]) > 1e-3  # which differs from the masked run
    with pytest.raises(ValueError, match=r"\[prompt\]"):
        encode_prompts_t5(enc, tok, "a red fox")

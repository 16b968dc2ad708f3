"""T5 v1.1 tokenizer read from a SentencePiece `spiece.model`, on the `tokenizers` library alone.

Shapes: B prompts, L token slots (max_length, 226 for CogVideoX).

The CogVideoX `tokenizer/` folder holds a slow-tokenizer serialization (`spiece.model` plus
tokenizer_config.json / special_tokens_map.json / added_tokens.json, no tokenizer.json). transformers'
`T5Tokenizer` converts it into a `tokenizers` Unigram pipeline; this module does the same conversion
with a ~60-line protobuf reader, so neither `sentencepiece` nor `protobuf` is needed at run time:

  vocab = the model's pieces (id = position) + `<extra_id_{n-1}> ... <extra_id_0>` (so
  `<extra_id_0>` is the last id, 32099 for T5), normalizer = the model's precompiled charsmap,
  pre-tokenizer = whitespace split + Metaspace('▁', always prepend), `</s>` appended after
  truncation, `<pad>` / `</s>` / `<unk>` / extra ids matched as special tokens in the raw text.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .t5_tokenizer import pad_rows

SPM_FILE = "spiece.model"
TOKENIZER_SUBDIR = "tokenizer"  # diffusers checkpoint layout: <ckpt>/tokenizer/spiece.model
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPACE = "\u2581"  # SentencePiece's visible space '▁'

# SentencePiece piece types (sentencepiece_model.proto, SentencePiece.Type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4
UNIGRAM = 1  # TrainerSpec.ModelType


# ------------------------------------------------------------------------------------------
# spiece.model protobuf: the few fields the tokenizer needs (wire format, no protobuf package)
# ------------------------------------------------------------------------------------------

@dataclass
class SpmModel:
    """What a `ModelProto` says about tokenizing (all other fields are ignored)."""

    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type)
    model_type: int = UNIGRAM
    unk_id: int = 0
    byte_fallback: bool = False
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return out, i


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """Top-level (field number, value) pairs of one message; LEN values stay raw bytes."""
    out: list[tuple[int, int | bytes]] = []
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, i = _varint(buf, i)
            out.append((num, val))
        elif wire == 1:
            out.append((num, buf[i:i + 8]))
            i += 8
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise ValueError("length-delimited field runs past the end")
            out.append((num, buf[i:i + n]))
            i += n
        elif wire == 5:
            out.append((num, buf[i:i + 4]))
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return out


def _int32(v: int) -> int:
    """A varint as a signed int32 (protobuf writes negatives as 64-bit two's complement)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def parse_spm_model(data: bytes, source: str = "<bytes>") -> SpmModel:
    """Parse a serialized SentencePiece `ModelProto` (spiece.model)."""
    model = SpmModel()
    try:
        for num, val in _fields(data):
            if num == 1:  # repeated SentencePiece pieces
                piece, score, kind = "", 0.0, NORMAL
                for n, v in _fields(val):
                    if n == 1:
                        piece = v.decode("utf-8")
                    elif n == 2:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3:
                        kind = v
                model.pieces.append((piece, score, kind))
            elif num == 2:  # TrainerSpec
                for n, v in _fields(val):
                    if n == 3:
                        model.model_type = v
                    elif n == 35:
                        model.byte_fallback = bool(v)
                    elif n == 40:
                        model.unk_id = _int32(v)
            elif num == 3:  # NormalizerSpec
                for n, v in _fields(val):
                    if n == 1:
                        model.normalizer_name = v.decode("utf-8")
                    elif n == 2:
                        model.precompiled_charsmap = bytes(v)
    except (ValueError, TypeError, struct.error, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{source} is not a SentencePiece model file ({e}); expected the spiece.model "
                         "of a T5 tokenizer folder") from e
    if not model.pieces:
        raise ValueError(f"{source} holds no SentencePiece pieces; expected the spiece.model of a T5 "
                         "tokenizer folder")
    return model


def _key(num: int, wire: int) -> bytes:
    return _enc_varint(num << 3 | wire)


def _enc_varint(v: int) -> bytes:
    v &= (1 << 64) - 1  # negative int32 -> 10-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _len_field(num: int, payload: bytes) -> bytes:
    return _key(num, 2) + _enc_varint(len(payload)) + payload


def serialize_spm_model(pieces: list[tuple[str, float, int]], *, unk_id: int, eos_id: int = -1,
                        pad_id: int = -1, bos_id: int = -1) -> bytes:
    """A minimal Unigram `ModelProto` loadable by sentencepiece and transformers.

    Normalizer 'identity' (no charsmap) with dummy prefix and whitespace collapsing, as T5's spec.
    """
    body = b""
    for piece, score, kind in pieces:
        p = _len_field(1, piece.encode("utf-8")) + _key(2, 5) + struct.pack("<f", score)
        if kind != NORMAL:
            p += _key(3, 0) + _enc_varint(kind)
        body += _len_field(1, p)
    trainer = (_key(3, 0) + _enc_varint(UNIGRAM) + _key(4, 0) + _enc_varint(len(pieces))
               + b"".join(_key(n, 0) + _enc_varint(v)
                          for n, v in ((40, unk_id), (41, bos_id), (42, eos_id), (43, pad_id))))
    normalizer = (_len_field(1, b"identity") + _key(3, 0) + b"\x01" + _key(4, 0) + b"\x01"
                  + _key(5, 0) + b"\x01")
    return body + _len_field(2, trainer) + _len_field(3, normalizer)


# ------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------

def _resolve_spm_file(path: str | Path) -> Path:
    """Accept a checkpoint root (diffusers layout), a tokenizer folder, or spiece.model itself."""
    path = Path(path)
    candidates = [path / SPM_FILE, path / TOKENIZER_SUBDIR / SPM_FILE]
    if path.suffix == ".model":
        candidates.insert(0, path)
    for c in candidates:
        if c.is_file():
            return c
    tried = " or ".join(str(c) for c in candidates)
    hint = (f"; {path} holds tokenizer.json but no {SPM_FILE}: this reader needs the SentencePiece model"
            if (path / "tokenizer.json").is_file() else "")
    raise FileNotFoundError(f"T5 tokenizer not found: tried {tried}{hint}; expected the checkpoint's "
                            f"{TOKENIZER_SUBDIR}/ folder (THUDM/CogVideoX-* layout) holding {SPM_FILE}, "
                            "its checkpoint root, or the file itself")


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        out = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON ({e}); re-download the tokenizer folder") from e
    if not isinstance(out, dict):
        raise ValueError(f"{file} holds a JSON {type(out).__name__}, expected an object")
    return out


class T5SpmTokenizer:
    """Prompts -> (ids [B, L] int64, mask [B, L] int64), ids equal to transformers' `T5Tokenizer`.

    `T5SpmTokenizer(folder)` reads `<folder>/spiece.model` and, when present, `tokenizer_config.json`
    (`extra_ids`, default 100) and `added_tokens.json` (checked against the ids built here).
    """

    def __init__(self, path: str | Path) -> None:
        file = _resolve_spm_file(path)
        folder = file.parent
        self.source = str(file)
        spm = parse_spm_model(file.read_bytes(), source=str(file))
        if spm.model_type != UNIGRAM:
            raise ValueError(f"{file}: SentencePiece model_type {spm.model_type}, expected 1 (unigram) as in "
                             "every T5 tokenizer; this reader does not convert BPE/word/char models")
        config = _read_json(folder / "tokenizer_config.json")
        extra_ids = config.get("extra_ids", 100)
        if not isinstance(extra_ids, int) or extra_ids < 0:
            raise ValueError(f"{folder / 'tokenizer_config.json'}: extra_ids={extra_ids!r}, expected an int >= 0")
        self.model_max_length: int | None = config.get("model_max_length")
        self.tok = _build_tokenizer(spm, extra_ids, source=str(file))
        self.pad_id, self.eos_id, self.unk_id = (self._special_id(t) for t in (PAD, EOS, UNK))
        self._check_added_tokens(folder / "added_tokens.json")

    def _special_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.source} has no {token!r} piece; a T5 SentencePiece model holds "
                             f"{PAD} (0), {EOS} (1) and {UNK} (2)")
        return i

    def _check_added_tokens(self, file: Path) -> None:
        for token, i in _read_json(file).items():
            if self.tok.token_to_id(token) != i:
                raise ValueError(f"{file}: {token!r} has id {i}, but {SPM_FILE} + extra_ids give "
                                 f"{self.tok.token_to_id(token)}; the folder's files do not belong together")

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode_ids(self, prompts: list[str], max_length: int = 226) -> list[list[int]]:
        """Tokenized, truncated to max_length incl. the trailing </s>; no padding."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"T5SpmTokenizer: prompts must be a list of strings, got {type(prompts).__name__} "
                             f"{prompts!r:.80}; wrap a single prompt as [prompt]")
        if max_length < 1:
            raise ValueError(f"T5SpmTokenizer: max_length={max_length}; expected >= 1 (CogVideoX uses 226)")
        # tokenizers keeps room for the post-processor's </s> when truncating, as transformers does.
        self.tok.enable_truncation(max_length)
        try:
            return [e.ids for e in self.tok.encode_batch(list(prompts), add_special_tokens=True)]
        finally:
            self.tok.no_truncation()

    def __call__(self, prompts: list[str], max_length: int = 226) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids [B, L] int64 (pad id after </s>), mask [B, L] int64 (1 = real token incl. </s>)."""
        return pad_rows(self.encode_ids(prompts, max_length), max_length, self.pad_id)


def _build_tokenizer(spm: SpmModel, extra_ids: int, source: str) -> Tokenizer:
    vocab = [(p, s) for p, s, _ in spm.pieces]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(extra_ids - 1, -1, -1)]
    if not 0 <= spm.unk_id < len(spm.pieces):
        raise ValueError(f"{source}: unk_id {spm.unk_id} is outside its {len(spm.pieces)} pieces")
    # byte_fallback off whatever the model says: transformers' T5Tokenizer builds it that way.
    tok = Tokenizer(models.Unigram(vocab, unk_id=spm.unk_id, byte_fallback=False))
    if spm.precompiled_charsmap:
        tok.normalizer = normalizers.Precompiled(spm.precompiled_charsmap)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)])
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    specials = [PAD, EOS, UNK] + [p for p, _, kind in spm.pieces if kind == CONTROL and p not in (PAD, EOS)]
    specials += [f"<extra_id_{i}>" for i in range(extra_ids)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    user = [p for p, _, kind in spm.pieces if kind == USER_DEFINED]
    if user:  # always emitted whole by SentencePiece
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    eos = tok.token_to_id(EOS)
    if eos is None:
        raise ValueError(f"{source} has no {EOS!r} piece; a T5 SentencePiece model holds {EOS} at id 1")
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}",
                                                       special_tokens=[(EOS, eos)])
    return tok


# ------------------------------------------------------------------------------------------
# Tiny tokenizer folder for the "tiny" preset and tests
# ------------------------------------------------------------------------------------------

def tiny_spm_pieces() -> list[tuple[str, float, int]]:
    """134 deterministic pieces: <pad> 0, </s> 1, <unk> 2, '▁', printable ASCII, '▁'+[a-z0-9]."""
    pieces = [(PAD, 0.0, CONTROL), (EOS, 0.0, CONTROL), (UNK, 0.0, UNKNOWN), (SPACE, -5.0, NORMAL)]
    pieces += [(chr(c), -5.0, NORMAL) for c in range(33, 127)]
    # Word-initial pieces score above '▁' + char (-10), so "▁a" is one token.
    pieces += [(SPACE + ch, -4.0, NORMAL) for ch in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return pieces


def save_spm_tokenizer_folder(folder: str | Path, spm_bytes: bytes, extra_ids: int = 100,
                              model_max_length: int = 226) -> Path:
    """Write a T5 tokenizer folder (spiece.model + the three JSON files the hub folder has).

    Loadable by `T5SpmTokenizer` and by `transformers.T5Tokenizer.from_pretrained(folder)`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPM_FILE).write_bytes(spm_bytes)
    n = len(parse_spm_model(spm_bytes, source=str(folder / SPM_FILE)).pieces)
    extras = [f"<extra_id_{i}>" for i in range(extra_ids)]
    specials = {"eos_token": EOS, "unk_token": UNK, "pad_token": PAD, "additional_special_tokens": extras}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (folder / "added_tokens.json").write_text(json.dumps({t: n + extra_ids - 1 - i for i, t in enumerate(extras)},
                                                         indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": extra_ids, "model_max_length": model_max_length,
         "legacy": True, **specials}, indent=2))
    return folder


def save_tiny_t5_tokenizer(folder: str | Path) -> Path:
    """A tiny T5 tokenizer folder: 134 pieces + 100 extra ids = 234 ids (fits the tiny vocab 256)."""
    pieces = tiny_spm_pieces()
    return save_spm_tokenizer_folder(folder, serialize_spm_model(pieces, unk_id=2, eos_id=1, pad_id=0))

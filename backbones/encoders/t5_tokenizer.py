"""umT5 tokenizer for Wan2.2 on the `tokenizers` library alone (upstream `wan/modules/tokenizers.py`).

Shapes: B prompts, L token slots (max_length, 512 upstream).

Upstream calls `AutoTokenizer.from_pretrained(<ckpt>/google/umt5-xxl)` with
`padding='max_length', truncation=True, add_special_tokens=True`; the fast tokenizer it gets is
`tokenizer.json`, so reading that file with `tokenizers` gives the same ids without transformers.
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

try:  # optional as upstream: it repairs mojibake before tokenizing
    import ftfy
except ImportError:  # pragma: no cover - depends on the environment
    ftfy = None

TOKENIZER_SUBDIR = Path("google") / "umt5-xxl"
TOKENIZER_FILE = "tokenizer.json"
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


def clean_text(text: str) -> str:
    """Upstream 'whitespace' cleaning: ftfy -> html.unescape twice -> strip -> collapse whitespace."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def _resolve_tokenizer_file(path: str | Path) -> Path:
    """Accept a checkpoint root (official layout), a folder holding tokenizer.json, or the file."""
    path = Path(path)
    candidates = [path / TOKENIZER_SUBDIR / TOKENIZER_FILE, path / TOKENIZER_FILE]
    if path.suffix == ".json":
        candidates.insert(0, path)
    for c in candidates:
        if c.is_file():
            return c
    tried = " or ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"umT5 tokenizer not found: tried {tried}; expected a checkpoint root in the "
                            f"Wan-AI/Wan2.2-TI2V-5B layout ({TOKENIZER_SUBDIR / TOKENIZER_FILE}), a folder "
                            "holding tokenizer.json, or the file itself; download google/umt5-xxl/ with the "
                            "checkpoint")


class WanTokenizer:
    """Prompts -> (ids [B, L] int64, mask [B, L] int64), padded with id 0 and ending in </s>."""

    def __init__(self, path: str | Path) -> None:
        file = _resolve_tokenizer_file(path)
        self._init(Tokenizer.from_file(str(file)), source=str(file))

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer) -> WanTokenizer:
        """Wrap an in-memory tokenizer (e.g. `build_tiny_tokenizer()`); it is copied, not mutated."""
        self = cls.__new__(cls)
        self._init(Tokenizer.from_str(tok.to_str()), source="<in-memory>")
        return self

    def _init(self, tok: Tokenizer, source: str) -> None:
        self.source = source
        # Own copy without padding/truncation: both are applied per call below.
        tok.no_padding()
        tok.no_truncation()
        self.tok = tok
        eos = tok.token_to_id(EOS)
        if eos is None:
            raise ValueError(f"tokenizer {source} has no {EOS!r} token; an umT5 tokenizer.json is expected")
        pad = tok.token_to_id(PAD)
        self.eos_id: int = eos
        self.pad_id: int = 0 if pad is None else pad
        # The hub tokenizer.json appends </s> via its post-processor (T5TokenizerFast relies on it);
        # a file without one gets </s> appended here so ids match either way.
        probe_plain = tok.encode("a", add_special_tokens=False).ids
        probe_special = tok.encode("a", add_special_tokens=True).ids
        self.post_processor_adds_eos = probe_special == probe_plain + [eos]
        if not self.post_processor_adds_eos and probe_special != probe_plain:
            raise ValueError(f"tokenizer {source}: its post-processor turns {probe_plain} into {probe_special}, "
                             f"expected either nothing added or only </s> (id {eos}) appended as umT5 does")

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode_ids(self, prompts: list[str], max_length: int = 512) -> list[list[int]]:
        """Cleaned, tokenized, truncated to max_length incl. the trailing </s>; no padding."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"WanTokenizer: prompts must be a list of strings, got {type(prompts).__name__} "
                             f"{prompts!r:.80}; wrap a single prompt as [prompt]")
        if max_length < 1:
            raise ValueError(f"WanTokenizer: max_length={max_length}; expected >= 1 (upstream uses 512)")
        texts = [clean_text(p) for p in prompts]
        if self.post_processor_adds_eos:
            # tokenizers reserves room for the post-processor's </s> when truncating, as HF does.
            self.tok.enable_truncation(max_length)
            try:
                return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=True)]
            finally:
                self.tok.no_truncation()
        encs = self.tok.encode_batch(texts, add_special_tokens=False)
        return [e.ids[: max_length - 1] + [self.eos_id] for e in encs]

    def __call__(self, prompts: list[str], max_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids [B, L] int64 (pad id after </s>), mask [B, L] int64 (1 = real token incl. </s>)."""
        return pad_rows(self.encode_ids(prompts, max_length), max_length, self.pad_id)


def pad_rows(rows: list[list[int]], max_length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> (ids [B, max_length] padded with pad_id, mask [B, max_length], 1 on real tokens)."""
    ids = torch.full((len(rows), max_length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), max_length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


# ------------------------------------------------------------------------------------------
# Tiny tokenizer for the embedded "tiny" preset and tests
# ------------------------------------------------------------------------------------------

def build_tiny_tokenizer(extra_words: tuple[str, ...] = ()) -> Tokenizer:
    """A deterministic SentencePiece-style Unigram tokenizer (vocab 390, no training data).

    Same pipeline shape as umT5's tokenizer.json: NFKC + collapse spaces, Metaspace pre-tokenizer,
    Unigram with byte fallback (any Unicode text round-trips), post-processor appending </s>.
    Ids: 0 <pad>, 1 </s>, 2 <unk>, then '▁', printable ASCII, '▁'+[a-z0-9], 256 byte tokens, then one
    whole-word piece '▁'+word per `extra_words` (ids 390, ...; a corpus's vocabulary, as SentencePiece would
    learn it: the tiny pretrained base's captions), scored above any spelling of the word from smaller pieces.
    """
    pieces: list[tuple[str, float]] = [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0), ("\u2581", -5.0)]
    pieces += [(chr(c), -5.0) for c in range(33, 127)]
    # Word-initial pieces score above '▁' + char (-10), so "▁a" is one token as in SentencePiece.
    pieces += [("\u2581" + ch, -4.0) for ch in "abcdefghijklmnopqrstuvwxyz0123456789"]
    pieces += [(f"<0x{b:02X}>", -10.0) for b in range(256)]
    known = {p for p, _ in pieces}
    pieces += [("\u2581" + w, -3.0) for w in dict.fromkeys(extra_words) if "\u2581" + w not in known]
    assert len(pieces) <= 512 and len({p for p, _ in pieces}) == len(pieces)

    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="\u2581", prepend_scheme="always"),
                                     decoders.ByteFallback(), decoders.Fuse()])
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}",
                                                       special_tokens=[(EOS, 1)])
    tok.add_special_tokens([PAD, EOS, UNK])  # already in the vocab: ids stay 0, 1, 2
    return tok


def save_tokenizer(tok: Tokenizer, ckpt_dir: str | Path) -> Path:
    """Write `tok` as `<ckpt_dir>/google/umt5-xxl/tokenizer.json` (official layout) and return it.

    Also writes a minimal tokenizer_config.json / special_tokens_map.json so that
    `transformers.AutoTokenizer.from_pretrained(<ckpt_dir>/google/umt5-xxl)` loads the folder too.
    """
    folder = Path(ckpt_dir) / TOKENIZER_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / TOKENIZER_FILE
    tok.save(str(file))
    specials = {"pad_token": PAD, "eos_token": EOS, "unk_token": UNK}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512, **specials}, indent=2))
    return file


def save_tiny_tokenizer(ckpt_dir: str | Path) -> Path:
    """`save_tokenizer(build_tiny_tokenizer(), ckpt_dir)`."""
    return save_tokenizer(build_tiny_tokenizer(), ckpt_dir)

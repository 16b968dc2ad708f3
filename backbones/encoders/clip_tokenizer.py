"""CLIP byte-level BPE tokenizer of SD1.5 on the `tokenizers` library alone (transformers `CLIPTokenizer`).

Shapes: B prompts, L token slots (model_max_length, 77 for SD1.5).

Reads the `tokenizer/` folder of a diffusers download: `tokenizer.json` when present (what
transformers' tokenizer reads first), else `vocab.json` + `merges.txt`, from which the pipeline of
transformers' CLIPTokenizer is rebuilt: NFC, whitespace runs -> one space, lowercase; CLIP's split
regex (specials, contractions, letter runs, single digits, punctuation runs); byte-level symbols;
BPE with a `</w>` end-of-word suffix and `<|endoftext|>` as unk. `tokenizer_config.json` /
`special_tokens_map.json` give bos/eos/pad and model_max_length (defaults: CLIP's).

Every prompt becomes [BOS] + at most L - 2 tokens + [EOS], padded with the pad token to L, as SD
training code calls it (`padding="max_length", max_length=77, truncation=True`). SD1.5's pad token
is `<|endoftext|>` (49407), so padding repeats EOS; SD2's tokenizer pads with `!` (0).
Unlike OpenAI's original tokenizer there is no ftfy / HTML unescape: transformers and diffusers
do not apply them either, and those are the ids SD1.5 LoRAs are trained on today.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

VOCAB_FILE, MERGES_FILE, TOKENIZER_FILE = "vocab.json", "merges.txt", "tokenizer.json"
CONFIG_FILE, SPECIAL_TOKENS_FILE = "tokenizer_config.json", "special_tokens_map.json"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's pre-tokenizer regex (OpenAI simple_tokenizer; transformers' CLIPTokenizer uses the same).
CLIP_SPLIT_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
                      r"""|[^\s\p{L}\p{N}]+""")
DEFAULT_MAX_LENGTH = 77
# transformers writes this sentinel (int(1e30)) for "no limit"; anything that large means "unset".
_NO_LIMIT = 10**12


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable character table; printable Latin-1 bytes map to themselves,
    the other 68 to chr(256 + n) in byte order, so no symbol is whitespace or a control character."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def _token_content(value: object, folder: Path, key: str) -> str:
    """A special token as configs store it: a plain string or an AddedToken dict with 'content'."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{folder}: {key}={value!r} in {SPECIAL_TOKENS_FILE} / {CONFIG_FILE}; expected a token "
                     "string or an object with a 'content' string")


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}); re-download the tokenizer/ folder") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file} holds a {type(data).__name__}, expected a JSON object")
    return data


def resolve_tokenizer_folder(path: str | Path) -> Path:
    """Accept the `tokenizer/` folder itself or a diffusers checkpoint root holding it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"CLIP tokenizer folder {path} does not exist; pass the tokenizer/ folder of a "
                                "diffusers SD1.5 download (or the download's root)")
    if not (path / VOCAB_FILE).exists() and not (path / TOKENIZER_FILE).exists() and (path / "tokenizer").is_dir():
        path = path / "tokenizer"
    if (path / TOKENIZER_FILE).is_file():
        return path
    missing = [f for f in (VOCAB_FILE, MERGES_FILE) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"CLIP tokenizer folder {path} is missing {' and '.join(missing)}; expected "
                                f"{VOCAB_FILE} + {MERGES_FILE} (or {TOKENIZER_FILE}) as in the tokenizer/ folder of "
                                "runwayml/stable-diffusion-v1-5; download that folder completely")
    return path


def build_clip_bpe(vocab_file: Path, merges_file: Path, unk_token: str = EOS) -> Tokenizer:
    """transformers' CLIPTokenizer pipeline over vocab.json + merges.txt (no post-processor: the
    specials, truncation and padding are added by `CLIPTokenizer` itself)."""
    try:
        bpe = models.BPE.from_file(str(vocab_file), str(merges_file), unk_token=unk_token, fuse_unk=False,
                                   continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD)
    except Exception as e:  # tokenizers raises a bare Exception for unreadable or inconsistent files
        raise ValueError(f"CLIP tokenizer files {vocab_file} / {merges_file} could not be read as a BPE "
                         f"vocabulary ({e}); re-download the tokenizer/ folder") from e
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # invert + removed: keep only the regex matches, so whitespace between them disappears
        pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


class CLIPTokenizer:
    """Prompts -> input_ids [B, L] int64: BOS, tokens, EOS, then pad (EOS for SD1.5) up to L = 77."""

    def __init__(self, path: str | Path, max_length: int | None = None) -> None:
        folder = resolve_tokenizer_folder(path)
        self.source = str(folder)
        config: dict = {}
        for name in (CONFIG_FILE, SPECIAL_TOKENS_FILE):  # the special-tokens map wins, as in transformers
            if (folder / name).is_file():
                config.update(_read_json(folder / name))

        def special(key: str, default: str) -> str:
            return _token_content(config[key], folder, key) if config.get(key) is not None else default

        bos, eos = special("bos_token", BOS), special("eos_token", EOS)
        pad, unk = special("pad_token", EOS), special("unk_token", EOS)
        if (folder / TOKENIZER_FILE).is_file():
            try:
                tok = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
            except Exception as e:  # tokenizers raises a bare Exception for malformed files
                raise ValueError(f"{folder / TOKENIZER_FILE} could not be read by the tokenizers library ({e}); "
                                 "delete it to use vocab.json + merges.txt, or re-download the folder") from e
        else:
            tok = build_clip_bpe(folder / VOCAB_FILE, folder / MERGES_FILE, unk_token=unk)
        # Owned copy: specials, truncation and padding are applied per call below.
        tok.no_padding()
        tok.no_truncation()
        ids = {}
        for role, token in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad)):
            i = tok.token_to_id(token)
            if i is None:  # transformers would append it, past the end of the model's embedding table
                raise ValueError(f"CLIP tokenizer {folder}: {role} {token!r} is not in the vocabulary; its "
                                 f"{SPECIAL_TOKENS_FILE} / {CONFIG_FILE} do not belong to this vocabulary; "
                                 "re-download the tokenizer/ folder")
            ids[role] = i
        # Specials written in a prompt map to their ids (not to BPE pieces), as transformers does.
        present = [t for t in dict.fromkeys((bos, eos, pad, unk)) if tok.token_to_id(t) is not None]
        tok.add_special_tokens(present)
        self.tok = tok
        self.bos_token_id: int = ids["bos_token"]
        self.eos_token_id: int = ids["eos_token"]
        self.pad_token_id: int = ids["pad_token"]
        if max_length is None:
            cfg_len = config.get("model_max_length")
            max_length = cfg_len if isinstance(cfg_len, int) and 2 <= cfg_len < _NO_LIMIT else DEFAULT_MAX_LENGTH
        if max_length < 2:
            raise ValueError(f"CLIPTokenizer: max_length={max_length}; expected >= 2 (BOS and EOS), 77 for SD1.5")
        self.model_max_length: int = max_length

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @staticmethod
    def _check(texts: list[str]) -> None:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"CLIPTokenizer: texts must be a list of strings, got {type(texts).__name__} "
                             f"{texts!r:.80}; wrap a single prompt as [prompt]")

    def encode_ids(self, texts: list[str]) -> list[list[int]]:
        """BPE ids of each text without BOS/EOS and untruncated (to tell how much truncation drops)."""
        self._check(texts)
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Text of ids, specials dropped; `</w>` marks become the spaces between words."""
        text = self.tok.decode(ids, skip_special_tokens=True)
        return " ".join(text.replace(END_OF_WORD, " ").split())

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """-> input_ids [B, L] int64. Truncation keeps the first L - 2 tokens and still ends in EOS."""
        rows = self.encode_ids(texts)
        keep = self.model_max_length - 2
        out = torch.full((len(rows), self.model_max_length), self.pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            row = [self.bos_token_id] + r[:keep] + [self.eos_token_id]
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out


# ------------------------------------------------------------------------------------------
# Tiny tokenizer for the "tiny" preset and tests
# ------------------------------------------------------------------------------------------

# Merges first for frequent pairs, then each word built left to right, so BPE must apply ranks
# (not left-to-right order) to get words like "string" right.
_TINY_PAIRS = ["t h", "i n", "e r", "a n", "o n", "e n", "r e", "s t", "a r", "o r", "in g</w>", "e d</w>",
               "e s</w>", "! !</w>", ". .", ".. .</w>", "' s</w>"]
_TINY_WORDS = ["the", "and", "of", "with", "photo", "cat", "dog", "in", "on", "best", "quality", "masterpiece",
               "high", "detailed", "portrait", "woman", "man", "red", "blue", "green", "light", "night", "city",
               "street", "art", "style", "by", "sky", "sun", "water", "tree", "house", "string", "running"]
TINY_CLIP_VOCAB_SIZE = 640  # 512 byte symbols (+ `</w>` twins) + 126 merges + BOS + EOS


def _tiny_merges() -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    made: set[str] = set()

    def add(a: str, b: str) -> None:
        if a + b not in made:
            merges.append((a, b))
            made.add(a + b)

    for pair in _TINY_PAIRS:
        a, b = pair.split(" ")
        add(a, b)
    for word in _TINY_WORDS:
        prefix = word[0]
        for i, ch in enumerate(word[1:], start=1):
            last = i == len(word) - 1
            add(prefix, ch + END_OF_WORD if last else ch)
            prefix += ch
    return merges


def build_tiny_clip_tokenizer(folder: str | Path) -> Path:
    """Write a small, valid CLIP tokenizer folder (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json) and return it. Vocabulary laid out as CLIP's: the 256 byte symbols, their
    `</w>` twins, one token per merge in rank order, then BOS and EOS last; any text is encodable."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    merges = _tiny_merges()
    vocab = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges] + [BOS, EOS]
    assert len(set(vocab)) == len(vocab) == TINY_CLIP_VOCAB_SIZE, (len(vocab), len(set(vocab)))
    (folder / VOCAB_FILE).write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                     encoding="utf-8")
    (folder / MERGES_FILE).write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                      encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    (folder / SPECIAL_TOKENS_FILE).write_text(json.dumps(specials, indent=2))
    (folder / CONFIG_FILE).write_text(json.dumps({"tokenizer_class": "CLIPTokenizer", "do_lower_case": True,
                                                  "model_max_length": DEFAULT_MAX_LENGTH, **specials}, indent=2))
    return folder

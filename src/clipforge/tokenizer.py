"""CLIP's byte-level BPE tokenizer, giving the same ids as OpenAI's `clip.simple_tokenizer`.

How a caption becomes ids:

1. clean: repair mis-decoded unicode (ftfy), undo HTML escapes (twice, because scraped captions are often
   escaped twice), collapse runs of whitespace to one space, strip, lower-case;
2. split into pieces with a regex: runs of letters, single digits, runs of other non-space characters and the
   English contractions ('s 't 're 've 'm 'll 'd);
3. write each piece's UTF-8 bytes as printable stand-in characters (so no byte is ever unknown), mark the
   last one as word-final with `</w>`, and apply the 48,894 merges of the shipped file, lowest rank first;
4. look each resulting symbol up in the 49,408-entry vocabulary.

The vocabulary is: the 256 byte symbols, the same 256 with `</w>`, one symbol per merge (in file order), then
`<start_of_text>` (49406) and `<end_of_text>` (49407).

The merge file is read once, on first use, and shared by every tokenizer built from the same path.
"""

from __future__ import annotations

import gzip
import html
import operator
from collections.abc import Callable, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import ftfy
import regex
import torch

if TYPE_CHECKING:
    from .models.config import ModelConfig

DEFAULT_CONTEXT_LENGTH = 77
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
_WORD_END = "</w>"
_NUM_MERGES = 49152 - 256 - 2  # the merge list is cut here so that the vocabulary has 49,408 entries
_WORD_CACHE_SIZE = 200_000  # distinct pieces memoised per vocabulary (a few tens of MB at most)

# OpenAI's tokenizer turns these literal strings inside a caption into the special ids; we do the same so
# that ids stay identical for every input.
_LITERAL_SPECIALS = {"<|startoftext|>": SOT_TOKEN, "<|endoftext|>": EOT_TOKEN}

# Letters (\p{L}) and numbers (\p{N}) need the `regex` package; the standard `re` has no such classes.
# IGNORECASE is kept although the text is already lower-cased: it makes a few non-letters whose case folding
# is a letter (e.g. U+0345) join letter runs, and OpenAI's tokenizer behaves that way.
_PIECE_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
_WHITESPACE_RUN = regex.compile(r"\s+")


@lru_cache(maxsize=1)
def _byte_symbols() -> tuple[str, ...]:
    """The printable character that stands for each byte value, indexed by byte.

    Bytes that are already visible Latin-1 characters stand for themselves; the 68 others (controls, space,
    soft hyphen...) are given the code points 256, 257, ... in increasing byte order.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {b: chr(b) for b in visible}
    hidden = [b for b in range(256) if b not in symbols]
    symbols.update({b: chr(256 + n) for n, b in enumerate(hidden)})
    return tuple(symbols[b] for b in range(256))


def _base_alphabet() -> list[str]:
    """The 256 byte symbols in vocabulary order: the visible bytes first, then the stand-ins."""
    symbols = _byte_symbols()
    return sorted(symbols, key=ord)  # visible bytes keep their own code point < 256; stand-ins come after


def clean_text(text: str) -> str:
    """The caption normalisation applied before tokenizing (same steps and order as OpenAI's)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip().lower()


class _Vocabulary:
    """The merge ranks and the symbol <-> id tables of one BPE file, plus a memo of encoded pieces."""

    def __init__(self, bpe_path: Path) -> None:
        try:
            lines = gzip.decompress(bpe_path.read_bytes()).decode("utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{bpe_path}: cannot read a gzip-compressed UTF-8 BPE merge list ({exc})") from None
        merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]  # line 0 is a version header
        bad = next((i for i, m in enumerate(merges, start=2) if len(m) != 2), None)
        if len(merges) != _NUM_MERGES or bad is not None:
            where = f"line {bad} is not two symbols" if bad else f"only {len(merges)} merges"
            raise ValueError(f"{bpe_path}: expected {_NUM_MERGES} merge lines after the header, {where}")
        self.ranks: dict[tuple[str, str], int] = {m: r for r, m in enumerate(merges)}  # type: ignore[misc]
        alphabet = _base_alphabet()
        tokens = alphabet + [s + _WORD_END for s in alphabet] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
        self.tokens: list[str] = tokens
        self.ids: dict[str, int] = {t: i for i, t in enumerate(tokens)}
        self.byte_of: dict[str, int] = {s: b for b, s in enumerate(_byte_symbols())}
        # Bounded memo: captions reuse a small set of words, so most pieces are looked up, not merged.
        self.piece_ids = lru_cache(maxsize=_WORD_CACHE_SIZE)(self._piece_ids)

    def _merge(self, symbols: list[str]) -> list[str]:
        """Apply merges to one word, always the lowest-ranked adjacent pair first, every occurrence at once."""
        ranks, unranked = self.ranks, len(self.ranks)
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, unranked))
            if best not in ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(symbols):  # left to right, so "a a a" with merge (a, a) gives "aa a"
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _piece_ids(self, piece: str) -> tuple[int, ...]:
        """Ids of one pre-tokenized piece."""
        if piece in _LITERAL_SPECIALS:
            return (self.ids[_LITERAL_SPECIALS[piece]],)
        byte_symbols = _byte_symbols()
        symbols = [byte_symbols[b] for b in piece.encode("utf-8")]
        symbols[-1] += _WORD_END
        return tuple(self.ids[s] for s in self._merge(symbols))


@lru_cache(maxsize=4)
def _load_vocabulary(bpe_path: Path) -> _Vocabulary:
    return _Vocabulary(bpe_path)


def default_bpe_path() -> Path:
    """The merge list shipped with clipforge (OpenAI's `bpe_simple_vocab_16e6.txt.gz`, see assets/NOTICE.md)."""
    return Path(str(resources.files("clipforge") / "assets" / "bpe_simple_vocab_16e6.txt.gz"))


class BPETokenizer:
    """Callable CLIP tokenizer: `tokenizer(texts) -> LongTensor[N, context_length]`.

    Instances built from the same merge file share its tables and word memo, so creating one is cheap once the
    file has been read.
    """

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH, bpe_path: str | Path | None = None) -> None:
        _check_context_length(context_length)
        self.context_length = context_length
        self._vocab = _load_vocabulary(Path(bpe_path) if bpe_path is not None else default_bpe_path())
        self.vocab_size = len(self._vocab.tokens)
        self.sot_token_id = self._vocab.ids[SOT_TOKEN]
        self.eot_token_id = self._vocab.ids[EOT_TOKEN]

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without the start/end tokens."""
        if not isinstance(text, str):
            raise TypeError(f"encode: expected a str, got {type(text).__name__}")
        ids: list[int] = []
        for piece in _PIECE_PATTERN.findall(clean_text(text)):
            ids.extend(self._vocab.piece_ids(piece))
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of a sequence of ids. Word ends become spaces, so the text ends with one (as OpenAI's does);
        special tokens appear as `<start_of_text>` / `<end_of_text>`; invalid UTF-8 becomes U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        tokens = self._vocab.tokens
        symbols = []
        for position, token_id in enumerate(ids):
            try:
                index = operator.index(token_id)
            except TypeError:
                raise TypeError(f"decode: ids[{position}] is a {type(token_id).__name__}, expected int") from None
            if not 0 <= index < len(tokens):
                raise ValueError(f"decode: ids[{position}] = {index} is outside the vocabulary [0, {len(tokens)})")
            symbols.append(tokens[index])
        byte_of = self._vocab.byte_of
        # Special-token names are plain ASCII, whose characters are their own byte symbols.
        raw = bytes(byte_of[c] for c in "".join(symbols))
        return raw.decode("utf-8", errors="replace").replace(_WORD_END, " ")

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Tokenize to `[N, context_length]` (this tokenizer's length unless given), truncating long texts."""
        length = self.context_length if context_length is None else context_length
        return self.tokenize(texts, length, truncate=True)

    def tokenize(
        self, texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH, truncate: bool = True
    ) -> torch.Tensor:
        """`<start_of_text> ids <end_of_text>` per text, zero-padded to `[N, context_length]` (int64).

        A text that does not fit is cut so that `<end_of_text>` is still its last token; with `truncate=False`
        it raises ValueError instead.
        """
        _check_context_length(context_length)
        texts = _as_text_list(texts)
        out = torch.zeros(len(texts), context_length, dtype=torch.long)  # [N, L]
        for n, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > context_length:
                if not truncate:
                    raise ValueError(
                        f"tokenize: texts[{n}] is {len(ids)} tokens long (with start/end tokens), more than "
                        f"context_length {context_length}; shorten it or pass truncate=True"
                    )
                ids = ids[: context_length - 1] + [self.eot_token_id]
            out[n, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


def _check_context_length(context_length: object) -> None:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
        raise ValueError(f"context_length must be an int >= 2 (room for start and end tokens), got {context_length!r}")


def _as_text_list(texts: object) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, Sequence):
        raise TypeError(f"tokenize: expected a str or a list of str, got {type(texts).__name__}")
    for n, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"tokenize: texts[{n}] is a {type(text).__name__}, expected str")
    return list(texts)


@lru_cache(maxsize=1)
def _default_tokenizer() -> BPETokenizer:
    return BPETokenizer()


def tokenize(
    texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH, truncate: bool = True
) -> torch.Tensor:
    """Tokenize with the default CLIP BPE: LongTensor `[N, context_length]` (see `BPETokenizer.tokenize`)."""
    return _default_tokenizer().tokenize(texts, context_length, truncate)


def tokenizer_for(model_cfg: ModelConfig, context_length: int | None = None) -> Callable[[str | Sequence[str]], torch.Tensor]:
    """The tokenizer a model with config `model_cfg` reads: its Hugging Face text tower's own tokenizer, or CLIP's
    BPE; ids padded to `context_length` (default: the model's context length).

    The one place where a tokenizer is chosen: training, evaluation, the demo and the study all call it.
    """
    text_cfg = model_cfg.text_cfg
    length = text_cfg.context_length if context_length is None else context_length
    if text_cfg.hf_model_path is not None:
        from .models.hf_text import HFTokenizer  # noqa: PLC0415 - pulls in transformers

        return HFTokenizer(text_cfg.hf_model_path, length)
    return BPETokenizer(context_length=length)


def get_tokenizer(name: str | None = None) -> Callable[[str | Sequence[str]], torch.Tensor]:
    """The tokenizer for model `name` (`tokenizer_for` its config), or the 77-token CLIP BPE when `name` is None."""
    if name is None:
        return _default_tokenizer()
    from .registry import get_model_config  # noqa: PLC0415 - the registry is only needed when a model is named

    return tokenizer_for(get_model_config(name))

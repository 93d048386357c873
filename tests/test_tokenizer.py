"""The BPE tokenizer against OpenAI's `clip/simple_tokenizer.py` and open_clip's `open_clip/tokenizer.py`.

Both references are loaded by file path from their installed packages (clip-anytorch, open_clip_torch); the
packages themselves are never imported because they pull in torchvision.
"""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import clipforge
from clipforge.config import ConfigError
from clipforge.tokenizer import BPETokenizer, get_tokenizer, tokenize


def _load_by_path(package: str, filename: str, module_name: str) -> ModuleType:
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"reference package '{package}' is not installed (see requirements-reference.txt)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    file_spec = importlib.util.spec_from_file_location(module_name, path)
    assert file_spec is not None and file_spec.loader is not None, path
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[module_name] = module
    file_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def openai_ref():
    return _load_by_path("clip", "simple_tokenizer.py", "_ref_openai_simple_tokenizer").SimpleTokenizer()


@pytest.fixture(scope="module")
def openclip_ref():
    return _load_by_path("open_clip", "tokenizer.py", "_ref_open_clip_tokenizer").SimpleTokenizer()


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    return get_tokenizer()


def _random_printable(rng: random.Random, n: int) -> list[str]:
    """Strings of printable code points drawn from a mix of scripts, plus some from anywhere in Unicode."""
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
              (0x900, 0x97F), (0xE00, 0xE7F), (0x1E00, 0x1EFF), (0x2000, 0x2BFF), (0x3000, 0x30FF),
              (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0xFB00, 0xFFFD), (0x1F300, 0x1FAFF), (0x20, 0x10FFFF)]
    out = []
    while len(out) < n:
        chars = []
        for _ in range(rng.randint(1, 40)):
            lo, hi = rng.choice(blocks)
            c = chr(rng.randint(lo, hi))
            if c.isprintable():
                chars.append(c)
        out.append("".join(chars))
    return out


HAND_CORPUS = [
    "",
    " ",
    "a photo of a cat",
    "A PHOTO OF A DOG. It's Here!",
    "Hello, world!!! ... ?!?! (parentheses) [brackets] {braces} -- dashes_under_scores",
    "numbers 0 1 42 3.14159 -7 1,000,000 2024-01-31 12:30pm ½ ² ³ ٣ 五",
    "emoji 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "accents: café naïve résumé Zürich São Paulo Ångström crème brûlée",
    "CJK: 日本語のテキスト 中文字符 한국어 문장",
    "greek Ελληνικά, cyrillic Привет мир, arabic مرحبا, hebrew שלום, hindi नमस्ते, thai สวัสดี",
    "html &amp; entities &lt;b&gt;bold&lt;/b&gt; &quot;q&quot; &#39;x&#39; &amp;amp; &nbsp; &eacute;",
    "mojibake: cafÃ© â€œquotedâ€\x9d donâ€™t Ã¼ber",
    "mixed\twhitespace\n\nnew lines\r\n  and   spaces\u00a0nbsp\u2003em\u3000ideo \x0b\x0c end",
    "\n\t leading and trailing \t\n",
    "she's they're we've i'm you'll he'd don't IT'S THEY'RE",
    "'s 't 're 've 'm 'll 'd '''quotes''' ``back`ticks``",
    "https://example.com/path/to/page?query=1&other=two#frag www.test.org user@mail.com",
    "ALL UPPER CASE TEXT WITH MiXeD cAsE",
    "ligatures ﬁ ﬂ ß ẞ İstanbul K Kelvin Å angstrom ͅ ypogegrammeni ᾳ",
    "control\x00chars\x01\x1c\x1d\x1e\x1f\x7f and soft\u00adhyphen zero\u200bwidth",
    "<b>tags</b> <script>alert(1)</script> a</w>b",
    "<p>with a tag ftfy leaves entities alone: &amp;amp; &amp;lt;i&amp;gt; &amp;quot;</p>",
    "supercalifragilisticexpialidocious antidisestablishmentarianism pneumonoultramicroscopic",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "x" * 500,
    " ".join(["the quick brown fox jumps over the lazy dog"] * 30),
    "日本語" * 80,
    "🎉" * 100,
    "!@#$%^&*()_+-=~`|\\;:'\",.<>/? ¡¿ «» „“ ‹›",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return HAND_CORPUS + _random_printable(random.Random(1234), 300)


def test_vocabulary_and_merges_match_openai(tok, openai_ref):
    vocab = tok._vocab
    assert tok.vocab_size == 49408 == len(openai_ref.encoder)
    assert (tok.sot_token_id, tok.eot_token_id) == (49406, 49407)
    # Every regular symbol has the same id; only the names of the two special tokens differ (OpenAI spells
    # them <|startoftext|>, <|endoftext|>).
    assert vocab.tokens[:49406] == [openai_ref.decoder[i] for i in range(49406)]
    assert vocab.ranks == openai_ref.bpe_ranks


def test_encode_matches_both_references(tok, openai_ref, openclip_ref, corpus):
    mismatches = [(i, text) for i, text in enumerate(corpus) if tok.encode(text) != openai_ref.encode(text)]
    assert not mismatches, f"differs from OpenAI on {len(mismatches)} texts, first: {mismatches[0]!r}"
    mismatches = [(i, text) for i, text in enumerate(corpus) if tok.encode(text) != openclip_ref.encode(text)]
    assert not mismatches, f"differs from open_clip on {len(mismatches)} texts, first: {mismatches[0]!r}"


@pytest.mark.parametrize("context_length", [77, 16])
def test_tokenize_matches_both_references(tok, openai_ref, openclip_ref, corpus, context_length):
    ours = tokenize(corpus, context_length=context_length)
    assert ours.dtype == torch.long and ours.shape == (len(corpus), context_length)
    assert torch.equal(ours, openclip_ref(corpus, context_length=context_length))
    # OpenAI's own tokenize() lives in clip/clip.py, which needs torchvision; rebuild it from its encode().
    for n, text in enumerate(corpus):
        ids = [49406, *openai_ref.encode(text), 49407]
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = 49407
        expected = ids + [0] * (context_length - len(ids))
        assert ours[n].tolist() == expected, f"text {n}: {text!r}"


def test_long_texts_are_truncated_to_end_with_eot(tok):
    long_texts = [" ".join(["word"] * 200), "x" * 2000, "日本語" * 100]
    out = tokenize(long_texts)
    assert out.shape == (3, 77)
    assert (out[:, 0] == 49406).all() and (out[:, -1] == 49407).all() and (out != 0).all()
    short = tokenize(["a cat"])
    assert short[0, :4].tolist() == [49406, 320, 2368, 49407] and (short[0, 4:] == 0).all()


def test_literal_special_token_strings_follow_openai(tok, openai_ref, openclip_ref):
    # OpenAI maps the literal strings <|startoftext|> / <|endoftext|> in a caption to the special ids; so do
    # we. open_clip recognises its own spelling (<start_of_text>) instead, so only OpenAI is compared here.
    for text in ["<|endoftext|>", "a <|startoftext|> b <|endoftext|>c", "<end_of_text> <start_of_text>"]:
        assert tok.encode(text) == openai_ref.encode(text), text
    assert tok.encode("x <|endoftext|>") == [343, 49407]
    assert openclip_ref.encode("<end_of_text>") == [49407] != tok.encode("<end_of_text>")


def test_decode_matches_both_references(tok, openai_ref, openclip_ref, corpus):
    for text in corpus:
        ids = tok.encode(text)
        assert tok.decode(ids) == openai_ref.decode(ids) == openclip_ref.decode(ids), text
    rng = random.Random(7)  # arbitrary id sequences, including ones that form invalid UTF-8
    for _ in range(200):
        ids = [rng.randrange(49406) for _ in range(rng.randint(0, 20))]
        assert tok.decode(ids) == openai_ref.decode(ids) == openclip_ref.decode(ids), ids
    with_specials = [49406, 320, 2368, 49407]
    assert tok.decode(with_specials) == openclip_ref.decode(with_specials) == "<start_of_text>a cat <end_of_text>"
    assert tok.decode(torch.tensor(with_specials)) == tok.decode(with_specials)


def test_decode_encode_round_trip_on_clean_text(tok):
    vocab = tok._vocab.tokens
    # Whole words of the vocabulary made of lower-case ASCII letters (token ids 256..511 are single bytes).
    words = [t[:-4] for t in vocab[512:49406] if t.endswith("</w>") and t[:-4].isascii() and t[:-4].isalpha()]
    rng = random.Random(3)
    texts = ["a photo of a cat", "the quick brown fox jumps over the lazy dog", "x"]
    texts += [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(100)]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text + " ", text


def test_get_tokenizer_uses_the_model_context_length(openclip_ref):
    micro = get_tokenizer("ViT-Micro-8-32")
    assert micro.context_length == 16
    texts = ["a photo of a cat", "a very long caption " * 10]
    out = micro(texts)
    assert out.shape == (2, 16) and torch.equal(out, openclip_ref(texts, context_length=16))
    assert micro(texts, context_length=8).shape == (2, 8)
    default = clipforge.get_tokenizer()
    assert default.context_length == 77 and default("a cat").shape == (1, 77)
    assert (default.vocab_size, default.sot_token_id, default.eot_token_id) == (49408, 49406, 49407)
    assert micro.decode(micro.encode("a cat")) == "a cat "
    assert torch.equal(clipforge.tokenize(["a cat"]), default(["a cat"]))
    assert get_tokenizer("ViT-B-32").context_length == 77


def test_piece_memo_is_bounded(tok):
    info = tok._vocab.piece_ids.cache_info()
    assert info.maxsize is not None and 0 < info.maxsize <= 1_000_000


def test_clear_errors(tok, tmp_path):
    with pytest.raises(TypeError, match=r"texts\[1\] is a NoneType"):
        tokenize(["ok", None])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"texts\[0\] is a bytes"):
        tokenize([b"caption"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="expected a str or a list of str, got int"):
        tokenize(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="encode: expected a str, got bytes"):
        tok.encode(b"x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"texts\[1\] is 202 tokens long .* context_length 77"):
        tokenize(["short", " ".join(["word"] * 200)], truncate=False)
    assert tokenize(["word " * 75], truncate=False)[0, -1] == 49407  # exactly 77 tokens fits
    with pytest.raises(ValueError, match="context_length must be an int >= 2"):
        tokenize("a", context_length=1)
    with pytest.raises(ValueError, match=r"ids\[1\] = 49408 is outside the vocabulary"):
        tok.decode([320, 49408])
    with pytest.raises(TypeError, match=r"ids\[0\] is a str"):
        tok.decode(["a"])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="unknown model 'No-Such-Model'"):
        get_tokenizer("No-Such-Model")
    bad = tmp_path / "bad_bpe.txt.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="bad_bpe.txt.gz: cannot read"):
        BPETokenizer(bpe_path=bad)

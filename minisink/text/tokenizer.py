"""Tokenizers for minisink, with no `transformers` or `tokenizers` at runtime.

A model folder ships one of two files, and `load_tokenizer(folder)` picks by which it has:

  tokenizer.model  -> SentencePieceTokenizer: Llama. The `sentencepiece` library does the work.
  tokenizer.json   -> BPETokenizer: GPT-NeoX/Pythia/MPT and Falcon. A hand-written byte-level BPE
                      that reproduces HF `tokenizers` exactly for the options these files use, and
                      refuses (UnsupportedTokenizerError) every option it does not implement.

Both share one interface (class Tokenizer): encode, decode, bos_id, eos_id, vocab_size,
id_to_piece and stream_decoder(). The StreamDecoder at the bottom turns generated ids into text
that is safe to print as it arrives (never half a UTF-8 character), for `--stream`.

How HF `tokenizers` encodes a string, which BPETokenizer.encode follows step by step:

  text ─cut out added tokens─> pieces ─normalize (NFC)─> cut out "normalized" added tokens
       ─pre-tokenize─> words ─bytes as characters, BPE merges─> ids   (added tokens: their id)
"""

import heapq
import json
import re
import sys
import unicodedata
from functools import cache
from pathlib import Path

import sentencepiece


class UnsupportedTokenizerError(ValueError):
    """A tokenizer.json uses a feature minisink does not implement; we refuse rather than guess."""


# ---------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(folder) -> "Tokenizer":
    """The tokenizer of a model folder: tokenizer.model (SentencePiece) or tokenizer.json (BPE).

    A Llama folder from the HF hub has both files; the SentencePiece model is the original and the
    JSON is a conversion of it (Metaspace pre-tokenizer, which the BPE here refuses), so it wins.
    """
    folder = Path(folder)
    if (folder / "tokenizer.model").is_file():
        return SentencePieceTokenizer(folder / "tokenizer.model")
    if (folder / "tokenizer.json").is_file():
        tokenizer = BPETokenizer(folder / "tokenizer.json")
        bos_id, eos_id = _special_ids_from_folder(folder, tokenizer)
        if bos_id is not None:
            tokenizer.bos_id = bos_id
        if eos_id is not None:
            tokenizer.eos_id = eos_id
        return tokenizer
    raise FileNotFoundError(
        f"{folder}: no tokenizer found; expected tokenizer.model (SentencePiece) or "
        f"tokenizer.json (HF tokenizers) in this folder"
    )


def _special_ids_from_folder(folder: Path, tokenizer: "BPETokenizer"):
    """BOS/EOS ids as an HF model folder declares them, or None where it is silent.

    Pythia and MPT declare `bos_token`/`eos_token` ("<|endoftext|>") in tokenizer_config.json and
    special_tokens_map.json; Falcon names only its eos_token there, and its config.json adds
    `bos_token_id: 11` (the same <|endoftext|>). The first file that names a token wins.
    """
    found = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if not path.is_file():
            continue
        config = json.loads(path.read_text(encoding="utf-8"))
        for which in ("bos", "eos"):
            token = config.get(f"{which}_token")
            if isinstance(token, dict):  # a serialized AddedToken: {"content": "<s>", ...}
                token = token.get("content")
            if which not in found and token:
                if token not in tokenizer.piece_to_id:
                    raise ValueError(
                        f"{path}: {which}_token {token!r} is not a token of {tokenizer.path}"
                    )
                found[which] = tokenizer.piece_to_id[token]
    path = folder / "config.json"
    if path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        for which in ("bos", "eos"):
            token_id = config.get(f"{which}_token_id")
            if isinstance(token_id, list):  # several stop tokens (Llama 3): the first is the EOS
                token_id = token_id[0] if token_id else None
            if which not in found and isinstance(token_id, int):
                found[which] = token_id
    return found.get("bos"), found.get("eos")


# ---------------------------------------------------------------------------------------------
# The shared interface


class Tokenizer:
    """What both tokenizers offer.

    encode(text, bos=False) -> ids       bos=True puts bos_id first
    decode(ids) -> text                  special tokens (BOS, EOS, <|endoftext|>) print as nothing
    bos_id, eos_id                       None when the tokenizer has none
    vocab_size                           one more than the largest id
    id_to_piece(id) -> str               the token as the vocabulary spells it ("▁the", "Ġthe")
    stream_decoder() -> StreamDecoder    for printing ids as they are generated
    """

    path: Path
    bos_id: int | None
    eos_id: int | None
    vocab_size: int

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self._encode(text)
        if bos:
            if self.bos_id is None:
                raise ValueError(f"{self.path}: this tokenizer has no BOS token; use bos=False")
            ids.insert(0, self.bos_id)
        return ids

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        raise NotImplementedError

    def _decode_continuation(self, ids: list[int]) -> str:
        """The text of `ids` when they follow tokens that already produced some text."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# SentencePiece (Llama)


class SentencePieceTokenizer(Tokenizer):
    """Llama's tokenizer.model, through the `sentencepiece` library.

    encode() is plain `sentencepiece` encode. llama.cpp's reference cases were made with HF's
    LlamaTokenizer (legacy mode, add_special_tokens=False), and plain sentencepiece reproduces
    all 46 of them, leading spaces included (" Hello" -> "▁▁Hello" after the dummy prefix).
    The one known difference is deliberate: HF cuts "<s>" or "</s>" typed in the text out as
    control tokens, while sentencepiece encodes them as the characters they are. minisink follows
    sentencepiece, so text from a user can never inject a BOS/EOS; use bos=True for a BOS.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(self.path))
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None  # -1 means none
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        # sentencepiece's decode drops the space that starts the first piece ("▁Hello" -> "Hello"),
        # which is right for a whole text but wrong for a piece in the middle of one. To decode a
        # continuation we put a plain piece (no "▁", no byte, not special) in front of it and cut
        # its text off again.
        sp = self._sp
        self._anchor_id = next(
            i
            for i in range(self.vocab_size)
            if not (sp.is_unknown(i) or sp.is_control(i) or sp.is_byte(i) or sp.is_unused(i))
            and "▁" not in sp.id_to_piece(i)
            and sp.decode([i]) == sp.id_to_piece(i) != ""
        )
        self._anchor_text = sp.id_to_piece(self._anchor_id)

    def _encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{self.path}: token id {bad[0]} is not in this vocabulary")
        return self._sp.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def _decode_continuation(self, ids: list[int]) -> str:
        return self._sp.decode([self._anchor_id, *ids])[len(self._anchor_text) :]


# ---------------------------------------------------------------------------------------------
# Byte-level BPE: the building blocks


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 byte values to 256 visible characters, so BPE works on strings.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, ...) are moved
    to U+0100 onwards in byte order, which is why a space shows up as "Ġ" and "\\n" as "Ċ".
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    byte_to_char = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in byte_to_char):
        byte_to_char[b] = chr(256 + n)
    return dict(sorted(byte_to_char.items()))


# str.translate table that takes the text of raw bytes decoded as Latin-1 (one char per byte) to
# the byte-level characters: one C-speed call per word instead of a Python loop over its bytes.
_LATIN1_TO_BYTE_LEVEL = dict(bytes_to_unicode())
_BYTE_LEVEL_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def _to_byte_level(word: str) -> str:
    return word.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_BYTE_LEVEL)


@cache
def _major_categories() -> str:
    """One letter per code point: the first letter of its Unicode general category (L, N, P...)."""
    return "".join(unicodedata.category(chr(cp))[0] for cp in range(sys.maxunicode + 1))


@cache
def _char_class(major: str) -> str:
    """A regex character-class body (no brackets) for one major Unicode category, e.g. "L".

    Python's `re` has no \\p{L}, so we list the code points ourselves, as ranges. Caveat: this
    uses Python's own Unicode tables (14.0 in Python 3.11), while HF `tokenizers` carries newer
    ones (Oniguruma's, 16.0): characters assigned after 14.0 (e.g. CJK Extension H, Kawi) are
    letters to HF and "other" here. No text in the test assets has any.
    """
    runs = re.finditer(f"{major}+", _major_categories())
    return "".join(f"\\U{m.start():08x}-\\U{m.end() - 1:08x}" for m in runs)


# Unicode's White_Space characters: what Oniguruma's \s (the regex engine inside `tokenizers`)
# and Rust's char::is_whitespace match. Python's \s and str.strip() add U+001C..U+001F.
_WHITESPACE_CHARS = "\t\n\x0b\x0c\r\x85 \xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
_WHITESPACE_CHARS += "\u2028\u2029\u202f\u205f\u3000"
_WHITESPACE = re.escape(_WHITESPACE_CHARS)

# The GPT-2 split pattern exactly as `tokenizers` writes it, for reference:
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# Alternatives are tried in order at each position. `\s+(?!\S)` takes a run of whitespace but
# leaves its last character when a word follows, so the word gets its leading space (" world").
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


@cache
def _gpt2_split() -> re.Pattern:
    L, N, S = _char_class("L"), _char_class("N"), _WHITESPACE
    return re.compile(
        rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+"
    )


# Llama 3's split pattern, as its tokenizer.json writes it (a Split step before a regex-less ByteLevel).
# Unlike GPT-2's: contractions in any case, a letter run takes one leading non-letter (not only a
# space), numbers go in groups of at most 3 digits, and line breaks stick to the run before them.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@cache
def _llama3_split() -> re.Pattern:
    # (?i:...) folds case as Oniguruma does for these letters (Python's re also folds "ſ" to "s")
    L, N, S = _char_class("L"), _char_class("N"), _WHITESPACE
    return re.compile(
        rf"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n{L}{N}]?[{L}]+|[{N}]{{1,3}}|"
        rf" ?[^{S}{L}{N}]+[\r\n]*|[{S}]*[\r\n]+|[{S}]+(?![^{S}])|[{S}]+"
    )


@cache
def _punctuation_class() -> str:
    """HF's Punctuation pre-tokenizer: ASCII punctuation (which includes symbols like $+<=>^`|~)
    plus the Unicode punctuation categories. Caveat: HF takes those categories from Unicode 8.0
    (the `unicode_categories` crate), so ~100 marks added since (e.g. U+2E43..U+2E5D) are
    punctuation here but not in HF; none occurs in the test assets."""
    ascii_punctuation = re.escape("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    return ascii_punctuation + _char_class("P")


# ---------------------------------------------------------------------------------------------
# Byte-level BPE: pre-tokenizer steps. Each one splits a string into smaller strings.


def _split_isolated(pattern: re.Pattern, text: str) -> list[str]:
    """Every match of `pattern` becomes its own piece, and so does the text between matches."""
    pieces, start = [], 0
    for m in pattern.finditer(text):
        if m.start() > start:
            pieces.append(text[start : m.start()])
        pieces.append(m.group())
        start = m.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


class _Punctuation:
    """Cuts punctuation away from the rest: "Hello,world!!" -> Hello | , | world | !!"""

    def __init__(self, contiguous: bool):
        P = _punctuation_class()
        # "contiguous": a run of punctuation stays one piece; "isolated": one piece per mark.
        self._pattern = re.compile(f"[{P}]+|[^{P}]+" if contiguous else f"[{P}]|[^{P}]+")

    def __call__(self, text: str) -> list[str]:
        return self._pattern.findall(text)


class _Digits:
    """Cuts runs of digits away from the rest ("abc123" -> abc | 123), or each digit alone."""

    def __init__(self, individual: bool):
        # Rust's char::is_numeric: Nd, Nl, No. Falcon runs this after ByteLevel, on byte-level
        # characters, where byte 0xB2 is "²" and so a digit: HF splits there too.
        N = _char_class("N")
        self._pattern = re.compile(f"[{N}]|[^{N}]+" if individual else f"[{N}]+|[^{N}]+")

    def __call__(self, text: str) -> list[str]:
        return self._pattern.findall(text)


class _Split:
    """HF's Split pre-tokenizer with behavior "Isolated": matches become pieces of their own."""

    def __init__(self, pattern: re.Pattern):
        self._pattern = pattern

    def __call__(self, text: str) -> list[str]:
        return _split_isolated(self._pattern, text)


# Regexes of Split pre-tokenizers that we know mean the same in Python's `re` as in Oniguruma.
# Any other is refused: a regex silently read differently would mis-tokenize without a sound.
_KNOWN_SPLIT_REGEXES = {
    "[0-9][0-9][0-9]": lambda: re.compile("[0-9][0-9][0-9]"),  # Falcon: numbers in groups of 3
    GPT2_PATTERN: _gpt2_split,
    LLAMA3_PATTERN: _llama3_split,  # Llama 3, 3.1, 3.2
}


# ---------------------------------------------------------------------------------------------
# Byte-level BPE: added tokens


class _AddedTokens:
    """Finds added tokens (e.g. <|endoftext|>) in text, before the pre-tokenizer may split them.

    Like HF: the leftmost match wins, and the longest one among matches that start there (an
    alternation of the tokens sorted longest first gives exactly that). The flags work as in
    HF's AddedVocabulary::find_matches: `single_word` only matches outside a word, `lstrip` and
    `rstrip` also swallow the whitespace before / after the token.
    """

    def __init__(self, tokens: list[dict]):
        self._tokens = {t["content"]: t for t in tokens}
        contents = sorted(self._tokens, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, contents))) if contents else None

    def split(self, text: str) -> list[tuple[str, int | None]]:
        """`text` cut into (piece, None) and (token text, token id), in order."""
        if self._pattern is None:
            return [(text, None)]
        pieces, done = [], 0  # text[:done] is in `pieces`
        for m in self._pattern.finditer(text):
            token = self._tokens[m.group()]
            start, stop = m.start(), m.end()
            if token["single_word"] and (
                (start > 0 and _is_word_char(text[start - 1]))
                or (stop < len(text) and _is_word_char(text[stop]))
            ):
                continue  # "cat" in "concat" is not the single word "cat"
            if token["lstrip"]:
                while start > done and text[start - 1] in _WHITESPACE_CHARS:
                    start -= 1
            if token["rstrip"]:
                while stop < len(text) and text[stop] in _WHITESPACE_CHARS:
                    stop += 1
            if start > done:
                pieces.append((text[done:start], None))
            pieces.append((text[start:stop], token["id"]))
            done = stop
        if done < len(text):
            pieces.append((text[done:], None))
        return pieces


def _is_word_char(c: str) -> bool:
    """Rust regex's \\w, which HF uses here: letters, marks, Nd, Nl, Pc (as "_"), ZWNJ, ZWJ."""
    category = unicodedata.category(c)
    return category[0] in "LM" or category in ("Nd", "Nl", "Pc") or c in "\u200c\u200d"



# ---------------------------------------------------------------------------------------------
# Byte-level BPE: the tokenizer


_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD"}
_ADDED_TOKEN_DEFAULTS = dict(
    special=False, single_word=False, lstrip=False, rstrip=False, normalized=True
)


class BPETokenizer(Tokenizer):
    """Byte-level BPE read from an HF tokenizer.json (GPT-NeoX/Pythia/MPT, Falcon)."""

    def __init__(self, path):
        self.path = Path(path)
        spec = json.loads(self.path.read_text(encoding="utf-8"))
        for field in ("model", "normalizer", "pre_tokenizer", "post_processor", "decoder"):
            if field not in spec:
                raise UnsupportedTokenizerError(f"{self.path}: no `{field}`; not an HF tokenizer.json?")
        for field in ("truncation", "padding"):  # both would change what encode() returns
            if spec.get(field) is not None:
                self._refuse(field, spec[field], "null")
        self._read_model(spec["model"])
        self._normalizer = self._read_normalizer(spec["normalizer"], "normalizer")
        added = self._read_added_tokens(spec.get("added_tokens") or [])
        steps = self._read_pre_tokenizer(spec["pre_tokenizer"])
        self._text_steps, self._byte_level, self._word_steps = steps
        if spec["decoder"] is None or spec["decoder"].get("type") != "ByteLevel":
            # (HF's ByteLevel decoder ignores its add_prefix_space and trim_offsets.)
            self._refuse("decoder", spec["decoder"], "ByteLevel")

        self.piece_to_id: dict[str, int] = {**self._vocab, **{t["content"]: t["id"] for t in added}}
        self.vocab_size = max(self.piece_to_id.values()) + 1
        self._pieces: list[str | None] = [None] * self.vocab_size
        for piece, i in self.piece_to_id.items():
            self._pieces[i] = piece
        # The bytes each id decodes to. Special tokens decode to nothing, like `tokenizers`'
        # decode (skip_special_tokens=True) and like sentencepiece, which drops <s> and </s>.
        # A token that is not all byte-level characters (GPT-NeoX's added "  ") stands for its
        # own UTF-8 text, as in HF's ByteLevel decoder.
        special = {t["id"] for t in added if t["special"]}
        self._token_bytes: list[bytes | None] = [
            None if piece is None
            else b"" if i in special
            else bytes(map(_BYTE_LEVEL_TO_BYTE.get, piece)) if set(piece) <= _BYTE_LEVEL_TO_BYTE.keys()
            else piece.encode("utf-8")
            for i, piece in enumerate(self._pieces)
        ]

        # BOS/EOS: where a TemplateProcessing puts them, else <|endoftext|>, which both starts and
        # ends text in GPT-2's convention, kept by GPT-NeoX and Falcon. load_tokenizer() lets the
        # model folder's config files override these.
        self.bos_id, self.eos_id = self._read_post_processor(spec["post_processor"], "post_processor")
        endoftext = [t["id"] for t in added if t["content"] == "<|endoftext|>" and t["special"]]
        endoftext = endoftext[0] if endoftext else None
        self.bos_id = endoftext if self.bos_id is None else self.bos_id
        self.eos_id = endoftext if self.eos_id is None else self.eos_id

        # Memo of already-encoded words: a book has ~300K words but only ~25K distinct ones.
        self._cache: dict[str, list[int]] = {}

    # -- encode ---------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        ids = []
        for piece, token_id in self._raw_added.split(text):
            if token_id is not None:
                ids.append(token_id)
                continue
            for piece, token_id in self._normalized_added.split(self._normalize(piece)):
                if token_id is not None:
                    ids.append(token_id)
                    continue
                for word in self._pre_tokenize(piece):
                    word_ids = self._cache.get(word)
                    if word_ids is None:
                        if len(self._cache) > 1_000_000:  # bound the memory of a long-lived process
                            self._cache.clear()
                        word_ids = self._cache[word] = self._encode_word(word)
                    ids += word_ids
        return ids

    def _normalize(self, text: str) -> str:
        for form in self._normalizer:
            text = unicodedata.normalize(form, text)
        return text

    def _pre_tokenize(self, text: str) -> list[str]:
        """Cut text into words, still as plain text: the steps up to and including ByteLevel."""
        pieces = [text] if text else []
        for step in self._text_steps:
            pieces = [p for piece in pieces for p in step(piece)]
        add_prefix_space, split = self._byte_level
        words = []
        for piece in pieces:
            # Done per piece, as HF does, so a piece after an added token gets a space too.
            if add_prefix_space and not piece.startswith(" "):
                piece = " " + piece
            words += split.findall(piece) if split else [piece]
        return words

    def _encode_word(self, word: str) -> list[int]:
        """Map a word to byte-level characters, apply the steps after ByteLevel, then BPE."""
        parts = [_to_byte_level(word)]
        for step in self._word_steps:
            parts = [p for part in parts for p in step(part)]
        return [i for part in parts for i in self._bpe(part)]

    def _bpe(self, word: str) -> list[int]:
        """Start from single characters and keep joining the neighbouring pair whose merge was
        learned first (lowest rank; leftmost on a tie) until no neighbouring pair has a merge.

        GPT-2's encoder.py rescans every pair after each merge, which is quadratic in the
        word's length (5 s for a 20,000-character word). Like HF we keep the candidate merges
        in a heap and the parts in a linked list instead; a heap entry whose parts have changed
        since it was pushed is stale and skipped.
        """
        if self._ignore_merges and word in self._vocab:
            return [self._vocab[word]]
        ranks = self._ranks
        parts: list[str | None] = [c for c in word if c in self._vocab]  # drop bytes it lacks
        n = len(parts)
        after = list(range(1, n + 1))  # after[i]: index of the part after part i (n: none)
        before = list(range(-1, n - 1))  # before[i]: index of the part before it (-1: none)
        heap = [(ranks[pair], i) for i, pair in enumerate(zip(parts, parts[1:])) if pair in ranks]
        heapq.heapify(heap)
        while heap:
            rank, i = heapq.heappop(heap)
            j = after[i]
            if parts[i] is None or j == n or ranks.get((parts[i], parts[j])) != rank:
                continue  # stale
            parts[i], parts[j] = parts[i] + parts[j], None  # part j joins part i
            after[i] = after[j]
            if after[i] < n:
                before[after[i]] = i
            for a, b in ((before[i], i), (i, after[i])):  # the new part's two new neighbour pairs
                if a >= 0 and b < n and (parts[a], parts[b]) in ranks:
                    heapq.heappush(heap, (ranks[parts[a], parts[b]], a))
        return [self._vocab[p] for p in parts if p is not None]

    # -- decode ---------------------------------------------------------------------------------

    def decode(self, ids) -> str:
        return b"".join(self._bytes_of(i) for i in ids).decode("utf-8", errors="replace")

    def _decode_continuation(self, ids: list[int]) -> str:
        return self.decode(ids)  # byte-level BPE has no leading-space rule: a token is its bytes

    def _bytes_of(self, token_id) -> bytes:
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size or self._token_bytes[token_id] is None:
            raise ValueError(f"{self.path}: token id {token_id} is not in this vocabulary")
        return self._token_bytes[token_id]

    def id_to_piece(self, token_id: int) -> str:
        self._bytes_of(token_id)  # the range check
        return self._pieces[int(token_id)]

    # -- reading tokenizer.json, refusing what is not implemented --------------------------------

    def _refuse(self, field: str, value, supported: str):
        raise UnsupportedTokenizerError(
            f"{self.path}: {field} = {json.dumps(value, ensure_ascii=False)} is not supported by "
            f"minisink's byte-level BPE (supported: {supported})"
        )

    def _read_model(self, model: dict):
        """The vocabulary and the merges. A merge "a b" (["a", "b"] in newer files) says: where a
        and b are neighbours, join them; merges earlier in the list were learned first."""
        if model.get("type", "BPE") != "BPE":
            self._refuse("model.type", model.get("type"), '"BPE"')
        if model.get("dropout") is not None:  # random merges skipped at training time
            self._refuse("model.dropout", model["dropout"], "null")
        for field in ("continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(field):
                self._refuse(f"model.{field}", model[field], 'null or ""')
        self._vocab: dict[str, int] = model["vocab"]
        self._ranks: dict[tuple[str, str], int] = {}
        for rank, merge in enumerate(model["merges"]):
            pair = tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge)
            if len(pair) != 2 or pair[0] + pair[1] not in self._vocab:
                self._refuse(f"model.merges[{rank}]", merge, "two tokens whose concatenation is a token")
            self._ranks[pair] = rank
        # With ignore_merges (Llama 3), a word that is itself in the vocabulary is one token.
        self._ignore_merges = model.get("ignore_merges", False)
        # Byte-level BPE starts from one token per byte, but a vocabulary may lack a few: Falcon
        # has none for 14 control bytes (0x03, 0x04, ...), GPT-NeoX none for C0, C1 and F5..FF,
        # which UTF-8 never uses. With unk_token null, HF drops such a byte without a word, and
        # so does _bpe. An unk_token or byte_fallback would stand in for it: not implemented.
        # (Where no byte is missing, they never come into play, so they are accepted.)
        missing = [f"{b:#04x}" for b, c in bytes_to_unicode().items() if c not in self._vocab]
        for field in ("unk_token", "byte_fallback"):
            if missing and model.get(field):
                self._refuse(f"model.{field}", model[field], f"null/false: model.vocab lacks {missing}")

    def _read_normalizer(self, spec, field: str) -> list[str]:
        """The Unicode normalization forms to apply, in order."""
        if spec is None:
            return []
        if spec.get("type") == "Sequence":
            parts = enumerate(spec["normalizers"])
            return [f for i, s in parts for f in self._read_normalizer(s, f"{field}.normalizers[{i}]")]
        if spec.get("type") in _NORMALIZERS:
            return [spec["type"]]
        self._refuse(f"{field}.type", spec.get("type"), "null, NFC, NFD, NFKC, NFKD, a Sequence of them")

    def _read_added_tokens(self, tokens: list[dict]) -> list[dict]:
        """Added tokens: specials like <|endoftext|>, and GPT-NeoX's runs of 2 to 24 spaces.
        Those with normalized=false are looked for in the raw text, the others in the text after
        the normalizer, so their own content is normalized too (HF decodes them that way too)."""
        added = [{**_ADDED_TOKEN_DEFAULTS, **t} for t in tokens]
        for i, t in enumerate(added):
            # HF takes the id of an added token that is also in the vocabulary from the vocabulary
            # (with a warning); a file where the two disagree is broken.
            if self._vocab.get(t["content"], t["id"]) != t["id"]:
                in_vocab = self._vocab[t["content"]]
                self._refuse(f"added_tokens[{i}].id", t["id"], f"{in_vocab}, its id in model.vocab")
            if t["normalized"]:
                t["content"] = self._normalize(t["content"])
        self._raw_added = _AddedTokens([t for t in added if not t["normalized"]])
        self._normalized_added = _AddedTokens([t for t in added if t["normalized"]])
        return added

    def _read_pre_tokenizer(self, spec):
        """Returns (steps before ByteLevel, ByteLevel's (add_prefix_space, regex or None), steps
        after it). The steps after ByteLevel see byte-level characters and work on one word at
        a time, so the memo of encoded words covers them."""
        supported = "ByteLevel, or a Sequence of one ByteLevel and Punctuation, Digits, Split"
        if spec is None:
            self._refuse("pre_tokenizer", None, supported)
        in_sequence = spec.get("type") == "Sequence"
        before, byte_level, after = [], None, []
        for i, step in enumerate(spec["pretokenizers"] if in_sequence else [spec]):
            where = f"pre_tokenizer.pretokenizers[{i}]" if in_sequence else "pre_tokenizer"
            kind = step.get("type")
            if kind == "ByteLevel" and byte_level is None:
                use_regex = step.get("use_regex", True)  # absent in older files, such as NeoX's
                byte_level = (step.get("add_prefix_space", False), _gpt2_split() if use_regex else None)
                continue
            if kind == "Punctuation":
                behavior = step.get("behavior", "Isolated")
                if behavior not in ("Isolated", "Contiguous"):
                    self._refuse(f"{where}.behavior", behavior, '"Isolated", "Contiguous"')
                split = _Punctuation(contiguous=behavior == "Contiguous")
            elif kind == "Digits":
                split = _Digits(individual=step.get("individual_digits", False))
            elif kind == "Split":
                split = self._read_split(step, where)
            else:
                self._refuse(f"{where}.type", kind, supported)
            (before if byte_level is None else after).append(split)
        if byte_level is None:
            self._refuse("pre_tokenizer", spec, supported)
        return before, byte_level, after

    def _read_split(self, step: dict, where: str) -> _Split:
        if step.get("behavior") != "Isolated":
            self._refuse(f"{where}.behavior", step.get("behavior"), '"Isolated"')
        if step.get("invert", False):
            self._refuse(f"{where}.invert", step["invert"], "false")
        pattern = step.get("pattern", {})
        if "String" in pattern:
            return _Split(re.compile(re.escape(pattern["String"])))
        if pattern.get("Regex") in _KNOWN_SPLIT_REGEXES:
            return _Split(_KNOWN_SPLIT_REGEXES[pattern["Regex"]]())
        self._refuse(f"{where}.pattern", pattern, f"a String, a Regex in {list(_KNOWN_SPLIT_REGEXES)}")

    def _read_post_processor(self, spec, field: str):
        """(bos_id, eos_id) that a TemplateProcessing puts around one text, or None for each.

        encode(bos=True) adds only the BOS: the decode loop treats EOS as a stop signal."""
        if spec is None or spec.get("type") == "ByteLevel":  # ByteLevel only trims offsets
            return None, None
        if spec.get("type") == "Sequence":
            items = enumerate(spec["processors"])
            found = [self._read_post_processor(s, f"{field}.processors[{i}]") for i, s in items]
            return next((f for f in found if f != (None, None)), (None, None))
        if spec.get("type") != "TemplateProcessing":
            supported = "null, ByteLevel, TemplateProcessing, Sequence"
            self._refuse(f"{field}.type", spec.get("type"), supported)
        # "single" is the template for one text: [<s>, $A] (Llama 2), [$A, </s>], [<s>, $A, </s>]:
        # [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
        single = spec["single"]
        is_text = ["Sequence" in item for item in single]
        if is_text.count(True) != 1 or len(single) > 3 or (len(single) == 3 and not is_text[1]):
            self._refuse(f"{field}.single", single, "$A with at most one special token either side")
        names = [item["SpecialToken"]["id"] for item in single if "SpecialToken" in item]
        ids = [spec["special_tokens"][name]["ids"] for name in names]
        if any(len(i) != 1 for i in ids):
            self._refuse(f"{field}.special_tokens", spec["special_tokens"], "one id per special token")
        a = is_text.index(True)
        return (ids[0][0] if a > 0 else None), (ids[-1][0] if a < len(single) - 1 else None)


# ---------------------------------------------------------------------------------------------
# Streaming detokenization


class StreamDecoder:
    """Text to print as generated tokens arrive, equal in the end to decode(all tokens).

        decoder = tokenizer.stream_decoder()
        for token_id in generated:
            print(decoder.push(token_id), end="", flush=True)
        print(decoder.flush())

    Decoding token by token goes wrong in two ways: a character made of several byte tokens
    ("<0xE2><0x82><0xAC>" is "€") would print as replacement marks U+FFFD, and SentencePiece
    drops the leading space of whichever token it decodes first. So we keep the tokens since the
    last point where the text was complete (`_pending`), decode just those each push, print what
    is new, and hold back a trailing U+FFFD, which may still become a character. Once the text of
    `_pending` ends in a complete character we start afresh: per-token work stays small, however
    long the stream. Until some text has come out, `_pending` holds everything from the first
    token and is decoded like a whole text (that is where SentencePiece drops the space).
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._pending: list[int] = []
        self._printed = ""  # what we already returned of the text of `_pending`
        self._started = False  # has any text been completed (so tokens are a continuation)?

    def _text(self) -> str:
        if self._started:
            return self._tokenizer._decode_continuation(self._pending)
        return self._tokenizer.decode(self._pending)

    def push(self, token_id: int) -> str:
        self._pending.append(int(token_id))
        text = self._text()
        # Everything but a trailing run of U+FFFD is final. (Python's and sentencepiece's UTF-8
        # decoders both work left to right, so later bytes cannot change earlier characters.)
        stable = text.rstrip("\ufffd")
        new = stable[len(self._printed) :]
        self._printed = stable
        if stable == text and (text or self._started):
            self._pending, self._printed, self._started = [], "", True
        return new

    def flush(self) -> str:
        """The held-back rest (replacement marks for bytes that never formed a character)."""
        rest = self._text()[len(self._printed) :] if self._pending else ""
        self._pending, self._printed = [], ""
        return rest

"""minisink.text.tokenizer against its oracles: `tokenizers` (for tokenizer.json), `sentencepiece`
(for tokenizer.model) and llama.cpp's reference cases. The oracles are test-only imports.

The real tokenizers and texts come from ../shared/assets (see its README); tests that need them
skip when it is absent, as on a fresh clone.
"""

import json
import random
import string
import sys
import time
import unicodedata
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minisink.generate import first_token
from minisink.text.tokenizer import (
    BPETokenizer,
    SentencePieceTokenizer,
    UnsupportedTokenizerError,
    _to_byte_level,
    bytes_to_unicode,
    load_tokenizer,
)

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
pytestmark = pytest.mark.skipif(
    not ASSETS.is_dir(), reason=f"offline assets not found at {ASSETS} (they live beside the repo)"
)

TOKENIZERS = ASSETS / "tokenizers"
BOOKS = ["moby_dick", "crime_and_punishment", "tinyshakespeare", "tinystories_val_sample"]
JSON_NAMES = ["gpt-neox-20b", "falcon", "llama3"]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- loading, once per session (a tokenizer.json takes ~0.5 s to read) --------------------------


@cache
def ours(name: str):
    if name == "llama2":
        return load_tokenizer(TOKENIZERS / "llama2")
    if name == "stories260K":
        return load_tokenizer(ASSETS / "models" / "stories260K")
    return load_tokenizer(TOKENIZERS / name)


@cache
def oracle(name: str):
    """The library that minisink must agree with, for a tokenizer folder name."""
    if name in ("llama2", "stories260K"):
        import sentencepiece

        path = TOKENIZERS / "llama2" if name == "llama2" else ASSETS / "models" / "stories260K"
        return sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(str(TOKENIZERS / name / "tokenizer.json"))


def oracle_encode(name: str, text: str, bos: bool = False) -> list[int]:
    if name in ("llama2", "stories260K"):
        return oracle(name).encode(text, add_bos=bos)
    return oracle(name).encode(text, add_special_tokens=bos).ids


@cache
def book(name: str) -> str:
    return (ASSETS / "text" / f"{name}.txt").read_text(encoding="utf-8")


def tokenizer_json(name: str) -> dict:
    return json.loads((TOKENIZERS / name / "tokenizer.json").read_text(encoding="utf-8"))


def write_variant(tmp_path: Path, name: str, edit) -> Path:
    """A modified copy of a shipped tokenizer.json: `edit` changes the parsed dict in place."""
    spec = tokenizer_json(name)
    edit(spec)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return path


# -- llama.cpp's reference cases ---------------------------------------------------------------


def reference_cases(name: str):
    """(text, ids) pairs: .inp has texts each followed by a separator, .out a line of ids each."""
    folder = TOKENIZERS / "testcases"
    texts = (folder / f"{name}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    lines = (folder / f"{name}.out").read_text(encoding="utf-8").split("\n")
    assert texts[-1] == "", "each case is followed by the separator, so the last piece is empty"
    texts = texts[:-1]
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines)]


@pytest.mark.parametrize("cases, name", [("llama-spm", "llama2"), ("gpt-neox-20b",) * 2, ("falcon",) * 2])
def test_reference_cases(cases, name):
    """llama-spm's ids come from HF's LlamaTokenizer; plain sentencepiece gives all of them."""
    pairs = reference_cases(cases)
    assert len(pairs) == 46
    got = [ours(name).encode(text) for text, _ in pairs]
    wrong = [(text, mine, ids) for (text, ids), mine in zip(pairs, got) if mine != ids]
    assert wrong == [], f"{len(wrong)} of 46 {cases} cases differ; first: {wrong[:1]}"


@pytest.mark.parametrize("cases", ["llama-spm", "gpt-neox-20b", "falcon"])
def test_reference_strings_llama3(cases):
    """llama.cpp has no .out of ids for this Llama-3.2 file, so its 46 x 3 reference strings (made to
    reach the corners of these pre-tokenizers) are checked against `tokenizers` instead."""
    texts = [text for text, _ in reference_cases(cases)]
    wrong = [text for text in texts if ours("llama3").encode(text) != oracle_encode("llama3", text)]
    assert wrong == []


def test_llama3_bos_is_begin_of_text():
    tok = ours("llama3")
    assert tok.id_to_piece(tok.bos_id) == "<|begin_of_text|>" and tok.id_to_piece(tok.eos_id) == "<|end_of_text|>"
    assert tok.encode("Hi there", bos=True) == oracle_encode("llama3", "Hi there", bos=True)


# -- whole books against the libraries ----------------------------------------------------------


@pytest.mark.parametrize("name", [*JSON_NAMES, "llama2"])
@pytest.mark.parametrize("book_name", BOOKS)
def test_books_match_library_and_round_trip(name, book_name):
    text = book(book_name)
    ids = ours(name).encode(text)
    want = oracle_encode(name, text)
    if ids != want:
        i = next((i for i, (a, b) in enumerate(zip(ids, want)) if a != b), min(len(ids), len(want)))
        pytest.fail(f"{name} on {book_name}: token {i} on differs: {ids[i:i + 5]} != {want[i:i + 5]}")
    assert ours(name).decode(ids) == text  # lossless: no normalizer changes these texts


# -- the hand-written pre-tokenizer, character by character --------------------------------------


def test_gpt2_split_agrees_with_tokenizers_on_every_assigned_code_point():
    """Every character Python's Unicode tables know (category not Cn; private-use ones only at
    the ends of their blocks), after a letter, a digit, a mark, a space, a newline and "'".
    Characters assigned after Unicode 14.0 differ (see _char_class), so they are left out."""
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    ours_neox = ours("gpt-neox-20b")
    assigned = (chr(cp) for cp in range(sys.maxunicode + 1))
    chars = [c for c in assigned if unicodedata.category(c) not in ("Cn", "Cs", "Co")]
    chars += ["\ue000", "\uf8ff", "\U000f0000", "\U000ffffd", "\U00100000", "\U0010fffd"]
    for start in range(0, len(chars), 25_000):
        text = "".join(f"a{c}1{c}!{c} {c}\n{c}'{c}" for c in chars[start : start + 25_000])
        want = [piece for piece, _ in hf.pre_tokenize_str(text)]
        got = [_to_byte_level(word) for word in ours_neox._pre_tokenize(text)]
        assert got == want, f"split differs in code points {ord(chars[start]):#x}.."


def test_llama3_split_agrees_with_tokenizers_on_every_assigned_code_point():
    """As above, for Llama 3's pattern; the surroundings also reach its case-insensitive
    contractions ("'S"), groups of digits and line breaks that stick to what precedes them."""
    hf = oracle("llama3").pre_tokenizer
    llama3 = ours("llama3")
    assigned = (chr(cp) for cp in range(sys.maxunicode + 1))
    chars = [c for c in assigned if unicodedata.category(c) not in ("Cn", "Cs", "Co")]
    for start in range(0, len(chars), 25_000):
        text = "".join(f"a{c}1234{c}!{c} {c}\r\n{c}'S{c}" for c in chars[start : start + 25_000])
        want = [piece for piece, _ in hf.pre_tokenize_str(text)]
        got = [_to_byte_level(word) for word in llama3._pre_tokenize(text)]
        assert got == want, f"split differs in code points {ord(chars[start]):#x}.."


def test_punctuation_agrees_with_tokenizers():
    """HF's Punctuation uses Unicode 8.0 categories (see _punctuation_class), so we compare on the
    characters of Unicode 3.2, which Python still ships; U+166D moved from Po to So in Unicode 12."""
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.pre_tokenizers.Punctuation(behavior="contiguous")
    falcon = ours("falcon")
    chars = [
        chr(cp)
        for cp in range(sys.maxunicode + 1)
        if unicodedata.ucd_3_2_0.category(chr(cp)) not in ("Cn", "Cs") and cp != 0x166D
    ]
    text = "".join(f"a{c}b{c}{c}" for c in chars)
    assert falcon._text_steps[0](text) == [piece for piece, _ in hf.pre_tokenize_str(text)]


# -- random text against the library ------------------------------------------------------------

# Characters chosen to reach every rule: letters, digits (Falcon's groups of 3), punctuation,
# apostrophes (contractions), all kinds of whitespace, bytes Falcon's vocabulary lacks (0x03),
# multi-byte characters, and added tokens (NeoX's runs of spaces, <|endoftext|>).
ALPHABET = list("aZé ßs'tdmlrev019 .,!?$+-_()«»—…²½Ⅻあ你🦙\u200d\u0301")
ALPHABET += list("  \t\n\r\x0b\x03\x1c\x85\xa0\u3000")
WORDS = ["<|endoftext|>", "<|padding|>", ">>TITLE<<", "<|begin_of_text|>", "'s", "'re", "'LL", "1234567", "  ", "    x", "e\u0301"]
PIECES = st.sampled_from(ALPHABET + WORDS)


@pytest.mark.parametrize("name", JSON_NAMES)
@SETTINGS
@given(pieces=st.lists(PIECES, max_size=40))
def test_random_text_matches_library(name, pieces):
    text = "".join(pieces)
    assert ours(name).encode(text) == oracle_encode(name, text)


@pytest.mark.parametrize("name", JSON_NAMES)
@SETTINGS
@given(data=st.data())
def test_random_ids_decode_like_library(name, data):
    """Including special tokens (dropped, as `tokenizers` does by default) and broken UTF-8."""
    tok = ours(name)
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=30))
    assert tok.decode(ids) == oracle(name).decode(ids)


def test_long_word_is_exact_and_fast():
    """A 100,000-letter word (say, a pasted blob): BPE keeps its candidate merges in a heap, so
    this takes well under a second; rescanning the word after every merge would take minutes."""
    word = "".join(random.Random(0).choices(string.ascii_letters, k=100_000))
    tok = BPETokenizer(TOKENIZERS / "gpt-neox-20b" / "tokenizer.json")  # an empty memo
    start = time.perf_counter()
    ids = tok.encode(word)
    assert time.perf_counter() - start < 10
    assert ids == oracle_encode("gpt-neox-20b", word)


def test_sentencepiece_reads_control_tokens_as_text():
    """Unlike HF's LlamaTokenizer (see SentencePieceTokenizer), "<s>" typed in text is text."""
    llama = ours("llama2")
    assert llama.encode("<s>hi</s>") == oracle_encode("llama2", "<s>hi</s>") != [1, 7251, 2]
    assert llama.encode("hi", bos=True) == oracle_encode("llama2", "hi", bos=True) == [1, 7251]
    assert llama.decode([1, 7251, 2]) == "hi" and llama.id_to_piece(7251) == "▁hi"


# -- the options the shipped files do not use, on modified copies --------------------------------


def compare_on(path: Path, texts, bos: bool = False):
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(path))
    tok = BPETokenizer(path)
    for text in texts:
        assert tok.encode(text, bos=bos) == hf.encode(text, add_special_tokens=bos).ids, repr(text)
        ids = hf.encode(text).ids
        assert tok.decode(ids) == hf.decode(ids)
    return tok


@cache
def sample_texts() -> list[str]:
    extra = ["a<|endoftext|>b", "<|endoftext|>Hello<|endoftext|> world", "x   <|padding|>   y"]
    return [text for text, _ in reference_cases("gpt-neox-20b")] + extra


def test_add_prefix_space_true(tmp_path):
    """HF adds the space to every piece between added tokens, not just to the start."""

    def edit(spec):
        spec["pre_tokenizer"]["add_prefix_space"] = True

    texts = sample_texts() + [book("tinystories_val_sample")[:20_000]]
    compare_on(write_variant(tmp_path, "gpt-neox-20b", edit), texts)


def test_ignore_merges(tmp_path):
    def edit(spec):
        spec["model"]["ignore_merges"] = True

    compare_on(write_variant(tmp_path, "gpt-neox-20b", edit), sample_texts())


def test_merges_as_pairs_read_like_strings(tmp_path):
    def edit(spec):
        spec["model"]["merges"] = [merge.split(" ") for merge in spec["model"]["merges"]]

    tok = BPETokenizer(write_variant(tmp_path, "gpt-neox-20b", edit))
    for text in sample_texts():
        assert tok.encode(text) == ours("gpt-neox-20b").encode(text)


def test_added_token_flags(tmp_path):
    def edit(spec):
        special = dict(single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
        plain = {**special, "normalized": True, "special": False}
        spec["added_tokens"] += [
            {**special, "id": 50277, "content": "<L>", "lstrip": True},
            {**special, "id": 50278, "content": "<R>", "rstrip": True},
            {**plain, "id": 50279, "content": "qzx", "single_word": True},
            {**plain, "id": 50280, "content": "e\u0301q"},  # normalized: NFC turns it into "éq"
        ]

    texts = [
        "a <L> b",
        "a\t\u3000 <L>b <L><L>",
        "x <R>   y<R>\n\nz<R>",
        "  <L>  <R>  ",
        "qzx conqzx qzx's _qzx qzxes (qzx) qzx_ 3qzx ²qzx \u0301qzx \u200dqzx Ⅻqzx ‿qzx qzx",
        "e\u0301q caféq cafe\u0301q\u0301",
    ]
    compare_on(write_variant(tmp_path, "gpt-neox-20b", edit), texts)


def test_template_post_processor_gives_bos(tmp_path):
    def edit(spec):
        bos = {"SpecialToken": {"id": "<|padding|>", "type_id": 0}}
        a, b = {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}
        spec["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [bos, a],
            "pair": [bos, a, b],
            "special_tokens": {"<|padding|>": {"id": "<|padding|>", "ids": [1],
                                              "tokens": ["<|padding|>"]}},
        }

    tok = compare_on(write_variant(tmp_path, "gpt-neox-20b", edit), sample_texts(), bos=True)
    assert (tok.bos_id, tok.eos_id) == (1, 0)  # EOS falls back to <|endoftext|>


# -- refusals -----------------------------------------------------------------------------------


def set_field(path: str, value):
    def edit(spec):
        *parents, last = path.split(".")
        node = spec
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[int(last) if last.isdigit() else last] = value

    return edit


NEOX, FALCON, SPLIT = "gpt-neox-20b", "falcon", "pre_tokenizer.pretokenizers"
REFUSALS = [  # (file, field to change, new value, what the error must say)
    (NEOX, "model.type", "WordPiece", 'model.type = "WordPiece"'),
    (NEOX, "model.dropout", 0.1, "model.dropout = 0.1"),
    (NEOX, "model.continuing_subword_prefix", "##", 'model.continuing_subword_prefix = "##"'),
    (NEOX, "model.end_of_word_suffix", "</w>", 'model.end_of_word_suffix = "</w>"'),
    (FALCON, "model.unk_token", "<unk>", 'model.unk_token = "<unk>"'),  # Falcon lacks some bytes
    (FALCON, "model.byte_fallback", True, "model.byte_fallback = true"),
    (NEOX, "normalizer", {"type": "Lowercase"}, 'normalizer.type = "Lowercase"'),
    (NEOX, "pre_tokenizer", {"type": "Whitespace"}, 'pre_tokenizer.type = "Whitespace"'),
    (NEOX, "pre_tokenizer", None, "pre_tokenizer = null"),
    (FALCON, f"{SPLIT}.3.pattern", {"Regex": "\\p{L}+"}, '[3].pattern = {"Regex": "\\\\p{L}+"}'),
    (FALCON, f"{SPLIT}.3.behavior", "Removed", 'pretokenizers[3].behavior = "Removed"'),
    (FALCON, f"{SPLIT}.0.behavior", "MergedWithNext", 'pretokenizers[0].behavior = "MergedWithNext"'),
    (NEOX, "decoder", {"type": "Metaspace"}, 'decoder = {"type": "Metaspace"}'),
    (NEOX, "post_processor", {"type": "BertProcessing"}, 'post_processor.type = "BertProcessing"'),
    (NEOX, "truncation", {"max_length": 512}, 'truncation = {"max_length": 512}'),
    (NEOX, "added_tokens.0.id", 7, "added_tokens[0].id = 7"),  # model.vocab says 0
]


@pytest.mark.parametrize("name, field, value, says", REFUSALS, ids=[r[3][:40] for r in REFUSALS])
def test_unsupported_field_is_refused(tmp_path, name, field, value, says):
    path = write_variant(tmp_path, name, set_field(field, value))
    with pytest.raises(UnsupportedTokenizerError) as error:
        BPETokenizer(path)
    assert str(error.value).startswith(f"{path}: "), "the error names the file"
    assert says in str(error.value)


def test_folder_without_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(error.value)
    assert "tokenizer.model" in str(error.value) and "tokenizer.json" in str(error.value)


# -- model folders: which file, and BOS/EOS from the config files ---------------------------------


def test_llama_folder_prefers_sentencepiece(tmp_path):
    (tmp_path / "tokenizer.model").symlink_to(TOKENIZERS / "llama2" / "tokenizer.model")
    (tmp_path / "tokenizer.json").symlink_to(TOKENIZERS / "gpt-neox-20b" / "tokenizer.json")
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
    assert tok.encode("Hello", bos=True) == [1, 15043]
    assert ours("stories260K").vocab_size == 512 and ours("stories260K").bos_id == 1


def test_falcon_folder_config_files(tmp_path):
    """What tiiuae/falcon-7b ships: eos_token in the tokenizer files, bos_token_id in config.json."""
    (tmp_path / "tokenizer.json").symlink_to(TOKENIZERS / "falcon" / "tokenizer.json")
    eos = {"eos_token": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**eos, "add_prefix_space": False}))
    special_tokens_map = {**eos, "additional_special_tokens": [">>TITLE<<"]}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_tokens_map))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 11}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (1, 11)  # eos from tokenizer_config, bos from config.json
    assert tok.encode(">>TITLE<<Hi", bos=True) == [1, 0, *tok.encode("Hi")]
    falcon = ours("falcon")  # the bare tokenizer.json: <|endoftext|> for both
    assert (falcon.bos_id, falcon.eos_id, falcon.vocab_size) == (11, 11, 65024)
    # a stream (run.py, eval) of any Falcon starts from <|endoftext|>, even where config.json says 1
    # (>>ABSTRACT<<, falcon-40b's first release); other models from BOS, or a trained sink token
    assert tok.id_to_piece(1) == ">>ABSTRACT<<" and first_token(tok, {"model_type": "RefinedWeb"}) == 11
    assert first_token(tok, {"model_type": "llama"}) == 1
    assert first_token(tok, {"model_type": "llama", "minisink_sink_token_id": 5}) == 5


def test_pythia_folder_config_files(tmp_path):
    (tmp_path / "tokenizer.json").symlink_to(TOKENIZERS / "gpt-neox-20b" / "tokenizer.json")
    added = {"__type": "AddedToken", "content": "<|padding|>", "lstrip": False, "normalized": True}
    config = {"bos_token": added, "eos_token": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 0, 50277)
    assert tok.id_to_piece(0) == "<|endoftext|>" and tok.id_to_piece(50276) == "  "
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(ValueError, match="tokenizer_config.json: bos_token '<s>'"):
        load_tokenizer(tmp_path)


def test_bad_ids_and_missing_bos(tmp_path):
    assert ours("gpt-neox-20b").stream_decoder().flush() == ""
    with pytest.raises(ValueError, match="token id 50277 is not in this vocabulary"):
        ours("gpt-neox-20b").decode([50277])
    with pytest.raises(ValueError, match="token id 32000 is not in this vocabulary"):
        ours("llama2").decode([5, 32000])
    path = write_variant(tmp_path, "gpt-neox-20b", lambda spec: spec["added_tokens"].pop(0))
    with pytest.raises(ValueError, match="no BOS token"):
        BPETokenizer(path).encode("hi", bos=True)


# -- streaming detokenization -------------------------------------------------------------------


def assert_streams_like_decode(tok, ids):
    """After each push the text so far is a prefix of decode(ids); at the end it is all of it."""
    want = tok.decode(ids)
    decoder = tok.stream_decoder()
    text = ""
    for i in ids:
        text += decoder.push(i)
        assert want.startswith(text), (ids, text, want)
    text += decoder.flush()
    assert text == want, (ids, text, want)


STREAM_TEXTS = [
    "Hello 🦙 world! 你好，世界。😶\u200d🌫️ ✅ Führer €5",
    " leading space\n\n    indented\tand 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ",
    "<|endoftext|> after a special <|endoftext|>",
]


def byte_id(tok, byte: int) -> int:
    """The id of the token that is this one byte: <0xNN> in SentencePiece, a character in BPE."""
    if isinstance(tok, SentencePieceTokenizer):
        return tok._sp.piece_to_id(f"<0x{byte:02X}>")
    return tok.piece_to_id[bytes_to_unicode()[byte]]


def byte_ids(tok) -> list[int]:
    if isinstance(tok, SentencePieceTokenizer):
        return [i for i in range(tok.vocab_size) if tok._sp.is_byte(i)]
    return [tok.piece_to_id[c] for c in bytes_to_unicode().values() if c in tok.piece_to_id]


def stream_cases(name: str) -> list[list[int]]:
    tok = ours(name)
    b = lambda *values: [byte_id(tok, v) for v in values]  # noqa: E731
    special = [tok.bos_id, tok.eos_id]
    x = tok.encode("x")
    cases = [tok.encode(text, bos=True) for text in STREAM_TEXTS]
    cases += [
        b(0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0xA6, 0x99),  # "€🦙", one byte per token
        b(0xE2, 0x41, 0xE2, 0x82) + x + b(0x80) + special + b(0xE2, 0x82) + x,  # broken UTF-8
        special + b(0xC3) + special + b(0xA9) + x + special,  # specials between the bytes of "é"
    ]
    if isinstance(tok, SentencePieceTokenizer):  # pieces that are only the space marker
        space = tok._sp.piece_to_id("▁")
        cases += [[space, space] + x, [tok.bos_id, space] + x + [space], [space] + b(0xC3, 0xA9)]
    return cases


@pytest.mark.parametrize("name", ["llama2", "stories260K", *JSON_NAMES])
def test_stream_every_prefix(name):
    tok = ours(name)
    for ids in stream_cases(name):
        for n in range(len(ids) + 1):
            assert_streams_like_decode(tok, ids[:n])


@pytest.mark.parametrize("name", ["llama2", "stories260K", *JSON_NAMES])
@SETTINGS
@given(data=st.data())
def test_stream_random_ids(name, data):
    tok = ours(name)
    ids_of_bytes = byte_ids(tok)
    any_id, a_byte = st.integers(0, tok.vocab_size - 1), st.sampled_from(ids_of_bytes)
    ids = data.draw(st.lists(st.one_of(any_id, a_byte, a_byte), max_size=25))  # 2/3 bytes
    assert_streams_like_decode(tok, ids)


@pytest.mark.parametrize("name", ["llama2", "gpt-neox-20b"])
def test_stream_a_book_with_bounded_work(name):
    """The pending span never grows past a character's bytes: per-token work stays small."""
    tok = ours(name)
    ids = tok.encode(book("moby_dick")[:100_000] + "🦙 你好 ꙮ€" * 50)
    decoder = tok.stream_decoder()
    text, longest = "", 0
    for i in ids:
        text += decoder.push(i)
        longest = max(longest, len(decoder._pending))
    assert text + decoder.flush() == tok.decode(ids)
    assert longest <= 4

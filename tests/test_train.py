"""minisink/tools/train.py: training reduces the loss, is reproducible, writes checkpoints that load, and the
sink-token option really puts <sink> at position 0. The committed default model matches transformers."""
import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from minisink.tools import train
from minisink.weights.load import load_model

from conftest import ASSETS, REPO, need_assets

TEXT = ASSETS / "text" / "tinystories_val_sample.txt"
DEFAULT_MODEL = REPO / "minisink" / "checkpoints" / "tinystories-1m"
TINY = dict(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, context=32,
            batch_size=8, warmup=2, eval_every=10, eval_crops=8, lr=1e-2, min_lr=1e-3, threads=1)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """The first 400 paragraphs of the TinyStories sample: enough for a 512-piece tokenizer."""
    need_assets(TEXT)
    path = tmp_path_factory.mktemp("text") / "stories.txt"
    path.write_text("\n\n".join(train.read_paragraphs(TEXT)[:400]) + "\n")
    return path


def test_a_few_steps_reduce_the_held_out_loss(text, tmp_path):
    _, log = train.train(train.Recipe(**TINY, steps=30), text, tmp_path / "m")
    first, last = log["evals"][0][1], log["evals"][-1][1]
    assert last < first - 0.5, log["evals"]


def test_same_command_gives_identical_weights(text, tmp_path):
    recipe = train.Recipe(**TINY, steps=4)
    a, b = (train.train(recipe, text, tmp_path / name)[1]["sha256"] for name in "ab")
    assert a == b
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (tmp_path / "b" / "tokenizer.model").read_bytes()


@pytest.mark.parametrize("save_dtype", ["fp32", "fp16"])
def test_checkpoint_round_trips_through_the_loader(text, tmp_path, save_dtype):
    model, _ = train.train(train.Recipe(**TINY, steps=3, save_dtype=save_dtype), text, tmp_path)
    loaded = load_model(tmp_path)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids), loaded(ids))


def test_sink_token_is_prepended_to_every_sample():
    data = torch.arange(100, 200)
    gen = torch.Generator().manual_seed(0)
    x, y = train.get_batch(data, 4, 8, gen, sink_id=3)
    assert x.shape == y.shape == (4, 8)
    assert (x[:, 0] == 3).all() and not (x[:, 1:] == 3).any()
    assert torch.equal(x[:, 1:], y[:, :-1])   # <sink> predicts the first stream token, then next-token
    assert ((y[:, 1:] - y[:, :-1]) == 1).all()
    x, y = train.get_batch(data, 4, 8, torch.Generator().manual_seed(0))  # vanilla: a plain crop
    assert torch.equal(x[:, 1:], y[:, :-1]) and not (x == 3).any()


def test_sink_token_option_is_recorded_and_used(text, tmp_path):
    model, log = train.train(train.Recipe(**TINY, steps=2, sink_token=True), text, tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    sink = sp.piece_to_id("<sink>")
    assert sink != sp.unk_id() and sp.is_control(sink)
    assert json.loads((tmp_path / "config.json").read_text())["minisink_sink_token_id"] == sink == log["sink_token_id"]
    assert sink not in sp.encode("a <sink> in the text is just text")
    vanilla = tmp_path / "vanilla"
    train.train(train.Recipe(**TINY, steps=1), text, vanilla)
    assert "minisink_sink_token_id" not in json.loads((vanilla / "config.json").read_text())


def test_command_line_flags_follow_the_recipe(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("One.\n\nTwo.\n")
    recipe, args = train.parse_args(["--text", str(text), "--out", str(tmp_path / "o"), "--sink-token", "--steps", "7",
                                     "--lr", "0.01"])
    assert (recipe.sink_token, recipe.steps, recipe.lr, args.out) == (True, 7, 0.01, tmp_path / "o")
    assert train.parse_args(["--text", str(text), "--out", str(tmp_path / "o")])[0] == train.Recipe()
    assert not (tmp_path / "o").exists()  # parsing checks where it will write, and writes nothing


def test_bos_samples_start_with_bos_at_a_paragraph_start():
    nl = 0
    data = torch.tensor([5, 6, nl, 7, 8, 9, nl, 10, 11, nl, 12, 13, 14, 15, nl])
    starts = train.paragraph_starts(data, nl, context=3)
    assert starts.tolist() == [0, 3, 7, 10]   # after every newline, where 3 targets still fit
    x, y = train.get_batch(data, 64, 3, torch.Generator().manual_seed(0), 1, starts)
    assert (x[:, 0] == 1).all() and torch.equal(x[:, 1:], y[:, :-1])
    assert all(int(t) in (5, 7, 10, 12) for t in y[:, 0])  # BOS predicts a paragraph's first token


def test_default_model_is_small_and_matches_transformers():
    transformers = pytest.importorskip("transformers")
    assert (DEFAULT_MODEL / "model.safetensors").stat().st_size < 4e6
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert config["model_type"] == "llama" and "minisink_sink_token_id" not in config
    ours = load_model(DEFAULT_MODEL)
    theirs = transformers.LlamaForCausalLM.from_pretrained(DEFAULT_MODEL, torch_dtype=torch.float32).eval()
    sp = spm.SentencePieceProcessor(model_file=str(DEFAULT_MODEL / "tokenizer.model"))
    ids = torch.tensor([sp.encode("Once upon a time, there was a little girl named Lily. She loved to play")])
    with torch.no_grad():
        assert torch.allclose(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("seed", range(5))
def test_default_model_starts_its_stream_with_a_sentence(seed):
    """`python run.py --stream --seed N` (BOS alone, run.py's sampling): the first 20 tokens start a
    sentence. Concretely: the first token begins a word (its piece starts with "▁": no fragment of a
    word before it), the text starts with a capital letter or a quote, and it has at least 3 words.
    The model before the --bos retraining started mid-word, e.g. "ing to the park"."""
    import sys
    sys.path.insert(0, str(REPO))
    import run
    args = run.parse_args(["--stream", "--max-new-tokens", "20", "--seed", str(seed), "--no-status"])
    demo, first_ids, _ = run.make_demo(args)
    assert first_ids == [demo.tok.bos_id]
    tokens = [int(t) for t in demo.stream.generate(torch.tensor([first_ids]), max_new_tokens=20, **demo.sample)]
    sp = spm.SentencePieceProcessor(model_file=str(DEFAULT_MODEL / "tokenizer.model"))
    text = sp.decode(tokens)
    assert sp.id_to_piece(tokens[0]).startswith("\u2581"), (sp.id_to_piece(tokens[0]), text)
    assert text[0].isupper() or text[0] in "\"'", text
    assert len(text.split()) >= 3, text

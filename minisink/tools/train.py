"""Pre-train a tiny Llama on one text file: minisink's own models, and the paper's sink-token recipe.

    python -m minisink train --text ../shared/assets/text/tinystories_val_sample.txt \\
        --out minisink/checkpoints/tinystories-1m

1. A SentencePiece tokenizer (BPE with byte fallback, as Llama's) is trained on the text.
2. The text becomes one token stream: its paragraphs, each followed by a newline token. The last
   `val_fraction` of the paragraphs is held out for evaluation.
3. Training samples are random crops of `context` tokens from the stream, so a sample starts at an
   arbitrary token, as in the paper's pre-training on the Pile. With `--bos`, every sample is BOS
   followed by the stream from the start of a random paragraph, as a stream in run.py begins: the
   model then learns what follows BOS (the start of a story), not a crop that starts mid-word. AdamW, linear warmup then cosine decay,
   gradient clipping, an evaluation on the held-out crops every `eval_every` steps.
4. The result is a Hugging Face folder (config.json, model.safetensors, tokenizer.model, README.md)
   that `minisink.weights.load.load_model` and transformers' LlamaForCausalLM both load.

Pre-training with a dedicated attention sink (paper section 3.3): with `--sink-token`, every training
sample starts with the same extra token, the control symbol <sink>, at position 0. The model can then
park its surplus attention on that one token instead of on whatever content token happens to come
first, and in streaming only that token need be kept (S=1). config.json records its id as
`minisink_sink_token_id` (transformers ignores the key): a stream must start with it.

Bit for bit reproducible on CPU: the tokenizer trainer is single-threaded and reads the paragraphs in
order; all randomness comes from one seeded generator; torch runs with a fixed number of threads and
deterministic algorithms. The same command on the same kind of machine gives the same weights.
"""
import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from . import cli
from ..generate import Stream
from ..models.llama import LlamaConfig, LlamaForCausalLM
from .sizing import free_memory

SINK_PIECE = "<sink>"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass
class Recipe:
    """Every setting of a run; each one is also a command-line flag (`--batch-size 16`)."""
    # tokenizer
    vocab_size: int = 1024
    # model: 0.93M parameters, 14% of them in the (tied) embedding
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    hidden_dim: int = 352          # SwiGLU width: 8/3 * dim, rounded up to a multiple of 32
    context: int = 256             # training sample length = max_position_embeddings
    # optimisation
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    min_lr: float = 3e-4           # end of the cosine
    warmup: int = 20
    weight_decay: float = 0.1      # on matrices and the embedding, not on norm weights
    grad_clip: float = 1.0
    # evaluation
    val_fraction: float = 0.05     # last paragraphs of the text, never trained on
    eval_every: int = 100
    eval_crops: int = 32           # non-overlapping held-out crops of `context` tokens
    # reproducibility and output
    seed: int = 0
    threads: int = 2               # results can depend on it: keep it fixed to reproduce a model
    sink_token: bool = False       # paper section 3.3: <sink> at position 0 of every sample
    bos: bool = False              # BOS at position 0, then a paragraph's start (the default model uses it)
    save_dtype: str = "fp16"       # fp16 halves the file; evaluation and parity use the saved weights


# ---------------------------------------------------------------------------------------- data

def read_paragraphs(path) -> list[str]:
    """The text's paragraphs (blocks separated by blank lines), with inner newlines kept."""
    paragraphs = [p.strip() for p in cli.read_text(path).split("\n\n") if p.strip()]
    if len(paragraphs) < 2:
        raise cli.UserError(f"{path}: {len(paragraphs)} paragraph(s); training needs at least two "
                            "(the last ones are held out), separated by blank lines")
    return paragraphs


def split(paragraphs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(training, held-out) paragraphs: the held-out ones are the last `val_fraction` of the text."""
    n_val = max(1, round(len(paragraphs) * val_fraction))
    return paragraphs[:-n_val], paragraphs[-n_val:]


def train_tokenizer(paragraphs: list[str], vocab_size: int) -> bytes:
    """A serialized SentencePiece model. Settings follow Llama's tokenizer; determinism needs one
    thread and the sentences in order, all of them (no sampling, no shuffling)."""
    model = io.BytesIO()
    with open(os.devnull, "w") as quiet, spm_errors(vocab_size):
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(paragraphs), model_writer=model, logstream=quiet,
            model_type="bpe", vocab_size=vocab_size, byte_fallback=True, character_coverage=0.9995,
            split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            # reserved in every tokenizer, so vanilla and sink models share one vocabulary; a control
            # symbol is never produced from text, only inserted by id
            control_symbols=[SINK_PIECE],
            num_threads=1, shuffle_input_sentence=False, input_sentence_size=0, max_sentence_length=1 << 16)
    return model.getvalue()


class spm_errors:
    """SentencePiece's trainer reports a vocabulary that does not fit the text as a RuntimeError with
    its C++ source line: keep the sentence that says what to change, as a UserError."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if kind is RuntimeError:
            why = str(e).split("] ", 1)[-1]
            raise cli.UserError(f"--vocab-size {self.vocab_size} does not fit this text: {why}") from None


def newline_id(sp: spm.SentencePieceProcessor) -> int:
    return sp.piece_to_id("<0x0A>")  # byte fallback piece: the tokenizer was trained without newlines


def encode_stream(sp: spm.SentencePieceProcessor, paragraphs: list[str]) -> torch.Tensor:
    """(N,) int64: each paragraph's tokens followed by a newline token."""
    nl = newline_id(sp)
    return torch.tensor([t for ids in sp.encode(paragraphs) for t in ids + [nl]], dtype=torch.long)


def decode(sp: spm.SentencePieceProcessor, ids: list[int]) -> str:
    """Text of a token stream: paragraph by paragraph, so no paragraph starts with the dummy space."""
    nl, paragraphs, current = newline_id(sp), [], []
    for t in ids:
        if t == nl:
            paragraphs.append(current)
            current = []
        else:
            current.append(t)
    return "\n".join(sp.decode(paragraphs + [current]))


def paragraph_starts(data: torch.Tensor, nl: int, context: int) -> torch.Tensor:
    """(P,) stream indices where a paragraph begins and a whole sample still fits after it."""
    starts = torch.cat([torch.zeros(1, dtype=torch.long), (data == nl).nonzero().flatten() + 1])
    return starts[starts <= len(data) - context]


def get_batch(data: torch.Tensor, batch_size: int, context: int, gen: torch.Generator,
              sink_id: int | None = None, starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops: inputs and next-token targets, (B, context) each. `starts`: the indices a crop may
    start at (paragraph starts, with --bos); default: any index."""
    if starts is None:
        picked = torch.randint(0, len(data) - context, (batch_size,), generator=gen)
    else:
        picked = starts[torch.randint(0, len(starts), (batch_size,), generator=gen)]
    return crops(data, picked, context, sink_id)


def crops(data: torch.Tensor, starts: torch.Tensor, context: int, sink_id: int | None = None):
    """Samples of `context` tokens starting at stream indices `starts` (B,): inputs and targets."""
    if sink_id is None:
        x = torch.stack([data[s: s + context] for s in starts.tolist()])           # (B, context)
        y = torch.stack([data[s + 1: s + context + 1] for s in starts.tolist()])   # (B, context)
        return x, y
    # <sink> (or BOS) takes position 0 and predicts the first stream token; the sample holds one stream token fewer
    x = torch.stack([data[s: s + context - 1] for s in starts.tolist()])           # (B, context-1)
    x = torch.cat([torch.full((len(starts), 1), sink_id), x], dim=1)               # (B, context)
    y = torch.stack([data[s: s + context] for s in starts.tolist()])               # (B, context)
    return x, y


# --------------------------------------------------------------------------------------- model

def hf_config(r: Recipe, sink_id: int | None) -> dict:
    """config.json in the layout of a Hugging Face Llama checkpoint."""
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": r.vocab_size, "hidden_size": r.dim, "intermediate_size": r.hidden_dim,
        "num_hidden_layers": r.n_layers, "num_attention_heads": r.n_heads, "num_key_value_heads": r.n_kv_heads,
        "head_dim": r.dim // r.n_heads, "max_position_embeddings": r.context, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": True,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": {"fp16": "float16", "fp32": "float32"}[r.save_dtype],
    }
    if sink_id is not None:
        config["minisink_sink_token_id"] = sink_id
    return config


def init_weights(model: LlamaForCausalLM, gen: torch.Generator, std: float = 0.02) -> None:
    """GPT-2's init: N(0, 0.02), and the projections that write into the residual stream scaled by
    1/sqrt(2 * layers) so the stream's variance does not grow with depth. Norm weights stay 1."""
    n_layers = len(model.model.layers)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied lm_head is listed once, as embed_tokens
            if p.dim() == 2:
                scale = 1 / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
                p.normal_(0.0, std * scale, generator=gen)


def lr_at(step: int, r: Recipe) -> float:
    """Linear warmup to `lr`, then a cosine down to `min_lr` at the last step."""
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    progress = (step - r.warmup) / max(1, r.steps - r.warmup)
    return r.min_lr + 0.5 * (r.lr - r.min_lr) * (1 + math.cos(math.pi * progress))


def eval_starts(data: torch.Tensor, r: Recipe, nl: int) -> torch.Tensor:
    """Where the held-out crops start: every `context` tokens, or with --bos the first paragraph
    start at or after each of those, so evaluation sees what training sees."""
    if not r.bos:
        return torch.arange(min(r.eval_crops, (len(data) - 1) // r.context)) * r.context
    picked = []
    for s in paragraph_starts(data, nl, r.context).tolist():
        if len(picked) < r.eval_crops and (not picked or s >= picked[-1] + r.context):
            picked.append(s)
    return torch.tensor(picked, dtype=torch.long)


@torch.no_grad()
def evaluate(model, data: torch.Tensor, r: Recipe, first_id: int | None, starts: torch.Tensor) -> float:
    """Mean next-token loss over fixed, non-overlapping crops of the held-out stream."""
    x, y = crops(data, starts, r.context, first_id)
    was_training = model.training
    model.eval()
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    model.train(was_training)
    return loss


def greedy(model, prompt_ids: list[int], n_new: int) -> list[int]:
    """Greedy continuation of `prompt_ids` (`Stream.generate` at temperature 0), through a cache
    that keeps everything."""
    stream = Stream(model, "dense", 0, len(prompt_ids) + n_new, prefill_chunk=len(prompt_ids))
    return [int(t) for t in stream.generate(torch.tensor([prompt_ids]), max_new_tokens=n_new)]


def save(model, config: dict, tokenizer: bytes, folder: Path, dtype: torch.dtype) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "tokenizer.model").write_bytes(tokenizer)
    # named_parameters lists the tied lm_head once (as model.embed_tokens.weight); transformers re-ties it
    state = {name: p.detach().to(dtype).contiguous() for name, p in model.named_parameters()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------ training

def progress(steps: int):
    """tqdm if it is installed (it is not a dependency), else one stderr line rewritten in place."""
    try:
        from tqdm import tqdm
        bar = tqdm(total=steps, file=sys.stderr, dynamic_ncols=True)
        return bar.update, bar.set_postfix_str, bar.close
    except ImportError:
        state = {"i": 0, "t0": time.time(), "note": ""}

        def draw():
            i, dt = state["i"], time.time() - state["t0"]
            eta = dt / i * (steps - i) if i else 0
            sys.stderr.write(f"\r{i}/{steps} [{dt:.0f}s<{eta:.0f}s] {state['note']}   ")
            sys.stderr.flush()

        def update(n=1):
            state["i"] += n
            if state["i"] % 10 == 0 or state["i"] == steps:
                draw()

        def note(text):
            state["note"] = text

        return update, note, lambda: sys.stderr.write("\n")


def train(r: Recipe, text_path, out) -> tuple[LlamaForCausalLM, dict]:
    """Train a tokenizer and a model on `text_path` and write them to folder `out`.
    Returns the model (with the saved weights, in eval mode) and a log of the run."""
    t_start, cpu_start = time.time(), time.process_time()
    torch.set_num_threads(r.threads)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(r.seed)

    train_text, val_text = split(read_paragraphs(text_path), r.val_fraction)
    tokenizer = train_tokenizer(train_text, r.vocab_size)  # the held-out text is unseen
    sp = spm.SentencePieceProcessor(model_proto=tokenizer)
    train_data, val_data = encode_stream(sp, train_text), encode_stream(sp, val_text)
    # the token every sample starts with: <sink>, BOS, or none (a plain crop)
    first_id = sp.piece_to_id(SINK_PIECE) if r.sink_token else sp.bos_id() if r.bos else None
    sink_id = first_id if r.sink_token else None
    starts = paragraph_starts(train_data, newline_id(sp), r.context) if r.bos else None
    val_starts = eval_starts(val_data, r, newline_id(sp))
    if len(train_data) <= r.context or len(val_starts) == 0:
        raise cli.UserError(f"{text_path}: too little text for --context {r.context}: {len(train_data)} training and "
                            f"{len(val_data)} held-out tokens (each needs more than one sample of {r.context})")

    config = hf_config(r, sink_id)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    init_weights(model, gen)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters; {len(train_data)} training tokens, {len(val_data)} held out; "
          f"{r.steps * r.batch_size * r.context / len(train_data):.1f} epochs", file=sys.stderr)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=r.lr, betas=(0.9, 0.95), eps=1e-8)
    log = {"evals": []}
    update, note, close = progress(r.steps)
    model.train()
    for step in range(r.steps):
        if step % r.eval_every == 0:
            log["evals"].append((step, evaluate(model, val_data, r, first_id, val_starts)))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, r)
        x, y = get_batch(train_data, r.batch_size, r.context, gen, first_id, starts)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
        opt.step()
        note(f"loss {loss.item():.3f} val {log['evals'][-1][1]:.3f} lr {lr_at(step, r):.1e}")
        update(1)
    close()

    out = Path(out)
    save(model, config, tokenizer, out, DTYPES[r.save_dtype])
    # Report on what was saved: round the weights as the file does, so the numbers are the file's
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(DTYPES[r.save_dtype]).float())
    val = evaluate(model, val_data, r, first_id, val_starts)
    log["evals"].append((r.steps, val))
    prompt = ([first_id] if first_id is not None else []) + sp.encode("Once upon a time")
    sample = decode(sp, sp.encode("Once upon a time") + greedy(model.eval(), prompt, 200))
    # what `python run.py --stream --temperature 0` starts with: the model's text after BOS alone
    from_bos = decode(sp, greedy(model, [first_id], 60)) if r.bos else None
    log.update(params=n_params, val_loss=val, val_ppl=math.exp(val), sample=sample, from_bos=from_bos, train_tokens=len(train_data),
               val_tokens=len(val_data), seconds=time.time() - t_start, cpu_seconds=time.process_time() - cpu_start, sink_token_id=sink_id,
               sha256=hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    return model, log


def write_readme(r: Recipe, log: dict, text_path, out: Path, command: str) -> None:
    """README.md beside the weights: how they were made, and what they do."""
    evals = "\n".join(f"| {s} | {v:.4f} | {math.exp(v):.2f} |" for s, v in log["evals"])
    recipe = "\n".join(f"| `{k}` | {v} |" for k, v in dataclasses.asdict(r).items())
    size = (out / "model.safetensors").stat().st_size
    sink = (f"Trained with a dedicated sink token: every training sample started with `<sink>` (id "
            f"{log['sink_token_id']}). Start every stream with it and keep it as the single sink (S=1)."
            if log["sink_token_id"] is not None else
            "Trained without a sink token (vanilla). Every training sample is BOS followed by the token stream\n"
            "from the start of a random paragraph, as a stream in run.py starts with BOS (`--bos`)."
            if r.bos else
            "Trained without a sink token (vanilla): samples are random crops of the token stream.")
    bos = ("BOS occurs only at\nposition 0 of every sample; EOS never occurs." if r.bos else
           "BOS\nand EOS never occur in it.")
    crops = (", each BOS then the text from the first paragraph start at or after every\n"
             f"{r.context}th token, as training samples are (so not comparable with a model trained without --bos)"
             if r.bos else "")
    from_bos = ("" if log.get("from_bos") is None else
                f"\n60 tokens after BOS alone (what `python run.py --stream --temperature 0` prints):\n\n"
                f"```\n{log['from_bos']}\n```\n")
    (out / "README.md").write_text(f"""# {out.name}

A {log['params'] / 1e6:.2f}M-parameter Llama trained from scratch by `minisink/tools/train.py` on
`{Path(text_path).name}` ({log['train_tokens']} training tokens, {log['val_tokens']} held out: the last
{r.val_fraction:.0%} of the paragraphs). That file is the start of the TinyStories validation split
(Eldan & Li 2023, CDLA-Sharing-1.0); it is not in this repository (see `../shared/assets/README.md`).
{sink}
The training stream is the text's paragraphs, each followed by the newline byte token `<0x0A>`; {bos}

Loads with `minisink.weights.load.load_model` and with transformers' `LlamaForCausalLM.from_pretrained`.
Weights: `model.safetensors`, {r.save_dtype}, {size / 1e6:.2f} MB, sha256 `{log['sha256']}`.

## How it was made

```
{command}
```

Seed {r.seed}, {r.threads} torch thread{"s" if r.threads != 1 else ""}, torch {torch.__version__}, {platform.machine()} CPU
(`{torch.backends.cpu.get_cpu_capability()}` kernels). Time: {log['seconds'] / 60:.1f} minutes wall-clock,
{log['cpu_seconds'] / 60:.1f} CPU-minutes, tokenizer and evaluation included (wall-clock time depends on what
else the machine is running). The same command, with the same text, thread count and torch build, gives a
bit-for-bit identical `model.safetensors` (same sha256); another thread count or CPU kernel set may
round differently.

| setting | value |
|---|---|
{recipe}

## Held-out loss

Mean next-token cross-entropy (nats) on {r.eval_crops} non-overlapping held-out crops of {r.context}
tokens{crops}; the last row is the saved ({r.save_dtype}) weights.

| step | val loss | val perplexity |
|---|---|---|
{evals}

Final: validation loss **{log['val_loss']:.4f}**, perplexity **{log['val_ppl']:.2f}**.

## Greedy sample

200 tokens after the prompt "Once upon a time"{" (the stream starts with `<sink>`)" if log['sink_token_id'] is not None else ""}:

```
{log['sample']}
```
{from_bos}""")


def training_bytes(r: Recipe) -> int:
    """A lower bound on the fp32 bytes training `r` needs: 4 copies of every parameter (weights,
    gradients, AdamW's two moments) and, per layer, a few activations of width dim and hidden_dim
    for every token of the batch, plus the attention scores and the logits."""
    params = r.vocab_size * r.dim + r.n_layers * (4 * r.dim * r.dim + 3 * r.dim * r.hidden_dim)
    tokens = r.batch_size * r.context
    scores = r.n_layers * r.batch_size * r.n_heads * r.context * r.context
    return 4 * (4 * params + scores + tokens * (r.n_layers * (4 * r.dim + 2 * r.hidden_dim) + 2 * r.vocab_size))


def recipe_problem(r: Recipe) -> str | None:
    """The first setting of `r` that cannot train, as `--flag: why`; None when all can."""
    at_least = dict(vocab_size=VOCAB_MIN, dim=1, n_layers=1, n_heads=1, n_kv_heads=1, hidden_dim=1, context=2,
                    steps=1, batch_size=1, warmup=0, eval_every=1, eval_crops=1, threads=1)
    for name, low in at_least.items():
        if getattr(r, name) < low:
            return f"--{name.replace('_', '-')} must be >= {low}, got {getattr(r, name)}"
    # more threads than CPUs only wait, and far more crash torch's thread pool (issue 26); the default
    # stays allowed on a smaller machine, since the recorded models were trained with it
    most = max(cli.usable_cpus(), Recipe.threads)
    if r.threads > most:
        return f"--threads must be <= {most} (the CPUs this process may use, or the default {Recipe.threads}), got {r.threads}"
    if r.seed > cli.SEED_MAX:
        return f"--seed must be < 2^64 (torch.manual_seed takes 64 bits), got {r.seed}"
    need = training_bytes(r)
    free = free_memory(torch.device("cpu"))
    if free is not None and need > free:
        return (f"this model and batch need about {need / 1e9:,.1f} GB to train (weights, gradients, AdamW's two "
                f"moments, activations) but {free / 1e9:,.1f} GB of memory is free: pass a smaller --dim, "
                "--n-layers, --vocab-size, --context or --batch-size")
    for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
        value = getattr(r, name)
        if not (math.isfinite(value) and value >= 0) or (name in ("lr", "grad_clip") and value == 0):
            return f"--{name.replace('_', '-')} must be a finite number {'> 0' if name in ('lr', 'grad_clip') else '>= 0'}, got {value}"
    if not 0 < r.val_fraction < 1:
        return f"--val-fraction must be between 0 and 1, got {r.val_fraction}"
    if r.dim % r.n_heads or (r.dim // r.n_heads) % 2:
        return f"--n-heads {r.n_heads} must divide --dim {r.dim} into heads of an even size (RoPE rotates pairs)"
    if r.n_heads % r.n_kv_heads:
        return f"--n-kv-heads {r.n_kv_heads} must divide --n-heads {r.n_heads} (each kv head serves a group of query heads)"
    if r.save_dtype not in DTYPES:
        return f"--save-dtype must be one of {', '.join(DTYPES)}, got {r.save_dtype!r}"
    if r.sink_token and r.bos:
        return "--sink-token and --bos both choose the first token of every sample: pick one"
    return None


# the 256 byte-fallback pieces, <unk>, <s>, </s> and <sink>, and at least one piece learned from the text
VOCAB_MIN = 256 + 4 + 1


def parse_args(argv=None) -> tuple[Recipe, argparse.Namespace]:
    """The recipe and the paths, every one checked before any work: a bad flag exits 2, at once."""
    parser = cli.Parser(prog="python -m minisink train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", required=True, type=cli.readable_file,
                        help="training text: UTF-8 (reported with its byte offset if not), paragraphs separated by blank lines")
    parser.add_argument("--out", required=True, type=cli.writable_folder,
                        help="folder to write the model to (new or empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace the model files in an existing --out folder")
    for f in dataclasses.fields(Recipe):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action="store_true", help=f"default: {f.default}")
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=f"default: {f.default}")
    args = parser.parse_args(argv)
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})
    problem = recipe_problem(recipe)
    if problem:
        parser.error(problem)
    if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        parser.error(f"--out {args.out} exists and is not empty: pass --overwrite to replace its model files")
    return recipe, args


def run(argv=None) -> int:
    recipe, args = parse_args(argv)
    read_paragraphs(args.text)  # the text is UTF-8 and has paragraphs: checked before any training
    _, log = train(recipe, args.text, args.out)
    command = "python -m minisink train " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    write_readme(recipe, log, args.text, Path(args.out), command)
    print(f"val loss {log['val_loss']:.4f} (perplexity {log['val_ppl']:.2f}) after {log['seconds']:.0f}s; "
          f"wrote {args.out}\n{log['sample']}")
    return 0


def main(argv=None) -> int:
    return cli.main("python -m minisink train", run, argv)


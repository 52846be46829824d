#!/usr/bin/env python
"""Stream text from a language model through an attention-sink cache, for as long as you like.

    python run.py --stream                             # the small model that ships in minisink/checkpoints
    python run.py --model pythia-410m --stream         # downloaded from the Hugging Face hub
    python run.py --model llama-2-7b-chat              # chat: type turns, pipe lines, or --prompts FILE
    python run.py --model path/to/folder --policy window --stream   # watch the output fall apart

The cache holds S attention sinks and a rolling window of W tokens (S+W = the model's trained
context unless you say otherwise), so memory and time per token stay flat however long the stream
runs. Stop it with Ctrl-C; it prints a summary in units that teach: tok/s, ms/token and GB/s of
weights read (every token reads every weight once).

Exit codes: 0 when done (Ctrl-C included), 1 for a problem with the model, its download or the
input files (one line on stderr, no traceback), 2 for a bad command line, 130 for Ctrl-C before the
stream has started.
"""
import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minisink.generate import POLICIES, Stream
from minisink.hub import HubError, model_table, one_line, resolve
from minisink.load import DTYPES, LoadError, load_model, read_config
from minisink.tokenizer import load_tokenizer

HERE = Path(__file__).resolve().parent
# The model that ships inside the repository, trained by minisink/train.py (see its README.md)
DEFAULT_MODEL = HERE / "minisink" / "checkpoints" / "tinystories-1m"
DEFAULT_CONTEXT = 2048        # when config.json names no context length
CONTEXT_KEYS = ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length", "max_sequence_length")


class UserError(Exception):
    """Something the user can fix (a file, a flag); printed as one line, exit code 1."""


# ------------------------------------------------------------------------------------ the command line

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
        "modes:\n"
        "  --stream           one endless text from --prompt (or from BOS), until Ctrl-C or --max-new-tokens\n"
        "  (default) chat     turns from --prompts FILE, or from stdin: typed (a terminal) or piped, one per\n"
        "                     line. All turns go into one stream: the cache persists across turns.\n\n"
        "dtype: auto is bf16 on CUDA (fp16 where bf16 is unsupported) and fp32 on CPU. fp16 on CPU is\n"
        "refused with a message: most CPUs emulate fp16 arithmetic, slowly; use bf16 there to halve memory."))
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="NAME",
                   help=f"short name (see --list-models), Hugging Face repo id, or local folder "
                        f"(default: {DEFAULT_MODEL.relative_to(HERE)})")
    g.add_argument("--revision", default=None, metavar="REV", help="hub branch, tag or commit, e.g. refs/pr/7 for a safetensors conversion")
    g.add_argument("--list-models", action="store_true", help="print the short names and exit")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights and cache dtype (default: auto, see below)")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on GPU; on CPU "
                   "inductor, 15-110 s to compile, 1-17%% faster than eager at 1 thread, but up to 1.5x slower "
                   "at 2 threads on a busy machine: docs/benchmarks.md)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's choice; 1 is fastest for tiny models on a busy machine)")
    g = p.add_argument_group("cache")
    g.add_argument("--policy", default="sink", choices=POLICIES, help="default: sink (StreamingLLM)")
    g.add_argument("--sink-size", type=int, default=4, metavar="S", help="attention sinks kept forever (default: 4)")
    g.add_argument("--window-size", type=int, default=None, metavar="W",
                   help="recent tokens kept (default: the model's trained context minus S)")
    g = p.add_argument_group("generation")
    g.add_argument("--stream", action="store_true", help="endless text instead of chat")
    g.add_argument("--prompt", default="", metavar="TEXT", help="text the stream starts from, after BOS (default: just BOS)")
    g.add_argument("--prompts", type=Path, metavar="FILE", help='chat turns from a JSONL file of {"turns": [...]} (MT-Bench style)')
    g.add_argument("--template", default="auto", choices=["auto", *TEMPLATES],
                   help="chat prompt template (default: picked from the model's name)")
    g.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="stop after N tokens (default: endless with --stream, 256 per chat turn)")
    g.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 is greedy (default: 0.8)")
    g.add_argument("--top-p", type=float, default=0.95, metavar="P", help="nucleus sampling (default: 0.95)")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="sample from the K most likely (default: off)")
    g.add_argument("--seed", type=int, default=None, metavar="N", help="seed the sampler (default: random)")
    g = p.add_argument_group("output")
    g.add_argument("--no-status", action="store_true",
                   help="no status line on stderr (it is also off when stderr is not a terminal; "
                        "the summary at the end is always printed)")
    args = p.parse_args(argv)
    if args.stream and args.prompts:
        p.error("--stream and --prompts are two different modes: pick one")
    for name in ("sink_size", "window_size", "max_new_tokens", "top_k"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "sink_size" else 1):
            p.error(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'sink_size' else '>= 1'}, got {value}")
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name}: {one_line(e)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this PyTorch sees no CUDA GPU (torch {torch.__version__})")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("--dtype fp16 is refused on CPU (most CPUs emulate fp16, slowly): use fp32, or bf16 to halve memory")
    return dtype


def context_length(config: dict) -> int:
    """The model's trained context, as config.json names it (Llama/NeoX/Falcon, MPT, GPT-2, ...)."""
    return next((config[k] for k in CONTEXT_KEYS if isinstance(config.get(k), int)), DEFAULT_CONTEXT)


# ------------------------------------------------------------------------------------------- chat

@dataclass(frozen=True)
class Template:
    """How one user turn is wrapped, and where the model's answer ends."""
    turn: str                   # format string with {user}; the model's reply follows it
    separator: str = "\n"       # between the end of a reply and the next turn
    stop: tuple = ()            # the reply ends at the first of these strings (not printed)
    bos_each_turn: bool = False  # Llama-2 chat: every exchange is <s>[INST] ... [/INST] reply </s>


TEMPLATES = {
    "plain": Template("USER: {user}\nASSISTANT:", stop=("\nUSER:",)),                       # base models
    "llama-2-chat": Template("[INST] {user} [/INST]", separator="", bos_each_turn=True),     # Meta's template
    "chatml": Template("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n",       # mpt-*-chat
                       stop=("<|im_end|>",)),
    "falcon-instruct": Template("User: {user}\nAssistant:", stop=("\nUser:",)),
    "dolly": Template("### Instruction:\n{user}\n\n### Response:\n", separator="\n\n",       # mpt-7b-instruct
                      stop=("### Instruction",)),
}


def pick_template(name: str, model_type: str | None) -> str:
    """Template for a model, from its name (short name, repo id or folder) and config model_type."""
    name = name.lower()
    if "chat" in name and (model_type == "llama" or "llama" in name):
        return "llama-2-chat"
    if "chat" in name and model_type == "mpt":
        return "chatml"
    if "instruct" in name and model_type == "mpt":
        return "dolly"
    if "instruct" in name and "falcon" in name:
        return "falcon-instruct"
    return "plain"


def read_prompts(path: Path) -> list[str]:
    """All turns of a JSONL file whose lines are {"turns": ["...", ...]}, in order."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts {path}: {one_line(e)}") from None
    turns = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: not valid JSON ({e})") from None
        if not (isinstance(record, dict) and isinstance(record.get("turns"), list)
                and all(isinstance(t, str) for t in record["turns"])):
            raise UserError(f'{path}:{n}: expected an object with a "turns" list of strings')
        turns += record["turns"]
    return turns


def typed_or_piped_turns(interactive: bool):
    """Turns from stdin: prompted for on a terminal, one per line when piped. Ends at EOF."""
    while True:
        try:
            line = input("USER: ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and not line:
            return
        line = line.rstrip("\n")
        if line.strip():
            yield line


class StopText:
    """Holds back text that may be the start of a stop string, so that no stop string is printed."""

    def __init__(self, stops):
        self.stops, self.held = stops, ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to print, whether a stop string was reached)."""
        self.held += text
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.held = self.held[:min(found)], ""
            return out, True
        # the longest end of `held` that a stop string starts with must wait for the next token
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


# ---------------------------------------------------------------------------------- measurements

def memory(device: torch.device) -> str:
    """Memory in use now: the CUDA allocator's count on GPU, the process's resident set on CPU."""
    if device.type == "cuda":
        return f"GPU {torch.cuda.memory_allocated(device) / 1e6:,.0f} MB"
    try:
        with open("/proc/self/statm") as f:  # Linux: resident pages now
            return f"RSS {int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 1e6:,.0f} MB"
    except OSError:  # macOS and others: only the peak is known
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return f"peak RSS {peak / 1e6:,.0f} MB"


class Meter:
    """Counts tokens and times them in two parts, as gpt-fast does: the first token of each
    generation (prefill of the prompt, plus compilation with --compile) and the decode steps after
    it, which are what tok/s measures. Time spent waiting for a user is in neither.

    With --compile the first *decode step* is where compilation happens (the prompt is prefilled
    eagerly), so the first two tokens of the first generation count as "first token"."""

    def __init__(self, model, compile: bool = False):
        # parameters() lists a tied weight once: a decode step reads it once
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.fed = self.generated = self.decoded = 0
        self.first_s = self.decode_s = 0.0
        self._last, self._first = None, True
        self._compiling = compile  # the next decode step, the first, will compile

    def start(self):
        """A generation begins: its prompt is about to be fed."""
        self._last, self._first = time.perf_counter(), True

    def tick(self):
        """One token came out."""
        now = time.perf_counter()
        if self._first or self._compiling:
            self._compiling = self._compiling and self._first  # the token after the first compiled
            self.first_s += now - self._last
        else:
            self.decode_s += now - self._last
            self.decoded += 1
        self._last, self._first = now, False
        self.generated += 1

    def rates(self) -> tuple[float, float, float]:
        """tok/s, ms/token, GB/s of weights read (each token reads every weight once)."""
        tok_s = self.decoded / self.decode_s if self.decode_s else 0.0
        return tok_s, 1e3 / tok_s if tok_s else 0.0, self.weight_bytes * tok_s / 1e9


class StatusLine:
    """One line on stderr, redrawn in place: tokens, cache slots, speed, memory.

    When stdout is the same terminal, text and status would overwrite each other, so the status is
    pinned to the bottom row and the rows above become a scroll region (VT100 DECSTBM) for the text.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.pinned = self.enabled and sys.stdout.isatty() and same_terminal(sys.stdout, sys.stderr)
        self.rows, self.cols = shutil.get_terminal_size()[::-1]
        self.last = 0.0
        if self.pinned:
            sys.stdout.flush()
            # make sure a row is free below the cursor, then scroll only rows 1..rows-1
            # (setting the region homes the cursor: save and restore it around)
            sys.stderr.write(f"\n\x1b[1A\x1b7\x1b[1;{self.rows - 1}r\x1b8")
            sys.stderr.flush()

    def due(self) -> bool:
        """Time to redraw? A few times a second: more would cost more than the tokens."""
        return self.enabled and time.monotonic() - self.last >= 0.25

    def show(self, text: str):
        self.last = time.monotonic()
        text = text[:self.cols - 1]
        if self.pinned:
            sys.stderr.write(f"\x1b7\x1b[{self.rows};1H\x1b[2K{text}\x1b8")
        else:
            sys.stderr.write(f"\r\x1b[2K{text}")
        sys.stderr.flush()

    def close(self):
        if self.pinned:  # whole screen scrolls again; clear the status row
            sys.stderr.write(f"\x1b7\x1b[r\x1b[{self.rows};1H\x1b[2K\x1b8")
        elif self.enabled:
            sys.stderr.write("\r\x1b[2K")
        sys.stderr.flush()
        self.enabled = self.pinned = False


def same_terminal(a, b) -> bool:
    try:
        return os.ttyname(a.fileno()) == os.ttyname(b.fileno())
    except (OSError, AttributeError, ValueError):
        return True  # cannot tell: assume the usual case, one terminal


# ------------------------------------------------------------------------------------------ the demo

class Demo:
    """One model, one tokenizer and one Stream; prints what the model says as it says it."""

    def __init__(self, args, model, tokenizer, stream: Stream, template: Template, out=None):
        self.args, self.model, self.tok, self.stream, self.template = args, model, tokenizer, stream, template
        self.out = out or sys.stdout
        self.meter = Meter(model, compile=args.compile)
        self.status = StatusLine(not args.no_status)
        self.decoder = None   # the StreamDecoder of the text being printed, flushed on Ctrl-C
        self.turns = 0
        self.sample = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)

    def write(self, text: str):
        if text:
            self.out.write(text)
            self.out.flush()

    def printable(self, token: int) -> str:
        """The text of a generated token, via the stream decoder. Ids beyond the tokenizer's vocab
        (embedding rows padded to a multiple of 64 or 128) are never trained and have no text."""
        return self.decoder.push(token) if token < self.tok.vocab_size else ""

    def feed(self, ids: list[int]):
        self.stream.feed(torch.tensor([ids], dtype=torch.long))
        self.meter.fed += len(ids)

    def monologue(self, start_ids: list[int], echo_ids: list[int]):
        """--stream: the prompt (echoed), then the model's text, token by token, until N or Ctrl-C."""
        self.decoder = self.tok.stream_decoder()
        for token in echo_ids:  # through the decoder, so the first generated token is spaced right
            self.write(self.decoder.push(token))
        self.meter.start()
        self.feed(start_ids)
        for token in self.stream.generate(max_new_tokens=self.args.max_new_tokens, **self.sample):
            self.meter.tick()
            self.write(self.printable(int(token)))
            self.update_status()
        self.end_text()

    def chat(self, start_ids: list[int], turns, echo: bool = True) -> list[dict]:
        """Every turn is appended to the one stream; returns what was fed and said, turn by turn.
        `echo`: print each turn as "USER: ..." (not when the user has just typed it)."""
        template, eos = self.template, self.tok.eos_id
        self.feed(start_ids)
        transcript = []
        for user in turns:
            text = (template.separator if self.turns else "") + template.turn.format(user=user)
            ids = self.tok.encode(text, bos=template.bos_each_turn and self.turns > 0)
            self.turns += 1
            self.write((f"USER: {user}\n" if echo else "") + "ASSISTANT: ")
            reply = self.reply(ids)
            if template.bos_each_turn and eos is not None and reply[-1:] != [eos]:
                self.feed([eos])  # close the exchange as the chat format expects: ... reply </s>
            self.write("\n")
            transcript.append(dict(user=user, prompt_ids=ids, reply_ids=reply))
        return transcript

    def reply(self, ids: list[int]) -> list[int]:
        """Feed one turn, print the model's answer until EOS, a stop string or --max-new-tokens."""
        eos = self.tok.eos_id
        self.decoder, stop, reply, started = self.tok.stream_decoder(), StopText(self.template.stop), [], False
        self.meter.start()
        self.feed(ids)
        for token in self.stream.generate(max_new_tokens=self.args.max_new_tokens or 256,
                                          stop_ids={eos} if eos is not None else set(), **self.sample):
            token = int(token)
            reply.append(token)
            self.meter.tick()
            self.update_status()
            if token == eos:
                break
            text, stopped = stop.push(self.printable(token))
            if not started:  # the reply's own leading space: "ASSISTANT: " has one already
                text = text.lstrip()
                started = bool(text)
            self.write(text)
            if stopped:
                break
        else:  # ran out of tokens: what the decoder and the stop filter still hold
            self.write(stop.push(self.decoder.flush())[0] + stop.flush())
        self.decoder = None
        return reply

    def end_text(self):
        """Print what the decoder still holds and end the line."""
        if self.decoder is not None:
            self.write(self.decoder.flush())
            self.decoder = None
        self.write("\n")

    def update_status(self):
        if self.status.due():
            tok_s, _, _ = self.meter.rates()
            self.status.show(f"[{self.meter.generated:,} tokens | cache {self.cache_use()} | {tok_s:,.1f} tok/s | "
                             f"{memory(self.stream.device)}]")

    def summary(self, interrupted: bool = False) -> str:
        m, s = self.meter, self.stream
        tok_s, ms, gb_s = m.rates()
        shape = {"sink": f"S={s.cache.S} W={s.cache.W}", "window": f"S=0 W={s.cache.W}",
                 "dense": "no eviction: grows with the stream", "recompute": "re-encoded every token"}[s.policy]
        dtype = str(s.dtype).removeprefix("torch.")
        first = (f"time to first token {m.first_s:.2f} s{f' over {self.turns} turns' if self.turns > 1 else ''} "
                 f"({m.fed:,} prompt token{'s' if m.fed != 1 else ''})")
        return (f"run.py: {'interrupted: ' if interrupted else ''}{f'{self.turns} turns, ' if self.turns else ''}"
                f"{m.generated:,} token{'s' if m.generated != 1 else ''} generated; {first}; then {tok_s:,.1f} tok/s = {ms:.2f} ms/token = "
                f"{gb_s:.2f} GB/s of weights read ({m.weight_bytes / 1e6:,.1f} MB of {dtype} parameters per token); "
                f"cache {self.cache_use()} ({s.policy}, {shape}); {memory(s.device)}")

    def cache_use(self) -> str:
        s = self.stream
        return f"{s.slots_used:,} tokens" if s.policy == "dense" else f"{s.slots_used:,}/{s.capacity:,} slots"


# -------------------------------------------------------------------------------------------- main

def start_ids(tokenizer, config: dict, prompt: str) -> tuple[list[int], list[int]]:
    """(ids the stream starts with, the prompt's own ids to echo). A model pre-trained with a
    dedicated sink token (minisink/train.py --sink-token) starts with that token instead of BOS."""
    sink = config.get("minisink_sink_token_id")
    first = sink if sink is not None else tokenizer.bos_id
    prompt_ids = tokenizer.encode(prompt) if prompt else []
    if first is None and not prompt_ids:
        raise UserError("this tokenizer has no BOS token to start from: give --prompt TEXT")
    return ([first] if first is not None else []) + prompt_ids, prompt_ids


def load(args, download=None):
    """(model, tokenizer, config dict, folder) for --model; every failure is one line."""
    device = pick_device(args.device)  # before a download: a wrong flag should not cost gigabytes
    dtype = pick_dtype(args.dtype, device)
    if args.model is None:
        folder = DEFAULT_MODEL
        if not folder.is_dir():
            raise UserError(f"the default model {folder} is missing; pass a model folder or name with --model")
    else:
        folder = resolve(args.model, args.revision, download=download)
    config = read_config(folder)
    model = load_model(folder, dtype=dtype, device=device)
    try:
        tokenizer = load_tokenizer(folder)
    except (OSError, ValueError, RuntimeError) as e:  # missing file, unsupported or malformed tokenizer
        raise UserError(f"tokenizer: {one_line(e)}") from None
    return model, tokenizer, config, folder


def make_demo(args, download=None) -> tuple[Demo, list[int], list[int]]:
    """The Demo that args ask for, and (ids the stream starts with, prompt ids to echo)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, config, folder = load(args, download)
    sink_size = args.sink_size
    window = args.window_size or context_length(config) - sink_size
    if window < 1:
        raise UserError(f"--sink-size {sink_size} leaves no room for a window in a context of {context_length(config)}")
    stream = Stream(model, policy=args.policy, sink_size=sink_size, window_size=window, compile=args.compile)
    if args.seed is not None:
        torch.manual_seed(args.seed)  # one generator for the whole run, chat turns included
    name = args.template if args.template != "auto" else pick_template(args.model or folder.name, config.get("model_type"))
    demo = Demo(args, model, tokenizer, stream, TEMPLATES[name])
    return demo, *start_ids(tokenizer, config, args.prompt)


def run(args, download=None) -> int:
    file_turns = read_prompts(args.prompts) if args.prompts else None  # a bad file fails before loading
    demo, first_ids, prompt_ids = make_demo(args, download)
    interrupted = False
    try:
        if args.stream:
            demo.monologue(first_ids, prompt_ids)
        else:
            typed = file_turns is None and sys.stdin.isatty()
            demo.chat(first_ids, file_turns if file_turns is not None else typed_or_piped_turns(typed), echo=not typed)
    except KeyboardInterrupt:  # Ctrl-C is how an endless stream ends
        interrupted = True
        demo.end_text()
    finally:
        demo.status.close()  # give the terminal its whole screen back, whatever happened
    print(demo.summary(interrupted), file=sys.stderr, flush=True)
    return 0


def main(argv=None, download=None) -> int:
    args = parse_args(argv)
    if args.list_models:
        print(model_table(default=str(DEFAULT_MODEL.relative_to(HERE))))
        return 0
    try:
        return run(args, download)
    except (UserError, HubError, LoadError) as e:
        print(f"run.py: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # while loading: nothing to summarise
        print("run.py: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `run.py --stream | head`: the reader has gone, so have we
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

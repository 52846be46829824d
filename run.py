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
stream has started (while torch imports included).
"""
import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # before torch: Ctrl-C in the seconds it takes to import exits 130, quietly
    from minisink.tools.cli import exit_on_interrupt
    exit_on_interrupt("run.py")

import torch

from minisink.tools import cli, tp
from minisink.text.chat import ChatTemplateError, TemplateTurns, encode_rendered, read_chat_template
from minisink.tools.cli import UserError
from minisink.generate import POLICIES, Stream, end_ids, first_token
from minisink.weights.hub import model_table, one_line, resolve
from minisink.weights.load import DTYPES, build_config, load_model, on_meta, read_config
from minisink.tools.sizing import CacheSizeError, check_fits, choose_window, step_read_bytes
from minisink.text.tokenizer import load_tokenizer

HERE = Path(__file__).resolve().parent
# The model that ships inside the repository, trained by minisink/tools/train.py (see its README.md)
DEFAULT_MODEL = HERE / "minisink" / "checkpoints" / "tinystories-1m"


# ------------------------------------------------------------------------------------ the command line

def parse_args(argv=None) -> argparse.Namespace:
    p = cli.Parser(prog="run.py", description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
        "modes:\n"
        "  --stream           one endless text from --prompt (or from BOS), until Ctrl-C or --max-new-tokens\n"
        "  (default) chat     turns from --prompts FILE, or from stdin: typed (a terminal) or piped, one per\n"
        "                     line. All turns go into one stream: the cache persists across turns.\n\n"
        "dtype: auto is bf16 on CUDA (fp16 where bf16 is unsupported). On CPU, chosen by measurement\n"
        "(docs/benchmarks.md, issue 23): bf16 for models of 10M parameters or more on a CPU with bf16\n"
        "instructions (a decode step reads every weight once: half the bytes, SmolLM2-135M decodes\n"
        "1.3-1.5x faster eager, 1.7x compiled), fp32 for smaller ones and elsewhere. fp16 on CPU is\n"
        "refused with a message: most CPUs emulate fp16 arithmetic, slowly.\n"
        "int8 / int4 (CPU): weight-only quantization (minisink/quantize.py, docs/quantize.md): int8 per output\n"
        "channel or int4 per group of 32, activations and cache in bf16 (torch's int8/int4 kernels are 8-30x\n"
        "slower with fp32 activations). With --model FILE.gguf, int4 runs the file's own Q4_0/Q4_1/Q4_K blocks\n"
        "(d and m rounded to bf16), other matrices re-quantized: int8 where the file has 8 bits or more (the\n"
        "Q8_0 embedding/head), else int4; int8 re-quantizes every matrix from the file's values.\n\n"
        "text: --prompt, --prompts and chat lines must be UTF-8; text that is not is reported (where, and\n"
        "the byte offset), never guessed at. A typed line is asked for again; anything else exits 1."))
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="NAME",
                   help=f"short name (see --list-models), Hugging Face repo id, or local folder "
                        f"(default: {DEFAULT_MODEL.relative_to(HERE)})")
    g.add_argument("--revision", default=None, metavar="REV", help="hub branch, tag or commit, e.g. refs/pr/7 for a safetensors conversion")
    g.add_argument("--list-models", action="store_true", help="print the short names and exit")
    g.add_argument("--device", default="auto", type=cli.device, help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16", *QUANTIZED],
                   help="weights and cache dtype (default: auto, see below); int8, int4: quantized weights, CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on GPU; on CPU "
                   "inductor, its mat-vecs as fused reductions that read the weights near the memory bandwidth, "
                   "minisink/tools/fast.py; 15-300 s to compile: docs/benchmarks.md)")
    g.add_argument("--threads", type=cli.threads, default=None, metavar="N",
                   help=f"CPU threads for torch (default: 1 for models under {cli.TINY_MODEL_PARAMS / 1e6:.0f}M parameters, "
                        "where more threads only spin; torch's choice, one per core, for larger ones); "
                        f"{cli.THREADS_HELP} ({cli.usable_cpus()} here)")
    g = p.add_argument_group("cache")
    g.add_argument("--policy", default="sink", choices=POLICIES, help="default: sink (StreamingLLM)")
    g.add_argument("--sink-size", type=int, default=4, metavar="S", help="attention sinks kept forever (default: 4)")
    g.add_argument("--window-size", type=int, default=None, metavar="W",
                   help="recent tokens kept (default: the model's trained context minus S, S+W at most 4096)")
    g = p.add_argument_group("generation")
    g.add_argument("--stream", action="store_true", help="endless text instead of chat")
    g.add_argument("--prompt", default="", type=cli.text_arg, metavar="TEXT", help="text the stream starts from, after BOS (default: just BOS)")
    g.add_argument("--prompts", type=cli.readable_file, metavar="FILE", help='chat turns from a JSONL file of {"turns": [...]} (MT-Bench style)')
    g.add_argument("--template", default="auto", choices=["auto", *TEMPLATES],
                   help="chat prompt template (default: the checkpoint's own, else picked from the model's name)")
    g.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="stop after N tokens (default: endless with --stream, 256 per chat turn)")
    g.add_argument("--temperature", type=cli.temperature, default=0.8, metavar="T", help="0 is greedy (default: 0.8)")
    g.add_argument("--top-p", type=cli.top_p, default=0.95, metavar="P", help="nucleus sampling, 0 < P <= 1 (default: 0.95)")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="sample from the K most likely (default: off)")
    g.add_argument("--seed", type=cli.seed, default=None, metavar="N", help="seed the sampler, 0 <= N < 2^64 (default: random)")
    g = p.add_argument_group("compare (minisink/tools/compare.py)")
    g.add_argument("--compare", type=policy_pair, default=None, metavar="P1,P2",
                   help="two policies side by side, e.g. window,sink: same model, prompt, cache size and seed "
                        f"(default model {COMPARE_MODEL}, cache {COMPARE_CACHE[0]}+{COMPARE_CACHE[1]})")
    g.add_argument("--text", type=cli.readable_file, default=None, metavar="FILE",
                   help="with --compare: each policy's running perplexity of this UTF-8 text, instead of generating")
    g.add_argument("--text-tokens", type=cli.int_between(2, 10**7, " (tokens of the text scored)"), default=1024,
                   metavar="N", help="with --text: score its first N tokens, BOS included (default: 1024)")
    g = p.add_argument_group("output")
    g.add_argument("--no-status", action="store_true",
                   help="no status line on stderr (it is also off when stderr is not a terminal; "
                        "the summary at the end is always printed)")
    args = p.parse_args(argv)
    if args.stream and args.prompts:
        p.error("--stream and --prompts are two different modes: pick one")
    if args.text and not args.compare:
        p.error("--text goes with --compare (for one policy's perplexity: python -m minisink eval)")
    if args.compare and args.prompts:
        p.error("--compare streams text from --prompt; it takes no --prompts file")
    if args.revision and (args.model is None or Path(args.model).expanduser().is_dir()):
        p.error(f"--revision {args.revision} picks a version of a hub repo; {args.model or 'the default model'} "
                "is a local folder, which has only the files it holds")
    for name in ("sink_size", "window_size", "max_new_tokens", "top_k"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "sink_size" else 1):
            p.error(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'sink_size' else '>= 1'}, got {value}")
    return args


COMPARE_MODEL, COMPARE_CACHE, COMPARE_TOKENS = "smollm2-135m-instruct", (4, 60), 200


def policy_pair(text: str) -> list[str]:
    policies = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in policies if x not in POLICIES or x == "recompute"]
    if len(policies) != 2 or bad or policies[0] == policies[1]:
        raise argparse.ArgumentTypeError(f"expected two different policies from {', '.join(POLICIES[:3])}, "
                                         f"e.g. window,sink; got {text!r}")
    return policies


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


QUANTIZED = ("int8", "int4")   # weight-only (minisink/quantize.py); activations and cache in bf16


def pick_dtype(name: str, device: torch.device, n_params: int | None = None) -> torch.dtype:
    """--dtype as the torch dtype of activations and cache (of the weights too, unless int8/int4).
    auto on a CPU: bf16 for a model of TINY_MODEL_PARAMS or more, on a CPU with bf16 instructions,
    where a decode step is the time to read the weights (half the bytes: SmolLM2-135M decodes 1.3-1.5x
    faster than in fp32 eager, 1.7x compiled; docs/benchmarks.md, issue 23); fp32 for a tiny model
    (n_params unknown counts as tiny), whose step is not its reads."""
    if name in QUANTIZED:
        if device.type != "cpu":
            raise UserError(f"--dtype {name} runs on CPU only (torch's int8/int4 CPU kernels); on {device} use bf16")
        return torch.bfloat16
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        big = n_params is not None and n_params >= cli.TINY_MODEL_PARAMS
        return torch.bfloat16 if big and torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    dtype = DTYPES[name]
    cli.refuse_fp16_on_cpu(dtype, device)
    return dtype


# ------------------------------------------------------------------------------------------- chat

@dataclass(frozen=True)
class Template:
    """How one user turn is wrapped, and where the model's answer ends: the fallback for checkpoints
    that ship no chat template (minisink/text/chat.py renders those that do; both feed a turn the same way)."""
    turn: str                   # format string with {user}; the model's reply follows it
    separator: str = "\n"       # between the end of a reply and the next turn
    stop: tuple = ()            # the reply ends at the first of these strings (not printed)
    bos_each_turn: bool = False  # Llama-2 chat: every exchange is <s>[INST] ... [/INST] reply </s>

    def turn_ids(self, tokenizer, user: str, first: bool) -> list[int]:
        text = ("" if first else self.separator) + self.turn.format(user=user)
        return tokenizer.encode(text, bos=self.bos_each_turn and not first)

    def replied(self, reply: str, stop_text: str | None, eos_text: str | None) -> str:
        """Text that closes the exchange, fed after the reply: Llama-2's </s> when the reply was cut off."""
        return eos_text if self.bos_each_turn and stop_text is None and eos_text else ""


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
    """Template for a model that ships none, from its name (short name, repo id or folder) and
    config model_type. (Llama-2-chat ships one on the hub; a copy without it still gets it here.
    Other Llama chat models, TinyLlama or longchat, were tuned on other formats: plain.)"""
    name = name.lower()
    if "chat" in name and "llama-2" in name:
        return "llama-2-chat"
    if "chat" in name and model_type == "mpt":
        return "chatml"
    if "instruct" in name and model_type == "mpt":
        return "dolly"
    if "instruct" in name and "falcon" in name:
        return "falcon-instruct"
    if "instruct" in name and "smollm" in name:
        return "chatml"
    return "plain"


def read_prompts(path: Path) -> list[str]:
    """All turns of a JSONL file whose lines are {"turns": ["...", ...]}, in order."""
    lines = cli.read_text(path, f"--prompts {path}").splitlines()
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
    if not turns:
        raise UserError(f"--prompts {path}: no turns in the file (expected lines like {{\"turns\": [\"Hello!\"]}})")
    return turns


def typed_or_piped_turns(interactive: bool, out=None):
    """Turns from stdin: prompted for on a terminal, one per line when piped. Ends at EOF.
    A line that is not UTF-8 is reported: typed, it is asked for again; piped, the run stops."""
    out = out or sys.stdout
    if interactive:
        out.write("Type a message and press Enter. Ctrl-C stops a reply; Ctrl-D (or Ctrl-C here) quits.\n")
    number = 0
    while True:
        number += 1
        if interactive:
            try:
                line = input("USER: ")
            except EOFError:
                out.write("\n")
                return
            except UnicodeDecodeError as e:
                out.write(f"(that line is not UTF-8: {cli.bad_byte(e.object, e)}; type it again)\n")
                continue
            if not line.strip():
                out.write("(empty message: type something, or Ctrl-D to quit)\n")
                continue
        else:
            data = sys.stdin.buffer.readline()
            if not data:
                return
            line = cli.decode_utf8(data, f"stdin line {number}").rstrip("\n")
            if not line.strip():
                continue
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
    rss, now = cli.resident_bytes()
    return f"{'RSS' if now else 'peak RSS'} {rss / 1e6:,.0f} MB"


class Meter:
    """Counts tokens and times them in two parts, as gpt-fast does: the first token of each
    generation (prefill of the prompt, plus compilation with --compile) and the decode steps after
    it, which are what tok/s measures. Time spent waiting for a user is in neither.

    With --compile the first *decode step* is where compilation happens (the prompt is prefilled
    eagerly), so the first two tokens of the first generation count as "first token"."""

    def __init__(self, model, compile: bool = False):
        self.weight_bytes = step_read_bytes(model)   # what a decode step reads: an embedding one row
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
    """One line on stderr, redrawn in place: tokens, cache slots and evictions, speed, memory.

    When stdout is another file (a pipe, a file) the status has its terminal row to itself. When
    stdout is the same terminal, text and status would overwrite each other, so the status is drawn
    only between lines of text: while the text's cursor is at the start of an empty line, and wiped
    before the next text is written. Long lines therefore show it less often; they are never garbled.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.shared = self.enabled and sys.stdout.isatty() and same_terminal(sys.stdout, sys.stderr)
        self.cols = shutil.get_terminal_size().columns
        self.last = 0.0
        self.line_start = True   # shared terminal: is the text's cursor at the start of a line?
        self.visible = False

    def due(self) -> bool:
        """Time to redraw? A few times a second: more would cost more than the tokens."""
        return self.enabled and time.monotonic() - self.last >= 0.25 and (self.line_start or not self.shared)

    def show(self, text: str):
        self.last = time.monotonic()
        sys.stderr.write(f"\r\x1b[2K{text[:self.cols - 1]}")
        sys.stderr.flush()
        self.visible = True

    def before_text(self, text: str):
        """Called before `text` goes to stdout: on a shared terminal, wipe the status first."""
        if self.shared and self.visible:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()
            self.visible = False
        if text:
            self.line_start = text.endswith("\n")

    def close(self):
        if self.visible or (self.enabled and not self.shared):
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()
        self.enabled = self.visible = False


def same_terminal(a, b) -> bool:
    try:
        return os.ttyname(a.fileno()) == os.ttyname(b.fileno())
    except (OSError, AttributeError, ValueError):
        return True  # cannot tell: assume the usual case, one terminal


# ------------------------------------------------------------------------------------------ the demo

class Demo:
    """One model, one tokenizer and one Stream; prints what the model says as it says it."""

    def __init__(self, args, model, tokenizer, stream: Stream, template: Template, out=None, notes=(),
                 stop_ids=()):
        self.args, self.model, self.tok, self.stream, self.template = args, model, tokenizer, stream, template
        # a reply ends at any of these: the tokenizer's EOS, and the config's (generate.end_ids)
        self.stop_ids = {i for i in (tokenizer.eos_id, *stop_ids) if i is not None}
        self.notes = list(notes)  # said on stderr just before the first text: a failure stays one line
        self.out = out or sys.stdout
        self.meter = Meter(model, compile=args.compile)
        self.status = StatusLine(not args.no_status)
        self.decoder = None   # the StreamDecoder of the text being printed, flushed on Ctrl-C
        self.turns = 0
        self.sample = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)

    def write(self, text: str):
        if text:
            self.status.before_text(text)
            self.out.write(text)
            self.out.flush()

    def printable(self, token: int) -> str:
        """The text of a generated token, via the stream decoder. Ids beyond the tokenizer's vocab
        (embedding rows padded to a multiple of 64 or 128) are never trained and have no text."""
        return self.decoder.push(token) if token < self.tok.vocab_size else ""

    def feed(self, ids: list[int]):
        logits = self.stream.feed(torch.tensor([ids], dtype=torch.long))
        if ids and not self.meter.fed and not bool(torch.isfinite(logits).all()):  # once, on the first logits
            raise UserError(f"{self.args.model or 'the default model'}: its first logits are NaN or infinite: the "
                            "weights hold NaN/inf (a corrupt or wrongly converted checkpoint)" +
                            ("; or fp16 overflows: try --dtype bf16 or fp32" if self.stream.dtype == torch.float16 else ""))
        self.meter.fed += len(ids)

    def say_notes(self):
        """The cache's notes (a capped default, a window past the trained context), once."""
        for note in self.notes:
            print(f"run.py: {note}", file=sys.stderr, flush=True)
        self.notes = []

    def monologue(self, start_ids: list[int], echo_ids: list[int]):
        """--stream: the prompt (echoed), then the model's text, token by token, until N or Ctrl-C."""
        self.decoder = self.tok.stream_decoder()
        self.meter.start()
        self.feed(start_ids)
        self.say_notes()
        for token in echo_ids:  # through the decoder, so the first generated token is spaced right
            self.write(self.decoder.push(token))
        for token in self.stream.generate(max_new_tokens=self.args.max_new_tokens, **self.sample):
            self.meter.tick()
            self.write(self.printable(int(token)))
            self.update_status()
        self.end_text()

    def chat(self, start_ids: list[int], turns, echo: bool = True) -> list[dict]:
        """Every turn is appended to the one stream; returns what was fed and said, turn by turn.
        `echo`: print each turn as "USER: ..." (not when the user has just typed it)."""
        template, eos = self.template, self.tok.eos_id
        eos_text = self.tok.id_to_piece(eos) if eos is not None else None
        self.feed(start_ids)
        transcript = []
        for user in turns:
            self.say_notes()
            ids = template.turn_ids(self.tok, user, first=self.turns == 0)
            self.turns += 1
            self.write((f"USER: {user}\n" if echo else "") + "ASSISTANT: ")
            if echo:
                reply = self.reply(ids)
            else:  # typed: Ctrl-C stops this reply, and the user types the next turn
                with cli.DeferredInterrupt() as ctrl_c:
                    reply = self.reply(ids, stop=lambda: ctrl_c.pressed)
                if ctrl_c.pressed:
                    self.write(" [reply stopped]")
            ended = bool(reply) and reply[-1] in self.stop_ids
            # what the chat format puts after the reply and the model has not said: ... reply </s>
            closing = template.replied(self.tok.decode(reply[:-1] if ended else reply),
                                       self.tok.id_to_piece(reply[-1]) if ended else None, eos_text)
            if closing:
                self.feed(encode_rendered(self.tok, closing))
            self.write("\n")
            transcript.append(dict(user=user, prompt_ids=ids, reply_ids=reply))
        return transcript

    def reply(self, ids: list[int], stop=lambda: False) -> list[int]:
        """Feed one turn, print the model's answer until EOS, a stop string, --max-new-tokens or stop()."""
        self.decoder, stop_text, reply, started = self.tok.stream_decoder(), StopText(self.template.stop), [], False
        self.meter.start()
        self.feed(ids)
        for token in self.stream.generate(max_new_tokens=self.args.max_new_tokens or 256,
                                          stop_ids=self.stop_ids, **self.sample):
            token = int(token)
            reply.append(token)
            self.meter.tick()
            self.update_status()
            if token in self.stop_ids:
                break
            text, stopped = stop_text.push(self.printable(token))
            if not started:  # the reply's own leading space: "ASSISTANT: " has one already
                text = text.lstrip()
                started = bool(text)
            self.write(text)
            if stopped:
                break
            if stop():
                self.write(stop_text.push(self.decoder.flush())[0] + stop_text.flush())
                break
        else:  # ran out of tokens: what the decoder and the stop filter still hold
            self.write(stop_text.push(self.decoder.flush())[0] + stop_text.flush())
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
        if self.args.dtype in QUANTIZED:
            dtype = f"{self.args.dtype} weights + {dtype}"
        turns = f"{self.turns} turn{'s' if self.turns != 1 else ''}"
        first = (f"time to first token {m.first_s:.2f} s{f' over {turns}' if self.turns > 1 else ''} "
                 f"({m.fed:,} prompt token{'s' if m.fed != 1 else ''})")
        return (f"run.py: {'interrupted: ' if interrupted else ''}{f'{turns}, ' if self.turns else ''}"
                f"{m.generated:,} token{'s' if m.generated != 1 else ''} generated; {first}; then {tok_s:,.1f} tok/s = {ms:.2f} ms/token = "
                f"{gb_s:.2f} GB/s of weights read ({m.weight_bytes / 1e6:,.1f} MB of {dtype} parameters per token); "
                f"cache {self.cache_use()} ({s.policy}, {shape}); {memory(s.device)}")

    def cache_use(self) -> str:
        """The fill, and how many tokens have been dropped from the cache so far."""
        s = self.stream
        if s.policy == "dense":
            return f"{s.slots_used:,} tokens"
        seen = s.cache.length if s.policy != "recompute" else self.meter.fed + max(0, self.meter.generated - 1)
        return f"{s.slots_used:,}/{s.capacity:,} slots, {max(0, seen - s.capacity):,} evicted"


# -------------------------------------------------------------------------------------------- main

def start_ids(tokenizer, config: dict, prompt: str) -> tuple[list[int], list[int]]:
    """(ids the stream starts with, the prompt's own ids to echo): minisink.generate.first_token,
    then the prompt."""
    first = first_token(tokenizer, config)
    prompt_ids = tokenizer.encode(prompt) if prompt else []
    if first is None and not prompt_ids:
        raise UserError("this tokenizer has no BOS token to start from: give --prompt TEXT")
    return ([first] if first is not None else []) + prompt_ids, prompt_ids


def inspect(folder: Path):
    """(config dict, model class, parsed config, tokenizer) from the small files of a model folder.

    Everything that can refuse a model (its config, its tokenizer) is read here, before any weight
    is downloaded or loaded."""
    config = read_config(folder)
    cls, parsed = build_config(config, where=str(Path(folder) / "config.json"))
    try:
        tokenizer = load_tokenizer(folder)
    except (OSError, ValueError, RuntimeError) as e:  # missing file, unsupported or malformed tokenizer
        raise UserError(f"tokenizer: {one_line(e)}") from None
    try:
        chat_template = read_chat_template(folder)
    except ChatTemplateError as e:
        raise UserError(one_line(e)) from None
    tp.check_launch(parsed, Path(folder).name)  # under torchrun: N ranks must split the heads
    return config, cls, parsed, tokenizer, chat_template


def load(args, download=None):
    """(model, tokenizer, config dict, folder, window W) for --model; every failure is one line.

    Order matters: flags, then config and tokenizer (small files, downloaded first), then whether
    model + cache fit in memory, and only then the weights."""
    device = pick_device(args.device)  # before a download: a wrong flag should not cost gigabytes
    dtype = pick_dtype(args.dtype, device)
    small = []
    if args.model is None:
        folder = DEFAULT_MODEL
        if not folder.is_dir():
            raise UserError(f"the default model {folder} is missing; pass a model folder or name with --model")
    else:
        folder = resolve(args.model, args.revision, download=download, check=lambda f: small.append(inspect(f)),
                         note=lambda text: print(f"run.py: {text}", file=sys.stderr, flush=True))
    config, cls, parsed, tokenizer, chat_template = small[0] if small else inspect(folder)  # [] for a local folder
    if args.dtype == "auto" and device.type == "cpu":   # by the model's size, counted on the meta device
        dtype = pick_dtype("auto", device, sum(p.numel() for p in on_meta(cls, parsed).parameters()))
    shard, device = tp.start(parsed, device, folder.name)  # (None, device) unless torchrun started us
    try:
        window, notes = choose_window(config, args.sink_size, args.window_size, getattr(parsed, "sliding_window", None))
        if args.policy != "dense":  # dense grows without bound anyway: nothing to promise up front
            check_fits(cls, parsed, args.sink_size + window, dtype, device, tp.memory_share(tp.launched(), device))
    except CacheSizeError as e:  # a flag the model or the memory cannot take: exit 2, as argparse's
        raise cli.UsageError(str(e)) from None
    model = load_weights(args, folder, dtype, device, shard)
    return model, tokenizer, config, folder, (window, notes), chat_template


def load_weights(args, folder, dtype, device, shard=None):
    """The model in `dtype` (this rank's part under torchrun), its matrices quantized with --dtype
    int8/int4 (minisink/quantize.py)."""
    if args.dtype not in QUANTIZED:
        return load_model(folder, dtype=dtype, device=device, shard=shard)
    if shard is not None:
        raise UserError(f"--dtype {args.dtype} runs in one process only; under torchrun use --dtype bf16 or fp32")
    from minisink.quantize import QuantizeError, load_quantized
    from minisink.weights.gguf import GGUFError
    try:
        return load_quantized(args.model, folder, args.dtype, dtype=dtype, device=device)
    except (QuantizeError, GGUFError) as e:
        raise UserError(str(e)) from None


def make_demo(args, download=None) -> tuple[Demo, list[int], list[int]]:
    """The Demo that args ask for, and (ids the stream starts with, prompt ids to echo)."""
    model, tokenizer, config, folder, (window, notes), chat_template = load(args, download)
    torch.set_num_threads(args.threads or cli.default_threads(model))
    stream = Stream(model, policy=args.policy, sink_size=args.sink_size, window_size=window, compile=args.compile)
    seed = tp.shared_seed(args.seed, stream.device) if tp.launched() else args.seed  # every rank draws the same token
    if seed is not None:
        torch.manual_seed(seed)  # one generator for the whole run, chat turns included
    first_ids, prompt_ids = start_ids(tokenizer, config, args.prompt)
    if args.template == "auto" and chat_template is not None:
        template = TemplateTurns(chat_template)
        if chat_template.writes_bos() and first_ids[:1] == [tokenizer.bos_id] and not args.stream:
            first_ids = first_ids[1:]  # the template starts the conversation with BOS itself
    else:
        name = args.template if args.template != "auto" else pick_template(args.model or folder.name, config.get("model_type"))
        template = TEMPLATES[name]
    demo = Demo(args, model, tokenizer, stream, template, notes=notes, stop_ids=end_ids(tokenizer, config))
    return demo, first_ids, prompt_ids


def compare(args, download=None) -> int:
    """--compare P1,P2: minisink/tools/compare.py on the model args name, its defaults filled in."""
    from minisink.tools import compare as side_by_side
    args.model = args.model or COMPARE_MODEL
    if args.window_size is None:
        args.sink_size, args.window_size = (args.sink_size, COMPARE_CACHE[0] + COMPARE_CACHE[1] - args.sink_size) \
            if args.sink_size != 4 else COMPARE_CACHE
    if args.sink_size == 0 and "sink" in args.compare:
        raise cli.UsageError("--compare ...sink needs --sink-size >= 1 (with 0 it is the window policy)")
    text = cli.read_text(args.text, f"--text {args.text}") if args.text else None  # a bad file fails before loading
    model, tokenizer, config, folder, (window, notes), _ = load(args, download)
    torch.set_num_threads(args.threads or cli.default_threads(model))
    for note in notes:
        print(f"run.py: {note}", file=sys.stderr, flush=True)
    first_ids, prompt_ids = start_ids(tokenizer, config, args.prompt)
    cache = f"cache {args.sink_size + window} slots"
    if text is not None:
        ids = (first_ids + tokenizer.encode(text))[:args.text_tokens]
        print(f"perplexity of {args.text}, its first {len(ids):,} tokens, {cache}, through {' and '.join(args.compare)}:", flush=True)
        result = side_by_side.perplexity_side_by_side(model, ids, args.compare, args.sink_size, window)
        (a, b) = (result[p][1] for p in args.compare)
        print(f"run.py: after the first eviction {args.compare[0]} ppl {a:.2f}, {args.compare[1]} ppl {b:.2f}: "
              f"{a / b:.2f}x", file=sys.stderr, flush=True)
        return 0
    seed = args.seed if args.seed is not None else int(torch.seed() % 2**32)
    n = args.max_new_tokens or COMPARE_TOKENS
    print(f"{' vs '.join(args.compare)}: {n} tokens each, {cache}, seed {seed}, prompt {args.prompt!r}", flush=True)
    sample = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    try:
        side_by_side.generate_side_by_side(model, tokenizer, first_ids, args.compare, args.sink_size, window,
                                           n, seed, sample)
    except KeyboardInterrupt:
        print("\nrun.py: interrupted", file=sys.stderr)
    return 0


def run(args, download=None) -> int:
    if args.compare:
        return compare(args, download)
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
    """Every failure the user can fix is one line (minisink/tools/cli.py); Ctrl-C while loading exits 130."""
    def command(argv) -> int:
        args = parse_args(argv)
        if args.list_models:
            print(model_table(default=str(DEFAULT_MODEL.relative_to(HERE))))
            return 0
        try:
            return run(args, download)
        finally:
            tp.leave()  # under torchrun, at the end, on Ctrl-C and on an error alike
    return cli.main("run.py", command, argv, errors=(ChatTemplateError, tp.TPError))


if __name__ == "__main__":
    sys.exit(main())

"""StreamEval (the paper's Figure 9 / Table 7), rebuilt: does a streaming model answer from text it has evicted?

    python experiments/streameval/run.py --out DIR        # SmolLM2-135M-Instruct, the default policies
    python experiments/streameval/run.py --policies "dense,window 64,sink 4+60" --distances 0,1,3,10 \\
        --questions 8 --seed 0 --out DIR

The official repository never released StreamEval; this follows the paper's description. The stream
is LongEval-style lines, each a name and a number,

    line strip-proverbs: REGISTER_CONTENT is <55457>

given 10 lines at a time, one chat turn each (the model's own chat template, minisink.text.chat),
every turn ending with a question about one line a fixed `distance` lines back (0: the last line of
this turn, 10: the last line of the turn before):

    Tell me what is the <REGISTER_CONTENT> in line strip-proverbs? I need the number.

The model answers greedily (at most --max-new-tokens, until its end-of-turn token); the answer is
correct when the first number in the reply is the line's number (exact match). The reply goes into
the stream like any turn: one stream per (policy, distance), its cache persisting across turns. The
lines are generated from --seed (random.Random: the same lines for every policy and distance).
Distance in tokens: from the asked line's first token to the end of the question's turn (the
generation prompt included), counted in the ids the stream was fed.

What the paper's Table 7 says, and this measures: a bounded cache (window, sink) can answer only
while the asked line is still in it; once the line has been evicted it is gone, sinks or not.
StreamingLLM makes the stream stable, it does not extend the model's memory.

Writes results.csv (one row per question), results.md (accuracy per distance and policy, with the
command) and figure.png (accuracy against distance in tokens) in --out.
"""
import csv
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from minisink.tools import cli  # noqa: E402
from minisink.tools.cli import UserError  # noqa: E402

EVERY = 10  # lines per turn: a question every 10 lines, as in the paper
# words for the line names (LongEval's names are two random words joined by a hyphen)
WORDS = """amber anchor apple arrow autumn badge basket beacon berry blanket border bottle bramble breeze
bridge bronze bucket butter cabin candle canyon carpet castle cedar cellar chalk cherry cinder clover
cobalt copper coral cotton crater cricket crystal dagger daisy desert dolphin dragon ember falcon
feather fiddle forest fossil fountain garden garnet ginger glacier goblet granite gravel harbor harvest
hazel helmet hollow honey island ivory jacket jasmine jungle kettle lantern lemon lizard locket magnet
maple marble meadow mirror mitten monkey mosaic needle nickel oasis orbit orchid otter paddle parrot
pebble pepper pillow pirate planet pocket prairie pumpkin puzzle quartz quill rabbit raven ribbon river
rocket saddle salmon satin shadow silver sparrow spider spindle spruce squirrel summit sunset tablet
thimble thunder timber tulip tunnel turtle velvet violet walnut whistle willow window winter wizard
yarrow zephyr""".split()


@dataclass(frozen=True)
class Line:
    name: str
    value: int

    def text(self) -> str:
        return f"line {self.name}: REGISTER_CONTENT is <{self.value}>"


@dataclass(frozen=True)
class Turn:
    first: int          # index of the first line this turn gives; it gives lines first .. first+EVERY-1
    asked: int | None   # the line it asks about, or None (too early in the stream for the distance)


def make_lines(seed: int, n: int) -> list[Line]:
    """n lines with distinct names and 5-digit numbers, drawn one after the other from --seed: the
    first lines are the same whatever n is (every distance's stream starts with the same lines)."""
    rng, lines, used = random.Random(seed), [], set()
    if n > len(WORDS) * (len(WORDS) - 1) // 2:
        raise ValueError(f"too many lines for {len(WORDS)} words")
    while len(lines) < n:
        name = f"{rng.choice(WORDS)}-{rng.choice(WORDS)}"
        value = rng.randrange(10000, 100000)
        if name not in used and name.split("-")[0] != name.split("-")[1]:
            used.add(name)
            lines.append(Line(name, value))
    return lines


def schedule(distance: int, questions: int) -> list[Turn]:
    """Turns of EVERY lines; turn k asks about the line `distance` lines before its last one, from the
    first turn where that line exists, until `questions` have been asked."""
    turns, asked = [], 0
    while asked < questions:
        first = EVERY * len(turns)
        target = first + EVERY - 1 - distance
        turns.append(Turn(first, target if target >= 0 else None))
        asked += target >= 0
    return turns


def question(line: Line) -> str:
    return f"Tell me what is the <REGISTER_CONTENT> in line {line.name}? I need the number."


def user_message(lines: list[Line], turn: Turn) -> tuple[str, list[int]]:
    """(the turn's user text, the character offset where each of its lines starts)."""
    texts = [lines[i].text() for i in range(turn.first, turn.first + EVERY)]
    starts, offset = [], 0
    for t in texts:
        starts.append(offset)
        offset += len(t) + 1
    text = "\n".join(texts)
    if turn.asked is not None:
        text += "\n" + question(lines[turn.asked])
    return text, starts


def first_number(reply: str) -> int | None:
    match = re.search(r"\d+", reply)
    return int(match.group()) if match else None


def correct(reply: str, answer: int) -> bool:
    """Exact match: the first number of the reply is the answer."""
    return first_number(reply) == answer


def evaluate(chat, lines: list[Line], turns: list[Turn]) -> list[dict]:
    """Feed every turn through `chat` and score the questions: one row per question.

    `chat.ask(user, marks) -> (reply, positions, end)`: feed one user turn, reply to it; `positions`
    are the stream indices of the tokens at the character offsets `marks` of `user`, `end` the
    index just after the turn's prompt (before the reply)."""
    rows, line_at = [], {}   # line index -> stream index of its first token
    for k, turn in enumerate(turns):
        user, starts = user_message(lines, turn)
        reply, positions, end = chat.ask(user, starts)
        line_at.update({turn.first + i: p for i, p in enumerate(positions)})
        if turn.asked is None:
            continue
        line = lines[turn.asked]
        position = line_at[turn.asked]   # recorded when the line was fed
        rows.append({"distance_lines": turn.first + EVERY - 1 - turn.asked, "distance_tokens": end - position,
                     "turn": k, "line": turn.asked, "name": line.name, "answer": line.value,
                     "reply": reply, "correct": int(correct(reply, line.value))})
    return rows


class ModelChat:
    """One model streaming through one cache, turn after turn through its chat template."""

    def __init__(self, model, tokenizer, template, stop_ids, policy: str, sink_size: int, window_size: int,
                 max_new_tokens: int):
        import torch
        from minisink.generate import Stream
        from minisink.text.chat import TemplateTurns
        self.torch, self.tokenizer, self.stop_ids = torch, tokenizer, stop_ids
        self.stream = Stream(model, policy=policy, sink_size=sink_size, window_size=window_size)
        self.turns = TemplateTurns(template)
        self.max_new_tokens = max_new_tokens

    def feed(self, ids: list[int]) -> None:
        self.stream.feed(self.torch.tensor([ids]))

    def ask(self, user: str, marks: list[int]) -> tuple[str, list[int], int]:
        from minisink.text.chat import encode_rendered
        text = self.turns.turn_text(user)
        base = text.index(user)
        # tokenized piece by piece, cut where each line starts (just after a newline, where the
        # byte-level BPE's pre-tokenizer cuts anyway), so each line's first token is known
        cuts = [0, *(base + m for m in marks), len(text)]
        start = self.stream.fed + (self.stream.pending is not None)   # the last reply token is fed first
        ids, positions = [], []
        for a, b in zip(cuts, cuts[1:]):
            if a > 0:
                positions.append(start + len(ids))
            ids += encode_rendered(self.tokenizer, text[a:b])
        end = start + len(ids)
        reply = []
        for token in self.stream.generate(self.torch.tensor([ids]), max_new_tokens=self.max_new_tokens,
                                          stop_ids=self.stop_ids):
            reply.append(int(token))
        ended = bool(reply) and reply[-1] in self.stop_ids
        closing = self.turns.replied(self.tokenizer.decode(reply[:-1] if ended else reply),
                                     self.tokenizer.id_to_piece(reply[-1]) if ended else None,
                                     self.tokenizer.id_to_piece(self.tokenizer.eos_id))
        if closing:
            self.feed(encode_rendered(self.tokenizer, closing))
        return self.tokenizer.decode(reply[:-1] if ended else reply), positions, end


# ----------------------------------------------------------------------------------- the tables

def parse_policy(text: str) -> tuple[str, str, int, int]:
    """'dense' | 'window C' | 'sink S+W' -> (label, policy, S, W)."""
    text = " ".join(text.split())
    if text == "dense":
        return text, "dense", 0, 1024
    m = re.fullmatch(r"window (\d+)", text)
    if m and int(m.group(1)) >= 1:
        return text, "window", 0, int(m.group(1))
    m = re.fullmatch(r"sink (\d+)\+(\d+)", text)
    if m and int(m.group(2)) >= 1:
        return text, "sink", int(m.group(1)), int(m.group(2))
    raise ValueError(f"policy {text!r}: expected dense, 'window C' or 'sink S+W'")


def cache_of(label: str) -> str:
    _, policy, S, W = parse_policy(label)
    return "all" if policy == "dense" else str(S + W)


def accuracy_table(rows: list[dict]) -> tuple[list[str], list[int], dict, dict]:
    """(policies, distances, {(policy, distance): accuracy}, {distance: mean distance in tokens})."""
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    distances = sorted({int(r["distance_lines"]) for r in rows})
    acc, tokens = {}, {}
    for p in policies:
        for d in distances:
            cell = [int(r["correct"]) for r in rows if r["policy"] == p and int(r["distance_lines"]) == d]
            acc[p, d] = sum(cell) / len(cell) if cell else float("nan")
    for d in distances:
        cell = [int(r["distance_tokens"]) for r in rows if int(r["distance_lines"]) == d]
        tokens[d] = sum(cell) / len(cell)
    return policies, distances, acc, tokens


def write_results(out: Path, rows: list[dict], command: str, note: str) -> None:
    columns = ["policy", "cache", "distance_lines", "distance_tokens", "turn", "line", "name", "answer", "reply", "correct"]
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    policies, distances, acc, tokens = accuracy_table(rows)
    md = ["# StreamEval (written by experiments/streameval/run.py)", "",
          f"Command: `{command}`; {note}.",
          "Accuracy: the first number of the reply is the asked line's number. Distance in tokens: mean over the "
          "questions, from the asked line's first token to the end of the question's turn.", "",
          "| distance_lines | distance_tokens | " + " | ".join(policies) + " |",
          "|---|---|" + "---|" * len(policies)]
    for d in distances:
        md.append(f"| {d} | {tokens[d]:.0f} | " + " | ".join(f"{100 * acc[p, d]:.0f}%" for p in policies) + " |")
    (out / "results.md").write_text("\n".join(md) + "\n")


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Accuracy against distance in tokens, one line per policy; each bounded cache's size marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    policies, distances, acc, _ = accuracy_table(rows)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    markers = "osD^v<>"
    for i, p in enumerate(policies):
        xs = []
        for d in distances:
            cell = [int(r["distance_tokens"]) for r in rows if r["policy"] == p and int(r["distance_lines"]) == d]
            xs.append(sum(cell) / len(cell))
        # lines that coincide (several policies at 0%) stay visible: markers of shrinking size
        line, = ax.plot(xs, [100 * acc[p, d] for d in distances], marker=markers[i % len(markers)],
                        ms=9 - 1.2 * i, lw=2.4 - 0.3 * i, ls="--" if p.startswith("window") else "-", label=p)
        if cache_of(p) != "all":
            ax.axvline(int(cache_of(p)), color=line.get_color(), ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("distance from the asked line to the question (tokens; dotted: each cache's size)")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_ylim(-5, 105)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------- command line

def parse_args(argv):
    p = cli.Parser(prog="experiments/streameval/run.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder with a chat template (default: SmolLM2-135M-Instruct)")
    p.add_argument("--policies", default="dense,window 64,sink 4+60,window 256,sink 4+252",
                   help="comma-separated: dense, 'window C', 'sink S+W'")
    p.add_argument("--distances", default="0,1,3,10", help="distances in lines (comma-separated)")
    p.add_argument("--questions", type=cli.int_at_least(1), default=8, help="questions per distance and policy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=cli.int_at_least(1), default=24)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--threads", type=cli.int_at_least(1), default=1)
    p.add_argument("--out", required=True, type=cli.writable_folder)
    p.add_argument("--replot", action="store_true", help="only redraw figure.png from --out's results.csv")
    args = p.parse_args(argv)
    try:
        args.policies = [parse_policy(x) for x in args.policies.split(",") if x.strip()]
        args.distances = [int(x) for x in args.distances.split(",") if x.strip()]
    except ValueError as e:
        p.error(str(e))
    if any(d < 0 for d in args.distances) or not args.distances or not args.policies:
        p.error("need at least one policy and distances >= 0")
    return args


def read_results(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def model_name(folder: Path) -> str:
    return folder.name.split(".")[0]   # SmolLM2-135M-Instruct.Q4_1-b179c9523d0e: the converted GGUF's folder


def run(args, command: str) -> int:
    if args.replot:
        rows = read_results(Path(args.out) / "results.csv")
        questions = len(rows) // max(1, len({(r["policy"], r["distance_lines"]) for r in rows}))
        plot(rows, Path(args.out) / "figure.png", f"StreamEval, {model_name(Path(args.model or 'SmolLM2-135M-Instruct'))}: "
             f"{questions} questions per point")
        return 0
    import torch
    from minisink.generate import end_ids
    from minisink.text.chat import read_chat_template
    from minisink.text.tokenizer import load_tokenizer
    from minisink.weights.load import DTYPES, load_model, read_config
    if args.model is None:
        from minisink.weights.smollm2 import smollm2_folder
        args.model = smollm2_folder()
    folder = Path(args.model)
    template = read_chat_template(folder)
    if template is None:
        raise UserError(f"{folder}: the model has no chat template")
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(folder)
    stop_ids = end_ids(tokenizer, read_config(folder))
    model = load_model(folder, dtype=DTYPES[args.dtype])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, policy, S, W in args.policies:
        for d in args.distances:
            t0 = time.perf_counter()
            turns = schedule(d, args.questions)
            lines = make_lines(args.seed, EVERY * len(turns))
            chat = ModelChat(model, tokenizer, template, stop_ids, policy, S, W, args.max_new_tokens)
            got = evaluate(chat, lines, turns)
            rows += [{"policy": label, "cache": cache_of(label), **r} for r in got]
            print(f"{label}, distance {d}: {sum(r['correct'] for r in got)}/{len(got)} "
                  f"({chat.stream.fed} tokens, {time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    note = (f"seed {args.seed}, {args.questions} questions per distance and policy, greedy replies of at most "
            f"{args.max_new_tokens} tokens, {args.dtype}")
    write_results(out, rows, command, note)
    plot(rows, out / "figure.png", f"StreamEval, {model_name(folder)}: {args.questions} questions per point")
    print(f"wrote results.csv, results.md, figure.png in {out}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = "python experiments/streameval/run.py " + " ".join(
        a if re.fullmatch(r"[\w./,+=-]+", a) else f'"{a}"' for a in argv)
    return cli.main("experiments/streameval/run.py", lambda argv: run(parse_args(argv), command), argv)


if __name__ == "__main__":
    cli.exit_on_interrupt("experiments/streameval/run.py")
    sys.exit(main())

"""Golden cases: what a streaming model produced, recorded so that any implementation can test itself.

    python -m minisink golden make --model FOLDER --out CASE --sink-size 4 --window-size 12
    python -m minisink golden check CASE [CASE ...]                     # minisink against the cases
    python -m minisink golden check CASE --logits THEIRS.safetensors    # another implementation
    python -m minisink golden regenerate [--write]                      # re-record tests/golden/*
    python -m minisink golden streams CASE                              # the ids to feed, as JSON

A case is a folder (docs/golden.md has the full reference and a worked example):

    case.json           what to run: the model (where, and the sha256 of its files), dtype, policy,
                        S and W, the prompt ids, the number of greedy steps, a continuation to score,
                        how logits are stored, the tolerances, the minisink version
    golden.safetensors  what came out (tensors below)

A case runs two streams, each from an empty cache, fed exactly as a user would stream them:

    generation    the prompt (P tokens, longer than S+W), then N greedy steps. Step i produces
                  tokens[i] = argmax of its logits; step 0's logits are the prompt's last row.
                  Fed: prompt + tokens[:-1], P+N-1 tokens.
    continuation  the prompt, then a given continuation of C tokens, teacher-forced.
                  Fed: prompt + continuation[:-1], P+C-1 tokens.

Each fed token gives one row of logits: the prediction of the next token, made through the cache as
it is after that token was written. Rows of the generation stream:

    row     0 .. P-2   | P-1 .. P+N-2
            prompt     | decode step 0 .. N-1        (row P-1 is the prompt's last: it predicts tokens[0])

golden.safetensors, full mode (vocabularies small enough to store whole):

    tokens             (N,)     int64  the greedy tokens
    prompt_logits      (P-1, V) fp32   generation rows 0 .. P-2
    decode_logits      (N, V)   fp32   generation rows P-1 .. P+N-2
    continuation_nll   (C,)     fp32   -log softmax(row P-1+j)[continuation[j]] of the continuation stream

top-k mode (large vocabularies) stores, instead of each X_logits, X_topk_ids (rows, k) int64,
X_topk_values (rows, k) fp32 and X_lse (rows,) fp32, the log-sum-exp of the whole row.

Checking compares an implementation's rows with these: the largest absolute difference of the logits
(at the golden top-k ids, and the log-sum-exp, in top-k mode), top-1 agreement (a different argmax is
forgiven only where the golden logits tie within the tolerance), and the NLL. The first row that is
off is reported with where it sits in the stream: before the cache filled (the model differs) or
after tokens were evicted (positions or eviction differ).
"""
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import __version__
from . import cli
from ..generate import POLICIES, decode_one_token, first_token, make_cache, prefill
from .eval import token_nll
from ..weights.load import DTYPES, load_model, read_config

FORMAT = "minisink-golden-1"
DEFAULT_DIR = Path(__file__).resolve().parents[2] / "tests" / "golden"
FULL_VOCAB_MAX = 1024   # "auto" stores whole rows up to this vocabulary size, top-k beyond
DEFAULT_ATOL = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class GoldenError(Exception):
    """A case, a model folder or a logits file that cannot be used as asked; the message says why."""


# ---------------------------------------------------------------------------------------------
# The case


@dataclass
class Case:
    """case.json, plus the folder it lives in. Field names are the JSON keys."""
    name: str
    architecture: str           # model_type of the model's config.json
    model: dict                 # {"source": path relative to the case folder, "sha256": {file: hex}}
    dtype: str                  # float32 | float16 | bfloat16: the dtype of weights and cache
    policy: str                 # sink | window | dense | recompute, as minisink.generate.make_cache
    sink_size: int              # S
    window_size: int            # W (official StartRecentKVCache(S, R) is W = R + 1)
    prompt: list[int]
    steps: int                  # N greedy steps
    continuation: list[int]
    sampling: str = "greedy"
    logits: dict = field(default_factory=lambda: {"mode": "full"})  # or {"mode": "topk", "k": 32}
    tolerances: dict = field(default_factory=dict)  # logits_atol, lse_atol, nll_atol
    description: str = ""
    device: str = "cpu"
    minisink_version: str = __version__
    torch_version: str = torch.__version__
    prefill_chunk: int = 0      # how minisink fed the prompt when the case was made (0: whole)
    format: str = FORMAT
    folder: Path | None = None  # not in case.json

    # The two streams of token ids to feed, from an empty cache each
    def stream(self, name: str, tokens: list[int] | None = None) -> torch.Tensor:
        """(T,) int64 ids of the 'generation' or 'continuation' stream."""
        if name == "generation":
            tokens = self.golden()["tokens"].tolist() if tokens is None else tokens
            return torch.tensor(self.prompt + tokens[:-1], dtype=torch.long)
        if name == "continuation":
            return torch.tensor(self.prompt + self.continuation[:-1], dtype=torch.long)
        raise ValueError(f"no stream {name!r}: a case has 'generation' and 'continuation'")

    @property
    def capacity(self) -> int:
        """Slots in the cache: a query attends to at most this many keys, itself included."""
        return self.sink_size + self.window_size

    @property
    def model_folder(self) -> Path:
        # relative to the case folder; "~/..." for a model that lives in the user's cache (SmolLM2)
        return (self.folder / Path(self.model["source"]).expanduser()).resolve()

    def golden(self) -> dict[str, torch.Tensor]:
        path = self.folder / "golden.safetensors"
        if not path.is_file():
            raise GoldenError(f"{self.folder}: no golden.safetensors")
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}

    def to_json(self) -> str:
        """One key per line, lists of ids on one line: readable, and diffs well."""
        d = {k: v for k, v in self.__dict__.items() if k != "folder"}
        return "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in d.items()) + "\n}\n"


def load_case(folder) -> Case:
    folder = Path(folder)
    path = folder / "case.json"
    if not path.is_file():
        raise GoldenError(f"{folder}: no case.json (is this a golden case folder?)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GoldenError(f"{path}: not valid JSON ({e})") from None
    if d.get("format") != FORMAT:
        raise GoldenError(f"{path}: format {d.get('format')!r}; this minisink reads {FORMAT!r}")
    known = set(Case.__dataclass_fields__) - {"folder"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise GoldenError(f"{path}: unknown key(s) {', '.join(unknown)}")
    try:
        return Case(**d, folder=folder)
    except TypeError as e:
        raise GoldenError(f"{path}: {e}") from None


def find_cases(paths) -> list[Path]:
    """Case folders named directly, or found one level below (tests/golden -> tests/golden/*)."""
    found = []
    for p in map(Path, paths):
        if (p / "case.json").is_file():
            found.append(p)
        else:
            found += sorted(c.parent for c in p.glob("*/case.json"))
    return found


# ---------------------------------------------------------------------------------------------
# The model and its fingerprint


def fingerprint(folder) -> dict[str, str]:
    """sha256 of every file that defines the model: config.json, the safetensors and their index."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.name == "config.json" or p.name.endswith(".safetensors")
                   or p.name == "model.safetensors.index.json")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def check_model_folder(case: Case, folder=None) -> Path:
    """The folder holding the case's weights, after checking it holds exactly those weights."""
    folder = Path(folder) if folder else case.model_folder
    if not (folder / "config.json").is_file():
        raise GoldenError(f"{case.folder}: model source {folder} not found (case.json says "
                          f"{case.model['source']!r}, relative to the case folder); pass --model FOLDER")
    have, want = fingerprint(folder), case.model["sha256"]
    for name, sha in want.items():
        if have.get(name) != sha:
            raise GoldenError(f"{folder}/{name}: sha256 {have.get(name, 'missing')[:16]}... but the case was "
                              f"made with {sha[:16]}...: not the same model. Remake the case (make_fixtures.py "
                              "for the committed ones) rather than regenerate it")
    return folder


def load_case_model(case: Case, folder=None):
    return load_model(check_model_folder(case, folder), dtype=DTYPES[case.dtype])


# ---------------------------------------------------------------------------------------------
# minisink as a logits function


def minisink_stream(model, policy: str, sink_size: int, window_size: int, prefill_chunk: int = 0):
    """One fresh stream: feed(ids (T,)) -> logits (T, vocab) fp32, one row per token fed.

    T > 1 goes in as chunked prefill (chunks of `prefill_chunk`, 0: all at once), T == 1 as the
    decode step. Either way each row is what token-by-token streaming gives (minisink/cache.py).
    """
    weight = next(model.parameters())
    if policy == "recompute":
        from ..generate import Stream
        stream = Stream(model, "recompute", sink_size, window_size)
        return lambda ids: torch.cat([stream.feed(ids[None, t:t + 1]) for t in range(len(ids))]).float()
    cache = make_cache(policy, sink_size, window_size, weight.device, weight.dtype)

    @torch.inference_mode()
    def feed(ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(weight.device)
        if len(ids) == 1:
            return decode_one_token(model, cache, ids).float()                       # (1, vocab)
        rows = []
        prefill(model, cache, ids[None], prefill_chunk or len(ids), each=lambda start, logits: rows.append(logits[0]))
        return torch.cat(rows).float()
    return feed


def minisink_logits(model, prefill_chunk: int | None = None):
    """The checker's callable for minisink: fn(ids (T,), case) -> logits (T, vocab).

    The prompt goes in as one chunked prefill (chunks of `prefill_chunk`; None: as the case was made,
    1: token by token), every later token through the decode step.
    """
    def fn(ids: torch.Tensor, case: Case) -> torch.Tensor:
        chunk = case.prefill_chunk if prefill_chunk is None else prefill_chunk
        feed = minisink_stream(model, case.policy, case.sink_size, case.window_size, chunk)
        P = len(case.prompt)
        return torch.cat([feed(ids[:P])] + [feed(ids[t:t + 1]) for t in range(P, len(ids))])
    return fn


# ---------------------------------------------------------------------------------------------
# Making a case


def _store_rows(out: dict, part: str, rows: torch.Tensor, logits_mode: dict) -> None:
    rows = rows.float().cpu().contiguous()
    if logits_mode["mode"] == "full":
        out[f"{part}_logits"] = rows
    else:
        top = torch.topk(rows, min(logits_mode["k"], rows.shape[-1]), dim=-1)
        out[f"{part}_topk_ids"], out[f"{part}_topk_values"] = top.indices.contiguous(), top.values.contiguous()
        out[f"{part}_lse"] = torch.logsumexp(rows, -1)


def record(case: Case, model) -> dict[str, torch.Tensor]:
    """Run minisink on a case's inputs: the tensors of golden.safetensors."""
    P = len(case.prompt)
    if P < 2:
        raise GoldenError("the prompt needs at least 2 tokens")
    feed = minisink_stream(model, case.policy, case.sink_size, case.window_size, case.prefill_chunk)
    rows = feed(torch.tensor(case.prompt))                             # (P, V)
    decode = [rows[-1]]
    tokens = [int(rows[-1].argmax())]
    for _ in range(case.steps - 1):                                     # greedy: the argmax, fed back
        row = feed(torch.tensor(tokens[-1:]))[0]
        decode.append(row)
        tokens.append(int(row.argmax()))
    out = {"tokens": torch.tensor(tokens, dtype=torch.long)}
    _store_rows(out, "prompt", rows[:-1], case.logits)
    _store_rows(out, "decode", torch.stack(decode), case.logits)
    if case.continuation:
        cont = minisink_logits(model)(case.stream("continuation"), case)
        out["continuation_nll"] = token_nll(cont[P - 1:], torch.tensor(case.continuation, device=cont.device)).cpu()
    return out


def write_case(case: Case, tensors: dict[str, torch.Tensor]) -> None:
    case.folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(case.folder / "golden.safetensors"), metadata={"format": FORMAT})
    (case.folder / "case.json").write_text(case.to_json())


def make(model_folder, out, *, prompt: list[int], continuation: list[int], steps: int, sink_size: int,
         window_size: int, policy: str = "sink", dtype: str = "float32", logits: str = "auto", top_k: int = 32,
         prefill_chunk: int = 0, tolerances: dict | None = None, name: str | None = None,
         description: str = "") -> Case:
    """Run minisink (on the CPU) over the inputs and write the case folder `out`."""
    model_folder, out = Path(model_folder).resolve(), Path(out)
    if policy not in POLICIES:
        raise GoldenError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if steps < 1:
        raise GoldenError("steps must be at least 1")
    dtype = DTYPE_NAMES[DTYPES[dtype]] if dtype in DTYPES else dtype
    if dtype not in DEFAULT_ATOL:
        raise GoldenError(f"unknown dtype {dtype!r}; choose one of {', '.join(DEFAULT_ATOL)}")
    config = read_config(model_folder)
    vocab = config.get("vocab_size")
    if logits == "auto":
        logits = "full" if vocab and vocab <= FULL_VOCAB_MAX else "topk"
    atol = DEFAULT_ATOL[dtype]
    out.mkdir(parents=True, exist_ok=True)
    case = Case(
        name=name or out.resolve().name, description=description, architecture=config.get("model_type"),
        model={"source": _source(model_folder, out.resolve()), "sha256": fingerprint(model_folder)},
        dtype=dtype, policy=policy, sink_size=sink_size, window_size=window_size, prompt=list(map(int, prompt)),
        steps=steps, continuation=list(map(int, continuation)),
        logits={"mode": "full"} if logits == "full" else {"mode": "topk", "k": top_k},
        tolerances=tolerances or {"logits_atol": atol, "lse_atol": atol, "nll_atol": atol},
        prefill_chunk=prefill_chunk, folder=out)
    write_case(case, record(case, load_case_model(case)))
    return case


def _source(model_folder: Path, case_folder: Path) -> str:
    """The model's path relative to the case folder, so that a case with its model inside (or beside
    the repository, like ../shared) still finds it after a clone; absolute when they share no parent."""
    if os.path.commonpath([model_folder, case_folder]) == model_folder.anchor:
        return model_folder.as_posix()
    return Path(os.path.relpath(model_folder, case_folder)).as_posix()


def regenerate(folders, model_folder=None, write: bool = False) -> list[str]:
    """Re-record cases from their own case.json (same model, same inputs); one line per case on
    what changed. Every case is rebuilt in memory before any file is touched, so a case that cannot
    be rebuilt stops the command with all the files as they were; a case whose model is absent (the
    stories260K case without ../shared) is skipped, and says so. Files are written only if `write`,
    and only those of cases that changed."""
    rebuilt, lines = [], []
    for folder in folders:
        case = load_case(folder)
        if model_folder is None and not case.model_folder.exists():
            lines.append(f"SKIP {case.name}: its model is not at {case.model_folder} (pass --model FOLDER)")
            continue
        rebuilt.append((case, case.golden(), record(case, load_case_model(case, model_folder))))
    for case, old, new in rebuilt:
        changed = [k for k in sorted(new) if k not in old or not torch.equal(old[k], new[k])]
        if not changed:
            lines.append(f"{case.name}: unchanged, bit for bit")
            continue
        if write:
            case.minisink_version, case.torch_version = __version__, torch.__version__
            write_case(case, new)
        diffs = [f"{k} max|Δ| {(old[k].double() - new[k].double()).abs().max().item():.2e}"
                 for k in changed if k in old and old[k].shape == new[k].shape and k != "tokens"]
        tokens = "tokens unchanged" if torch.equal(old["tokens"], new["tokens"]) else "TOKENS CHANGED"
        lines.append(f"{case.name}: {'rewritten' if write else 'would change (pass --write to rewrite it)'}; "
                     f"{tokens}; " + ("; ".join(diffs) or ", ".join(changed)))
    return lines


# ---------------------------------------------------------------------------------------------
# Checking


@dataclass
class PartReport:
    """How one slice of rows compares: 'prompt' or 'decode' (logits) or 'continuation' (NLL)."""
    name: str
    first_row: int              # stream position of this part's row 0
    rows: int
    tol: float
    max_abs: float = 0.0
    worst_row: int = 0
    max_lse: float | None = None        # top-k mode: largest |Δ log-sum-exp|
    first_bad: int | None = None        # row index, within the part, of the first row off
    first_bad_diff: float = 0.0
    top1_agree: int | None = None
    top1_ties: int = 0                  # argmax differs, but the golden logits tie within tol
    first_top1_miss: tuple | None = None   # (row, theirs, golden)

    @property
    def passed(self) -> bool:
        return self.first_bad is None and self.first_top1_miss is None


@dataclass
class Report:
    case: Case
    parts: list[PartReport]
    who: str = "theirs"

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.parts)

    def first_divergence(self) -> tuple[str, int] | None:
        """(stream, position) of the first row that is off: the generation stream first."""
        for p in self.parts:
            bad = [r for r in (p.first_bad, p.first_top1_miss and p.first_top1_miss[0]) if r is not None]
            if bad:
                return ("continuation" if p.name == "continuation" else "generation", p.first_row + min(bad))
        return None

    def where(self, pos: int) -> str:
        """A stream position, said in terms of the cache: how many tokens had been evicted by then."""
        evicted = 0 if self.case.policy == "dense" else max(0, pos + 1 - self.case.capacity)
        return f"stream position {pos}, " + (f"{evicted} evicted" if evicted else "nothing evicted yet")

    def hint(self, pos: int) -> str:
        c = self.case
        sinks = c.sink_size if c.policy == "sink" else 0
        if c.policy == "dense" or pos < c.capacity:
            return ("before any eviction, so the model itself differs: weights, config, dtype, RoPE/ALiBi, "
                    "or the prefill")
        if pos == c.capacity:
            return (f"the first eviction (S+W = {c.capacity}): check which token is evicted (the oldest after "
                    f"the {sinks} sink{'s' * (sinks != 1)}) and the positions given to the keys (positions inside "
                    "the cache, 0..len-1, not in the text)")
        return (f"{pos + 1 - c.capacity} tokens after the first eviction (S+W = {c.capacity}), which matched: "
                "eviction or positions drift later in the stream")

    def __str__(self) -> str:
        c = self.case
        lines = [f"case {c.name} ({c.architecture}, {c.dtype}, {c.policy} S={c.sink_size} W={c.window_size}; "
                 f"prompt {len(c.prompt)}, {c.steps} greedy steps, continuation {len(c.continuation)}; "
                 f"logits {c.logits['mode']}) vs {self.who}"]
        label = {"prompt": "prompt position", "decode": "decode step", "continuation": "continuation token"}
        for p in self.parts:
            what = {"prompt": "prompt logits", "decode": "decode logits", "continuation": "continuation NLL"}[p.name]
            top1 = f"  top-1 {p.top1_agree}/{p.rows}" if p.top1_agree is not None else ""
            if p.top1_ties:
                top1 += f" (+{p.top1_ties} tie{'s' * (p.top1_ties > 1)} within tol)"
            lse = f"  max|Δlse| {p.max_lse:.2e}" if p.max_lse is not None else ""
            lines.append(f"  {what:<17} {p.rows:3d} rows  max|Δ| {p.max_abs:.2e} ({label[p.name]} {p.worst_row})"
                         f"{lse}{top1}  tol {p.tol:g}  {'ok' if p.passed else 'FAIL'}")
            if p.first_bad is not None:
                lines.append(f"      first off: {label[p.name]} {p.first_bad} ({self.where(p.first_row + p.first_bad)})"
                             f"  |Δ| {p.first_bad_diff:.2e}")
            if p.first_top1_miss is not None:
                row, theirs, gold = p.first_top1_miss
                lines.append(f"      first top-1 miss: {label[p.name]} {row} ({self.where(p.first_row + row)})"
                             f"  argmax {theirs}, golden {gold}")
        first = self.first_divergence()
        if first is None:
            lines.append("PASS")
        else:
            stream, pos = first
            lines.append(f"FAIL: first divergence at {stream} {self.where(pos)}: {self.hint(pos)}")
        return "\n".join(lines)


def _compare_rows(part: PartReport, theirs: torch.Tensor, golden: dict, logits_mode: dict, lse_tol: float) -> None:
    """Fill `part` from their rows (rows, V) against the golden tensors of this part."""
    theirs = theirs.double()
    top1 = theirs.argmax(-1)
    lse_bad = None
    if logits_mode["mode"] == "full":
        gold = golden[f"{part.name}_logits"].double()
        diff = (theirs - gold).abs().amax(-1)                                 # (rows,)
        gold_top = gold.max(-1).values
        gold_at_theirs = gold.gather(-1, top1[:, None])[:, 0]
        gold_top1 = gold.argmax(-1)
    else:
        ids, values = golden[f"{part.name}_topk_ids"], golden[f"{part.name}_topk_values"].double()
        diff = (theirs.gather(-1, ids) - values).abs().amax(-1)
        lse_diff = torch.nan_to_num((torch.logsumexp(theirs, -1) - golden[f"{part.name}_lse"].double()).abs(),
                                    nan=torch.inf)
        part.max_lse = float(lse_diff.max()) if len(lse_diff) else 0.0
        lse_bad = lse_diff > lse_tol
        gold_top, gold_top1 = values[:, 0], ids[:, 0]
        hit = ids == top1[:, None]                                            # their argmax among golden top-k?
        gold_at_theirs = torch.where(hit.any(-1), (values * hit).sum(-1), torch.full_like(gold_top, -torch.inf))
    _fill_diff(part, diff, lse_bad)
    agree = top1 == gold_top1
    tie = ~agree & (gold_at_theirs >= gold_top - part.tol)                    # a near-tie: either argmax is fine
    part.top1_agree, part.top1_ties = int(agree.sum()), int(tie.sum())
    miss = (~agree & ~tie).nonzero()
    if len(miss):
        r = int(miss[0])
        part.first_top1_miss = (r, int(top1[r]), int(gold_top1[r]))


def _fill_diff(part: PartReport, diff: torch.Tensor, also_bad: torch.Tensor | None = None) -> None:
    """diff (rows,): |Δ| per row; a row is off when diff > tol (or `also_bad` says so)."""
    diff = torch.nan_to_num(diff, nan=torch.inf)   # NaN logits are never within tolerance
    if len(diff):
        part.max_abs, part.worst_row = float(diff.max()), int(diff.argmax())
    bad = diff > part.tol
    bad = (bad | also_bad) if also_bad is not None else bad
    bad = bad.nonzero()
    if len(bad):
        part.first_bad = int(bad[0])
        part.first_bad_diff = float(diff[part.first_bad])


def check_logits(case: Case, logits: dict[str, torch.Tensor], who: str = "theirs") -> Report:
    """Compare logits for the case's two streams, {'generation': (P+N-1, V), 'continuation': (P+C-1, V)}."""
    golden, P, tol = case.golden(), len(case.prompt), case.tolerances
    vocab = (golden["prompt_logits"].shape[-1] if "prompt_logits" in golden else None)
    parts = []
    for stream in ("generation", "continuation"):
        if stream == "continuation" and not case.continuation:
            continue
        want = len(case.stream(stream, golden["tokens"].tolist()))
        if stream not in logits:
            raise GoldenError(f"{who}: no logits for the {stream} stream")
        got = logits[stream]
        got = got[0] if got.ndim == 3 and got.shape[0] == 1 else got
        if got.ndim != 2 or got.shape[0] != want or (vocab and got.shape[1] != vocab):
            raise GoldenError(f"{who}: {stream} logits have shape {tuple(got.shape)}; the case needs "
                              f"({want}, {vocab or 'vocab'}): one row per token of case.stream({stream!r})")
        got = got.detach().float().cpu()
        if stream == "generation":
            for name, rows in (("prompt", got[:P - 1]), ("decode", got[P - 1:])):
                part = PartReport(name, 0 if name == "prompt" else P - 1, len(rows), tol["logits_atol"])
                _compare_rows(part, rows, golden, case.logits, tol.get("lse_atol", tol["logits_atol"]))
                parts.append(part)
        else:
            part = PartReport("continuation", P - 1, len(case.continuation), tol["nll_atol"])
            _fill_diff(part, (token_nll(got[P - 1:], torch.tensor(case.continuation, device=got.device)).cpu() - golden["continuation_nll"]).abs())
            parts.append(part)
    return Report(case, parts, who)


def run_streams(case: Case, fn) -> dict[str, torch.Tensor]:
    """fn(ids (T,), case) -> logits (T, V) over both streams: what `check_logits` takes."""
    streams = ["generation"] + (["continuation"] if case.continuation else [])
    return {s: fn(case.stream(s), case) for s in streams}


def check(case: Case | str | Path, fn, who: str = "theirs") -> Report:
    """Check a logits function against a case.

    fn(ids, case) gets the (T,) int64 ids of one stream and must return its logits (T, vocab): row t
    is the prediction after ids[0..t] streamed through a fresh cache with the case's policy, S and W.
    """
    case = case if isinstance(case, Case) else load_case(case)
    with torch.inference_mode():
        return check_logits(case, run_streams(case, fn), who)


def read_logits_file(path) -> dict[str, torch.Tensor]:
    """THEIRS.safetensors: generation_logits (P+N-1, V) and continuation_logits (P+C-1, V)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:
        raise GoldenError(f"{path}: not a readable safetensors file ({e})") from None
    out = {s: tensors[f"{s}_logits"] for s in ("generation", "continuation") if f"{s}_logits" in tensors}
    if "generation_logits" not in tensors:
        raise GoldenError(f"{path}: expected tensors generation_logits and continuation_logits, found "
                          f"{', '.join(sorted(tensors)) or 'none'}")
    return out


# ---------------------------------------------------------------------------------------------
# Command line


def _ids_from(args, config) -> tuple[list[int], list[int]]:
    """Prompt and continuation: consecutive tokens of a text, or seeded random ids."""
    need = args.prompt_len + args.continuation_len
    if args.text:
        from ..text.tokenizer import load_tokenizer
        tok = load_tokenizer(args.model)
        first = first_token(tok, config)   # what every stream of this model starts with, as run.py's
        ids = ([first] if first is not None else []) + tok.encode(cli.read_text(args.text)[: 20 * need], bos=False)
        if len(ids) < need:
            raise GoldenError(f"{args.text}: {len(ids)} tokens, need {need}")
    else:
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, config["vocab_size"], (need,), generator=g).tolist()
    return ids[:args.prompt_len], ids[args.prompt_len:need]


# CPU kernels split work differently over different numbers of threads, which moves fp32 results
# in the last bits; one thread makes reruns (and regenerations) repeat the same bits.
THREADS_HELP = f"CPU threads (default 1: the same bits on every rerun); {cli.THREADS_HELP}"
CASE_MAX = 100_000  # --sink-size, --window-size, --prompt-len, --steps, --continuation-len at most


def parse_args(argv=None):
    """Every flag checked as it is read (minisink/tools/cli.py): a bad one exits 2 before any model loads."""
    parser = cli.Parser(prog="python -m minisink golden", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    at_least_0, at_least_1, at_least_2 = cli.int_at_least(0), cli.int_at_least(1), cli.int_at_least(2)
    # a case is read by people and by CI: its files hold every step, so its lengths stay small
    small = lambda low: cli.int_between(low, CASE_MAX, " (a golden case is meant to be small)")
    m = sub.add_parser("make", help="run minisink on a model and write a case folder")
    m.add_argument("--model", required=True, help="model folder (config.json + safetensors)")
    m.add_argument("--out", required=True, type=cli.writable_folder, help="case folder to write")
    m.add_argument("--policy", default="sink", choices=POLICIES)
    m.add_argument("--sink-size", type=small(0), default=4)
    m.add_argument("--window-size", type=small(1), default=12)
    m.add_argument("--prompt-len", type=small(2), default=40, help="make it longer than S+W")
    m.add_argument("--steps", type=small(1), default=40, help="greedy decode steps")
    m.add_argument("--continuation-len", type=small(0), default=40, help="teacher-forced tokens scored by NLL")
    m.add_argument("--text", type=cli.readable_file,
                   help="take prompt and continuation from this UTF-8 text (the model's tokenizer); "
                        "default: random ids from --seed")
    m.add_argument("--seed", type=cli.seed, default=0)
    m.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    m.add_argument("--logits", default="auto", choices=("auto", "full", "topk"),
                   help=f"auto: full rows up to a vocabulary of {FULL_VOCAB_MAX}, top-k beyond")
    m.add_argument("--top-k", type=at_least_1, default=32)
    m.add_argument("--atol", type=positive_float, help="tolerance on logits, log-sum-exp and NLL (default by dtype)")
    m.add_argument("--prefill-chunk", type=small(0), default=0, help="0: the prompt in one chunk")
    m.add_argument("--name")
    m.add_argument("--description", default="")
    m.add_argument("--threads", type=cli.threads, default=1, help=THREADS_HELP)
    c = sub.add_parser("check", help="check minisink, or a logits file, against case(s); exit 1 on failure")
    c.add_argument("cases", nargs="+", help="case folders, or folders of cases")
    c.add_argument("--logits", type=cli.readable_file,
                   help="THEIRS.safetensors with generation_logits and continuation_logits "
                        "(one case only); without it minisink is checked")
    c.add_argument("--model", help="where the case's model is, if not at its recorded source")
    c.add_argument("--prefill-chunk", type=at_least_1, help="minisink's prefill chunk (default: as made; 1: streaming)")
    r = sub.add_parser("regenerate", help="re-record cases from their case.json (same model and inputs); "
                                          "says what would change, and writes only with --write")
    r.add_argument("cases", nargs="*", default=[str(DEFAULT_DIR)])
    r.add_argument("--model", help="where the case's model is, if not at its recorded source")
    r.add_argument("--threads", type=cli.threads, default=1, help=THREADS_HELP)
    r.add_argument("--write", action="store_true",
                   help="rewrite the cases that changed (default: only report), once every case has been rebuilt")
    s = sub.add_parser("streams", help="print the ids of the two streams to feed, as JSON")
    s.add_argument("case")
    return parser.parse_args(argv)


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and value < float("inf")):
        raise ValueError(text)
    return value


def run(argv=None) -> int:
    args = parse_args(argv)
    if args.command in ("make", "regenerate"):
        torch.set_num_threads(args.threads)
    if args.command == "make":
        prompt, continuation = _ids_from(args, read_config(args.model))
        atol = args.atol
        case = make(args.model, args.out, prompt=prompt, continuation=continuation, steps=args.steps,
                    sink_size=args.sink_size, window_size=args.window_size, policy=args.policy,
                    dtype=args.dtype, logits=args.logits, top_k=args.top_k, prefill_chunk=args.prefill_chunk,
                    tolerances={"logits_atol": atol, "lse_atol": atol, "nll_atol": atol} if atol else None,
                    name=args.name, description=args.description)
        print(f"wrote {case.folder} ({len(case.prompt)} prompt, {case.steps} steps, "
              f"{len(case.continuation)} continuation tokens; S={case.sink_size} W={case.window_size})")
        return 0
    if args.command == "streams":
        case = load_case(args.case)
        print(json.dumps({s: case.stream(s).tolist() for s in ("generation", "continuation")}))
        return 0
    folders = find_cases(args.cases)
    if not folders:
        raise GoldenError(f"no case.json in {', '.join(args.cases)}")
    if args.command == "regenerate":
        print("\n".join(regenerate(folders, args.model, write=args.write)))
        return 0
    if args.logits and len(folders) > 1:
        raise GoldenError("--logits checks one case; name exactly one case folder")
    ok = True
    for folder in folders:
        case = load_case(folder)
        if not args.logits and not args.model and not case.model_folder.exists():
            # e.g. stories260K in a clone without ../shared/assets: say so, check the others
            print(f"SKIP {case.name}: its model is not at {case.model_folder} (pass --model FOLDER)\n")
            continue
        if args.logits:
            report = check_logits(case, read_logits_file(args.logits), who=args.logits)
        else:
            report = check(case, minisink_logits(load_case_model(case, args.model), args.prefill_chunk),
                           who="minisink")
        print(report, end="\n\n")
        ok &= report.passed
    return 0 if ok else 1


def main(argv=None) -> int:
    """Exit 0 pass, 1 a check failed, 2 unusable input (one line on stderr; docs/golden.md)."""
    return cli.main("python -m minisink golden", run, argv, errors=(GoldenError,), error_code=2)


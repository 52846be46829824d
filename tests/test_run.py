"""run.py end to end: the real script in a subprocess, on local folders; its errors, one line each.

Nothing here downloads. The hub's failures are produced by huggingface_hub itself: offline mode
for real (HF_HUB_OFFLINE=1, empty cache), and gated / missing / unreachable repos by a fake
download function whose exceptions come from huggingface_hub's own response handling.
"""
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import ASSETS, REPO, STORIES, need_assets

sys.path.insert(0, str(REPO))
import run  # noqa: E402  (the script, imported as a module)
from minisink.generate import Stream, end_ids  # noqa: E402
from minisink.weights.load import build_config, load_model  # noqa: E402
from minisink.text.tokenizer import load_tokenizer  # noqa: E402

TOKENIZERS = ASSETS / "tokenizers"


def run_py(*args, env=None, timeout=120):
    """`python run.py args...` -> CompletedProcess (text). One torch thread: the machine is shared."""
    env = {**{k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")},
           "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "run.py"), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, encoding="utf-8", timeout=timeout)


def main_in_process(argv, download=None):
    """run.main(argv) in this process -> (exit code, what it printed on stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run.main(argv, download=download)
    return code, err.getvalue()


def assert_one_line_error(stderr: str, *phrases):
    """The error contract: exactly one line on stderr, the phrases in it, no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("run.py: error: "), stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])


def summary_of(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    # the cache that run.py chose (when --window-size is not given) is said before the stream starts
    lines = [line for line in stderr.strip("\n").split("\n") if not line.startswith("run.py: cache: ")]
    assert len(lines) == 1 and lines[0].startswith("run.py: "), stderr  # status is off: not a TTY
    return lines[0]


# ------------------------------------------------------------------------------- real model, golden

def test_stream_greedy_reproduces_llama2c_golden_text():
    need_assets(STORIES)
    result = run_py("--model", STORIES, "--stream", "--max-new-tokens", 200, "--temperature", 0)
    assert result.returncode == 0, result.stderr
    expected = (STORIES / "expected_greedy_200.txt").read_text()
    assert result.stdout == expected + "\n"  # the text, then run.py ends the line
    summary = summary_of(result.stderr)
    assert "200 tokens generated; time to first token" in summary and "(1 prompt token)" in summary
    assert "tok/s" in summary and "ms/token" in summary
    assert "GB/s of weights read" in summary and "cache 200/512 slots, 0 evicted (sink, S=4 W=508)" in summary


def readme_first_command() -> list[str]:
    """The run.py part of the README's first command (`pip install ... && python run.py ...`), as argv."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Two commands.*?```bash\n(.*?)\n```", readme, re.S).group(1)
    command = block.split("&&")[-1].strip()
    argv = shlex.split(command)
    assert argv[:2] == ["python", "run.py"], command
    return argv[1:]


def test_fresh_clone_streams_english_offline_with_the_default_model(tmp_path):
    """What a newcomer runs first, the README's own command: no --model, no network, no ../shared
    beside the checkout. It streams past its cache (issue 26): the status line (stderr on a terminal)
    and the summary count evictions."""
    pty = pytest.importorskip("pty")
    clone = tmp_path / "minisink"
    shutil.copytree(REPO / "minisink", clone / "minisink", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "run.py", clone / "run.py")
    assert not (clone.parent / "shared").exists()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, *readme_first_command()], cwd=clone, env=env,
                            stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    try:
        stdout, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    err, stdout = drain(master).decode(), stdout.decode()
    assert proc.returncode == 0 and "Traceback" not in err, err
    summary = err.rsplit("\x1b[2K", 1)[-1].strip()
    evicted = re.search(r"cache 256/256 slots, ([\d,]+) evicted \(sink, S=4 W=252\)", summary)
    assert evicted and int(evicted.group(1).replace(",", "")) >= 256, summary  # well past the cache
    statuses = re.findall(r"\[[\d,]+ tokens \| cache \d+/256 slots, ([\d,]+) evicted \|", err)
    assert statuses and max(int(n.replace(",", "")) for n in statuses) > 0, err
    words = re.findall(r"[A-Za-z']+", stdout)
    common = {"the", "a", "and", "was", "to", "she", "he", "they", "her", "his", "it", "in", "said"}
    assert len(words) > 400 and sum(w.lower() in common for w in words) > len(words) / 6, stdout


# ------------------------------------------------------------- tiny random checkpoints, other archs

TINY = {  # config.json of each; the context (S+W) is 32 so that 40 new tokens evict
    "gpt_neox": (dict(model_type="gpt_neox", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=0),
                 "gpt-neox-20b"),
    "falcon": (dict(model_type="falcon", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    multi_query=True, parallel_attn=True, bias=False, alibi=False, max_position_embeddings=32,
                    bos_token_id=11, eos_token_id=11), "falcon"),
    "mpt": (dict(model_type="mpt", d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=32,
                 no_bias=True, attn_config={"alibi": True}), "gpt-neox-20b"),  # MPT uses NeoX's tokenizer
}


def tiny_folder(arch: str, folder: Path):
    """A random checkpoint of minisink's own model class, saved as a hub folder would be.
    Returns the folder and its tokenizer."""
    config, tokenizer = TINY[arch]
    need_assets(TOKENIZERS / tokenizer / "tokenizer.json")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(TOKENIZERS / tokenizer / "tokenizer.json", folder)
    tokenizer = load_tokenizer(folder)
    config = dict(config, vocab_size=tokenizer.vocab_size)
    cls, parsed = build_config(config)
    torch.manual_seed(0)
    model = cls(parsed)
    # named_parameters() lists a tied weight once, as the checkpoint stores it
    save_file({name: p.detach().contiguous() for name, p in model.named_parameters()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder, tokenizer


@pytest.mark.parametrize("arch", list(TINY))
def test_stream_tiny_random_checkpoint(arch, tmp_path):
    folder, tokenizer = tiny_folder(arch, tmp_path / arch)
    result = run_py("--model", folder, "--stream", "--prompt", "Hello, world", "--max-new-tokens", 40,
                    "--temperature", 0)
    assert result.returncode == 0, result.stderr
    # the same stream in-process: what run.py prints must be the decoded tokens, prompt first
    prompt = tokenizer.encode("Hello, world")
    stream = Stream(load_model(folder), sink_size=4, window_size=28)
    new = [int(t) for t in stream.generate(torch.tensor([[tokenizer.bos_id] + prompt]), max_new_tokens=40)]
    assert result.stdout == tokenizer.decode(prompt + new) + "\n"
    assert result.stdout.startswith("Hello, world")
    # over 32 tokens: evicting. Fed: BOS, the prompt and 39 of the 40 new tokens (the last is never fed)
    assert f"cache 32/32 slots, {1 + len(prompt) + 39 - 32} evicted (sink, S=4 W=28)" in summary_of(result.stderr)


# -------------------------------------------------------------------------------------------- chat

def write_prompts(path: Path) -> Path:
    path.write_text(json.dumps({"question_id": 81, "turns": ["Tell me a story about a cat.", "What did the cat eat?"]})
                    + "\n" + json.dumps({"question_id": 82, "turns": ["Who was Lily?"]}) + "\n")
    return path


def test_chat_from_prompts_file(tmp_path):
    need_assets(STORIES)
    result = run_py("--model", STORIES, "--prompts", write_prompts(tmp_path / "q.jsonl"), "--max-new-tokens", 12,
                    "--temperature", 0)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert [line for line in lines if line.startswith("USER: ")] == [
        "USER: Tell me a story about a cat.", "USER: What did the cat eat?", "USER: Who was Lily?"]
    assert sum(line.startswith("ASSISTANT: ") for line in lines) == 3
    summary = summary_of(result.stderr)
    generated, fed = map(int, re.search(r"3 turns, (\d+) tokens generated; .* over 3 turns \((\d+) prompt tokens\)",
                                        summary).groups())
    assert generated <= 36
    # one stream for the whole chat: the cache holds every turn and every reply (the last reply
    # token is still pending, fed with the next turn)
    assert f"cache {fed + generated - 1}/512 slots" in summary


def test_chat_cache_persists_across_turns(tmp_path):
    """Three turns through Demo.chat, then one fresh stream fed the concatenation of everything
    before the third reply: it must give the same third reply, token for token."""
    need_assets(STORIES)
    args = run.parse_args(["--model", str(STORIES), "--max-new-tokens", "15", "--temperature", "0", "--no-status"])
    demo, first, _ = run.make_demo(args)
    demo.out = io.StringIO()
    turns = run.read_prompts(write_prompts(tmp_path / "q.jsonl"))
    transcript = demo.chat(first, turns)
    assert len(transcript) == 3
    total = len(first) + sum(len(t["prompt_ids"]) + len(t["reply_ids"]) for t in transcript)
    assert demo.stream.tokens_seen == total - 1  # all but the last reply token, which is pending
    assert demo.meter.generated == sum(len(t["reply_ids"]) for t in transcript)

    history = first + [i for t in transcript[:2] for i in t["prompt_ids"] + t["reply_ids"]] + transcript[2]["prompt_ids"]
    fresh = Stream(demo.model, sink_size=4, window_size=508)
    third = transcript[2]["reply_ids"]
    again = [int(t) for t in fresh.generate(torch.tensor([history]), max_new_tokens=len(third))]
    assert again == third
    assert demo.out.getvalue().count("ASSISTANT: ") == 3


def test_chat_uses_the_checkpoints_own_template(tmp_path):
    """A folder whose tokenizer_config.json has TinyLlama-Chat's (Zephyr) template: each turn feeds the
    template's text for it, and a reply cut off by --max-new-tokens is closed as the template closes
    it (EOS, then its newline) before the next turn."""
    folder, tokenizer = tiny_folder("gpt_neox", tmp_path / "chat")
    zephyr = json.loads((REPO / "tests" / "data" / "chat_templates.json").read_text())["templates"]
    template = next(t["template"] for t in zephyr if t["name"] == "tinyllama-chat")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "chat_template": template}))
    args = run.parse_args(["--model", str(folder), "--max-new-tokens", "3", "--temperature", "0", "--no-status"])
    demo, first, _ = run.make_demo(args)
    demo.out, fed = io.StringIO(), []
    feed = demo.feed
    demo.feed = lambda ids: (fed.append(list(ids)), feed(ids))
    transcript = demo.chat(first, ["Hi", "Again"])
    assert first == [tokenizer.bos_id]  # the template writes no BOS: the stream starts with one
    assert transcript[0]["prompt_ids"] == tokenizer.encode("<|user|>\nHi<|endoftext|>\n<|assistant|>\n")
    assert fed[2] == tokenizer.encode("<|endoftext|>\n")  # after the 3 tokens of the first reply
    assert transcript[1]["prompt_ids"] == tokenizer.encode("<|user|>\nAgain<|endoftext|>\n<|assistant|>\n")


def test_chat_from_piped_stdin(monkeypatch, capsys):
    need_assets(STORIES)
    piped = io.TextIOWrapper(io.BytesIO(b"hello there\n\nhow are you\n"), encoding="utf-8")  # not a TTY
    monkeypatch.setattr(sys, "stdin", piped)
    assert run.main(["--model", str(STORIES), "--max-new-tokens", "5", "--seed", "1"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("USER: hello there\nASSISTANT: ") and "\nUSER: how are you\nASSISTANT: " in out
    assert "2 turns" in summary_of(err)


def test_one_piped_turn_is_one_turn(monkeypatch, capsys):
    need_assets(STORIES)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hello\n")))
    assert run.main(["--model", str(STORIES), "--max-new-tokens", "3", "--seed", "1"]) == 0
    assert summary_of(capsys.readouterr().err).startswith("run.py: 1 turn, 3 tokens generated")


def test_typed_chat_banner_empty_line_and_bad_utf8(monkeypatch):
    """At a terminal: a banner says how to quit; an empty line or one that is not UTF-8 gets a hint
    and the prompt again, instead of a turn or a crash."""
    answers = iter(["", UnicodeDecodeError("utf-8", b"caf\xe9", 3, 4, "invalid"), "hi", EOFError()])

    def typed(prompt):
        answer = next(answers)
        if isinstance(answer, BaseException):
            raise answer
        return answer
    monkeypatch.setattr("builtins.input", typed)
    out = io.StringIO()
    assert list(run.typed_or_piped_turns(True, out)) == ["hi"]
    lines = out.getvalue().splitlines()
    assert "Ctrl-D" in lines[0] and "quits" in lines[0]
    assert lines[1] == "(empty message: type something, or Ctrl-D to quit)"
    assert lines[2] == "(that line is not UTF-8: byte 0xe9 at offset 3; type it again)"


def test_status_waits_for_the_end_of_a_line_on_a_shared_terminal(monkeypatch):
    """stdout and stderr on one terminal: the status is drawn only at the start of a line of text,
    and wiped before the next text, so the two never interleave."""
    fake = io.StringIO()
    monkeypatch.setattr(sys, "stderr", fake)
    status = run.StatusLine(False)
    status.enabled = status.shared = True
    status.before_text("Once upon a")          # mid-line: no status
    assert not status.due()
    status.before_text(" time.\n")              # the line ended: the status may show
    assert status.due()
    status.show("[5 tokens]")
    status.before_text("Lily")                 # wiped before the text continues
    assert fake.getvalue() == "\r\x1b[2K[5 tokens]\r\x1b[2K" and not status.due()


def test_stop_text_never_prints_a_stop_string():
    stop = run.StopText(("\nUSER:",))
    assert stop.push("Hi there") == ("Hi there", False)
    assert stop.push("!\nUS") == ("!", False)          # "\nUS" might be the start of "\nUSER:"
    assert stop.push("E") == ("", False)
    assert stop.push("R: again") == ("", True)
    stop = run.StopText(("\nUSER:",))
    assert stop.push("\nUSA") == ("\nUSA", False)      # was not a stop after all


# --------------------------------------------------------------------------- Ctrl-C and the status

def test_ctrl_c_ends_an_endless_stream_with_a_summary_and_status_line():
    """An endless stream with stderr on a pseudo-terminal: the status line is drawn (tokens, cache
    slots, tok/s, RSS); Ctrl-C (SIGINT) ends it with the summary, exit code 0, no traceback."""
    need_assets(STORIES)
    pty = pytest.importorskip("pty")
    master, slave = pty.openpty()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "run.py"), "--model", str(STORIES), "--stream", "--seed", "0",
                             "--window-size", "8"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    try:
        assert len(proc.stdout.read(1000)) == 1000  # it is streaming, past the 12 slots of the cache
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    err = drain(master).decode()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert re.search(r"\[[\d,]+ tokens \| cache \d+/12 slots, [\d,]+ evicted \| [\d.,]+ tok/s \| RSS [\d,]+ MB\]", err), err
    summary = err.rsplit("\x1b[2K", 1)[-1].strip()  # after the status line is cleared
    assert summary.startswith("run.py: interrupted: ") and "cache 12/12 slots" in summary, summary


def read_or_eof(fd) -> bytes:
    try:
        return os.read(fd, 1 << 16)
    except OSError:  # Linux: EIO once the other end is closed
        return b""


def drain(master: int) -> bytes:
    """Everything left on a pty's master side, which is then closed."""
    out = b""
    while chunk := read_or_eof(master):
        out += chunk
    os.close(master)
    return out


# ------------------------------------------------------------------------------------------ memory

def test_memory_stays_flat_in_a_long_stream():
    """Cheap version of the slow test below: 1,500 tokens through a 12-slot cache; the cache never
    grows and nothing run.py keeps grows with the stream (RSS after 1,500 tokens ~ after 300)."""
    need_assets(STORIES)
    args = run.parse_args(["--model", str(STORIES), "--stream", "--window-size", "8", "--no-status", "--seed", "0"])
    demo, first, prompt = run.make_demo(args)
    demo.out = io.StringIO()
    rss = []
    for n in (300, 1500):
        demo.args.max_new_tokens = n - demo.meter.generated
        demo.out.seek(0), demo.out.truncate()
        demo.monologue(first if not rss else [], prompt if not rss else [])
        rss.append(float(re.search(r"RSS ([\d,.]+) MB", run.memory(demo.stream.device)).group(1).replace(",", "")))
    assert demo.meter.generated == 1500 and demo.stream.tokens_seen == 1500  # one stream, continued
    assert demo.stream.slots_used == 12 and demo.stream.cache.k[0].shape[2] == 12
    assert rss[1] - rss[0] < 5, rss


def rss_mb(stderr: str) -> float:
    return float(re.search(r"RSS ([\d,]+) MB", summary_of(stderr)).group(1).replace(",", ""))


@pytest.mark.slow
def test_memory_flat_over_100k_tokens():
    """`python run.py --stream --max-new-tokens N` for N = 10K and 100K: RSS at the end is the same.
    About 5 minutes on one CPU thread; run with `pytest -m slow`. Result in docs/run.md."""
    need_assets(STORIES)
    rss = {}
    for n in (10_000, 100_000):
        result = run_py("--model", STORIES, "--stream", "--max-new-tokens", n, "--seed", 0, timeout=1200)
        assert result.returncode == 0, result.stderr
        assert f"{n:,} tokens generated" in result.stderr
        rss[n] = rss_mb(result.stderr)
    assert abs(rss[100_000] - rss[10_000]) < 5, rss


# -------------------------------------------------------------------------------------------- errors

def test_offline_mode_names_the_local_folder_alternative(tmp_path):
    result = run_py("--model", "pythia-70m", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "EleutherAI/pythia-70m", "offline mode", "HF_HUB_OFFLINE",
                          "--model path/to/folder")


def test_folder_with_only_a_pickle_is_refused(tmp_path):
    need_assets(STORIES)
    shutil.copy(STORIES / "config.json", tmp_path)
    shutil.copy(STORIES / "tokenizer.model", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled, ever")
    code, err = main_in_process(["--model", str(tmp_path), "--stream"])
    assert code == 1
    assert_one_line_error(err, "pytorch_model.bin", "safetensors only")


def test_unknown_short_name_lists_close_matches():
    code, err = main_in_process(["--model", "pythia-70n", "--stream"])
    assert code == 1
    assert_one_line_error(err, "unknown model name 'pythia-70n'", "did you mean", "pythia-70m", "--list-models")


def test_missing_folder():
    code, err = main_in_process(["--model", "./no/such/folder"])
    assert code == 1
    assert_one_line_error(err, "./no/such/folder: no such folder")


def http_error(status: int, url: str, **headers):
    """A fake download that fails exactly as huggingface_hub fails on this HTTP response."""
    from httpx2 import Request, Response  # the HTTP library huggingface_hub 1.x+ is built on
    from huggingface_hub.utils import hf_raise_for_status

    def download(repo_id, revision=None, allow_patterns=None):
        hf_raise_for_status(Response(status, headers=headers, request=Request("GET", url)))
    return download


def test_gated_repo_without_a_token_says_how_to_log_in(monkeypatch, tmp_path):
    pytest.importorskip("httpx2")
    import huggingface_hub.constants
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "token"))  # not logged in
    download = http_error(401, "https://huggingface.co/api/models/meta-llama/Llama-2-7b-chat-hf/revision/main",
                          **{"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model is restricted"})
    code, err = main_in_process(["--model", "llama-2-7b-chat"], download=download)
    assert code == 1
    assert_one_line_error(err, "meta-llama/Llama-2-7b-chat-hf is a gated repo", "hf auth login", "HF_TOKEN",
                          "https://huggingface.co/meta-llama/Llama-2-7b-chat-hf")


def test_repo_not_found(monkeypatch):
    pytest.importorskip("httpx2")
    download = http_error(404, "https://huggingface.co/api/models/someone/nothing/revision/main",
                          **{"X-Error-Code": "RepoNotFound"})
    code, err = main_in_process(["--model", "someone/nothing"], download=download)
    assert code == 1
    assert_one_line_error(err, "someone/nothing: no such local folder, nor model repo", "hf auth login")


def test_revision_not_found(monkeypatch):
    pytest.importorskip("httpx2")
    download = http_error(404, "https://huggingface.co/api/models/EleutherAI/pythia-70m/revision/refs%2Fpr%2F99",
                          **{"X-Error-Code": "RevisionNotFound"})
    code, err = main_in_process(["--model", "pythia-70m", "--revision", "refs/pr/99"], download=download)
    assert code == 1
    assert_one_line_error(err, "EleutherAI/pythia-70m has no revision 'refs/pr/99'")


def test_repo_without_safetensors_suggests_a_revision(tmp_path):
    """allow_patterns skips *.bin, so a pickle-only repo downloads as config + tokenizer only."""
    need_assets(STORIES)

    def download(repo_id, revision=None, allow_patterns=None):
        assert not any(p.endswith(".bin") for p in allow_patterns)
        shutil.copy(STORIES / "config.json", tmp_path)
        shutil.copy(STORIES / "tokenizer.model", tmp_path)
        return str(tmp_path)
    code, err = main_in_process(["--model", "pythia-160m"], download=download)
    assert code == 1
    assert_one_line_error(err, "EleutherAI/pythia-160m has no safetensors weights", "pickled .bin", "--revision refs/pr/N")


def test_hub_unreachable(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def download(repo_id, revision=None, allow_patterns=None):  # what snapshot_download raises with no network
        raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub, and we "
                                      "cannot find the appropriate snapshot folder")
    code, err = main_in_process(["--model", "tiiuae/falcon-7b"], download=download)
    assert code == 1
    assert_one_line_error(err, "tiiuae/falcon-7b", "unreachable", "--model path/to/folder")


def test_download_gets_revision_and_only_what_minisink_reads(tmp_path):
    need_assets(STORIES)
    calls = []

    def download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(STORIES)
    code, err = main_in_process(["--model", "mpt-7b-chat", "--revision", "refs/pr/3", "--stream",
                                 "--max-new-tokens", "3"], download=download)
    assert code == 0, err
    (repo_id, revision, small), (_, _, patterns) = calls  # the small files first, then with the weights
    assert (repo_id, revision) == ("mosaicml/mpt-7b-chat", "refs/pr/3")
    assert "*.safetensors" not in small and {"config.json", "tokenizer.json", "tokenizer.model"} <= set(small)
    assert set(patterns) >= {"*.safetensors", "config.json", "tokenizer.json", "tokenizer.model"}


def test_missing_tokenizer_is_one_line(tmp_path):
    need_assets(STORIES)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(STORIES / name, tmp_path)
    code, err = main_in_process(["--model", str(tmp_path), "--stream"])
    assert code == 1
    assert_one_line_error(err, "tokenizer: ", "no tokenizer found")


def test_fp16_on_cpu_is_refused():
    need_assets(STORIES)
    code, err = main_in_process(["--model", str(STORIES), "--stream", "--device", "cpu", "--dtype", "fp16"])
    assert code == 1
    assert_one_line_error(err, "--dtype fp16 is refused on CPU", "fp32", "bf16")


def test_bad_prompts_file(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"turns": ["fine"]}\n{"question": "no turns"}\n')
    code, err = main_in_process(["--prompts", str(path)])
    assert code == 1
    assert_one_line_error(err, f"{path}:2:", '"turns"')


# ----------------------------------------------------------------------------------------- listing

def test_list_models(capsys):
    assert run.main(["--list-models"]) == 0
    out = capsys.readouterr().out
    for size in ("70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b"):
        assert re.search(rf"pythia-{re.escape(size)}\s+EleutherAI/pythia-{re.escape(size)}\s", out)
    for name, repo in [("llama-2-70b-chat", "meta-llama/Llama-2-70b-chat-hf"), ("falcon-40b-instruct", "tiiuae/falcon-40b-instruct"),
                       ("mpt-7b-instruct", "mosaicml/mpt-7b-instruct"), ("llama-2-13b", "meta-llama/Llama-2-13b-hf")]:
        assert re.search(rf"^{name}\s+{repo}\s", out, re.M)
    assert "70.4M" in out and "6.74B" in out and "gated" in out


def test_help_names_every_option(capsys):
    with pytest.raises(SystemExit) as exit:
        run.main(["--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--revision", "--list-models", "--stream", "--policy", "--sink-size", "--window-size",
                 "--max-new-tokens", "--temperature", "--top-p", "--top-k", "--seed", "--device", "--dtype",
                 "--compile", "--prompt ", "--prompts", "--no-status", "--compare", "--text ", "--text-tokens"):
        assert flag in out, flag


def test_templates_by_model_name():
    assert run.pick_template("llama-2-7b-chat", "llama") == "llama-2-chat"
    assert run.pick_template("meta-llama/Llama-2-13b-chat-hf", "llama") == "llama-2-chat"
    assert run.pick_template("mpt-7b-chat", "mpt") == "chatml"
    assert run.pick_template("mpt-7b-instruct", "mpt") == "dolly"
    assert run.pick_template("falcon-40b-instruct", "falcon") == "falcon-instruct"
    assert run.pick_template("pythia-1b", "gpt_neox") == "plain"
    # other Llama chat models were tuned on other formats (and TinyLlama ships its own template)
    assert run.pick_template("tinyllama-1.1b-chat", "llama") == "plain"
    assert run.pick_template("lmsys/longchat-7b-16k", "llama") == "plain"




# ------------------------------------------------------------------------------------ fail fast

def refused_folder(tmp_path, what: str) -> Path:
    """A model folder that run.py must refuse from its small files, with 20 GB of (sparse, unreadable)
    weights beside them: reading them would fail differently, and slowly."""
    need_assets(STORIES)
    config = json.loads((STORIES / "config.json").read_text())
    shutil.copy(STORIES / "tokenizer.model", tmp_path)
    if what == "config":
        config["hidden_act"] = "gelu"
    else:  # a tokenizer.json that minisink's BPE does not implement (and no tokenizer.model)
        (tmp_path / "tokenizer.model").unlink()
        spec = json.loads((TOKENIZERS / "gpt-neox-20b" / "tokenizer.json").read_text())
        spec["pre_tokenizer"] = {"type": "Whitespace"}
        (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "config.json").write_text(json.dumps(config))
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.truncate(20 * 10**9)
    return tmp_path


@pytest.mark.parametrize("what, says", [("config", "hidden_act='gelu' is not supported"),
                                        ("tokenizer", 'pre_tokenizer.type = "Whitespace" is not supported')])
def test_refused_before_any_weight_is_read(tmp_path, what, says):
    import time
    folder = refused_folder(tmp_path, what)
    start = time.perf_counter()
    code, err = main_in_process(["--model", str(folder), "--stream"])
    assert time.perf_counter() - start < 2
    assert code == 1
    assert_one_line_error(err, says)


@pytest.mark.parametrize("what", ["config", "tokenizer"])
def test_refused_before_the_weights_are_downloaded(tmp_path, what):
    folder = refused_folder(tmp_path, what)
    (folder / "model.safetensors").unlink()
    calls = []

    def download(repo_id, revision=None, allow_patterns=None):
        calls.append(allow_patterns)
        return str(folder)
    code, err = main_in_process(["--model", "llama-3.2-1b", "--stream"], download=download)
    assert code == 1 and "is not supported" in err
    assert len(calls) == 1 and not any("safetensors" in p for p in calls[0])


def test_cache_that_does_not_fit_in_memory_is_refused(tmp_path):
    """A window of 10^11 slots (1,280 bytes each in stories260K: 5 layers x K,V x 4 heads x 8 x fp32):
    the message gives the size; nothing is allocated or loaded."""
    folder = refused_folder(tmp_path, "neither")
    shutil.copy(STORIES / "tokenizer.model", folder)
    (folder / "tokenizer.json").unlink()
    code, err = main_in_process(["--model", str(folder), "--stream", "--window-size", str(10**11)])
    assert code == 2  # a flag the memory cannot take: a bad command line (issue 26)
    assert_one_line_error(err, "a cache of 100,000,000,004 slots needs 128,000.00 GB", "pass a smaller --window-size")


def test_default_window_is_said_and_capped(tmp_path):
    """The whole trained context is the plain case: the summary names S and W, and nothing else is
    said (stderr stays one line). A default that differs from it is said before the text."""
    need_assets(STORIES)
    code, err = main_in_process(["--model", str(STORIES), "--stream", "--max-new-tokens", "2"])
    assert code == 0 and "run.py: cache:" not in err and "(sink, S=4 W=508)" in err
    folder = tmp_path / "long"
    shutil.copytree(STORIES, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 8192
    (folder / "config.json").write_text(json.dumps(config))
    code, err = main_in_process(["--model", str(folder), "--stream", "--max-new-tokens", "2"])
    assert code == 0
    assert "run.py: cache: 4 sinks + a window of 4092 = the trained context 8192, capped at 4096 slots; " \
           "--window-size W to change" in err.splitlines()[0]


def test_a_reply_ends_at_any_eos_id_the_config_names(tmp_path):
    """config.json's eos_token_id may name ids besides the tokenizer's EOS (Llama-3-Instruct: <|eot_id|>):
    a chat reply ends at the first of them the model says."""
    folder, tokenizer = tiny_folder("gpt_neox", tmp_path / "chat")
    zephyr = json.loads((REPO / "tests" / "data" / "chat_templates.json").read_text())["templates"]
    template = next(t["template"] for t in zephyr if t["name"] == "tinyllama-chat")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "chat_template": template}))
    argv = ["--model", str(folder), "--max-new-tokens", "6", "--temperature", "0", "--no-status"]

    def reply_to_hi():
        demo, first, _ = run.make_demo(run.parse_args(argv))
        demo.out = io.StringIO()
        return demo, demo.chat(first, ["Hi"])[0]["reply_ids"]

    demo, free = reply_to_hi()
    assert demo.stop_ids == {tokenizer.eos_id} and tokenizer.eos_id not in free
    end = next(i for i, t in enumerate(free) if t not in free[:i] and i > 0)   # a token said once, not first
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, eos_token_id=[tokenizer.eos_id, free[end]])))
    demo, stopped = reply_to_hi()
    assert demo.stop_ids == {tokenizer.eos_id, free[end]}
    assert stopped == free[:end + 1]


def test_end_ids_reads_an_int_a_list_or_nothing():
    class Tok:
        eos_id, vocab_size = 2, 100
    assert end_ids(Tok, {}) == {2}
    assert end_ids(Tok, {"eos_token_id": 7}) == {2, 7}
    assert end_ids(Tok, {"eos_token_id": [2, 9, 128009, None]}) == {2, 9}   # ids past the vocabulary: none
    Tok.eos_id = None
    assert end_ids(Tok, {"eos_token_id": None}) == set()

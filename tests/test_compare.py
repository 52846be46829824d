"""`run.py --compare window,sink` (minisink/tools/compare.py) on SmolLM2-135M-Instruct, a real model
with an attention sink: window attention's perplexity of a book explodes after the first eviction,
the sink's does not; in a real terminal (tmux) both streams are on the screen, with their evictions.

The model is the converted GGUF from PyPI (the `smollm2` fixture: skips with the reason when it is
neither cached nor downloadable); run.py reaches it by its short name with the hub offline."""
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ASSETS, REPO, need_assets

BOOK = ASSETS / "text" / "moby_dick.txt"
ENV = {**{k: v for k, v in os.environ.items() if k != "HF_TOKEN"}, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONIOENCODING": "utf-8"}


def test_window_perplexity_after_the_first_eviction_is_at_least_1_5x_the_sinks(smollm2):
    need_assets(BOOK)
    result = subprocess.run([sys.executable, "run.py", "--compare", "window,sink", "--text", str(BOOK),
                             "--text-tokens", "320", "--threads", "1"], cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"tokens +([\d,]+): window ppl +([\d.]+), .*\| sink ppl +([\d.]+),", result.stdout)
    assert len(rows) == 5, result.stdout  # live: one line per 64 tokens
    said = re.search(r"after the first eviction window ppl ([\d.]+), sink ppl ([\d.]+): ([\d.]+)x", result.stderr)
    assert said, result.stderr
    window, sink, ratio = map(float, said.groups())
    assert ratio >= 1.5 and abs(window / sink - ratio) < 0.01, result.stderr
    assert "dequantized to fp32 (not the original weights)" in result.stderr


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux) for a real terminal")
def test_both_streams_appear_on_a_real_terminal(smollm2, tmp_path):
    session = f"minisink-compare-{os.getpid()}"
    done = tmp_path / "done"
    command = (f"cd {shlex.quote(str(REPO))} && {shlex.quote(sys.executable)} run.py --compare window,sink "
               f"--max-new-tokens 70 --seed 0 --prompt 'Once upon a time' --threads 1; echo $? > {done}; sleep 600")
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in ENV.items() if k in ("HF_HUB_OFFLINE", "OMP_NUM_THREADS"))
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "50", f"env {env} sh -c "
                    + shlex.quote(command)], check=True)
    try:
        deadline = time.monotonic() + 900
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(1)
        screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session, "-S", "-200"], capture_output=True,
                                text=True, check=True).stdout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    assert done.exists() and done.read_text().strip() == "0", screen
    assert "window vs sink: 70 tokens each, cache 64 slots, seed 0" in screen, screen
    for head in ("== window (0 sinks + 64 recent) | tokens 1-32 | 0 evicted so far ==",
                 "== sink (4 sinks + 60 recent) | tokens 1-32 | 0 evicted so far =="):
        assert head in screen, screen
    later = re.findall(r"== (window|sink) \(.*\) \| tokens 65-70 \| (\d+) evicted so far ==", screen)
    assert [p for p, _ in later] == ["window", "sink"] and all(int(n) > 0 for _, n in later), screen
    blocks = re.split(r"== .* ==\n", screen)[1:]
    assert len(blocks) == 6 and all(re.search(r"[A-Za-z]{3}", b) for b in blocks), screen


def test_on_the_default_model_the_two_streams_agree_until_the_first_eviction_and_ppl_equals_eval():
    """No SmolLM2 needed: the shipped model. Same seed and prompt, so window and sink write the same
    tokens while nothing is evicted; the live perplexity equals minisink.tools.eval's, policy by policy."""
    import io
    import torch
    from minisink.tools.compare import generate_side_by_side, perplexity_side_by_side
    from minisink.tools.eval import perplexity, policy_nll
    from minisink.text.tokenizer import load_tokenizer
    from minisink.weights.load import load_model
    folder = REPO / "minisink" / "checkpoints" / "tinystories-1m"
    model, tok = load_model(folder), load_tokenizer(folder)
    out = io.StringIO()
    sample = dict(temperature=1.0, top_k=None, top_p=None)
    ids = generate_side_by_side(model, tok, [tok.bos_id], ["window", "sink"], 2, 14, 40, 0, sample, block=8, out=out)
    assert ids["window"][:15] == ids["sink"][:15]   # 1 + 15 tokens fit in the 16 slots
    assert ids["window"] != ids["sink"]              # and then the caches differ (sampled at temperature 1)
    assert "== sink (2 sinks + 14 recent) | tokens 33-40 | 16 evicted so far ==" in out.getvalue()
    stream = [tok.bos_id] + tok.encode("Once upon a time there was a cat who sang. " * 12)[:150]
    got = perplexity_side_by_side(model, stream, ["window", "sink"], 2, 14, every=32, out=io.StringIO())
    for policy in ("window", "sink"):
        nll = policy_nll(model, torch.tensor(stream), policy, 2, 14, chunk_size=7)
        assert abs(got[policy][0] - perplexity(nll)) < 1e-3 * got[policy][0], policy
        assert abs(got[policy][1] - perplexity(nll, first=17)) < 1e-3 * got[policy][1], policy

"""experiments/learnable_sink/run.py: its BOS model is the committed default model's recipe, its
results.md names the committed model's sha256, and its whole pipeline (train, stream, attention,
tables) runs on a tiny recipe."""
import dataclasses
import hashlib
import importlib.util
import math
import re
import shlex

import pytest
import torch

from minisink.tools import train, viz
from minisink.weights.load import load_model

from conftest import REPO, need_assets

EXPERIMENT = REPO / "experiments" / "learnable_sink"
# the experiment is a script, not a package, and the repository root has its own run.py: load it by path
_spec = importlib.util.spec_from_file_location("learnable_sink_run", EXPERIMENT / "run.py")
experiment = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(experiment)


def test_bos_model_is_the_default_models_recipe(monkeypatch):
    """The command in the default model's README, parsed by train.py itself, gives MODELS["BOS"]."""
    readme = (experiment.DEFAULT_MODEL / "README.md").read_text()
    command = re.search(r"^python -m minisink train (.*)$", readme, re.M).group(1)
    need_assets(REPO / shlex.split(command)[shlex.split(command).index("--text") + 1])
    monkeypatch.chdir(REPO)                                   # the command's paths are relative to the root
    recipe, _ = train.parse_args(shlex.split(command))
    assert recipe == experiment.MODELS["BOS"]
    assert recipe.bos and not recipe.sink_token
    # the other two differ from train.py's defaults only in the sink token
    assert experiment.MODELS["vanilla"] == train.Recipe()
    assert experiment.MODELS["sink token"] == dataclasses.replace(train.Recipe(), sink_token=True)


def test_results_name_the_committed_default_models_sha256():
    """Retraining the default model makes results.md stale: rerun the experiment, which compares its
    BOS model with the committed one (sha256 computed as run.py and train.py compute it)."""
    sha = hashlib.sha256((experiment.DEFAULT_MODEL / "model.safetensors").read_bytes()).hexdigest()
    results = (EXPERIMENT / "results.md").read_text()
    assert "`minisink/checkpoints/tinystories-1m`" in results and f"(sha256 `{sha[:16]}`)" in results


def test_first_token_attention_is_viz_mass_on_first():
    """Per layer (mean over heads, largest head) of the attention on key 0 from queries T/2 .. T-1,
    against a loop over samples and heads of viz.attention_maps."""
    model = load_model(experiment.DEFAULT_MODEL)
    x = torch.randint(3, 1024, (3, 16), generator=torch.Generator().manual_seed(0))
    x[:, 0] = 1                                               # BOS, as the default model's samples start
    got = experiment.first_token_attention(model, x)
    P = viz.attention_maps(model, x)                          # (layers, B, heads, T, T)
    for layer, (mean, largest) in enumerate(got):
        per_head = [sum(P[layer, b, h, 8:, 0].mean().item() for b in range(3)) / 3 for h in range(P.shape[2])]
        assert mean == pytest.approx(sum(per_head) / len(per_head), rel=1e-5)
        assert largest == pytest.approx(max(per_head), rel=1e-5)


def test_the_pipeline_runs_on_a_tiny_recipe(tmp_path):
    """What `run.py --smoke` does, smaller: three models, their streaming and attention tables."""
    text = need_assets(experiment.TEXT)
    small = tmp_path / "stories.txt"
    small.write_text("\n\n".join(train.read_paragraphs(text)[:400]) + "\n")
    tiny = dict(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, context=32,
                steps=3, batch_size=4, warmup=1, eval_every=100, eval_crops=4, threads=1)
    logs, results = {}, {}
    for name, recipe in experiment.MODELS.items():
        recipe = dataclasses.replace(recipe, **tiny)
        _, logs[name] = train.train(recipe, small, tmp_path / name)
        results[name] = experiment.measure(tmp_path / name, recipe, small, n_crops=4)
        m = results[name]
        assert set(m["nll"]) == {(C, S) for C in (16, 8) for S in experiment.SINKS}
        assert all(math.isfinite(v) for v in m["nll"].values())
        assert len(m["attention"]) == 2 and m["crops"] >= 1
    # every model is scored on the same held-out tokens
    assert len({m["tokens"] for m in results.values()}) == 1
    experiment.write_results(results, logs, recipe, "test", tmp_path, smoke=True)
    written = (tmp_path / "results.md").read_text()
    for name in experiment.MODELS:
        assert f"| {name} | " in written and f"| {name}, largest head | " in written
    assert "| model | 0+16 | 1+15 | 2+14 | 4+12 | 0+8 | 1+7 | 2+6 | 4+4 |" in written

"""Every real config.json in ../shared/assets/configs (the checkpoints that --list-models offers, and
more): it parses, minisink builds the model with the parameter shapes transformers builds for it (both
on the meta device: no memory), and where the checkpoint's tensor names are known, the loader expects
exactly those names after its documented ignores.

None of these configs is refused today; a deliberate refusal would be listed in REFUSED with its reason.
"""
import json

import pytest
import torch
import transformers

from conftest import ASSETS
from minisink.weights.hub import MODELS
from minisink.weights.load import build_config, checkpoint_names

CONFIGS = ASSETS / "configs"
FOLDERS = sorted(p.name for p in CONFIGS.iterdir()) if CONFIGS.is_dir() else []
pytestmark = pytest.mark.skipif(not FOLDERS, reason=f"offline assets not found at {CONFIGS}")
REFUSED: dict[str, str] = {}  # folder -> the setting the refusal names (none so far)


def read(folder: str, name: str = "config.json"):
    return json.loads((CONFIGS / folder / name).read_text())


def transformers_config(d: dict):
    """The config as transformers reads it. Falcon's first releases (model_type RefinedWeb*, custom
    code) are translated as transformers' convert_custom_code_checkpoint.py translates them."""
    if d["model_type"] in ("RefinedWeb", "RefinedWebModel"):
        renames = {"n_head": "num_attention_heads", "n_layer": "num_hidden_layers", "n_head_kv": "num_kv_heads"}
        d = {renames.get(k, k): v for k, v in d.items()}
        d.update(model_type="falcon", new_decoder_architecture="num_kv_heads" in d)
    d = {k: v for k, v in d.items() if k not in ("auto_map", "architectures")}
    return transformers.AutoConfig.for_model(d.pop("model_type"), **d)


def test_every_folder_is_covered():
    assert len(FOLDERS) == 17 and "mistral-7b-v0.1" in FOLDERS and "falcon-40b-refinedweb" in FOLDERS


@pytest.mark.parametrize("folder", FOLDERS)
def test_parses_and_builds_the_shapes_transformers_builds(folder):
    d = read(folder)
    if folder in REFUSED:
        with pytest.raises(Exception, match=REFUSED[folder]):
            build_config(d)
        return
    cls, config = build_config(d)
    with torch.device("meta"):
        ours = cls(config)
        theirs = transformers.AutoModelForCausalLM.from_config(transformers_config(d))
    shapes = lambda model: {name: tuple(p.shape) for name, p in model.named_parameters()}
    # transformers 5 renames GPT-NeoX's checkpoint name embed_out to lm_head on load
    # (conversion_mapping.py: WeightRenaming "^embed_out\." -> "lm_head."); minisink keeps the checkpoint's
    renamed = {"lm_head.weight": "embed_out.weight"} if d["model_type"] == "gpt_neox" else {}
    assert shapes(ours) == {renamed.get(name, name): shape for name, shape in shapes(theirs).items()}


WEIGHT_MAPS = [(f, name) for f in FOLDERS for name in ("weight_map.json", "weight_map.INFERRED.json")
               if (CONFIGS / f / name).is_file()]


@pytest.mark.parametrize("folder, weight_map", WEIGHT_MAPS)
def test_checkpoint_tensor_names_are_what_the_loader_expects(folder, weight_map):
    """Read as load_model reads them: a name is a parameter, a tied alias, or an ignored buffer
    (Llama-2's rotary_emb.inv_freq); and every parameter is in the checkpoint."""
    cls, config = build_config(read(folder))
    with torch.device("meta"):
        model = cls(config)
    expected, aliases, ignore = checkpoint_names(model)
    names = read(folder, weight_map)  # a weight_map {name: shard}, or the inferred list of names
    ignored = {n for n in names if any(p.search(n) for p in ignore)}
    unknown = {n for n in names if n not in aliases and n not in ignored}
    assert unknown == set()
    assert {aliases[n] for n in names if n in aliases} == set(expected)
    if "llama-2" in folder:
        assert len(ignored) == config.num_hidden_layers  # one inv_freq per layer, all ignored


@pytest.mark.parametrize("short, folder", [("llama-2-7b", "llama-2-7b-hf"), ("llama-2-13b", "llama-2-13b-hf"),
                                           ("llama-2-70b", "llama-2-70b-hf"), ("llama-3-8b", "meta-llama-3-8b"),
                                           ("llama-3.1-8b", "llama-3.1-8b"), ("llama-3.2-1b", "llama-3.2-1b"),
                                           ("mistral-7b", "mistral-7b-v0.1"), ("tinyllama-1.1b-chat", "tinyllama-1.1b-chat-v1.0"),
                                           ("falcon-7b-instruct", "falcon-7b-instruct"), ("falcon-40b", "falcon-40b-refinedweb"),
                                           ("mpt-7b-instruct", "mpt-7b-instruct"), ("pythia-6.9b", "pythia-6.9b-deduped"),
                                           ("pythia-12b", "pythia-12b-deduped")])
def test_list_models_counts_each_tensor_once(short, folder):
    """--list-models' parameter counts, against the model built from the real config: a tied head
    (Falcon, MPT, Llama-3.2-1B) is the embedding, counted once."""
    cls, config = build_config(read(folder))
    with torch.device("meta"):
        n = sum(p.numel() for p in cls(config).parameters())
    assert MODELS[short].params == pytest.approx(n, rel=0.005)

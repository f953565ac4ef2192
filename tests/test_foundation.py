import pytest
import torch

from core.blocks import depth_map, find_blocks, model_shape
from core.config import RunConfig, TrainConfig, method_config
from core.methods.lora import LoraConfig
from core.models import ModelNotFoundError, load_model, resolve_device
from tiny import tiny_gpt2, tiny_llama


def test_config_roundtrip_yaml(tmp_path):
    cfg = RunConfig(method=LoraConfig(r=4, targets=["q_proj"]), train=TrainConfig(lr=1e-3, max_steps=5))
    cfg.save(tmp_path / "c.yaml")
    back = RunConfig.load(tmp_path / "c.yaml")
    assert back == cfg


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: TrainConfig(lr=0), "lr"),
        (lambda: TrainConfig(lr=-1e-3), "lr"),
        (lambda: TrainConfig(batch_size=0), "batch_size"),
        (lambda: TrainConfig(llrd_decay=1.5), "llrd_decay"),
        (lambda: TrainConfig(llrd_decay=0.0), "llrd_decay"),
        (lambda: LoraConfig(r=0), "r"),
        (lambda: method_config("prompt_tuning", {"num_virtual_tokens": 0}), "num_virtual_tokens"),
        (lambda: method_config("adapter", {"placement": "sideways"}), "placement"),
        (lambda: method_config("nope"), "method"),
        (lambda: TrainConfig.from_dict({"lr": "fast"}), "lr"),
        (lambda: TrainConfig.from_dict({"learning_rate": 1e-3}), "learning_rate"),
    ],
)
def test_bad_values_name_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_blocks_and_depths_llama_and_gpt2():
    for model, path in ((tiny_llama(), "model.layers"), (tiny_gpt2(), "transformer.h")):
        blocks_path, blocks = find_blocks(model)
        assert blocks_path == path
        depths = depth_map(model)
        L = len(blocks)
        assert set(depths.values()) == {-1, *range(L), L}
        assert depths[f"{path}.0.mlp." + ("up_proj.weight" if "model" in path else "c_fc.weight")] == 0


def test_model_shape_gqa():
    s = model_shape(tiny_llama())
    assert (s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.kv_dim) == (3, 4, 2, 8, 16)


def test_missing_model_is_one_clear_sentence():
    with pytest.raises(ModelNotFoundError, match="no-such-org/no-such-model") as e:
        load_model("no-such-org/no-such-model", device="cpu")
    assert "\n" not in str(e.value)


def test_device_resolution_cpu():
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.slow
def test_default_model_loads_from_cache():
    model, tok = load_model(device="cpu")
    assert model_shape(model).num_layers == 30
    assert tok.pad_token is not None
    assert all(not p.requires_grad for p in model.parameters())

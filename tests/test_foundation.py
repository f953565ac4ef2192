from types import SimpleNamespace

import pytest
import torch

from core.advisor import HARDWARE
from core.blocks import depth_label, depth_map, find_blocks, label_order, model_shape
from core.config import RunConfig, TrainConfig, method_config
from core.methods.lora import LoraConfig
from core.models import ModelNotFoundError, gpu_count, hardware_class, load_model, resolve_device
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


def test_depth_labels_from_depths_and_event_keys():
    depths = [None, 3, 1, -1, 0, 2, 10]
    labels = [depth_label(d, 3) for d in depths]
    assert labels == ["prompt", "head", "block 1", "embed", "block 0", "block 2", "head"]
    assert [depth_label(k, 3) for k in ("-1", "0", "3", "prompt", "None")] == ["embed", "block 0", "head", "prompt",
                                                                              "prompt"]
    assert depth_label("5", None) == "block 5"  # number of blocks unknown: no head
    assert sorted(set(labels), key=label_order) == ["embed", "block 0", "block 1", "block 2", "head", "prompt"]
    assert sorted(["block 10", "block 9", "head", "embed"], key=label_order) == ["embed", "block 9", "block 10", "head"]


def _machine(monkeypatch, gpus: int, mps: bool = False, memory: int = 0):
    """Pretend the machine has ``gpus`` CUDA GPUs of ``memory`` bytes (and MPS or not)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=memory))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("gpus, mps, expected", [(0, False, "cpu"), (0, True, "mps"), (1, True, "cuda")])
def test_device_resolution_prefers_cuda_then_mps_then_cpu(monkeypatch, gpus, mps, expected):
    _machine(monkeypatch, gpus, mps)
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device("cpu") == torch.device("cpu")


def test_device_resolution_refuses_a_missing_gpu(monkeypatch):
    _machine(monkeypatch, 0)
    with pytest.raises(ValueError, match="TrainConfig.device = 'cuda' is invalid: this machine has no CUDA GPU"):
        resolve_device("cuda")


@pytest.mark.parametrize("gpus, memory, expected", [(0, 0, "cpu"), (1, 16 * 2**30, "small_gpu"),
                                                    (1, 80 * 2**30, "large_gpu"), (2, 16 * 2**30, "large_gpu")])
def test_hardware_class_names_the_advisor_hardware(monkeypatch, gpus, memory, expected):
    _machine(monkeypatch, gpus, memory=memory)
    assert gpu_count() == gpus
    assert hardware_class() == expected and expected in HARDWARE


@pytest.mark.slow
def test_default_model_loads_from_cache():
    model, tok = load_model(device="cpu")
    assert model_shape(model).num_layers == 30
    assert tok.pad_token is not None
    assert all(not p.requires_grad for p in model.parameters())

"""TrainConfig.precision: "auto" picks bf16-mixed only where bf16 is native, and every registered method trains
under bf16-mixed on the CPU, the path GPUs take: loss falls, frozen weights stay bit-identical in bf16, trainable
weights and the saved adapter are fp32, and the adapter loads into an fp32 model and generates."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from core import models
from core.checkpoint import load_adapter
from core.config import TrainConfig
from core.generate import GenerationSettings, generate
from core.methods import spec, specs
from tiny import contract_config
from test_train import run, run_config, steps, tiny_lm, tokenizer, write_qa


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "fma"}, "fp32"),
    ({"avx2", "avx512f", "amx_bf16", "amx_tile"}, "bf16-mixed"),
    ({"avx512f", "avx512_bf16"}, "bf16-mixed"),
])
def test_auto_is_bf16_mixed_only_on_cpus_with_native_bf16(monkeypatch, flags, expected):
    monkeypatch.setattr(models, "cpu_flags", lambda: frozenset(flags))
    cpu = torch.device("cpu")
    assert models.resolve_precision("auto", cpu) == expected
    assert models.resolve_precision("fp32", cpu) == "fp32"
    assert models.resolve_precision("bf16-mixed", cpu) == "bf16-mixed"


def test_a_bad_precision_names_the_field():
    with pytest.raises(ValueError, match="TrainConfig.precision"):
        TrainConfig(precision="fp8")


def test_cpu_flags_reads_this_machine():
    flags = models.cpu_flags()
    assert not flags or any(f in flags for f in ("sse2", "avx2", "neon", "asimd", "fpu"))


@pytest.mark.parametrize("name", list(specs()))
def test_every_method_trains_under_bf16_mixed(name, tmp_path):
    data = write_qa(tmp_path / "qa.json", n=8)
    cfg = run_config(data, method=contract_config(name), max_steps=8, precision="bf16-mixed", batch_size=8)
    model = tiny_lm(init=0.3)  # lively weights: a frozen base can carry a prompt method's change
    frozen: dict[str, torch.Tensor] = {}

    def at_start(event):
        if event["type"] == "start":
            for n, p in model.named_parameters():
                if p.requires_grad:
                    assert p.dtype == torch.float32, f"{n}: a trainable weight must be fp32, not {p.dtype}"
                else:
                    frozen[n] = p.detach().clone()

    events = run(cfg, tmp_path / "run", model=model, on_event=at_start)
    assert events[-1]["status"] == "completed"
    losses = [e["loss"] for e in steps(events)]
    assert losses[-1] < losses[0], losses

    params = dict(model.named_parameters())
    assert frozen or spec(name).trains_base, "a method that leaves the base alone must leave frozen weights"
    for n, before in frozen.items():
        assert before.dtype == torch.bfloat16, f"{n}: the frozen base must be held in bf16"
        assert torch.equal(params[n].detach(), before), f"{n} changed"

    tensors = load_file(tmp_path / "run" / "adapter" / next(
        f.name for f in (tmp_path / "run" / "adapter").iterdir() if f.suffix == ".safetensors"))
    floats = {k: t.dtype for k, t in tensors.items() if t.is_floating_point()}
    assert floats and set(floats.values()) == {torch.float32}, floats

    fresh = tiny_lm(init=0.3)
    method = load_adapter(fresh, tmp_path / "run" / "adapter")
    settings = GenerationSettings(max_new_tokens=6, temperature=0.0)
    answer = generate(fresh, tokenizer(), method, [{"role": "user", "content": "What is 3 times three?"}], settings)
    assert answer == generate(fresh, tokenizer(), method, [{"role": "user", "content": "What is 3 times three?"}],
                              settings)

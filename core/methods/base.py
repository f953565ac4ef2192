"""The one small interface every fine-tuning method implements.

A method is built from its typed config and adapts a Hugging Face causal LM *in place*:

    method = LoraMethod(LoraConfig(r=8))
    method.apply(model)                 # inject modules, set requires_grad on exactly what trains
    ... train on method.trainable_parameters(model) ...
    tensors = method.adapter_tensors(model)   # what adapter_model.safetensors holds (PEFT keys where PEFT has it)

The training loop, generation and checkpointing only ever talk to this interface, so adding a method means
adding one file under ``core/methods/`` and one line in ``core/methods/__init__.py``.

Forward pass. Methods that change the *inputs* (prompt / prefix / p-tuning) override ``prepare_inputs``; it turns
(input_ids, attention_mask) into the keyword arguments of the decoder body (``model.base_model``), and
``num_virtual_tokens`` says how many positions it prepended to the hidden states, which callers strip off.
Every other method changes modules inside the model and leaves the inputs alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import MethodConfig


@dataclass(frozen=True)
class RunPlan:
    """What a method's ``prepare`` may need to know about the run ahead."""

    total_steps: int  # optimiser steps of the run
    lr: float  # peak learning rate
    weight_decay: float = 0.0
    start_step: int = 0  # optimiser steps already done (a resumed run continues after its checkpoint's step)


class Method:
    config_cls: ClassVar[type[MethodConfig]]
    #: PEFT's ``peft_type`` when the adapter is saved in PEFT's format, else None (our own documented format)
    peft_type: ClassVar[str | None] = None
    #: True when the trained result can be folded into the base weights (LoRA, BitFit, Freeze, FishMask, full)
    can_merge: ClassVar[bool] = False
    #: True when the method trains the model's own tensors in place, which FSDP2 can shard (core.dist.strategy)
    shards_base: ClassVar[bool] = False
    #: False when rows cannot share one run of a common prompt prefix (core.forward.SharedPrefix): virtual tokens
    #: come before it, or the weights are drawn anew at every forward
    shares_prefix: ClassVar[bool] = True

    def __init__(self, config: MethodConfig):
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = config
        self.enabled = True

    @property
    def name(self) -> str:
        return self.config.method

    # ---- required ------------------------------------------------------------------------------------------

    def apply(self, model: nn.Module) -> None:
        """Adapt ``model`` in place: add modules and leave ``requires_grad`` set on exactly the trainable params.

        Raises ValueError (naming the config field) when the config does not fit the model, for example a
        target module that does not exist, or a config that would train nothing."""
        raise NotImplementedError

    def remove(self, model: nn.Module) -> None:
        """Undo ``apply``: the model is the untouched base model again."""
        raise NotImplementedError

    def adapter_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        """The tensors to save, keyed as in ``adapter_model.safetensors``."""
        raise NotImplementedError

    def load_adapter_tensors(self, model: nn.Module, tensors: dict[str, Tensor]) -> None:
        """Inverse of ``adapter_tensors`` on a model this method has been applied to. Checks keys and shapes."""
        raise NotImplementedError

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        """Content of ``adapter_config.json`` (PEFT's schema when ``peft_type`` is set)."""
        raise NotImplementedError

    def expected_trainable(self, model: nn.Module) -> int:
        """The number of parameter entries this method trains on ``model``, in closed form: a formula in the
        config and the model's shapes (``core.blocks.model_shape``, the shapes of the modules it targets), never
        a count of ``requires_grad``. Called after ``apply`` (and after ``prepare`` for methods whose spec has
        ``prepares=True``); it must equal ``parameter_counts(model)[0]``, which the contract test checks for every
        registered method. Tied tensors count once. Example: LoRA of rank r on layers of shape (in_i, out_i)
        trains Σ_i r·(in_i + out_i)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement expected_trainable")

    # ---- optional ------------------------------------------------------------------------------------------

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        """Switch the method off (the model computes the base output) or back on."""
        raise NotImplementedError(f"{self.name} cannot be disabled")

    def merge(self, model: nn.Module) -> None:
        """Fold the trained result into the base weights, so the model runs at base speed."""
        raise NotImplementedError(f"{self.name} cannot be merged")

    def unmerge(self, model: nn.Module) -> None:
        raise NotImplementedError(f"{self.name} cannot be unmerged")

    def bake(self, model: nn.Module) -> None:
        """Fold the result into the weights for good and drop every trace of the method, so that
        ``model.save_pretrained`` writes a plain HF model folder that ``AutoModelForCausalLM`` loads.
        Only for ``can_merge`` methods."""
        raise NotImplementedError(f"{self.name} cannot be merged into the base model")

    def prepare(self, model: nn.Module, batches, loss_fn, plan: RunPlan) -> None:
        """Called once before the optimiser is built, with an iterable of training batches (input_ids,
        attention_mask, labels), ``loss_fn(batch) -> mean loss`` and the run's plan. FishMask estimates its
        Fisher information here; FAR primes its FFNs and picks its learner units."""

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimiser step (FishMask re-imposes its mask here)."""

    def frozen_below(self, step: int, epoch: int, num_layers: int) -> int | None:
        """Gradual unfreezing: parameters of depth < the returned value do not train at this point.
        None means everything trainable trains. Depths as in core.blocks (-1 embeddings, L head)."""
        return None

    @property
    def num_virtual_tokens(self) -> int:
        """Positions prepended to the sequence (attention mask and cache) by ``prepare_inputs``."""
        return 0

    def prepare_inputs(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Any]:
        """Keyword arguments for ``model.base_model(...)`` on a fresh sequence (training, or generation prefill)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # ---- shared helpers ------------------------------------------------------------------------------------

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def parameter_counts(self, model: nn.Module) -> tuple[int, int]:
        """(trainable, total) parameter counts; tied weights are counted once."""
        trainable = sum(p.numel() for p in self.trainable_parameters(model).values())
        total = sum(p.numel() for p in model.parameters())
        return trainable, total

    def memory(self, trainable: int, total: int, base_bytes: int, device: str) -> tuple[int, int]:
        """What training holds besides the frozen base, for the studio's memory estimate (studio.estimate):
        (entries the optimiser updates, each an fp32 weight with its gradient and two AdamW moments; bytes the
        method keeps besides the model on ``device``, "cpu" or "cuda"). ``base_bytes``: bytes per entry of the
        base weights. Methods whose optimiser sees more than their trainable count, or that keep copies, say so
        here."""
        return trainable, 0


def check_tensors(expected: dict[str, tuple[int, ...]], got: dict[str, Tensor], what: str) -> None:
    """Raise ValueError with a readable sentence when saved tensors do not match what the model expects."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        raise ValueError(f"{what} does not match this model: {'; '.join(parts)}")
    for k, shape in expected.items():
        if tuple(got[k].shape) != tuple(shape):
            raise ValueError(f"{what} does not match this model: {k} has shape {tuple(got[k].shape)}, expected {tuple(shape)}")


def snapshot(t: Tensor) -> Tensor:
    """A CPU copy of ``t``; on the meta device (a dry run, core.preflight) a meta copy, which has no data to move."""
    return t.detach().clone() if t.is_meta else t.detach().to("cpu", copy=True)


@torch.no_grad()
def copy_into(param: Tensor, value: Tensor) -> None:
    param.copy_(value.to(device=param.device, dtype=param.dtype))

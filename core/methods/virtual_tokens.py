"""Shared machinery of the virtual-token methods, and the KV-cache generation recipe that serves every method.

Two families add m virtual positions in front of every sequence (m = ``num_virtual_tokens``):

    prompt family (prompt tuning, P-Tuning v1)     the input layer sees m extra embeddings
        inputs_embeds  = [P ; E(x)]                 P (m, d), E(x) (B, T, d)  ->  (B, m+T, d)
        attention_mask = [1_m ; mask]               (B, m+T)

    prefix family (prefix tuning, P-Tuning v2)      every layer l attends to m extra key/value slots
        cache[l] = (K_l, V_l)                       each (B, kv_heads, m, head_dim), read from one table row
        attention_mask = [1_m ; mask]               (B, m+T); the real tokens get positions m..m+T-1, which the
                                                    model derives from the cache length

Both follow PEFT 0.21's ``PeftModelForCausalLM.forward`` exactly, so a saved folder gives the same logits in
``peft.PeftModel``. Every method stores its result as one table, which is what ``adapter_model.safetensors``
holds under the key ``prompt_embeddings``:

    prompt family   (m, d)
    prefix family   (m, 2·L·kv_dim); columns [s·kv_dim, (s+1)·kv_dim) are slot s, slot 2l = layer l's keys and
                    slot 2l+1 its values; inside a slot the layout is (kv_heads, head_dim)

A reparameterised method (P-Tuning's prompt encoder, prefix tuning's MLP) computes its table while training;
a loaded adapter holds the computed table itself (``VirtualTable``), like PEFT's inference mode.

Generation (core/generate.py) runs any method, virtual or not, with the KV cache like this:

    step = prefill(model, method, input_ids, attention_mask)      # the prompt, once (left padding allowed)
    while ...:
        next_ids = pick(step.logits)                              # (B, 1)
        step = decode_step(model, next_ids, step)                 # one token, cache grows by one
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from ..blocks import METHOD_MODULE_PREFIX, ModelShape, model_shape
from .base import Method, check_tensors, copy_into

TENSOR_KEY = "prompt_embeddings"  # PEFT's key for every prompt-learning method


class VirtualTable(nn.Module):
    """A plain (m, width) table of virtual-token rows: the trained prompt itself, or a loaded adapter."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())

    def forward(self) -> Tensor:
        return self.weight  # (m, width)


def adapter_placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Virtual-token parameters live next to the input embeddings, in fp32 (outputs are cast to the model dtype)."""
    w = model.get_input_embeddings().weight
    return w.device, torch.float32


class VirtualTokenMethod(Method):
    """Common part of the four methods: one root module ``model.<module_name>`` whose ``forward()`` is the table.

    Several of these adapters can sit on one base model at once (side-by-side chat): the first is attached as
    ``peft_prompt`` / ``peft_prefix``, later ones as ``peft_prompt_2``, ... Each method object only ever uses its
    own module, so which adapter runs is decided by the method passed to ``prepare_inputs``.
    """

    shares_prefix = False  # the virtual tokens come first, so no two rows share a prefix of real tokens alone

    base_module_name: ClassVar[str]  # starts with METHOD_MODULE_PREFIX

    def __init__(self, config):
        super().__init__(config)
        self.module_name = ""  # this adapter's attribute on the model root, set by apply

    # ---- what each method defines ---------------------------------------------------------------------------

    def build_module(self, model: nn.Module, shape: ModelShape) -> nn.Module:
        """The trainable module; ``module()`` returns the (m, table_width) table."""
        raise NotImplementedError

    def table_width(self, shape: ModelShape) -> int:
        raise NotImplementedError

    def peft_dims(self, shape: ModelShape) -> dict[str, Any]:
        """token_dim / num_attention_heads as PEFT derives them for this method."""
        return {"token_dim": shape.hidden_size, "num_attention_heads": shape.num_heads}

    def extra_peft_config(self, shape: ModelShape) -> dict[str, Any]:
        return {}

    # ---- the Method interface --------------------------------------------------------------------------------

    @property
    def num_virtual_tokens(self) -> int:
        return self.config.num_virtual_tokens if self.enabled else 0

    def check_fits(self, shape: ModelShape) -> None:
        m = self.config.num_virtual_tokens
        if not isinstance(m, int) or isinstance(m, bool) or m < 1 or m >= shape.max_positions:
            raise ValueError(
                f"{type(self.config).__name__}.num_virtual_tokens = {m!r} is invalid: must be between 1 and "
                f"{shape.max_positions - 1} (this model has {shape.max_positions} positions and real tokens need some)"
            )

    def apply(self, model: nn.Module) -> None:
        shape = model_shape(model)
        self.check_fits(shape)
        if self.module_name and hasattr(model, self.module_name):
            raise ValueError(f"{self.name} is already applied to this model (as {self.module_name})")
        name, n = self.base_module_name, 1
        while hasattr(model, name):  # another virtual-token adapter is attached: take the next free name
            n += 1
            name = f"{self.base_module_name}_{n}"
        assert name.startswith(METHOD_MODULE_PREFIX)
        model.requires_grad_(False)
        module = self.build_module(model, shape)
        module.requires_grad_(True)
        model.add_module(name, module)
        self.module_name = name
        self.enabled = True

    def remove(self, model: nn.Module) -> None:
        if self.module_name and hasattr(model, self.module_name):
            delattr(model, self.module_name)
        self.module_name = ""

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        self.enabled = bool(enabled)

    def module(self, model: nn.Module) -> nn.Module:
        module = getattr(model, self.module_name, None) if self.module_name else None
        if module is None:
            raise ValueError(f"{self.name} is not applied to this model")
        return module

    def table(self, model: nn.Module) -> Tensor:
        """The (m, width) table the method currently computes (with grad while training)."""
        return self.module(model)()

    def adapter_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        return {TENSOR_KEY: self.table(model).detach()}

    def load_adapter_tensors(self, model: nn.Module, tensors: dict[str, Tensor]) -> None:
        shape = model_shape(model)
        expected = (self.config.num_virtual_tokens, self.table_width(shape))
        check_tensors({TENSOR_KEY: expected}, tensors, f"{self.name} adapter")
        module = self.module(model)
        if isinstance(module, VirtualTable):
            copy_into(module.weight, tensors[TENSOR_KEY])
        else:  # a reparameterised encoder cannot be inverted: keep the computed table, as PEFT does
            device, dtype = adapter_placement(model)
            table = VirtualTable(tensors[TENSOR_KEY].to(device=device, dtype=dtype))
            table.requires_grad_(False)
            setattr(model, self.module_name, table)

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        shape = model_shape(model)
        return {
            "task_type": "CAUSAL_LM",
            "peft_type": self.peft_type,
            "auto_mapping": None,
            "revision": None,
            "inference_mode": True,
            "num_virtual_tokens": self.config.num_virtual_tokens,
            **self.peft_dims(shape),
            "num_transformer_submodules": 1,
            "num_layers": shape.num_layers,
            "modules_to_save": None,
            **self.extra_peft_config(shape),
        }


class PromptMethod(VirtualTokenMethod):
    """Prompt family: m soft embeddings before the input embeddings."""

    base_module_name = "peft_prompt"

    def table_width(self, shape: ModelShape) -> int:
        return shape.hidden_size

    def prepare_inputs(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Any]:
        if not self.enabled:
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        embeds = model.get_input_embeddings()(input_ids)  # (B, T, d)
        b, m = input_ids.shape[0], self.config.num_virtual_tokens
        prompt = self.table(model).to(embeds.dtype)  # (m, d)
        return {
            "inputs_embeds": torch.cat([prompt.unsqueeze(0).expand(b, -1, -1), embeds], dim=1),  # (B, m+T, d)
            "attention_mask": virtual_mask(attention_mask, m),
        }


class PrefixMethod(VirtualTokenMethod):
    """Prefix family: m key/value slots in every layer, handed to the model as a pre-filled KV cache."""

    base_module_name = "peft_prefix"

    def table_width(self, shape: ModelShape) -> int:
        return 2 * shape.num_layers * shape.kv_dim

    def peft_dims(self, shape: ModelShape) -> dict[str, Any]:
        # PEFT sizes prefixes by the KV heads (grouped-query attention): token_dim = head_dim·kv_heads
        return {"token_dim": shape.kv_dim, "num_attention_heads": shape.num_kv_heads}

    def prepare_inputs(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Any]:
        if not self.enabled:
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        if torch.is_grad_enabled() and model.training and _checkpointing(model):
            # transformers drops the KV cache inside checkpointed layers, which would silently drop the prefix
            raise ValueError(f"{self.name} cannot train with grad_checkpointing: the prefix lives in the KV cache")
        dtype = model.get_input_embeddings().weight.dtype
        cache = prefix_cache(model, self.table(model).to(dtype), input_ids.shape[0])
        return {
            "input_ids": input_ids,
            "attention_mask": virtual_mask(attention_mask, self.config.num_virtual_tokens),
            cache_kwarg(model): cache,
        }


def _checkpointing(model: nn.Module) -> bool:
    flag = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.2x
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)


# ---- tensors ----------------------------------------------------------------------------------------------------


def virtual_mask(attention_mask: Tensor, m: int) -> Tensor:
    """[1_m ; mask]: (B, T) -> (B, m+T)."""
    ones = attention_mask.new_ones(attention_mask.shape[0], m)
    return torch.cat([ones, attention_mask], dim=1)


def prefix_cache(model: nn.Module, table: Tensor, batch: int) -> DynamicCache:
    """A DynamicCache holding the prefix: table (m, 2·L·kv_dim) -> L layers of (K, V), each (B, kv_heads, m, hd)."""
    s = model_shape(model)
    m = table.shape[0]
    kv = table.view(m, 2 * s.num_layers, s.num_kv_heads, s.head_dim).permute(1, 2, 0, 3)  # (2L, kvh, m, hd)
    kv = kv.unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (2L, B, kvh, m, hd)
    layers = [(kv[2 * i], kv[2 * i + 1]) for i in range(s.num_layers)]
    return DynamicCache(ddp_cache_data=layers, config=model.config)


def cache_table(cache, num_layers: int) -> Tensor:
    """Inverse of ``prefix_cache`` for batch row 0: L layers of (K, V) (1, kvh, m, hd) -> (m, 2·L·kv_dim)."""
    slots = []
    for layer in list(cache.layers)[:num_layers]:
        for t in (layer.keys, layer.values):
            slots.append(t[0].permute(1, 0, 2).reshape(t.shape[2], -1))  # (m, kvh·hd)
    return torch.cat(slots, dim=1)


def cache_kwarg(model: nn.Module) -> str:
    """Name of the decoder body's cache argument: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    params = inspect.signature(model.base_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# ---- generation with the KV cache (used by core/generate.py) ----------------------------------------------------


@dataclass
class Step:
    """State after a prefill or decode step."""

    logits: Tensor  # (B, V) next-token logits at the last position
    cache: Any  # the model's KV cache, virtual positions included
    attention_mask: Tensor  # (B, m + T + generated so far), virtual positions included
    padded: bool = False  # left-padded rows: positions come from the mask (see ``mask_positions``)


@torch.no_grad()
def prefill(model: nn.Module, method: Method | None, input_ids: Tensor, attention_mask: Tensor | None = None) -> Step:
    """Run the prompt once with the cache on. Works for every method (non-virtual ones pass their inputs through)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if method is None:
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    else:
        kwargs = method.prepare_inputs(model, input_ids, attention_mask)
    padded = bool((attention_mask == 0).any())
    if padded:  # left padding: each row's real tokens get the positions they would have alone
        width = (kwargs["inputs_embeds"] if "inputs_embeds" in kwargs else kwargs["input_ids"]).shape[1]
        kwargs["position_ids"] = mask_positions(kwargs["attention_mask"])[:, -width:]
    out = model.base_model(**kwargs, use_cache=True)
    return Step(_last_logits(model, out), output_cache(out), kwargs["attention_mask"], padded)


@torch.no_grad()
def decode_step(model: nn.Module, next_ids: Tensor, step: Step) -> Step:
    """Feed one token per row, next_ids (B, 1); positions continue from the cache length (virtual ones included)."""
    mask = torch.cat([step.attention_mask, step.attention_mask.new_ones(next_ids.shape[0], 1)], dim=1)
    extra = {"position_ids": mask_positions(mask)[:, -1:]} if step.padded else {}
    out = model.base_model(input_ids=next_ids, attention_mask=mask, use_cache=True, **{cache_kwarg(model): step.cache},
                           **extra)
    return Step(_last_logits(model, out), output_cache(out), mask, step.padded)


def mask_positions(attention_mask: Tensor) -> Tensor:
    """Position ids (B, L) of a left-padded mask (B, L): 0, 1, ... over each row's real (and virtual) positions,
    1 on padding (never attended to), as transformers' ``generate`` does."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


def output_cache(out) -> Any:
    """The cache a decoder body returned (``cache`` in transformers 5.2x, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _last_logits(model: nn.Module, out) -> Tensor:
    return model.get_output_embeddings()(out.last_hidden_state[:, -1]).float()  # (B, V)

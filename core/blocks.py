"""Find the transformer blocks of any decoder-only causal LM and map each parameter to its depth.

Depth convention (used by LLRD, freezing, unfreezing and the per-block gradient heatmap):

    -1            token / position embeddings
    0 .. L-1      transformer block l, counted from the bottom (input side)
    L             everything above the blocks: final norm and LM head

Parameters added by a method (LoRA A/B, adapters, ...) inherit the depth of the module they sit in.
Parameters that belong to no block (a soft prompt, a prefix table spanning all layers) get depth ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


METHOD_MODULE_PREFIX = "peft_"  # methods attach their own root-level modules under names starting with this


@dataclass(frozen=True)
class ModelShape:
    """The few numbers of a causal LM that methods need."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int

    @property
    def kv_dim(self) -> int:
        """Width of one layer's keys (= values): head_dim · num_kv_heads."""
        return self.head_dim * self.num_kv_heads


def _first(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def model_shape(model: nn.Module) -> ModelShape:
    cfg = model.config
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    heads = _first(cfg, "num_attention_heads", "n_head")
    kv_heads = _first(cfg, "num_key_value_heads", default=heads)
    return ModelShape(
        num_layers=_first(cfg, "num_hidden_layers", "n_layer"),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=_first(cfg, "head_dim", default=hidden // heads),
        vocab_size=cfg.vocab_size,
        max_positions=_first(cfg, "max_position_embeddings", "n_positions", "n_ctx", default=2048),
    )


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (dotted path, ModuleList) of the repeated transformer blocks: the longest homogeneous ModuleList."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__}: could not find the transformer blocks (no ModuleList of layers)")
    return best


def embedding_prefixes(model: nn.Module) -> list[str]:
    """Dotted names of the embedding modules (token and, for GPT-2 style models, position embeddings)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Embedding)]


def param_depth(name: str, blocks_path: str, num_layers: int, embedding_names: list[str]) -> int | None:
    """Depth of the parameter ``name`` (see the module docstring)."""
    prefix = blocks_path + "."
    if name.startswith(prefix):
        return int(name[len(prefix) :].split(".", 1)[0])
    if any(name.startswith(e + ".") for e in embedding_names):
        return -1
    if name.startswith(METHOD_MODULE_PREFIX):  # a method-owned module on the root (soft prompt, prefix table)
        return None
    return num_layers


def depth_map(model: nn.Module) -> dict[str, int | None]:
    """{parameter name: depth} for every parameter of ``model`` (tied weights appear once)."""
    blocks_path, blocks = find_blocks(model)
    embeds = embedding_prefixes(model)
    return {n: param_depth(n, blocks_path, len(blocks), embeds) for n, _ in model.named_parameters()}


def depth_label(depth: int | str | None, num_layers: int | None) -> str:
    """The name of a depth in events and charts: "embed" (-1), "block l" (0 .. L-1), "head" (L), "prompt" (None).

    ``depth`` may also be the string key of an event's lr_by_depth ("-1", "3", "prompt"); with ``num_layers``
    None (not known) every depth from 0 up reads as a block."""
    if isinstance(depth, str):
        try:
            depth = int(depth)
        except ValueError:
            return "prompt" if depth in ("None", "null", "prompt") else depth
    if depth is None:
        return "prompt"
    if depth < 0:
        return "embed"
    if num_layers is not None and depth >= num_layers:
        return "head"
    return f"block {depth}"


def block_index(label: str) -> int | None:
    """l for a depth label "block l" (depth_label), None for any other label."""
    return int(label[6:]) if label.startswith("block ") and label[6:].isdigit() else None


def label_order(label: str) -> tuple[int, int, str]:
    """Sort key that puts depth labels bottom to top: embed, block 0 .. block L-1, head, then anything else."""
    if label == "embed":
        return (0, 0, label)
    if (block := block_index(label)) is not None:
        return (1, block, label)
    return (2, 0, label) if label == "head" else (3, 0, label)

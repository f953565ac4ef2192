"""Full fine-tuning (vanilla), with partial freezing and gradual (layer-wise) unfreezing.

Every parameter of the model trains in place, W ← W − η·update, except what the config freezes:

    freeze_embeddings   depth -1 (token and position embeddings)
    freeze_bottom = K   blocks 0 .. K−1
    freeze_modules      every tensor one of whose names contains one of these substrings ('norm', 'mlp', ...)

The options combine. LLRD (lr_l = base_lr·decay^(L−l−1)) is TrainConfig.llrd_decay, applied by
core.schedules.param_groups to any method. Gradual unfreezing (``unfreeze_every = k``, Howard & Ruder 2018,
ULMFiT) is reported through ``frozen_below``: at first only the top block and the head train, then one more
block downward every k steps (or epochs), and the embeddings last; the loop applies it with
core.schedules.apply_unfreezing. ``apply`` marks everything that will *ever* train, so the optimiser owns it
from the start.

Tied embeddings (SmolLM2, GPT-2): the LM head *is* the embedding matrix. It is one tensor, named (and given
depth -1) as the embedding, so freeze_embeddings also freezes the head, 'lm_head' in freeze_modules matches it,
and gradual unfreezing releases it last, together with the embeddings.

The method keeps a CPU copy of every trainable tensor as it was at ``apply``, so ``set_enabled(False)`` and
``remove`` give back the base model bit for bit. Saved (our own format, no PEFT equivalent) as the trainable
tensors under their Hugging Face parameter names in adapter_model.safetensors; ``bake`` just drops the copies,
since the weights already are the fine-tuned model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, ClassVar

from torch import Tensor, nn

from ..blocks import depth_map, find_blocks
from ..config import MethodConfig, knob
from ..schedules import unfrozen_from
from .registry import MethodSpec, Preset, register
from .base import Method, check_tensors, copy_into, snapshot


@dataclass
class FullConfig(MethodConfig):
    """Full fine-tuning. LLRD lives in TrainConfig.llrd_decay and applies here too."""

    method: ClassVar[str] = "full"
    freeze_embeddings: bool = knob(False, "Keep the token (and position) embeddings frozen.", help_zh="冻结词嵌入（以及位置嵌入）。")
    freeze_bottom: int = knob(0, "Freeze the bottom K transformer blocks.", min=0, help_zh="冻结最底部的 K 个 Transformer 层。")
    freeze_modules: list[str] = knob([], "Also freeze modules whose name contains one of these (e.g. 'norm').",
                                     help_zh="同时冻结名称中包含这些字符串之一的模块（例如 'norm'）。")
    unfreeze_every: int = knob(
        0, "Gradual unfreezing: start with top block + head, unfreeze one more block every k units (0 = off).", min=0,
        help_zh="分层微调（逐步解冻）：先训练顶层和输出头，每 k 个单位再解冻一层（0 = 关闭）。",
    )
    unfreeze_unit: Literal["steps", "epochs"] = knob("steps", "Unit of unfreeze_every.", help_zh="unfreeze_every 的单位。")



def parameter_aliases(model: nn.Module) -> dict[str, list[str]]:
    """{name as in model.named_parameters(): every name of that tensor}. Tied weights have several names."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    aliases: dict[str, list[str]] = {n: [] for n in canonical.values()}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases[canonical[id(p)]].append(n)
    return aliases


class InPlaceMethod(Method):
    """A method that trains a subset of the model's own tensors in place (full, freeze).

    Subclasses implement ``select(model) -> [parameter names]`` (validating their config against the model);
    this class keeps the CPU originals and does enable/disable, remove, save/load and bake.
    """

    can_merge = True
    shards_base = True
    format_note = "trainable tensors under their Hugging Face parameter names"

    def __init__(self, config):
        super().__init__(config)
        self._originals: dict[str, Tensor] | None = None  # name -> CPU copy of the base tensor
        self._stash: dict[str, Tensor] | None = None  # name -> CPU copy of the trained tensor while disabled

    def select(self, model: nn.Module) -> list[str]:
        raise NotImplementedError

    # ---- apply / remove ------------------------------------------------------------------------------------

    def apply(self, model: nn.Module) -> None:
        names = self.select(model)
        if not names:
            raise ValueError(f"{type(self.config).__name__}: this configuration trains no parameter of the model")
        params = dict(model.named_parameters())
        model.requires_grad_(False)
        self._originals = {n: snapshot(params[n]) for n in names}
        self._stash = None
        self.enabled = True
        for n in names:
            params[n].requires_grad_(True)

    def memory(self, trainable: int, total: int, base_bytes: int, device: str) -> tuple[int, int]:
        """The trained tensors, plus a copy of each as it was at ``apply`` (in the base weights' dtype), which
        lives in host memory: it counts on the CPU only."""
        return trainable, trainable * base_bytes if device == "cpu" else 0

    def _require_applied(self) -> dict[str, Tensor]:
        if self._originals is None:
            raise RuntimeError(f"{self.name}: apply(model) has not been called (or the method was removed/baked)")
        return self._originals

    def remove(self, model: nn.Module) -> None:
        originals = self._require_applied()
        params = dict(model.named_parameters())
        for n, t in originals.items():
            copy_into(params[n], t)
        model.requires_grad_(False)
        self._originals, self._stash, self.enabled = None, None, True

    def set_enabled(self, model: nn.Module, enabled: bool) -> None:
        originals = self._require_applied()
        if enabled == self.enabled:
            return
        params = dict(model.named_parameters())
        if not enabled:  # keep the trained weights aside, put the base back
            self._stash = {n: snapshot(params[n]) for n in originals}
            for n, t in originals.items():
                copy_into(params[n], t)
        else:
            for n, t in (self._stash or {}).items():
                copy_into(params[n], t)
            self._stash = None
        self.enabled = enabled

    # ---- save / load ---------------------------------------------------------------------------------------

    def adapter_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        originals = self._require_applied()
        if not self.enabled and self._stash is not None:
            return dict(self._stash)
        params = dict(model.named_parameters())
        return {n: params[n].detach() for n in originals}

    def load_adapter_tensors(self, model: nn.Module, tensors: dict[str, Tensor]) -> None:
        originals = self._require_applied()
        check_tensors({n: tuple(t.shape) for n, t in originals.items()}, tensors, f"{self.name} weights")
        params = dict(model.named_parameters())
        for n in originals:
            copy_into(params[n], tensors[n])

    def adapter_config(self, model: nn.Module) -> dict[str, Any]:
        originals = self._require_applied()
        return {
            "method": self.name,
            "format": self.format_note,
            "num_tensors": len(originals),
            "num_parameters": sum(t.numel() for t in originals.values()),
            **self.config.to_dict(),
        }

    # ---- merge ---------------------------------------------------------------------------------------------

    def merge(self, model: nn.Module) -> None:
        """Nothing to do: the trained tensors are the model's own weights."""
        self._require_applied()

    def unmerge(self, model: nn.Module) -> None:
        """Nothing to do (see merge); use set_enabled(False) for the base output."""
        self._require_applied()

    def bake(self, model: nn.Module) -> None:
        self._require_applied()
        self.set_enabled(model, True)
        model.requires_grad_(False)
        self._originals, self._stash = None, None


class FullMethod(InPlaceMethod):
    config_cls = FullConfig

    def select(self, model: nn.Module) -> list[str]:
        cfg: FullConfig = self.config  # type: ignore[assignment]
        num_layers = len(find_blocks(model)[1])
        if cfg.freeze_bottom > num_layers:
            raise ValueError(
                f"FullConfig.freeze_bottom = {cfg.freeze_bottom} is invalid: the model has only {num_layers} blocks"
            )
        aliases = parameter_aliases(model)
        if any(not s.strip() for s in cfg.freeze_modules):
            raise ValueError(f"FullConfig.freeze_modules = {cfg.freeze_modules!r} is invalid: empty name")
        unused = [s for s in cfg.freeze_modules if not any(s in a for names in aliases.values() for a in names)]
        if unused:
            examples = sorted({a.rsplit(".", 1)[0].split(".")[-1] for names in aliases.values() for a in names})
            raise ValueError(
                f"FullConfig.freeze_modules: {unused} match no parameter of this model; module names include "
                f"{', '.join(examples)}"
            )
        names = []
        for name, depth in depth_map(model).items():
            if cfg.freeze_embeddings and depth == -1:
                continue
            if depth is not None and 0 <= depth < cfg.freeze_bottom:
                continue
            if any(s in a for s in cfg.freeze_modules for a in aliases[name]):
                continue
            names.append(name)
        return names

    def expected_trainable(self, model: nn.Module) -> int:
        """N = Σ numel(t) over the model's tensors t (tied ones once) that no freeze option covers: t is not in an
        nn.Embedding when freeze_embeddings, not in blocks 0 .. freeze_bottom−1, and none of its names contains a
        freeze_modules string. With no option set, N is the size of the whole model."""
        cfg: FullConfig = self.config  # type: ignore[assignment]
        frozen: set[int] = set()
        if cfg.freeze_embeddings:
            frozen |= {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        for block in list(find_blocks(model)[1])[: cfg.freeze_bottom]:
            frozen |= {id(p) for p in block.parameters()}
        for name, p in model.named_parameters(remove_duplicate=False):
            if any(s in name for s in cfg.freeze_modules):
                frozen.add(id(p))
        return sum(p.numel() for p in model.parameters() if id(p) not in frozen)

    def frozen_below(self, step: int, epoch: int, num_layers: int) -> int | None:
        cfg: FullConfig = self.config  # type: ignore[assignment]
        if cfg.unfreeze_every == 0:
            return None
        progress = step if cfg.unfreeze_unit == "steps" else epoch
        return unfrozen_from(progress, cfg.unfreeze_every, num_layers)


__all__ = ["FullMethod", "InPlaceMethod", "parameter_aliases"]


register(MethodSpec(
    name="full", label="Full fine-tuning", family="full", lr=2e-5, trains_base=True, goals=("quality",),
    blurb="Every weight trains. Best with lots of data and memory; the result is a whole model.",
    label_zh="全参数微调",
    blurb_zh="所有权重都参与训练。适合数据多、显存充足的情况；产物是一个完整的模型。",
    config_cls=FullConfig, method_cls=FullMethod, fields=("freeze_embeddings", "freeze_bottom", "freeze_modules"),
    presets=(
        Preset("llrd", "LLRD (full + layer-wise lr decay)", lr=5e-5, fields=("freeze_embeddings",),
               train={"llrd_decay": 0.9},
               blurb="Full fine-tuning where block l gets lr·decay^(L−l−1): the top learns fastest, the bottom barely "
                     "moves.",
               label_zh="学习率调度（LLRD：全参数 + 逐层学习率衰减）",
               blurb_zh="全参数微调，第 l 层的学习率为 lr·decay^(L−l−1)：顶层学得最快，底层几乎不动。"),
        Preset("layerwise", "Layer-wise unfreezing (full, gradual)", lr=5e-5, fields=("unfreeze_every", "unfreeze_unit"),
               method={"unfreeze_every": 10},
               blurb="Start with the top block + head, release one more block downward every k steps or epochs.",
               label_zh="分层微调（全参数，逐步解冻）",
               blurb_zh="从顶层（靠近输出）和输出头开始训练，每 k 步或 k 轮再向下解冻一层。"),
    ),
))

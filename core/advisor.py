"""Recommend a fine-tuning method from data size, hardware and goal.

It follows the seed notes' "how to choose" table (如何选择微调方式):

    | condition / goal                      | method                         |
    | large data, enough compute            | full fine-tuning               |
    | quick experiments and deployment      | LoRA                           |
    | several tasks sharing one base model  | Adapter                        |
    | extreme parameter compression         | prompt / prefix tuning         |
    | base weights must not change          | the PEFT family, LoRA first    |

and refines it with the hardware (full fine-tuning needs about 16 bytes of memory per parameter with AdamW, so
it is only advised on a large GPU) and the data size (full fine-tuning on a small dataset overfits; prompt
tuning has little capacity, so with more data prefix tuning is advised instead). Pure function, no I/O.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from .methods import spec, specs
from .methods.registry import Goal

Hardware = Literal["cpu", "small_gpu", "large_gpu"]

HARDWARE: dict[str, str] = {
    "cpu": "CPU only",
    "small_gpu": "one GPU up to 24 GB",
    "large_gpu": "a GPU with more than 24 GB, or several GPUs",
}
GOALS: dict[str, str] = {
    "quick": "quick experiment",
    "multitask": "several tasks sharing one base model",
    "quality": "highest quality",
    "smallest": "smallest artefact",
    "frozen_base": "base weights must not change",
}
#: The same labels in Chinese (the studio shows them; the seed notes' own wording where they have one).
HARDWARE_ZH: dict[str, str] = {
    "cpu": "仅 CPU",
    "small_gpu": "一块显存不超过 24 GB 的 GPU",
    "large_gpu": "一块显存超过 24 GB 的 GPU，或多块 GPU",
}
GOALS_ZH: dict[str, str] = {
    "quick": "快速实验",
    "multitask": "多个任务共享一个基座模型",
    "quality": "最高质量",
    "smallest": "最小的产物",
    "frozen_base": "基座权重不得改变",
}
SMALL_DATA = 1_000  # rows; below this, full fine-tuning mostly memorises
LARGE_DATA = 10_000  # rows; from here on, full fine-tuning pays off when the hardware allows it


@dataclass(frozen=True)
class Advice:
    method: str  # a registered method (core.methods.specs)
    method_config: dict[str, Any]
    train: dict[str, Any]  # TrainConfig fields to set
    reasons: list[str]
    alternatives: list[str] = field(default_factory=list)  # labels of the other methods that serve the goal
    reasons_zh: list[str] = field(default_factory=list)  # ``reasons`` in Chinese, one for one
    alternative_methods: list[str] = field(default_factory=list)  # their registry names

    @property
    def label(self) -> str:
        """The registry's label of the method, or of its preset (LLRD for full with llrd_decay < 1)."""
        s = spec(self.method)
        preset = s.preset_for(self.method_config, self.train)
        return preset.label if preset is not None else s.label


Reason = tuple[str, str]  # (English, Chinese)


def _advice(method: str, method_config: dict[str, Any], train: dict[str, Any], *reasons: Reason) -> Advice:
    return Advice(method, method_config, train, [en for en, _ in reasons], reasons_zh=[zh for _, zh in reasons])


def _data_note(rows: int) -> Reason:
    if rows < 100:
        return (f"{rows} rows is very little data: expect the model to memorise it; keep an eye on the eval loss.",
                f"{rows} 行数据非常少：模型多半会把它背下来，请留意验证损失（eval loss）。")
    if rows < SMALL_DATA:
        return (f"{rows} rows is a small dataset (< {SMALL_DATA:,}): a small trainable part generalises better.",
                f"{rows} 行是小数据集（< {SMALL_DATA:,}）：可训练部分小一些，泛化更好。")
    if rows < LARGE_DATA:
        return f"{rows:,} rows is a medium dataset.", f"{rows:,} 行是中等规模的数据集。"
    return f"{rows:,} rows is a large dataset (≥ {LARGE_DATA:,}).", f"{rows:,} 行是大数据集（≥ {LARGE_DATA:,}）。"


def recommend(rows: int, hardware: Hardware, goal: Goal) -> Advice:
    """The method to try first for ``rows`` training examples on ``hardware`` with ``goal``, with reasons, and as
    alternatives every other registered method that serves ``goal`` (``MethodSpec.goals``)."""
    advice = _first_choice(rows, hardware, goal)
    also = [s for s in specs().values() if goal in s.goals and s.name != advice.method]
    return dataclasses.replace(advice, alternatives=[s.label for s in also], alternative_methods=[s.name for s in also])


def _first_choice(rows: int, hardware: Hardware, goal: Goal) -> Advice:
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        raise ValueError(f"rows = {rows!r} is invalid: must be an integer >= 0")
    if hardware not in HARDWARE:
        raise ValueError(f"hardware = {hardware!r} is invalid: choose one of {', '.join(map(repr, HARDWARE))}")
    if goal not in GOALS:
        raise ValueError(f"goal = {goal!r} is invalid: choose one of {', '.join(map(repr, GOALS))}")
    data = _data_note(rows)
    cpu = hardware == "cpu"

    if goal == "quick":
        return _advice(
            "lora", {"r": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]}, {"lr": spec("lora").lr},
            ("Seed table: quick experiments and deployment → LoRA.", "选择表：快速实验与部署 → LoRA。"),
            ("Only the small A·B matrices train (well under 1% of the parameters), so steps are fast and the "
             "artefact is a few MB; it can be merged into the base for zero-overhead inference.",
             "只训练很小的 A·B 矩阵（远少于 1% 的参数），每步都快，产物只有几 MB；还可以合并回基座模型，推理零额外开销。"),
            data,
        )

    if goal == "multitask":
        return _advice(
            "adapter", {"bottleneck": 16 if rows < LARGE_DATA else 64, "placement": "houlsby"},
            {"lr": spec("adapter").lr if rows < LARGE_DATA else spec("adapter").lr / 2},
            ("Seed table: several tasks sharing one model → Adapter.", "选择表：多任务共享一个模型 → Adapter。"),
            ("Each task gets its own small bottleneck module next to one shared, frozen base; switching tasks "
             "means switching modules.",
             "每个任务有自己的小型瓶颈 Adapter 模块，共用一个冻结的基座；切换任务就是切换模块。"),
            data,
        )

    if goal == "smallest":
        if rows < LARGE_DATA or cpu:
            return _advice(
                "prompt_tuning", {"num_virtual_tokens": 20, "init": "vocab"}, {"lr": spec("prompt_tuning").lr},
                ("Seed table: extreme parameter compression → prompt / prefix tuning.",
                 "选择表：极致的参数压缩 → Prompt Tuning / Prefix Tuning（前缀调控）。"),
                ("Prompt tuning trains only m soft token embeddings (m × hidden values: tens of KB); it needs a "
                 "high learning rate.",
                 "Prompt Tuning 只训练 m 个软提示（soft prompt）向量（m × hidden 个数值，几十 KB），需要较高的学习率。"),
                data,
            )
        return _advice(
            "prefix_tuning", {"num_virtual_tokens": 20, "encoder_hidden": 512}, {"lr": spec("prefix_tuning").lr},
            ("Seed table: extreme parameter compression → prompt / prefix tuning.",
             "选择表：极致的参数压缩 → Prompt Tuning / Prefix Tuning（前缀调控）。"),
            ("With this much data, prefix tuning's key/value prefixes in every layer use it better than an "
             "input-only prompt, and the saved prefix is still tiny.",
             "数据这么多时，Prefix Tuning 在每一层的 key/value 前缀比只在输入层的提示更能利用数据，保存的前缀依然很小。"),
            data,
        )

    if goal == "frozen_base":
        return _advice(
            "lora", {"r": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]}, {"lr": spec("lora").lr},
            ("Seed table: base weights must not change → the PEFT family, LoRA first.",
             "选择表：基座权重不得改变 → 参数高效微调（PEFT）家族，首选 LoRA。"),
            ("LoRA adds B·A beside each frozen weight and never writes to it; keep it unmerged and the base "
             "stays bit-identical.",
             "LoRA 在每个冻结权重旁路添加 B·A，从不改写原权重；不合并时基座逐位不变。"),
            data,
        )

    # goal == "quality"
    if rows >= LARGE_DATA and hardware == "large_gpu":
        return _advice(
            "full", {}, {"lr": spec("full").lr, "llrd_decay": 0.9},
            ("Seed table: large data and enough compute → full fine-tuning.",
             "选择表：数据量大、算力充足 → 全参数微调。"),
            ("Layer-wise lr decay (0.9) keeps the general lower layers stable while the top adapts.",
             "学习率调度（LLRD，衰减 0.9）让通用的底层保持稳定，顶层重点适配。"),
            data,
            ("Full fine-tuning with AdamW needs about 16 bytes per parameter, which this hardware has.",
             "用 AdamW 做全参数微调每个参数约需 16 字节显存，这台硬件够用。"),
        )
    reasons: list[Reason] = []
    if rows < LARGE_DATA:
        reasons.append((f"Full fine-tuning pays off with large data (≥ {LARGE_DATA:,} rows); with less it tends to "
                        "overfit, so a PEFT method with more capacity is the better bet.",
                        f"全参数微调在大数据（≥ {LARGE_DATA:,} 行）上才划算；数据少时容易过拟合，"
                        "容量更大的参数高效微调方法更稳妥。"))
    if hardware != "large_gpu":
        reasons.append((f"Full fine-tuning needs about 16 bytes of memory per parameter with AdamW; on "
                        f"{HARDWARE[hardware]} that is too much for most models.",
                        f"用 AdamW 做全参数微调每个参数约需 16 字节内存；在「{HARDWARE_ZH[hardware]}」上，"
                        "对多数模型来说太多了。"))
    return _advice(
        "lora", {"r": 16, "alpha": 32.0, "targets": ["all-linear"]}, {"lr": spec("lora").lr},
        ("LoRA on every linear layer with a higher rank (16) comes closest to full fine-tuning quality.",
         "在所有线性层上使用更高秩（16）的 LoRA，最接近全参数微调的质量。"),
        *reasons,
        data,
    )

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
SMALL_DATA = 1_000  # rows; below this, full fine-tuning mostly memorises
LARGE_DATA = 10_000  # rows; from here on, full fine-tuning pays off when the hardware allows it


@dataclass(frozen=True)
class Advice:
    method: str  # a registered method (core.methods.specs)
    method_config: dict[str, Any]
    train: dict[str, Any]  # TrainConfig fields to set
    reasons: list[str]
    alternatives: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The registry's label of the method, or of its preset (LLRD for full with llrd_decay < 1)."""
        s = spec(self.method)
        preset = s.preset_for(self.method_config, self.train)
        return preset.label if preset is not None else s.label


def _data_note(rows: int) -> str:
    if rows < 100:
        return f"{rows} rows is very little data: expect the model to memorise it; keep an eye on the eval loss."
    if rows < SMALL_DATA:
        return f"{rows} rows is a small dataset (< {SMALL_DATA:,}): a small trainable part generalises better."
    if rows < LARGE_DATA:
        return f"{rows:,} rows is a medium dataset."
    return f"{rows:,} rows is a large dataset (≥ {LARGE_DATA:,})."


def recommend(rows: int, hardware: Hardware, goal: Goal) -> Advice:
    """The method to try first for ``rows`` training examples on ``hardware`` with ``goal``, with reasons, and as
    alternatives every other registered method that serves ``goal`` (``MethodSpec.goals``)."""
    advice = _first_choice(rows, hardware, goal)
    also = [s.label for s in specs().values() if goal in s.goals and s.name != advice.method]
    return dataclasses.replace(advice, alternatives=also)


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
        return Advice("lora", {"r": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]}, {"lr": spec("lora").lr}, [
            "Seed table: quick experiments and deployment → LoRA.",
            "Only the small A·B matrices train (well under 1% of the parameters), so steps are fast and the "
            "artefact is a few MB; it can be merged into the base for zero-overhead inference.",
            data,
        ])

    if goal == "multitask":
        return Advice("adapter", {"bottleneck": 16 if rows < LARGE_DATA else 64, "placement": "houlsby"},
                      {"lr": spec("adapter").lr if rows < LARGE_DATA else spec("adapter").lr / 2}, [
            "Seed table: several tasks sharing one model → Adapter.",
            "Each task gets its own small bottleneck module next to one shared, frozen base; switching tasks "
            "means switching modules.",
            data,
        ])

    if goal == "smallest":
        if rows < LARGE_DATA or cpu:
            return Advice("prompt_tuning", {"num_virtual_tokens": 20, "init": "vocab"}, {"lr": spec("prompt_tuning").lr}, [
                "Seed table: extreme parameter compression → prompt / prefix tuning.",
                "Prompt tuning trains only m soft token embeddings (m × hidden values: tens of KB); it needs a "
                "high learning rate.",
                data,
            ])
        return Advice("prefix_tuning", {"num_virtual_tokens": 20, "encoder_hidden": 512}, {"lr": spec("prefix_tuning").lr}, [
            "Seed table: extreme parameter compression → prompt / prefix tuning.",
            "With this much data, prefix tuning's key/value prefixes in every layer use it better than an "
            "input-only prompt, and the saved prefix is still tiny.",
            data,
        ])

    if goal == "frozen_base":
        return Advice("lora", {"r": 8, "alpha": 16.0, "targets": ["q_proj", "v_proj"]}, {"lr": spec("lora").lr}, [
            "Seed table: base weights must not change → the PEFT family, LoRA first.",
            "LoRA adds B·A beside each frozen weight and never writes to it; keep it unmerged and the base "
            "stays bit-identical.",
            data,
        ])

    # goal == "quality"
    if rows >= LARGE_DATA and hardware == "large_gpu":
        return Advice("full", {}, {"lr": spec("full").lr, "llrd_decay": 0.9}, [
            "Seed table: large data and enough compute → full fine-tuning.",
            "Layer-wise lr decay (0.9) keeps the general lower layers stable while the top adapts.",
            data,
            "Full fine-tuning with AdamW needs about 16 bytes per parameter, which this hardware has.",
        ])
    reasons = []
    if rows < LARGE_DATA:
        reasons.append(f"Full fine-tuning pays off with large data (≥ {LARGE_DATA:,} rows); with less it tends to "
                       "overfit, so a PEFT method with more capacity is the better bet.")
    if hardware != "large_gpu":
        reasons.append(f"Full fine-tuning needs about 16 bytes of memory per parameter with AdamW; on "
                       f"{HARDWARE[hardware]} that is too much for most models.")
    return Advice("lora", {"r": 16, "alpha": 32.0, "targets": ["all-linear"]}, {"lr": spec("lora").lr}, [
        "LoRA on every linear layer with a higher rank (16) comes closest to full fine-tuning quality.",
        *reasons,
        data,
    ])

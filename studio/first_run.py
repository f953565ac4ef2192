"""The Train form's starting values on a CPU: a useful result in minutes, sized to the loaded dataset.

Core's defaults (LoRA r 8 on q/v at lr 2e-4, one epoch, 200 held-out rows generated at the end) suit a GPU. On a
CPU they take most of an hour on a few hundred rows and learn little in the first minutes. So on a CPU the studio
starts from:

    LoRA r 16 on every linear layer at lr 2e-3   a larger update that learns a small dataset's pattern in a few
                                                 dozen steps (the identity sample's loss is below 0.1 by step 13)
    batches of 4                                  half the cost of a step of 8
    a step budget                                 the steps that fit TRAIN_BUDGET_S of training at the estimated
                                                  speed (studio.estimate), at least MIN_STEPS, at most one epoch
    16 held-out rows answered at the end          the task metrics in seconds, not minutes

The user sees these values and the estimated time in the form before pressing Start, and can change any of them.
The Train tab applies them when it opens with a newly loaded dataset, and only while those fields still hold the
page's defaults or the previous suggestion (nothing the user typed is overwritten).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import actions
from .estimate import planned_steps, train_rows
from .i18n import t

TRAIN_BUDGET_S = 120.0  # of training; with loading, the final evaluation and saving, a first run ends in ~3 min
MIN_STEPS = 16
CPU_FORM: dict[str, Any] = {
    "method": "lora",
    actions.knob_id("lora", "r"): 16,
    actions.knob_id("lora", "alpha"): 32.0,
    actions.knob_id("lora", "targets"): ["all-linear"],
    "train.lr": 2e-3,
    "train.batch_size": 4,
    "train.eval_max_rows": 16,
}
SUGGESTED = (*CPU_FORM, "train.max_steps")


def untouched(form: dict[str, Any], last: dict[str, Any] | None = None) -> bool:
    """True while every field the suggestion sets still holds the fresh page's value or the ``last``
    suggestion's: the user has chosen nothing of their own there yet."""
    defaults = actions.form_defaults()
    return all(form.get(k) == defaults[k] or (last is not None and form.get(k) == last.get(k)) for k in SUGGESTED)


def suggest(ctx, form: dict[str, Any], dataset: dict, hardware: str) -> dict[str, Any] | None:
    """Form values for a first run on this hardware and dataset, with "estimate" (actions.check's result for
    them), or None when core's defaults stay (a GPU, or no dataset)."""
    if hardware != "cpu" or not dataset or not dataset.get("stats", {}).get("n"):
        return None
    values = {**form, **CPU_FORM, "train.max_steps": 1}
    one = actions.check(ctx, values, dataset)  # the estimated time of one step
    cfg = actions.config_of(ctx, values)
    epoch = planned_steps(dataclasses.replace(cfg.train, max_steps=0, epochs=1.0),
                          train_rows(dataset["stats"]["n"], cfg.data))
    fit = int(TRAIN_BUDGET_S / one["train_seconds"]) if one["train_seconds"] else epoch
    values["train.max_steps"] = max(1, min(epoch, max(MIN_STEPS, fit)))
    return {"values": {k: values[k] for k in SUGGESTED},
            "estimate": actions.check(ctx, values, dataset)}


def markdown(tip: dict[str, Any]) -> str:
    v = tip["values"]
    r, targets = v[actions.knob_id("lora", "r")], ", ".join(v[actions.knob_id("lora", "targets")])
    return t("first_run.summary", r=r, targets=targets, lr=f"{v['train.lr']:g}", steps=v["train.max_steps"],
             batch=v["train.batch_size"], rows=v["train.eval_max_rows"]) + "  \n" + tip["estimate"]["markdown"]


__all__ = ["CPU_FORM", "MIN_STEPS", "SUGGESTED", "TRAIN_BUDGET_S", "markdown", "suggest", "untouched"]

"""Registry of fine-tuning methods: config name -> Method class (see base.py for the interface)."""

from __future__ import annotations

import importlib

from ..config import MethodConfig
from .base import Method

# name -> "module:Class"; imported on first use so that `import core` stays light.
METHODS: dict[str, str] = {
    "full": "full:FullMethod",
    "freeze": "freeze:FreezeMethod",
    "bitfit": "bitfit:BitFitMethod",
    "fishmask": "fishmask:FishMaskMethod",
    "lora": "lora:LoraMethod",
    "adapter": "adapter:AdapterMethod",
    "prompt_tuning": "prompt_tuning:PromptTuningMethod",
    "prefix_tuning": "prefix_tuning:PrefixTuningMethod",
    "p_tuning": "p_tuning:PTuningMethod",
    "p_tuning_v2": "p_tuning_v2:PTuningV2Method",
}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def build_method(config: MethodConfig) -> Method:
    return method_class(config.method)(config)


__all__ = ["METHODS", "Method", "build_method", "method_class"]

"""Fine-tuning methods: one file each, each registering itself (see registry.py; base.py is the interface).

Everything outside this package reads the registry: ``specs()`` for every method, ``spec(name)`` for one,
``build_method(config)`` for an instance, ``method_config(name, values)`` for a typed config.
"""

from __future__ import annotations

from .base import Method
from .registry import FAMILIES, MethodSpec, Preset, build_method, menu, method_config, spec, spec_of, specs


__all__ = ["FAMILIES", "Method", "MethodSpec", "Preset", "build_method", "menu", "method_config",
           "spec", "spec_of", "specs"]

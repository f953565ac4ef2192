"""The method registry: one ``register(...)`` call at the bottom of each method file, read by everything else.

    register(MethodSpec(
        name="lora", label="LoRA", family="reparameterised", lr=2e-4,
        blurb="Low-rank update B·A beside each frozen weight: y = W₀x + (α/r)·B·A·x. Small, mergeable.",
        config_cls=LoraConfig, method_cls=LoraMethod, goals=("quick", "frozen_base"),
        label_zh="LoRA（低秩适配）", blurb_zh="重参数化微调：在每个冻结权重旁路添加低秩更新 B·A ...",
    ))

The CLI's flags, the studio's method menu and knobs, the advisor's choices, the memory estimate, the README's
method table and the contract tests all iterate over ``specs()``: a new file in ``core/methods/`` that registers
itself appears in all of them with no other edit. Code outside ``core/methods/`` asks a spec's capability flags,
never a method's name or config type.

``register`` checks that the parts agree: the config class and the method class name the same method, the
method class accepts that config, the capability flags match what the class implements (``can_merge`` needs
``merge``/``unmerge``/``bake``; ``prepares`` needs ``prepare``), and presets only name fields the config has.
The method and each preset carry their label and blurb in Chinese too (``label_zh``, ``blurb_zh``, in the seed
notes' terms), for the studio's Chinese page.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import FieldError, MethodConfig
from .base import Method

Family = Literal["full", "selective", "additive", "reparameterised"]
Goal = Literal["quick", "multitask", "quality", "smallest", "frozen_base"]

#: The seed notes' families (seed 000 "LLM 常见微调方法", seed 002's table), in display order.
FAMILIES: dict[str, str] = {
    "full": "full fine-tuning",
    "selective": "selective: a part of the model's own weights trains",
    "additive": "additive: new modules or tokens train, the base stays frozen",
    "reparameterised": "reparameterised: a low-rank update beside each frozen weight",
}


@dataclass(frozen=True)
class Preset:
    """A studio menu entry that is a method with some knobs set, e.g. LLRD = full + TrainConfig.llrd_decay 0.9."""

    key: str
    label: str
    blurb: str
    fields: tuple[str, ...]  # method-config fields shown in the studio
    lr: float  # suggested learning rate
    method: dict[str, Any] = field(default_factory=dict)  # method-config values this entry sets
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig values this entry sets (shown as knobs)
    label_zh: str = ""  # label and blurb in Chinese, in the seed notes' terms (the studio's Chinese page)
    blurb_zh: str = ""


@dataclass(frozen=True)
class MethodSpec:
    name: str  # registry key: RunConfig.method, --method, the studio's menu key
    label: str  # human name, e.g. "P-Tuning v2 (deep prompts)"
    blurb: str  # one line: what trains, in formula form where it has one
    family: Family
    config_cls: type[MethodConfig]
    method_cls: type[Method]
    lr: float  # suggested peak learning rate for this method
    #: capability flags (the only things code outside core/methods may ask about a method)
    trains_base: bool = False  # updates the model's own weights in place (memory: grads/AdamW on base tensors)
    needs_tokenizer: bool = False  # build_method(..., tokenizer=) hands it the tokenizer (e.g. init from text)
    virtual_tokens: bool = False  # prepends num_virtual_tokens positions (prompt / prefix methods)
    prepares: bool = False  # runs a preparation pass over training batches before the loop (FishMask's Fisher)
    goals: tuple[Goal, ...] = ()  # the advisor's goals this method serves (core.advisor.GOALS)
    fields: tuple[str, ...] | None = None  # knobs shown in the studio's main menu entry (None: every field)
    presets: tuple[Preset, ...] = ()  # extra studio menu entries over this method
    label_zh: str = ""  # label and blurb in Chinese, in the seed notes' terms (全参数微调, 加性微调, ...)
    blurb_zh: str = ""

    @property
    def can_merge(self) -> bool:
        return self.method_cls.can_merge

    @property
    def peft_type(self) -> str | None:
        return self.method_cls.peft_type

    @property
    def knobs(self) -> tuple[str, ...]:
        """The studio's knobs of the main entry: ``fields``, or every config field."""
        return self.fields if self.fields is not None else tuple(f.name for f in dataclasses.fields(self.config_cls))

    def defaults(self) -> dict[str, Any]:
        """Every config field's default value."""
        return self.config_cls().to_dict()

    def preset_for(self, method_cfg: dict[str, Any], train: dict[str, Any]) -> Preset | None:
        """The first preset whose knobs are all switched away from their defaults (full with llrd_decay 0.9 is
        the LLRD preset), or None."""
        from ..config import TrainConfig

        method_defaults, train_defaults = self.defaults(), TrainConfig().to_dict()
        for p in self.presets:
            on = [method_cfg.get(k, method_defaults[k]) != method_defaults[k] for k in p.method]
            on += [train.get(k, train_defaults[k]) != train_defaults[k] for k in p.train]
            if on and all(on):
                return p
        return None


_REGISTRY: dict[str, MethodSpec] = {}


def _overrides(cls: type, name: str) -> bool:
    return getattr(cls, name) is not getattr(Method, name)


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry, after checking that its parts agree. Returns it."""
    where = f"register({spec.name!r})"
    if spec.name in _REGISTRY and _REGISTRY[spec.name].method_cls is not spec.method_cls:
        raise ValueError(f"{where}: the name is already registered by {_REGISTRY[spec.name].method_cls.__name__}")
    if spec.config_cls.method != spec.name:
        raise ValueError(f"{where}: {spec.config_cls.__name__}.method is {spec.config_cls.method!r}")
    if spec.method_cls.config_cls is not spec.config_cls:
        raise ValueError(f"{where}: {spec.method_cls.__name__}.config_cls is not {spec.config_cls.__name__}")
    if not 0 < spec.lr <= 1:
        raise ValueError(f"{where}: lr = {spec.lr!r} is invalid: must be in (0, 1]")
    if spec.family not in FAMILIES:
        raise ValueError(f"{where}: family = {spec.family!r} is invalid: choose one of {', '.join(FAMILIES)}")
    required = [
        "apply", "remove", "adapter_tensors", "load_adapter_tensors", "adapter_config", "set_enabled",
        "expected_trainable",
    ]
    if spec.can_merge:
        required += ["merge", "unmerge", "bake"]
    if spec.prepares:
        required.append("prepare")
    missing = [m for m in required if not _overrides(spec.method_cls, m)]
    if missing:
        raise ValueError(f"{where}: {spec.method_cls.__name__} does not implement {', '.join(missing)}")
    names = {f.name for f in dataclasses.fields(spec.config_cls)}
    if spec.virtual_tokens and "num_virtual_tokens" not in names:
        raise ValueError(f"{where}: virtual_tokens is set but {spec.config_cls.__name__} has no num_virtual_tokens")
    for preset in (None, *spec.presets):
        shown = spec.knobs if preset is None else (*preset.fields, *preset.method)
        unknown = sorted(set(shown) - names)
        if unknown:
            raise ValueError(f"{where}: {spec.config_cls.__name__} has no field(s) {', '.join(unknown)}")
    untranslated = [p.key if p else spec.name for p in (None, *spec.presets) if not (p or spec).label_zh
                    or not (p or spec).blurb_zh]
    if untranslated:
        raise ValueError(f"{where}: {', '.join(untranslated)} lacks label_zh / blurb_zh (the studio's Chinese page)")
    taken = {p.key for s in _REGISTRY.values() if s.name != spec.name for p in s.presets} | set(_REGISTRY)
    clash = sorted({p.key for p in spec.presets} & (taken | {spec.name}))
    if clash:
        raise ValueError(f"{where}: preset key(s) {', '.join(clash)} already name a method or preset")
    _REGISTRY[spec.name] = spec
    return spec


_loaded = False


def _load_all() -> None:
    """Import every module of core.methods once, so that each file's ``register`` call has run."""
    global _loaded
    if _loaded:
        return
    package = importlib.import_module(__package__)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        importlib.import_module(f"{__package__}.{info.name}")
    _loaded = True


def specs() -> dict[str, MethodSpec]:
    """Every registered method, in menu order: by family (as FAMILIES), then by registration file name."""
    _load_all()
    order = list(FAMILIES)
    return dict(sorted(_REGISTRY.items(), key=lambda kv: order.index(kv[1].family)))


def spec(name: str) -> MethodSpec:
    """The spec of method ``name``; ValueError naming RunConfig.method and the choices when it is unknown."""
    all_specs = specs()
    if name not in all_specs:
        raise FieldError(f"RunConfig.method = {name!r} is invalid: choose one of {', '.join(all_specs)}", "method")
    return all_specs[name]


def spec_of(config: MethodConfig) -> MethodSpec:
    return spec(config.method)


def build_method(config: MethodConfig, tokenizer: Any = None) -> Method:
    """The Method for ``config``; the tokenizer is handed to methods that need one (``needs_tokenizer``)."""
    s = spec_of(config)
    method = s.method_cls(config)
    if s.needs_tokenizer:
        method.tokenizer = tokenizer  # type: ignore[attr-defined]
    return method


def method_config(name: str, values: dict[str, Any] | None = None) -> MethodConfig:
    """The typed config of method ``name`` from plain values (YAML, JSON, CLI, form); unknown fields fail."""
    return spec(name).config_cls.from_dict(values)


def menu() -> dict[str, tuple[MethodSpec, Preset | None]]:
    """The studio's method menu: {entry key: (spec, preset or None)}, each method followed by its presets."""
    out: dict[str, tuple[MethodSpec, Preset | None]] = {}
    for s in specs().values():
        out[s.name] = (s, None)
        for p in s.presets:
            out[p.key] = (s, p)
    return out


__all__ = ["FAMILIES", "MethodSpec", "Preset", "build_method", "menu", "method_config", "register", "spec",
           "spec_of", "specs"]

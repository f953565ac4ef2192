"""Typed, validated configs: training, data and the whole run; the base of every method's config.

Every field has a type, a default and a one-line help text (``metadata["help"]``) that the CLI and the
studio show next to the knob. A bad value raises ``ValueError`` naming the field and what is allowed.
Configs round-trip through plain dicts, so through YAML and JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_type_hints

import yaml

DEFAULT_MODEL = "default"  # the packaged SmolLM2-135M-Instruct


def knob(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with help text. Lists get a default_factory. Extra keywords go to the metadata: ``min``,
    ``max``, ``gt`` (checked by Validated) and ``help_zh``, the help in Chinese for the studio's Chinese page."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


class FieldError(ValueError):
    """A bad config value. ``field`` is its path in RunConfig's dict shape once RunConfig.from_dict has seen it
    (``train.lr``, ``data.split``, ``method_config.r``), else the bare field name; the message names it too."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field

    def within(self, section: str) -> FieldError:
        return FieldError(str(self), f"{section}.{self.field}")


def _fail(cls_name: str, name: str, value: Any, allowed: str) -> None:
    raise FieldError(f"{cls_name}.{name} = {value!r} is invalid: {allowed}", name)


class Validated:
    """Checks Literal fields and numeric ranges declared in field metadata (``min``, ``max``, ``gt``)."""

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            hint = hints[f.name]
            choices = get_args(hint) if getattr(hint, "__origin__", None) is Literal else ()
            if choices and value not in choices:
                _fail(type(self).__name__, f.name, value, f"choose one of {', '.join(map(repr, choices))}")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                _fail(type(self).__name__, f.name, value, "must be a finite number")
            lo, hi, gt = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("gt")
            if lo is not None and value < lo:
                _fail(type(self).__name__, f.name, value, f"must be >= {lo}")
            if gt is not None and value <= gt:
                _fail(type(self).__name__, f.name, value, f"must be > {gt}")
            if hi is not None and value > hi:
                _fail(type(self).__name__, f.name, value, f"must be <= {hi}")
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; subclasses override."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None):
        data = dict(data or {})
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise FieldError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}", unknown[0])
        hints = get_type_hints(cls)
        for name, value in list(data.items()):
            data[name] = _coerce(cls.__name__, name, hints[name], value)
        return cls(**data)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}  # type: ignore[arg-type]


def _coerce(cls_name: str, name: str, hint: Any, value: Any) -> Any:
    """Turn YAML/CLI values into the declared type, or fail naming the field."""
    if value is None:
        return value
    base = hint if isinstance(hint, type) else None
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
    except (TypeError, ValueError):
        _fail(cls_name, name, value, f"expected {base.__name__}")
    if getattr(hint, "__origin__", None) is list and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if getattr(hint, "__origin__", None) is dict and isinstance(value, str):
        return _mapping(cls_name, name, value)
    return value


def _mapping(cls_name: str, name: str, text: str) -> dict[str, str]:
    """"a=b,c=d" (a CLI flag or a text box) -> {"a": "b", "c": "d"}; blank -> {}."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, eq, value = (s.strip() for s in part.partition("="))
        if not eq or not key or not value:
            _fail(cls_name, name, text, "expected name=column pairs separated by commas, e.g. instruction=prompt")
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------------------------
# Method configs live beside their method, one file each in core/methods/ (see core.methods.registry).
# ``method`` is the registry key.


@dataclass
class MethodConfig(Validated):
    method: ClassVar[str] = ""


def method_config(name: str, values: dict[str, Any] | None = None) -> MethodConfig:
    """The typed config of method ``name`` (the registry in core.methods owns the config classes)."""
    from .methods.registry import method_config as from_registry

    return from_registry(name, values)


# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig(Validated):
    lr: float = knob(2e-4, "Peak learning rate (of the top block when LLRD is on).", gt=0.0, max=1.0,
                     help_zh="峰值学习率（开启 LLRD 时为顶层的学习率）。")
    scheduler: Literal["constant", "linear", "cosine"] = knob("cosine", "Learning-rate schedule after warmup.",
                                                              help_zh="预热之后的学习率调度方式。")
    warmup_steps: int = knob(0, "Linear warmup steps.", min=0, help_zh="线性预热的步数。")
    epochs: float = knob(1.0, "Passes over the training set (ignored when max_steps > 0).", gt=0.0, max=1000,
                         help_zh="训练轮次：遍历训练集的次数（max_steps > 0 时忽略）。")
    max_steps: int = knob(0, "Stop after this many optimiser steps (0 = use epochs).", min=0,
                          help_zh="训练这么多个优化步后停止（0 = 按训练轮次）。")
    batch_size: int = knob(8, "Examples per micro-batch.", min=1, max=4096, help_zh="每个微批次的样本数（批大小）。")
    grad_accum: int = knob(1, "Micro-batches per optimiser step.", min=1, max=1024, help_zh="每个优化步累积的微批次数（梯度累积）。")
    max_len: int = knob(512, "Maximum tokens per example; longer ones are truncated.", min=8, max=131072,
                        help_zh="每个样本的最大 token 数；更长的会被截断。")
    weight_decay: float = knob(0.0, "AdamW weight decay.", min=0.0, max=1.0, help_zh="AdamW 的权重衰减。")
    max_grad_norm: float = knob(1.0, "Clip the gradient norm to this (0 = off).", min=0.0,
                                help_zh="把梯度范数裁剪到此值（0 = 不裁剪）。")
    llrd_decay: float = knob(1.0, "Layer-wise LR decay: lr_l = lr·decay^(L−l−1). 1 = off.", gt=0.0, max=1.0,
                             help_zh="学习率调度（LLRD）的逐层衰减系数：第 l 层的学习率为 lr·decay^(L−l−1)（1 = 关闭；通常 0.8 ~ 0.95）。")
    seed: int = knob(42, "Random seed for init, shuffling and dropout.", min=0, help_zh="初始化、打乱数据和 dropout 用的随机种子。")
    eval_every: int = knob(0, "Evaluate every N steps (0 = only at the end).", min=0,
                           help_zh="每 N 步在验证集上评估一次（0 = 只在结束时）。")
    eval_max_rows: int = knob(
        200, "Held-out rows answered by greedy generation for the task metrics at the end (0 = loss metrics only).",
        min=0, help_zh="结束时用贪心生成回答的验证行数，用于任务指标（0 = 只算损失类指标）。")
    eval_max_new_tokens: int = knob(64, "Most tokens generated per held-out answer at the end.", min=1, max=4096,
                                    help_zh="结束时每个验证回答最多生成的 token 数。")
    save_every: int = knob(0, "Checkpoint every N steps (0 = only at the end).", min=0,
                           help_zh="每 N 步保存一次检查点（0 = 只在结束时）。")
    log_every: int = knob(1, "Write a metrics event every N steps.", min=1, help_zh="每 N 步写一条指标记录。")
    grad_checkpointing: bool = knob(False, "Recompute activations in backward to save memory.",
                                    help_zh="反向传播时重新计算激活值，以节省显存（梯度检查点）。")
    device: Literal["auto", "cpu", "cuda", "mps"] = knob("auto", "Where to train.", help_zh="在哪个设备上训练。")
    precision: Literal["auto", "fp32", "bf16-mixed"] = knob(
        "auto",
        "bf16-mixed: base weights in bf16, trainable weights and optimiser state in fp32, forward under bf16 "
        "autocast. auto: bf16-mixed on GPUs with bf16 and on CPUs with bf16 matrix units (AMX, AVX512-BF16), "
        "fp32 otherwise.",
        help_zh="bf16-mixed：基座权重用 bf16，可训练权重和优化器状态用 fp32，前向在 bf16 autocast 下进行。"
                "auto：GPU 支持 bf16 或 CPU 有 bf16 矩阵单元（AMX、AVX512-BF16）时用 bf16-mixed，否则用 fp32。",
    )
    compile: bool = knob(False, "torch.compile the model (GPU only).")
    parallel: Literal["auto", "ddp", "fsdp"] = knob(
        "auto",
        "Several processes (torchrun): ddp keeps a whole model on each; fsdp (FSDP2) shards the weights, gradients "
        "and optimiser state of full fine-tuning and Freeze across them. auto: fsdp when that state would fill "
        "more than half of one device, else ddp. Ignored in one process.",
        help_zh="多进程（torchrun）时：ddp 在每个进程保留完整模型；fsdp（FSDP2）把全量微调和 Freeze 的权重、梯度和优化器状态"
                "分片到各进程。auto：这些状态超过单个设备一半内存时用 fsdp，否则用 ddp。单进程时忽略。",
    )


@dataclass
class DataConfig(Validated):
    path: str = knob(
        "", "A .json (array), .jsonl, .csv or .parquet file, a folder written by Dataset.save_to_disk, or a "
        "Hugging Face Hub dataset id (owner/name)."
    )
    format: Literal["auto", "instruction", "conversation", "qa", "classification", "text"] = knob(
        "auto", "Dataset format; auto-detected from the fields."
    )
    fields: dict[str, str] = knob(
        {}, "Column mapping: which column holds each field, e.g. instruction=prompt,output=completion.",
        help_zh="列名映射：每个字段在哪一列，例如 instruction=prompt,output=completion。",
    )
    split: str = knob("train", "Split of a Hub dataset or of a saved DatasetDict, e.g. train or train[:90%].")
    subset: str = knob("", "Configuration (subset) name of a Hub dataset; empty = its default.")
    val_fraction: float = knob(0.1, "Fraction of examples held out for evaluation.", min=0.0, max=0.5,
                               help_zh="留作评估的样本比例。")
    val_count: int = knob(0, "Hold out exactly this many examples instead (0 = use val_fraction).", min=0,
                          help_zh="改为恰好留出这么多样本（0 = 按比例）。")
    system_prompt: str = knob("", "System prompt rendered before every example (empty = template default).")
    max_bytes: int = knob(200 * 1024 * 1024, "Refuse files larger than this.", min=1)

    def validate(self) -> None:
        from .data.formats import check_fields  # core.data imports this module
        from .data.sources import SPLIT

        check_fields(self.fields)
        if not SPLIT.fullmatch(self.split):
            _fail("DataConfig", "split", self.split, "a split name such as train, test or train[:90%]")
        if self.subset and not SPLIT.fullmatch(self.subset):
            _fail("DataConfig", "subset", self.subset, "a configuration name (letters, digits, - _ .)")


@dataclass
class RunConfig:
    """Everything a worker needs to train one run. Written to <run>/config.yaml."""

    model: str = DEFAULT_MODEL
    method: MethodConfig = field(default_factory=lambda: method_config("lora"))
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    name: str = ""

    @property
    def method_name(self) -> str:
        return self.method.method

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "method": self.method_name,
            "method_config": self.method.to_dict(),
            "train": self.train.to_dict(),
            "data": self.data.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = dict(d or {})
        unknown = sorted(set(d) - {"name", "model", "method", "method_config", "train", "data"})
        if unknown:
            raise FieldError(f"RunConfig: unknown field(s) {', '.join(unknown)}", unknown[0])
        from .methods.registry import spec  # the registry imports this module

        name = d.get("method", "lora")
        cls_ = spec(name).config_cls  # FieldError "method" when unknown
        built = {}
        for section, build in (("method_config", cls_.from_dict), ("train", TrainConfig.from_dict),
                               ("data", DataConfig.from_dict)):
            value = d.get(section)
            if value is not None and not isinstance(value, dict):
                raise FieldError(f"RunConfig.{section} must be a mapping, not {type(value).__name__}", section)
            try:
                built[section] = build(value)
            except FieldError as e:
                raise e.within(section) from None
        return cls(name=str(d.get("name") or ""), model=str(d.get("model") or DEFAULT_MODEL),
                   method=built["method_config"], train=built["train"], data=built["data"])

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if path.suffix == ".json" else yaml.safe_dump(self.to_dict(), sort_keys=False)
        path.write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        text = Path(path).read_text(encoding="utf-8")
        try:
            data = yaml.safe_load(text)  # YAML is a superset of JSON
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML/JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        return cls.from_dict(data)

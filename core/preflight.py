"""Before a run: apply the method to the model's shape on the meta device, with no weights and no data.

``dry_run`` is the one place that builds such a model. It gives the exact trainable and total parameter counts
(what the studio's estimate shows) and raises ValueError, naming the config field, when the settings do not fit
the model: a target module it does not have (the message lists those it has), a rank above a layer's size, more
frozen or trained blocks than it has, or virtual tokens that leave no room in its context for ``max_len`` real
ones. ``preflight`` runs it for a whole RunConfig; ``train`` calls it first, and the CLI and the studio call it
before anything is queued. Both read only the model's config file and take well under a second.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .blocks import ModelShape, model_shape
from .config import MethodConfig, RunConfig, TrainConfig
from .dist import check_parallel
from .methods import Method, build_method, spec_of
from .models import load_model_config, resolve_device, shape_model


@dataclass
class DryRun:
    trainable: int
    total: int
    shape: ModelShape
    model: nn.Module  # the meta-device model with the method applied (shapes only)
    method: Method  # the method, applied to ``model``

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(1, self.total)


def check_context(method_cfg: MethodConfig, shape: ModelShape, max_len: int) -> None:
    """Virtual tokens plus ``max_len`` real tokens must fit the model's context."""
    virtual = int(getattr(method_cfg, "num_virtual_tokens", 0) or 0) if spec_of(method_cfg).virtual_tokens else 0
    if virtual and virtual + max_len > shape.max_positions:
        raise ValueError(
            f"{type(method_cfg).__name__}.num_virtual_tokens = {virtual} is invalid: with max_len {max_len} the "
            f"sequence exceeds the model's context of {shape.max_positions} tokens"
        )


def dry_run(model_config, method_cfg: MethodConfig, max_len: int | None = None) -> DryRun:
    """Apply ``method_cfg`` to a meta-device model built from ``model_config`` (a transformers config).

    Raises ValueError naming the field when the config does not fit; other exceptions (a layout that
    ``from_config`` cannot build) propagate."""
    model = shape_model(model_config)  # every tensor on the meta device
    model.requires_grad_(False)
    method = build_method(method_cfg)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        method.apply(model)
    trainable, total = method.parameter_counts(model)
    if trainable == 0:
        raise ValueError(f"{type(method_cfg).__name__}: this configuration trains no parameters of the model")
    shape = model_shape(model)
    if max_len is not None:
        check_context(method_cfg, shape, max_len)
    return DryRun(trainable, total, shape, model, method)


def preflight(cfg: RunConfig, model: nn.Module | None = None) -> DryRun | None:
    """``dry_run`` for a whole RunConfig, on ``model``'s config when given, else on ``cfg.model``'s config file.
    None when the model's layout cannot be built on the meta device (the real ``apply`` checks it later)."""
    config = getattr(model, "config", None) if model is not None else load_model_config(cfg.model)
    if config is None:
        return None
    try:
        run = dry_run(config, cfg.method)
    except ValueError:
        raise
    except Exception:  # noqa: BLE001 - what a meta tensor cannot do is not a config problem
        return None
    check_train(cfg.train, run.method)
    return run


def check_train(train: TrainConfig, method: Method) -> None:
    """The training settings that depend on this machine or on the method: the device exists, and the strategy
    across GPUs (TrainConfig.parallel) applies to the method. ValueError names the field."""
    resolve_device(train.device)
    check_parallel(train.parallel, method)


__all__ = ["DryRun", "check_context", "check_train", "dry_run", "preflight"]

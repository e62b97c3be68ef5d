"""The model side of fine-tuning: the architecture (from the options and the checkpoint), the
starting weights with a fresh head, and AdamW with layer-wise lr decay."""
from __future__ import annotations

import torch
from torch import nn

from ..checkpoint import infer_config, load_checkpoint, resolve_checkpoint
from ..models.model import ConvNeXtV2
from ..models.variants import model_config
from .finetune_config import FinetuneConfig
from ..training.layer_decay import param_groups_layer_decay


def finetune_architecture(model_name: str | None, checkpoint: str | None = None,
                          **model_kwargs) -> dict:
    """Constructor arguments: explicit ``model_kwargs`` first, then the variant ``model_name``
    for depths and dims, then what the checkpoint stores or implies (its stem stride, input
    channels, GRN / layer scale; and depths and dims when no variant is named). A variant that
    does not match the checkpoint fails when loading, with the mis-shaped keys named."""
    config = dict(model_config(model_name)) if model_name else {}
    if checkpoint:
        stored = dict(infer_config(resolve_checkpoint(checkpoint)))  # stored (native files) or implied by shapes
        skip = {"num_classes", "drop_path_rate", "head_init_scale"}
        if model_name:
            skip |= {"depths", "dims"}
        config.update({k: v for k, v in stored.items() if k not in skip})
    config.update({k: v for k, v in model_kwargs.items() if v is not None})
    if "depths" not in config:
        raise ValueError("give --model (a variant name) or a checkpoint that stores its config")
    return config


def build_finetune_model(model_name: str | None, num_classes: int, checkpoint: str | None = None,
                         drop_path: float = 0.0, head_init_std: float = 2e-5,
                         **model_kwargs) -> tuple[nn.Module, dict]:
    """The model to fine-tune: architecture from ``finetune_architecture``, weights from
    ``checkpoint`` in any layout. The checkpoint's head is dropped and a fresh one drawn (std
    ``head_init_std``, ``reset_classifier``) since fine-tuning starts a new classifier; without
    a checkpoint the head is the constructor's, scaled by 0.001 as the official recipe does.
    Returns (model, load report)."""
    config = finetune_architecture(model_name, checkpoint, **model_kwargs)
    config.update(num_classes=num_classes, drop_path_rate=drop_path, head_init_scale=0.001)
    model = ConvNeXtV2(**config)
    report: dict = {}
    if checkpoint:
        report = load_checkpoint(model, resolve_checkpoint(checkpoint), strict=True,
                                 drop_head=True)
        model.reset_classifier(num_classes, init_std=head_init_std)
    return model, report


def build_optimizer(model: nn.Module, run: FinetuneConfig, base_lr: float):
    """AdamW over the layer-decay groups (each with its ``lr_scale`` for the schedule) of the
    trainable parameters, with the resolved config's decay, betas and eps."""
    groups = param_groups_layer_decay(model, run.weight_decay, run.layer_decay,
                                      run.layer_decay_mode)
    return torch.optim.AdamW([{k: g[k] for k in ("params", "weight_decay", "lr_scale")}
                              for g in groups], lr=base_lr, betas=tuple(run.betas), eps=run.eps)

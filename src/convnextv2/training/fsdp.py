"""``--fsdp``: shard a model over the processes with PyTorch's FSDP2 (``fully_shard``).

DDP keeps a full copy of the weights, gradients and AdamW moments on every process; for the
large and huge encoders (200M / 660M parameters, ~8 GB of training state in float32) that is
what runs out of memory first. FSDP2 keeps 1/world of each at rest and all-gathers the
weights only around forward and backward.

The model is sharded as one unit (the root module): the sparse FCMAE encoder calls the
submodules of a block directly (``block.dwconv``, ``block.mlp``) instead of ``block(x)``, so
per-block units would never see their forward hooks fire. Parameters, gradients and
optimizer state are still sharded; only the all-gathered weights exist in full, briefly.

Checkpoints stay single-process files: ``full_state_views`` gathers a full (unsharded) model
and optimizer state dict onto rank 0, in exactly the layout an unwrapped model and its AdamW
produce, so ``checkpoint-*.pt`` from a sharded run loads into a plain model, resumes a plain
run, and vice versa (``apply_run_state``).
"""
from __future__ import annotations

import torch
from torch import nn

from .distributed import DistInfo
from .runstate import restore_position


def fsdp_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def shard(model: nn.Module, info: DistInfo, *, reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` in place over the process group (call before building the optimizer:
    the parameters become DTensors). A world of one is left as it is."""
    if not fsdp_available():
        raise ValueError("--fsdp needs torch.distributed.fsdp.fully_shard (PyTorch >= 2.6)")
    if not info.distributed:
        return model
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    # every rank must start from rank 0's weights, as DDP does at construction: the ranks
    # seed differently, and fully_shard keeps each rank's own values for its shard
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: nn.Module) -> dict:
    """The full state dict on rank 0 (CPU tensors), ``{}`` elsewhere. Collective: every
    rank must call it. A model that is not sharded just returns its own state dict."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_options(cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer) -> dict:
    """The optimizer's full state dict keyed like a plain optimizer's (``state`` by integer
    parameter position, ``param_groups`` with ``params`` lists), on rank 0. Collective."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    by_name = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not by_name:
        return {}
    # the distributed API keys state by parameter name; a single-process AdamW (and
    # ``optimizer.load_state_dict`` of a plain run) keys it by position in the groups
    names = _names_in_optimizer_order(model, optimizer)
    position = {name: i for i, name in enumerate(names)}
    groups = []
    for group in by_name["param_groups"]:
        entry = {k: v for k, v in group.items() if k != "params"}
        entry["params"] = [position[n] for n in group["params"]]
        groups.append(entry)
    state = {position[n]: v for n, v in by_name["state"].items()}
    return dict(state=state, param_groups=groups)


def _names_in_optimizer_order(model: nn.Module, optimizer) -> list[str]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


class _Frozen:
    """Something ``build_run_state`` can call ``.state_dict()`` on: an already gathered dict."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def full_state_views(model: nn.Module, optimizer):
    """``(model_view, optimizer_view)`` whose ``state_dict()`` are the gathered full dicts:
    pass them to ``build_run_state`` on rank 0. Collective: call on every rank."""
    return _Frozen(full_model_state(model)), _Frozen(full_optimizer_state(model, optimizer))


def apply_run_state(state: dict, *, model: nn.Module, optimizer=None, scaler=None,
                    restore_rng: bool = True) -> dict:
    """``runstate.apply_run_state`` for a sharded model: every rank loaded the same full state
    from disk; each keeps its own shard. Works for a plain model too."""
    if not is_sharded(model):
        from .runstate import apply_run_state as plain_apply
        return plain_apply(state, model=model, optimizer=optimizer, scaler=scaler,
                           restore_rng=restore_rng)
    from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                         set_optimizer_state_dict)
    set_model_state_dict(model, state["model"], options=_options())
    if optimizer is not None:
        names = _names_in_optimizer_order(model, optimizer)
        saved = state["optimizer"]
        by_name = dict(
            state={names[int(i)]: v for i, v in saved["state"].items()},
            param_groups=[{**{k: v for k, v in g.items() if k != "params"},
                           "params": [names[int(i)] for i in g["params"]]}
                          for g in saved["param_groups"]])
        set_optimizer_state_dict(model, optimizer, by_name, options=_options())
    return restore_position(state, scaler=scaler, restore_rng=restore_rng)


def unsharded_copy(model: nn.Module, build, device: torch.device, is_main: bool):
    """A plain (unsharded) module with the sharded ``model``'s weights, on rank 0 only (None
    elsewhere): what the end-of-run files and figures are made from. ``build()`` returns a
    fresh module of the same architecture. Collective."""
    state = full_model_state(model)
    if not is_main:
        return None
    plain = build()
    plain.load_state_dict(state)
    return plain.to(device)

"""Moving an encoder between block kinds: with or without GRN, with or without layer scale.

An ablation fine-tunes an encoder pretrained with one block in a model with another (the GRN
study: a V2 encoder without its GRN, a V1 encoder with a GRN added). The conversion is
explicit and reported key by key, and only GRN's presence changes what the network computes:

- dropping GRN removes ``*.grn.gamma``/``*.grn.beta``;
- adding GRN creates them as zeros, as a fresh model does (GRN starts as the identity);
- a layer scale the target lacks is folded into ``pwconv2``: ``s * (W x + b) = (s W) x + s b``,
  exact;
- a layer scale the source lacks is created as ones (the identity, not the usual 1e-6 init).
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import torch

from . import layouts
from .io import read_state_dict, save_safetensors
from .saving import FORMAT_TAG


def convert_blocks(native: Mapping[str, torch.Tensor], use_grn: bool,
                   layer_scale_init_value: float | None) -> tuple[dict[str, torch.Tensor], dict]:
    """``native`` (a native-layout state dict) for blocks with GRN when ``use_grn`` and with a
    layer scale when ``layer_scale_init_value`` is set (the model constructor's arguments).
    Returns the new state dict and the keys ``dropped``, ``added`` and ``folded``."""
    state = dict(native)
    blocks = sorted({k.rsplit(".", 2)[0] for k in state if k.endswith(".pwconv2.weight")})
    dropped, added, folded = [], [], []
    for b in blocks:
        gamma, beta, scale = f"{b}.grn.gamma", f"{b}.grn.beta", f"{b}.layer_scale"
        has_grn, has_scale = gamma in state, scale in state
        if has_grn and not use_grn:
            dropped += [gamma, beta]
            del state[gamma], state[beta]
        elif not has_grn and use_grn:
            hidden = state[f"{b}.pwconv1.weight"].shape[0]
            state[gamma], state[beta] = torch.zeros(hidden), torch.zeros(hidden)
            added += [gamma, beta]
        if has_scale and not layer_scale_init_value:
            s = state.pop(scale)
            state[f"{b}.pwconv2.weight"] = state[f"{b}.pwconv2.weight"] * s[:, None]
            state[f"{b}.pwconv2.bias"] = state[f"{b}.pwconv2.bias"] * s
            folded.append(f"{scale} -> {b}.pwconv2.weight/bias")
        elif not has_scale and layer_scale_init_value:
            state[scale] = torch.ones(state[f"{b}.pwconv2.weight"].shape[0])
            added.append(scale)
    return state, dict(dropped=dropped, added=added, folded=folded)


def convert_blocks_file(src: str | os.PathLike, dst: str | os.PathLike, use_grn: bool,
                        layer_scale_init_value: float | None) -> dict:
    """Write the checkpoint ``src`` (any layout) as a native safetensors file ``dst`` for
    blocks of the given kind (see ``convert_blocks``); its stored config says the new kind, so
    ``load_model(dst)`` builds the right network. Returns the report of ``convert_blocks``."""
    state, metadata, _ = read_state_dict(src)
    native = layouts.convert_state_dict(state)  # FCMAE decoder keys dropped: the encoder only
    converted, report = convert_blocks(native, use_grn, layer_scale_init_value)
    stored = metadata.get("config")
    config = json.loads(stored) if stored else layouts.infer_config(native)
    config.update(use_grn=use_grn, layer_scale_init_value=layer_scale_init_value)
    save_safetensors(converted, dst, {**metadata, "format": FORMAT_TAG,
                                      "config": json.dumps(config)})
    return report

"""Writing a model in any layout (every file written atomically)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from torch import nn

from . import layouts
from .errors import CheckpointError
from .atomic import atomic_write_bytes
from .io import save_pickle, save_safetensors, string_metadata

FORMAT_TAG = "convnextv2"


def _plain_config(config: Mapping) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}


def hf_config(config: Mapping, class_names=None) -> dict:
    """config.json for transformers' ConvNextV2 classes, written by hand (no transformers
    needed). Our LayerNorms use eps 1e-6 everywhere, which HF reads from layer_norm_eps."""
    n = int(config.get("num_classes", 0))
    names = list(class_names) if class_names and len(class_names) == n else [f"LABEL_{i}" for i in range(n)]
    if not config.get("use_grn", True) or config.get("layer_scale_init_value"):
        raise CheckpointError("the HF ConvNextV2 classes hold V2 blocks only (GRN, no layer "
                              "scale); a V1-style model cannot be written in the hf layout")
    return {
        "architectures": ["ConvNextV2ForImageClassification" if n else "ConvNextV2Model"],
        "model_type": "convnextv2",
        "num_channels": int(config.get("in_chans", 3)),
        "patch_size": int(config.get("stem_stride", 4)),
        "num_stages": 4,
        "hidden_sizes": [int(d) for d in config["dims"]],
        "depths": [int(d) for d in config["depths"]],
        "hidden_act": "gelu",
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-6,
        "drop_path_rate": float(config.get("drop_path_rate", 0.0)),
        "image_size": 224,
        "num_labels": n,
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
        "torch_dtype": "float32",
    }


def save_checkpoint(model: nn.Module, path, layout: str = "native",
                    metadata: Mapping | None = None, extra_metadata: Mapping | None = None,
                    conv_mlp: bool | None = None) -> Path:
    """Write ``model``'s weights in ``layout``; returns the path written.

    - ``native``: safetensors; the model config (JSON) and ``metadata`` in its header.
    - ``timm``: safetensors in timm's ``convnextv2_*`` names (1x1-conv MLP shapes for
      atto..nano; ``conv_mlp`` overrides), loadable with ``timm.create_model(name,
      pretrained=True, pretrained_cfg_overlay=dict(file=path))``.
    - ``hf``: a folder with config.json and model.safetensors for transformers'
      ``ConvNextV2ForImageClassification.from_pretrained``.
    - ``official`` / ``official_fcmae``: a .pt pickle ``{"model": state_dict}``.
    """
    layout = layouts.canonical_layout(layout)
    meta = string_metadata({**(metadata or {}), **(extra_metadata or {})})
    config = _plain_config(getattr(model, "config", None) or {})
    native = model.state_dict()
    if "dims" not in config:
        config = {**layouts.infer_config(native), **config}
    if conv_mlp is None:
        conv_mlp = layouts.timm_uses_conv_mlp(config["dims"])
    tensors = layouts.from_native(native, layout, conv_mlp=conv_mlp)
    path = Path(path)
    if layout == layouts.NATIVE:
        meta = {"format": FORMAT_TAG, "config": json.dumps(config), **meta}
        return save_safetensors(tensors, path, meta)
    if layout == layouts.TIMM:
        return save_safetensors(tensors, path, {"format": "pt", **meta})
    if layout == layouts.HF:
        if path.suffix in (".safetensors", ".pt", ".bin", ".pth"):
            raise CheckpointError(f"the hf layout is a folder (config.json + model.safetensors); "
                                  f"got the file name {path}")
        path.mkdir(parents=True, exist_ok=True)
        names = meta.get("class_names")
        names = json.loads(names) if names else None
        hf = hf_config(config, names)
        save_safetensors(tensors, path / "model.safetensors", {"format": "pt"})
        atomic_write_bytes(json.dumps(hf, indent=2).encode(), path / "config.json")
        return path
    return save_pickle({"model": tensors, **({"metadata": meta} if meta else {})}, path)

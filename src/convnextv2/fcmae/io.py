"""FCMAE files: encoder + decoder in one file, written by ``convnextv2 pretrain`` and read back
(also from other files holding ``encoder.*`` plus the decoder keys) for reconstructions and
``pretrain --init``.

Official FCMAE checkpoints (``main_pretrain.py`` of the ConvNeXt V2 release) hold the decoder
too: ``proj``, ``mask_token``, ``decoder.N.*`` (dense ConvNeXt V2 blocks) and ``pred``, next to
the sparse ``encoder.*``. Their decoder keys already have this package's names; only the GRN
parameters differ in shape, (1, 1, 1, C) there and (C,) here, so they are flattened on load.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..models.model import ConvNeXtV2
from .fcmae import FCMAE


def save_fcmae(fcmae, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Encoder + decoder as one safetensors file; the metadata holds what ``load_fcmae``
    needs to rebuild the module (encoder config and decoder shape)."""
    from ..checkpoint.io import save_safetensors

    tensors = fcmae.state_dict()
    meta = {"format": "convnextv2-fcmae",
            "config": json.dumps(dict(fcmae.encoder.config), default=list),
            "fcmae": json.dumps(dict(mask_ratio=fcmae.mask_ratio,
                                     norm_pix_loss=fcmae.norm_pix_loss,
                                     decoder_depth=len(fcmae.decoder),
                                     decoder_embed_dim=fcmae.proj.out_channels,
                                     patch_size=fcmae.patch_size)),
            **(metadata or {})}
    save_safetensors(tensors, path, metadata=meta)
    return path


def _load_native(path: str | Path, backend: str = "sparse", **overrides):
    """Rebuild an ``FCMAE`` (encoder + decoder) from a ``fcmae.safetensors`` file."""
    from safetensors import safe_open
    from safetensors.torch import load_file


    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "convnextv2-fcmae":
        raise ValueError(f"{path} is not an FCMAE file written by `convnextv2 pretrain` "
                         f"(no 'convnextv2-fcmae' metadata)")
    config, shape = json.loads(meta["config"]), json.loads(meta["fcmae"])
    fcmae = FCMAE(ConvNeXtV2(**config), backend=backend,
                  mask_ratio=overrides.get("mask_ratio", shape["mask_ratio"]),
                  norm_pix_loss=shape["norm_pix_loss"], decoder_depth=shape["decoder_depth"],
                  decoder_embed_dim=shape["decoder_embed_dim"])
    fcmae.load_state_dict(load_file(str(path)))
    return fcmae



def load_fcmae(path: str | Path, mask_ratio: float | None = None, backend: str = "sparse") -> FCMAE:
    """Build an ``FCMAE`` from a checkpoint holding ``encoder.*`` and the decoder
    (``proj``, ``mask_token``, ``decoder.*``, ``pred``): the ``fcmae.safetensors`` that
    ``convnextv2 pretrain`` writes (rebuilt from its metadata), or any
    other safetensors/torch file with those keys (also a run state ``checkpoint-*.pt``, whose
    ``args`` give mask_ratio and norm_pix_loss): then the shapes give the configuration and
    norm_pix_loss is assumed on unless stated.
    """
    path = Path(path)
    state, meta = _read_state(path)
    if meta.get("format") == "convnextv2-fcmae":  # written by `convnextv2 pretrain`
        kwargs = {} if mask_ratio is None else {"mask_ratio": mask_ratio}
        return _load_native(path, backend=backend, **kwargs)
    if not any(k.startswith("encoder.") for k in state) or "pred.weight" not in state:
        raise ValueError(f"{path} is not an FCMAE checkpoint with a decoder (need encoder.*, "
                         f"proj.*, mask_token, decoder.*, pred.*; saw e.g. {sorted(state)[:6]}); "
                         f"encoder-only files cannot reconstruct images")
    encoder_sd = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    encoder = _build_encoder(encoder_sd)
    embed_dim = state["proj.weight"].shape[0]
    depth = len({k.split(".")[1] for k in state if k.startswith("decoder.")})
    norm_pix = str(meta.get("norm_pix_loss", "true")).lower() not in ("false", "0", "no")
    if mask_ratio is None:
        mask_ratio = float(meta.get("mask_ratio", 0.6))
    fcmae = FCMAE(encoder, mask_ratio=mask_ratio, decoder_depth=depth,
                  decoder_embed_dim=embed_dim, norm_pix_loss=norm_pix, backend=backend)
    decoder_sd = {k: _decoder_tensor(k, v) for k, v in state.items()
                  if not k.startswith("encoder.")}
    missing, unexpected = fcmae.load_state_dict(decoder_sd, strict=False)
    missing = [k for k in missing if not k.startswith("encoder.")]
    if missing or unexpected:
        raise ValueError(f"{path}: decoder keys do not match (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    if fcmae.pred.weight.shape[0] != state["pred.weight"].shape[0]:
        raise ValueError(f"{path}: decoder predicts {state['pred.weight'].shape[0]} values per "
                         f"patch, the encoder's patch size needs {fcmae.pred.weight.shape[0]}")
    return fcmae


def _decoder_tensor(key: str, value: torch.Tensor) -> torch.Tensor:
    """A decoder tensor in this package's shape: GRN gamma/beta of the official dense block
    are (1, 1, 1, C); here they are (C,)."""
    if key.startswith("decoder.") and key.rsplit(".", 2)[-2] == "grn" and value.dim() > 1:
        return value.reshape(-1)
    return value


def _read_state(path: Path) -> tuple[dict, dict]:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(path)), meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # e.g. an official checkpoint pickles its argparse.Namespace of options
        from ..checkpoint.io import read_state_dict
        state, meta, _ = read_state_dict(path)  # tolerates that; refuses real code, clearly
        return state, meta
    meta = {}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # a pretraining run state
        args = obj.get("args") if isinstance(obj.get("args"), dict) else {}
        meta = {k: str(args[k]) for k in ("mask_ratio", "norm_pix_loss") if k in args}
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return obj, meta


def _build_encoder(encoder_sd: dict):
    """A ConvNeXtV2 with the encoder weights, via the checkpoint package (any layout)."""
    from ..checkpoint import load_model
    return load_model(encoder_sd, num_classes=0)

"""Reading checkpoint files safely and writing them atomically.

Pickles are opened with ``torch.load(weights_only=True)``: unpickling an untrusted file can run
arbitrary code, so anything beyond tensors and plain containers is refused (the official
checkpoints' ``args`` entry, an ``argparse.Namespace``, is the one benign type allowed).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Mapping

import torch

from .atomic import atomic_write_bytes
from .errors import CheckpointError, CheckpointNotFoundError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WRAPPER_KEYS = ("model", "model_ema", "state_dict")
STRIP_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def resolve_file(path: str | os.PathLike) -> Path:
    """The weights file for ``path``; an HF model folder resolves to its weights file."""
    path = Path(path)
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} is a folder without {' or '.join(WEIGHT_FILES)}; pass a "
                              "checkpoint file or a Hugging Face model folder")
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist")
    return path


def _is_safetensors(path: Path) -> bool:
    """By content, not name: 8-byte little-endian header length, then the JSON header."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _load_safetensors(path: Path) -> tuple[dict, dict[str, str]]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"cannot read {path}: not a valid safetensors file (truncated "
                              f"or corrupt? {type(e).__name__}: {e})") from e
    return tensors, meta


def _unpickler_reason(text: str) -> str:
    """The cause inside torch's weights-only error, without its advice to retry with
    ``weights_only=False`` (wrong for a corrupt file, and unsafe for an untrusted one)."""
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
    return " ".join(text.split()) or "unreadable pickle"


def trusted_conversion_hint(path) -> str:
    """The one command that turns a trusted pickle into a safetensors file (no code in it)."""
    path = Path(path)
    return (f"If you trust the file, convert it once: convnextv2 convert --trust-pickle "
            f"{path} {path.with_suffix('.safetensors').name}")


def _load_pickle(path: Path, trust_pickle: bool = False) -> object:
    if trust_pickle:  # the user vouched for this file (convert --trust-pickle): full unpickling
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            try:  # not torch.save's container: a plain pickle.dump of tensors, perhaps
                with open(path, "rb") as f:
                    return pickle.load(f)
            except Exception:
                raise CheckpointError(f"cannot read {path}: {' '.join(str(e).split())}") from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # torch warns (several lines) about pickle protocols other than its own; the
            # refusal below, if any, is the one message the user needs
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Unsupported global" in text or "allowed global" in text:
            culprit = text.split("Unsupported global:")[-1].split("was not")[0].strip()
            culprit = culprit.splitlines()[0] if culprit else ""
            raise CheckpointError(
                f"refusing to load {path}: the pickle needs code beyond tensors and plain "
                f"containers ({culprit or 'an unknown global'}), which "
                "torch.load(weights_only=True) will not run, because unpickling an untrusted "
                f"file can execute arbitrary code. {trusted_conversion_hint(path)}") from e
        raise CheckpointError(
            f"cannot read {path}: torch.load(weights_only=True) could not unpickle it "
            f"({_unpickler_reason(text)}). It is truncated or corrupt, not a PyTorch checkpoint, "
            "or a pickle that needs more than tensors and plain containers; untrusted pickles "
            f"are never run with weights_only=False here. {trusted_conversion_hint(path)}") from e
    except Exception as e:  # torch's legacy reader fails on foreign bytes in many ways
        raise CheckpointError(f"cannot read {path}: the file is truncated or corrupt, or no "
                              f"checkpoint at all ({type(e).__name__}: "
                              f"{' '.join(str(e).split()) or 'no details'})") from e


def unwrap(obj: object, key: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint.

    ``key`` picks an entry; otherwise ``model`` is used when present, else ``model_ema``, else
    ``state_dict``. ``module.``/``_orig_mod.`` prefixes are removed; non-tensors are dropped.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"the checkpoint holds a {type(obj).__name__}, not a state dict")
    if key is not None:
        if key not in obj:
            raise CheckpointError(f"the checkpoint has no entry {key!r}; entries: "
                                  f"{', '.join(map(str, obj))}")
        obj = obj[key]
    else:
        for _ in range(2):  # e.g. {"state_dict": {"model": ...}}
            if any(isinstance(v, torch.Tensor) for v in obj.values()):
                break
            inner = next((obj[k] for k in WRAPPER_KEYS
                          if isinstance(obj.get(k), Mapping) and obj[k]), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"entry {key!r} holds a {type(obj).__name__}, not a state dict")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        k = str(k)
        for prefix in STRIP_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    if not out:
        raise CheckpointError("the checkpoint holds no tensors (entries: "
                              f"{', '.join(map(str, obj)) or 'none'}); pass key= to pick one")
    return out


def read_state_dict(source, key: str | None = None, trust_pickle: bool = False
                    ) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(state dict, metadata, description) from a path or an in-memory mapping.

    ``trust_pickle=True`` unpickles without the weights-only guard (it can run code from the
    file): only for a file the user vouches for, to convert it once into safetensors."""
    if isinstance(source, Mapping):
        return unwrap(source, key), {}, "the given state dict"
    path = resolve_file(source)
    if _is_safetensors(path):
        tensors, meta = _load_safetensors(path)
        return unwrap(tensors, key), {**_hf_folder_metadata(path), **meta}, str(path)
    obj = _load_pickle(path, trust_pickle)
    return unwrap(obj, key), {**_hf_folder_metadata(path), **_pickle_metadata(obj)}, str(path)


def _pickle_metadata(obj) -> dict[str, str]:
    """The ``metadata`` entry that ``save_checkpoint`` puts beside an official-layout model."""
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if isinstance(meta, Mapping) and all(isinstance(v, str) for v in meta.values()):
        return {str(k): v for k, v in meta.items()}
    return {}


def _hf_folder_metadata(weights: Path) -> dict[str, str]:
    """``class_names`` from the config.json beside HF weights (unless they are LABEL_i)."""
    config_path = weights.parent / "config.json"
    if weights.name not in WEIGHT_FILES or not config_path.is_file():
        return {}
    try:
        id2label = json.loads(config_path.read_text()).get("id2label") or {}
        names = [id2label[k] for k in sorted(id2label, key=int)]
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}
    if not names or names == [f"LABEL_{i}" for i in range(len(names))]:
        return {}
    return {"class_names": json.dumps(names)}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a checkpoint (``config``, ``class_names``, ...): a safetensors
    header, the ``metadata`` entry of our official-layout pickles, the class names of an HF
    folder's config.json; ``{}`` when the file carries none."""
    path = resolve_file(path)
    if not _is_safetensors(path):
        return {**_hf_folder_metadata(path), **_pickle_metadata(_load_pickle(path))}
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return {**_hf_folder_metadata(path), **dict(f.metadata() or {})}
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: not a valid safetensors file ({e})") from e


def string_metadata(metadata: Mapping | None) -> dict[str, str]:
    """safetensors metadata must be strings: other values are stored as JSON."""
    return {str(k): v if isinstance(v, str) else json.dumps(v)
            for k, v in (metadata or {}).items()}


def save_safetensors(tensors: Mapping[str, torch.Tensor], path, metadata=None) -> Path:
    from safetensors.torch import save
    plain = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write_bytes(save(plain, metadata=string_metadata(metadata)), path)


def save_pickle(obj: object, path) -> Path:
    import io
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(buffer.getvalue(), path)

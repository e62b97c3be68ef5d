"""Pretrained weights from a local path or a Hugging Face Hub id."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .errors import CheckpointError, CheckpointNotFoundError
from .io import WEIGHT_FILES
from .loading import load_checkpoint


def hub_repo_id(source: str) -> str | None:
    """``timm/convnextv2_atto.fcmae`` and ``facebook/convnextv2-atto-1k-224`` are repo ids; a
    bare timm tag (``convnextv2_atto.fcmae``) means the timm organisation's repo."""
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return source
    if "/" not in source and source.startswith("convnextv2_") and "." in source:
        return f"timm/{source}"
    return None


def download(repo_id: str) -> str:
    """The local path of the repo's weights (model.safetensors, else pytorch_model.bin)."""
    try:
        import huggingface_hub
    except ImportError as e:
        raise CheckpointError(f"fetching {repo_id} needs huggingface_hub (pip install "
                              "huggingface_hub), or pass a local checkpoint file") from e
    tried = []
    for filename in WEIGHT_FILES:
        try:
            return huggingface_hub.hf_hub_download(repo_id, filename)
        except Exception as e:  # offline, DNS, timeouts, missing repo or file, auth
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            tried.append(f"{filename} ({type(e).__name__}: {first_line})")
            if not _file_missing_remotely(e):
                break  # the Hub was not reached: the next file would fail the same way
    raise CheckpointError(
        f"could not fetch {repo_id!r} from the Hugging Face Hub; tried {'; '.join(tried)}. "
        "The machine seems offline or the Hub unreachable (or the repo id is wrong, or the "
        "files are not cached). Download the weights where the Hub is reachable and pass the "
        "local file instead, e.g. create_model('convnextv2_atto', "
        "pretrained='/path/to/model.safetensors').")


def _file_missing_remotely(error: Exception) -> bool:
    """The Hub answered that the repo lacks this file (worth trying the next file name), as
    opposed to not being reached at all (LocalEntryNotFoundError when offline)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return "EntryNotFoundError" in names and "LocalEntryNotFoundError" not in names


def load_pretrained(model: nn.Module, source, drop_head: bool | None = None) -> dict:
    """Load ``source`` (a local path, or a hub id) into ``model``; ``drop_head=None`` accepts
    a missing head only for encoder-only checkpoints."""
    if not isinstance(source, (str, Path)):
        return load_checkpoint(model, source, drop_head=drop_head)
    text = str(source)
    if Path(text).expanduser().exists():
        return load_checkpoint(model, Path(text).expanduser(), drop_head=drop_head)
    repo_id = hub_repo_id(text)
    if repo_id is None:
        raise CheckpointNotFoundError(f"pretrained={text!r} is neither an existing file nor a hub id "
                                "like 'timm/convnextv2_atto.fcmae'")
    report = load_checkpoint(model, download(repo_id), drop_head=drop_head)
    report["hub_id"] = repo_id
    return report

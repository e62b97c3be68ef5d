"""Pretrained weights from a local path, a catalogue name or a Hugging Face Hub id.

Catalogue names (``convnextv2_tiny.fcmae_ft_in1k``, see ``catalog.py``) are fetched from the
Hugging Face Hub (timm's repo, into huggingface_hub's own cache) and, when the Hub cannot be
reached, from the official URL the timm files were made from (into ``$CONVNEXTV2_CACHE``,
default torch.hub's checkpoint folder). Both caches are looked at before any network call,
so a second use of a name is offline. ``$CONVNEXTV2_WEIGHTS_URL`` replaces the official root
URL with a mirror (a local HTTP server in the tests; a company mirror behind a firewall).
"""
from __future__ import annotations

import http.client
import os
import urllib.request
import zipfile
from pathlib import Path

from torch import nn

from .catalog import CATALOG, OFFICIAL_ROOT, PretrainedEntry, lookup
from .errors import CheckpointError, CheckpointNotFoundError
from .io import WEIGHT_FILES
from .loading import load_checkpoint

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
DOWNLOAD_TIMEOUT_S = 30


def hub_repo_id(source: str) -> str | None:
    """``timm/convnextv2_atto.fcmae`` and ``facebook/convnextv2-atto-1k-224`` are repo ids
    (``hf-hub:`` in front, as timm writes them, is accepted); a bare timm tag
    (``convnextv2_atto.fcmae``) means the timm organisation's repo."""
    if source.startswith("hf-hub:"):
        source = source[len("hf-hub:"):]
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
            tried.append(f"{filename} ({_reason(e)})")
            if not _file_missing_remotely(e):
                break  # the Hub was not reached: the next file would fail the same way
    raise CheckpointError(
        f"could not fetch {repo_id!r} from the Hugging Face Hub; tried {'; '.join(tried)}. "
        "The machine seems offline or the Hub unreachable (or the repo id is wrong, or the "
        "files are not cached). Download the weights where the Hub is reachable and pass the "
        "local file instead, e.g. create_model('convnextv2_atto', "
        "pretrained='/path/to/model.safetensors').")


def _reason(error: BaseException) -> str:
    """``TypeName: first line`` of an exception, for a one-line message."""
    text = " ".join(str(error).split())
    first = text.split(". ")[0].rstrip(".")  # the first sentence says it; the rest advises
    if len(first) > 160:
        first = first[:157].rsplit(" ", 1)[0] + "..."
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _file_missing_remotely(error: Exception) -> bool:
    """The Hub answered that the repo lacks this file (worth trying the next file name), as
    opposed to not being reached at all (LocalEntryNotFoundError when offline)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return "EntryNotFoundError" in names and "LocalEntryNotFoundError" not in names


# -- catalogue names ---------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where official-URL downloads are kept: ``$CONVNEXTV2_CACHE``, else torch.hub's
    checkpoint folder (``$TORCH_HOME/hub/checkpoints``), shared with torch.hub users."""
    if os.environ.get("CONVNEXTV2_CACHE"):
        return Path(os.environ["CONVNEXTV2_CACHE"]).expanduser()
    import torch.hub
    return Path(torch.hub.get_dir()) / "checkpoints"


def official_url(entry: PretrainedEntry) -> str:
    """The entry's official URL, or the same file under ``$CONVNEXTV2_WEIGHTS_URL``."""
    mirror = os.environ.get("CONVNEXTV2_WEIGHTS_URL")
    if not mirror:
        return entry.url
    return mirror.rstrip("/") + "/" + entry.url[len(OFFICIAL_ROOT):]


def fetch(entry: PretrainedEntry) -> Path:
    """The local weights file of a catalogue entry: a cached copy if there is one, else
    downloaded from the Hub, else from the official URL. Failing both is one CheckpointError
    line naming both sources and how to pass a local file instead."""
    cached = _cached(entry)
    if cached is not None:
        return cached
    try:
        import huggingface_hub
        return Path(huggingface_hub.hf_hub_download(entry.hub_id, WEIGHT_FILES[0]))
    except Exception as e:  # offline, DNS, timeouts, a missing package: try the official URL
        hub_failure = _reason(e)
    url = official_url(entry)
    try:
        return download_url(url, cache_dir() / entry.filename)
    except TruncatedDownloadError:
        raise
    except (OSError, http.client.HTTPException, CheckpointError) as e:  # URLError: OSError
        url_failure = _reason(getattr(e, "reason", None) or e)
    raise CheckpointError(
        f"could not fetch {entry.name}: the Hugging Face Hub ({entry.hub_id}: {hub_failure}) "
        f"and the official URL ({url}: {url_failure}) both failed; download "
        f"{entry.filename} from {entry.url} where the network is reachable and pass the file "
        f"where the name was, e.g. create_model('{entry.variant}', "
        f"pretrained='/path/to/{entry.filename}') or --finetune /path/to/{entry.filename}")


def _cached(entry: PretrainedEntry) -> Path | None:
    """A copy already on disk: huggingface_hub's cache, then ours; no network."""
    try:
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(entry.hub_id, WEIGHT_FILES[0])
        if isinstance(hit, str) and Path(hit).is_file():
            return Path(hit)
    except Exception:  # no huggingface_hub, or an unreadable cache: just not cached
        pass
    ours = cache_dir() / entry.filename
    return ours if ours.is_file() else None


class TruncatedDownloadError(CheckpointError):
    """The server sent fewer bytes than it announced, or a file that is not a checkpoint."""


def download_url(url: str, dest: Path) -> Path:
    """``url`` saved as ``dest``: streamed to ``dest.<pid>.part``, checked (the announced size,
    a complete zip archive for torch.save files) and only then renamed into place, so the
    cache never holds a torn file."""
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            expected = int(response.headers.get("Content-Length") or 0) or None
            received = 0
            with open(part, "wb") as f, tqdm(total=expected, unit="B", unit_scale=True,
                                             desc=dest.name, leave=False,
                                             disable=None) as bar:
                done = False
                while not done:
                    try:
                        chunk = response.read(1 << 20)
                    except http.client.IncompleteRead as e:  # hung up early: keep what came
                        chunk, done = e.partial, True
                    if not chunk:
                        break
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes it visible
        if expected is not None and received != expected:
            raise TruncatedDownloadError(
                f"download of {url} is truncated: got {received} of {expected} bytes; nothing "
                f"was cached, try again (or download it yourself and pass the local file)")
        _check_complete(part, url)
        os.replace(part, dest)
    finally:
        if part.exists():
            part.unlink()
    return dest


def _check_complete(path: Path, url: str) -> None:
    """torch.save files are zip archives whose directory sits at the end, so a cut-off file
    fails ``is_zipfile``; a safetensors file must hold the header it announces."""
    with open(path, "rb") as f:
        head = f.read(8)
    size = path.stat().st_size
    if head[:2] == b"PK":
        if zipfile.is_zipfile(path):
            return
        problem = "an incomplete zip archive"
    elif len(head) == 8 and int.from_bytes(head, "little") + 8 <= size and size > 8:
        return  # safetensors: the header length fits in the file
    elif head[:1] == b"\x80":
        return  # a legacy (pre-zip) torch pickle; the reader checks it further
    else:
        problem = "not a checkpoint (an HTML error page?)"
    raise TruncatedDownloadError(f"download of {url} is {problem} ({size} bytes); nothing was "
                                 f"cached, try again (or download it yourself and pass the "
                                 f"local file)")


def catalogue_entry(text: str) -> PretrainedEntry | None:
    """The catalogue entry ``text`` names (``convnextv2_tiny.fcmae_ft_in1k``, optionally with
    ``timm/`` in front), or None. A released variant with a tag that was never released is a
    ValueError listing the tags that were, rather than a doomed network request."""
    name = text.removeprefix("timm/")
    if "/" in name:
        return None
    entry = CATALOG.get(name.lower())
    if entry is not None:
        return entry
    variant, dot, tag = name.partition(".")
    if dot and not name.lower().endswith(CHECKPOINT_SUFFIXES):
        from ..models.variants import VARIANTS
        if variant.lower() in VARIANTS:
            lookup(variant.lower(), tag)  # raises: the tag was not released
    return None


def resolve_checkpoint(source):
    """A local path for a checkpoint argument: an existing path as given; a catalogue name
    (``convnextv2_tiny.fcmae_ft_in1k``, ``timm/...``) or a Hub id (``facebook/...``,
    ``hf-hub:org/name``) fetched; anything else unchanged, for the reader to refuse. Every
    command that takes a checkpoint goes through this, so names work the same everywhere."""
    if source is None or not isinstance(source, (str, Path)):
        return source
    text = str(source)
    if Path(text).expanduser().exists():
        return source
    entry = catalogue_entry(text)
    if entry is not None:
        return str(fetch(entry))
    repo_id = _cli_repo_id(text)
    return download(repo_id) if repo_id else source


def _cli_repo_id(text: str) -> str | None:
    """``org/name`` as a Hub id, unless it looks like a mistyped local path (a checkpoint
    suffix, or a first component that is a local folder)."""
    if text.startswith("hf-hub:"):
        return hub_repo_id(text)
    if text.count("/") != 1 or text.lower().endswith(CHECKPOINT_SUFFIXES):
        return None
    if Path(text.split("/")[0]).expanduser().is_dir():
        return None
    return hub_repo_id(text)


def load_pretrained(model: nn.Module, source, drop_head: bool | None = None) -> dict:
    """Load ``source`` (a local path, a catalogue name, or a hub id) into ``model``;
    ``drop_head=None`` accepts a missing head only for encoder-only checkpoints."""
    if not isinstance(source, (str, Path)):
        return load_checkpoint(model, source, drop_head=drop_head)
    text = str(source)
    if Path(text).expanduser().exists():
        return load_checkpoint(model, Path(text).expanduser(), drop_head=drop_head)
    entry = catalogue_entry(text)
    if entry is not None:
        return load_entry(model, entry, drop_head=drop_head)
    repo_id = hub_repo_id(text)
    if repo_id is None:
        raise CheckpointNotFoundError(
            f"pretrained={text!r} is neither an existing file nor a hub id like "
            f"'facebook/convnextv2-atto-1k-224' or a released name like 'convnextv2_atto.fcmae' "
            f"(convnextv2 info --pretrained lists them)")
    report = load_checkpoint(model, download(repo_id), drop_head=drop_head)
    report["hub_id"] = repo_id
    return report


def load_entry(model: nn.Module, entry: PretrainedEntry, drop_head: bool | None = None) -> dict:
    """Load a catalogue entry's weights into ``model``; the report names the entry."""
    report = load_checkpoint(model, fetch(entry), drop_head=drop_head)
    report.update(pretrained=entry.name, hub_id=entry.hub_id)
    return report


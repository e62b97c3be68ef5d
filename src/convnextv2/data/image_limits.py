"""The one way every reader (classification, detection, segmentation, predict) opens an image
file: size-checked by its header, 16-bit data scaled to 8 bits, failures named by file.

Why one opener:

- A huge image (a 20000x20000 PNG is 1.2 GB decoded) must be refused before it is decoded.
  Pillow's own guard raises ``DecompressionBombError`` from inside ``Image.open`` with a
  message that names neither the file nor a way round it, and only warns up to twice its
  limit. Here the header's width and height are compared with one limit, settable per process
  (``set_max_image_pixels``, the CLI's ``--max-image-pixels``), and the error names the file,
  its size and the option. Pillow's guard is stepped round while reading the header, so its
  exception never reaches the user whatever the two limits are.
- 16-bit images (``I;16`` PNGs, ``I`` TIFFs) are scaled to 8 bits (divided by 257). Pillow's
  ``convert("L")`` / ``convert("RGB")`` clips them instead, which turns almost every pixel white.
  Masks are opened with ``scale_16bit=False``: their values are class indices, not light.
- A truncated or unreadable file becomes one ``UnreadableImageError`` line naming it, not
  Pillow's bare "image file is truncated (3 bytes not processed)".

Both errors are ``ValueError``s: the CLI turns them into exit status 2 and one line, and the
classification reader's skip policy (which catches ``ValueError``) skips them like any other
unreadable file.
"""
from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Pillow's default error threshold (twice its 89.5 MP warning level): what Pillow alone would
# still decode is read here too, and a 20000x20000 image (400 MP) is refused.
DEFAULT_MAX_IMAGE_PIXELS = 2 * 89_478_485
_max_pixels = DEFAULT_MAX_IMAGE_PIXELS
_pil_guard_lock = threading.Lock()

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# what Pillow raises for files that are not (complete) images
READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError)


class ImageTooLargeError(ValueError):
    """An image whose header gives more pixels than the current limit."""


class UnreadableImageError(ValueError):
    """A missing, truncated or undecodable image file."""


def max_image_pixels() -> int:
    """The current limit (pixels, width x height) on images this process opens."""
    return _max_pixels


def set_max_image_pixels(pixels: int) -> None:
    """Set the limit for this process (and the DataLoader workers it forks from now on)."""
    global _max_pixels
    if int(pixels) < 1:
        raise ValueError(f"--max-image-pixels must be >= 1, got {pixels}")
    _max_pixels = int(pixels)


def _open_header(path: Path) -> Image.Image:
    """``Image.open`` (lazy: the header only) without Pillow's decompression-bomb guard, which
    ``check_size`` replaces."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except Image.DecompressionBombError:
            pass
        with _pil_guard_lock:  # open once more with Pillow's guard off, to learn the size
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                return Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved


def check_size(img: Image.Image, path) -> None:
    """Refuse ``img`` (opened lazily) if its header gives more pixels than the limit."""
    w, h = img.size
    if w * h > _max_pixels:
        raise ImageTooLargeError(
            f"image {path} is {w}x{h} ({w * h:,} pixels), above the limit of "
            f"{_max_pixels:,}; shrink it, or raise the limit with --max-image-pixels "
            f"{w * h}")


def open_lazily(path: str | Path) -> Image.Image:
    """The image at ``path`` opened lazily (header read, pixels not yet decoded), size-checked;
    use it as a context manager. For readers that need only the header, or decode elsewhere."""
    path = Path(path)
    try:
        img = _open_header(path)
    except READ_ERRORS as e:
        raise UnreadableImageError(f"unreadable image {path}: {_reason(e)}") from None
    try:
        check_size(img, path)
    except ImageTooLargeError:
        img.close()
        raise
    return img


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` from the header alone, after the size check."""
    with open_lazily(path) as img:
        return img.size


def to_8bit(img: Image.Image) -> Image.Image:
    """``img`` with 16-bit gray values scaled into 0..255 (mode ``L``); other modes as they are.

    Mode ``I`` (32-bit integers; what some Pillow versions and TIFF files give for 16-bit data)
    is read as 16-bit too, clipped to 0..65535 first.
    """
    if img.mode not in SIXTEEN_BIT_MODES:
        return img
    values = np.asarray(img, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")


def open_image(path: str | Path, mode: str | None = None,
               scale_16bit: bool = True) -> Image.Image:
    """The image at ``path``, size-checked, fully decoded (the file is closed again), 16-bit
    data scaled to 8 bits (unless ``scale_16bit=False``), then converted to ``mode`` if given.

    Raises ``ImageTooLargeError`` or ``UnreadableImageError`` (both ``ValueError``), one line
    naming the file.
    """
    with open_lazily(path) as img:
        try:
            img.load()
            out = to_8bit(img) if scale_16bit else img
            out = out.convert(mode) if mode and out.mode != mode else out
        except READ_ERRORS as e:
            raise UnreadableImageError(f"unreadable image {path}: {_reason(e)}") from None
        return out.copy() if out is img else out


def _reason(error: BaseException) -> str:
    """What is wrong, in words that do not repeat the path (the message names it once)."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image file Pillow can read (expected an image such as PNG or JPEG)"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return f"{' '.join(str(error).split()) or type(error).__name__} (truncated or damaged?)"

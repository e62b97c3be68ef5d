"""Pretraining images decoded on the training device instead of in DataLoader workers.

Why this exists: decoding a JPEG and resizing its random crop costs a CPU core a few
milliseconds per image, so a GPU that runs an FCMAE step at thousands of images per second
needs more decode workers than a typical host has cores to spare (docs/data_pipeline.md has
the measured numbers and the arithmetic). With ``--decode device`` the workers only read the
file bytes and draw the augmentation; the main process decodes the whole batch on the device
with ``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG on CUDA) and crops, resizes,
flips and normalises it there.

The augmentation stays the CPU path's (``pretrain_transform``): the crop box and the flip are
drawn by the recipe's own ``RandomResizedCrop`` / ``RandomHorizontalFlip`` objects, in the
same order, under the same keyed RNGs (``KeyedAugmentDataset``), from the image size read in
the file header (PIL's lazy open decodes no pixels). A sample thus gets the same box and flip
for the same (seed, epoch, index) on either path; only the resize implementation differs
(torch's antialiased bicubic instead of PIL's), a difference far below the pixel noise.

What takes the worker-side fallback: every file that is not a 3-channel JPEG (PNG, BMP, TIFF,
WebP, grayscale or CMYK JPEG, 16-bit images) is decoded in the worker exactly as the CPU path
decodes it (``open_image``: Pillow, 16-bit scaled to 8 bits, converted to RGB), so every format
the CPU path reads still works and gives the same pixels; only its crop runs on the device. A
JPEG the device decoder refuses is retried per image with ``decode_image`` on the CPU. A file
that still fails is skipped like on the CPU path (counted in ``num_skipped``; ``strict``
raises), its slot in the batch filled by another image of the batch.

Only RGB image folders take this path (``in_chans`` 3); in-memory arrays (IDX, ``builtin``)
and grayscale models keep the CPU path (the pretraining recipe refuses the combination).
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torch.utils.data import Dataset
from torchvision import io as tvio
from torchvision.transforms import RandomHorizontalFlip, RandomResizedCrop
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .datasets import _BAD_IMAGE_ERRORS, CorruptImageError, describe_failure
from .image_limits import open_image, open_lazily
from .transforms import mean_std, pretrain_transform

log = logging.getLogger("convnextv2.data")


def recipe_augmentation(img_size: int) -> tuple[RandomResizedCrop, RandomHorizontalFlip]:
    """The random crop and flip of ``pretrain_transform``, taken from it rather than rebuilt,
    so a change to the recipe changes both paths alike."""
    ops = pretrain_transform(img_size, 3).transforms
    crop = next(t for t in ops if isinstance(t, RandomResizedCrop))
    flip = next(t for t in ops if isinstance(t, RandomHorizontalFlip))
    return crop, flip


def draw_augmentation(img, crop: RandomResizedCrop, flip: RandomHorizontalFlip
                      ) -> tuple[tuple[int, int, int, int], bool]:
    """``((top, left, height, width), flipped)`` for ``img`` (only its size is read), drawn
    from the global torch RNG in the order the CPU transforms draw them: the crop box, then
    the flip's one uniform number."""
    box = crop.get_params(img, crop.scale, crop.ratio)
    flipped = bool(torch.rand(1) < flip.p)
    return tuple(int(v) for v in box), flipped


class EncodedImage(NamedTuple):
    """One sample as a worker hands it over: the file bytes (``encoded``) or, for a file the
    device does not decode, the decoded uint8 (3, H, W) image; and its augmentation."""
    data: torch.Tensor
    encoded: bool
    box: tuple[int, int, int, int]
    flipped: bool
    path: str
    sample: int             # the position of the file read (a later one if it failed)


class EncodedBatch(NamedTuple):
    """A batch of ``EncodedImage`` (lists: the images differ in size). A NamedTuple so the
    DataLoader pins its tensors like any other batch."""
    data: list
    encoded: list
    boxes: torch.Tensor     # (N, 4) int64: top, left, height, width
    flipped: torch.Tensor   # (N,) bool
    paths: list
    samples: list


class EncodedImageDataset(Dataset):
    """A file-backed dataset (``ImageFolderDataset``, ``ImageListDataset``) whose items are
    ``(EncodedImage, target)``: the bytes of 3-channel JPEGs, other formats decoded, each with
    the recipe's crop box and flip. Wrap it in ``KeyedAugmentDataset`` like the CPU path."""

    def __init__(self, files: Dataset, img_size: int):
        if not hasattr(files, "samples"):
            raise ValueError(f"device decoding needs a dataset of image files, got "
                             f"{type(files).__name__}")
        self.files = files
        self.crop, self.flip = recipe_augmentation(img_size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        files = self.files
        for step in range(len(files.samples)):  # the CPU path's policy: skip to the next file
            j = (i + step) % len(files.samples)
            path, target = files.samples[j]
            try:
                return self._read(str(path), j), target
            except _BAD_IMAGE_ERRORS as e:
                if files.strict:
                    raise CorruptImageError(describe_failure(path, e)) from None
                mark_unreadable(files, j, path, e)
        raise CorruptImageError(f"{files.root}: no image could be read")

    def _read(self, path: str, j: int) -> EncodedImage:
        with open_lazily(path) as img:  # the header only (and the size limit)
            box, flipped = draw_augmentation(img, self.crop, self.flip)
            device_decodes = img.format == "JPEG" and img.mode == "RGB"
        if device_decodes:
            # read_file maps the file; a copy in ordinary memory is what a worker can send
            # (torch cannot pass a file mapping's storage to another process)
            data = tvio.read_file(path).clone()
            return EncodedImage(data, True, box, flipped, path, j)
        pixels = F.pil_to_tensor(open_image(path).convert("RGB"))
        return EncodedImage(pixels, False, box, flipped, path, j)

    def __getattr__(self, name):  # .classes, .num_skipped, ... of the file dataset
        if name == "files" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.files, name)


def mark_unreadable(files: Dataset, j: int, path, error) -> None:
    """Count sample ``j`` as skipped in the file dataset's shared record (read by
    ``num_skipped`` in any process), warning once per file."""
    record = getattr(files, "_decode_failed", None)
    if record is not None and not record[j]:
        record[j] = 1
        log.warning("warning: skipping %s", describe_failure(path, error))


def collate_encoded(items) -> tuple[EncodedBatch, torch.Tensor, torch.Tensor]:
    """``(EncodedBatch, targets, indices)`` from ``IndexedDataset`` items ``(EncodedImage,
    target, index)``: the pretraining loader's batch shape, with the images left as lists."""
    samples, targets, indices = zip(*items)
    batch = EncodedBatch(data=[s.data for s in samples], encoded=[s.encoded for s in samples],
                         boxes=torch.tensor([s.box for s in samples], dtype=torch.int64),
                         flipped=torch.tensor([s.flipped for s in samples], dtype=torch.bool),
                         paths=[s.path for s in samples], samples=[s.sample for s in samples])
    return batch, torch.tensor(targets), torch.tensor(indices)


class DeviceDecoder:
    """Turns an ``EncodedBatch`` into the normalised float (N, 3, S, S) batch on ``device``
    that the CPU path's ``pretrain_transform`` would give: batched JPEG decode, then per image
    crop + antialiased bicubic resize (sizes differ until then), then flip and normalise on
    the whole batch.

    ``files`` (the file dataset) and ``strict`` decide what happens to a file that fails to
    decode: ``strict`` raises, otherwise it is counted in ``files.num_skipped`` and another
    image of the batch takes its place."""

    def __init__(self, img_size: int, device, files: Dataset | None = None,
                 strict: bool = False):
        self.size, self.device = [img_size, img_size], torch.device(device)
        self.files, self.strict = files, strict
        crop, _ = recipe_augmentation(img_size)
        self.interpolation = crop.interpolation
        mean, std = mean_std(3)
        self.normalize = v2.Normalize(mean, std)

    def __call__(self, batch: EncodedBatch) -> torch.Tensor:
        with torch.autocast(self.device.type, enabled=False):  # float32, like the CPU path
            images = self.decode(batch)
            crops = [F.resized_crop(img, *map(int, box), self.size,
                                    interpolation=self.interpolation, antialias=True)
                     for img, box in zip(images, batch.boxes.tolist())]
            out = torch.stack(crops)
            flip = batch.flipped.to(self.device, non_blocking=True).view(-1, 1, 1, 1)
            out = torch.where(flip, out.flip(-1), out)
            return self.normalize(F.to_dtype(out, torch.float32, scale=True))

    def decode(self, batch: EncodedBatch) -> list[torch.Tensor]:
        """The uint8 (3, H, W) images of ``batch`` on the device, in batch order."""
        images: list = [None] * len(batch.data)
        jpeg = [k for k, enc in enumerate(batch.encoded) if enc]
        if jpeg:
            try:
                decoded = tvio.decode_jpeg([batch.data[k] for k in jpeg],
                                           mode=tvio.ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # one bad file fails the batch: retry each image alone
                decoded = [self._decode_one(batch.data[k]) for k in jpeg]
            for k, img in zip(jpeg, decoded):
                images[k] = img
        for k, enc in enumerate(batch.encoded):
            if not enc:
                images[k] = batch.data[k].to(self.device, non_blocking=True)
        failed = [k for k, img in enumerate(images) if img is None]
        if failed:
            self._replace_failed(batch, images, failed)
        return images

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return tvio.decode_jpeg(data, mode=tvio.ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            pass
        try:  # what the device decoder refuses (e.g. an unusual JPEG flavour) the CPU may read
            return tvio.decode_image(data, mode=tvio.ImageReadMode.RGB).to(self.device)
        except RuntimeError:
            return None

    def _replace_failed(self, batch, images, failed) -> None:
        paths = [batch.paths[k] for k in failed]
        if self.strict:
            raise CorruptImageError(f"unreadable image {paths[0]}: its JPEG data does not "
                                    f"decode")
        good = [k for k, img in enumerate(images) if img is not None]
        if not good:
            raise CorruptImageError(f"no image of a batch could be decoded, e.g. {paths[0]}")
        for n, k in enumerate(failed):
            substitute = good[n % len(good)]
            images[k] = images[substitute]
            batch.boxes[k] = batch.boxes[substitute]
            if self.files is not None:
                mark_unreadable(self.files, batch.samples[k], batch.paths[k],
                                "its JPEG data does not decode")

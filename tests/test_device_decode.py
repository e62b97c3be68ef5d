"""`pretrain --decode device`: the same crops and flips as the CPU path, nearly the same pixels,
every image format, and a run from the command line."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from convnextv2.cli import main
from convnextv2.data import IMAGENET_STD, IndexedDataset, build_dataset, pretrain_transform
from convnextv2.data.datasets import CorruptImageError
from convnextv2.data.device_decode import (DeviceDecoder, EncodedBatch, EncodedImageDataset,
                                           collate_encoded)
from convnextv2.training.data_order import KeyedAugmentDataset

SIZE, SEED = 64, 7
# one gray level of an 8-bit image, in normalised units (the smallest std gives the largest)
LEVEL = 1 / 255 / min(IMAGENET_STD)
RUN_ARGS = ["--img-size", "32", "--batch-size", "4", "--decoder-dim", "16", "--workers", "0",
            "--deterministic", "--no-progress", "--device", "cpu"]


def photo(rng, height, width, gray=False):
    """A photo-like image: smooth colour fields and mild noise (pure noise would make every
    resize method disagree by its full range, which says nothing about real images)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    f = rng.uniform(6, 20, 6)
    fields = [128 + 90 * np.sin(x / f[c]) * np.cos(y / f[c + 3] + c) for c in range(3)]
    pixels = np.clip(np.stack(fields, -1) + rng.normal(0, 6, (height, width, 3)), 0, 255)
    img = Image.fromarray(pixels.astype(np.uint8))
    return img.convert("L") if gray else img


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Six RGB JPEGs of different sizes, a PNG, a grayscale and a CMYK JPEG, in two classes."""
    root = tmp_path_factory.mktemp("dd")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(90, 120), (120, 90), (75, 100), (100, 100), (64, 150),
                                (96, 128)]):
        (root / "a").mkdir(exist_ok=True)
        photo(rng, h, w).save(root / "a" / f"rgb{i}.jpg", quality=90)
    (root / "b").mkdir()
    photo(rng, 80, 110).save(root / "b" / "png.png")
    photo(rng, 90, 100, gray=True).save(root / "b" / "gray.jpg", quality=90)
    photo(rng, 100, 90).convert("CMYK").save(root / "b" / "cmyk.jpg", quality=90)
    return root


def cpu_path(folder):
    return KeyedAugmentDataset(build_dataset(folder, "train", pretrain_transform(SIZE)), SEED)


def device_path(folder):
    files = build_dataset(folder, "train")
    return files, IndexedDataset(KeyedAugmentDataset(EncodedImageDataset(files, SIZE), SEED))


def decode_items(files, dataset, indices):
    batch, _, _ = collate_encoded([dataset[i] for i in indices])
    return batch, DeviceDecoder(SIZE, "cpu", files)(batch)


def test_crop_boxes_and_flips_are_the_cpu_paths(folder):
    """For each key, the CPU pipeline's tensor is exactly what torchvision's own functional ops
    make of the box and flip the device path drew: the same geometry, not a look-alike."""
    cpu, (files, dev) = cpu_path(folder), device_path(folder)
    mean, std = [0.485, 0.456, 0.406], list(IMAGENET_STD)
    flips = set()
    for epoch in (0, 3):
        cpu.set_epoch(epoch)
        dev.set_epoch(epoch)
        for i in range(len(files)):
            sample, _, _ = dev[i]
            top, left, h, w = sample.box
            with Image.open(files.samples[i][0]) as img:
                pil = img.convert("RGB")
            ref = TF.resized_crop(pil, top, left, h, w, [SIZE, SIZE],
                                  interpolation=InterpolationMode.BICUBIC)
            if sample.flipped:
                ref = TF.hflip(ref)
            ref = TF.normalize(TF.to_tensor(ref), mean, std)
            assert torch.equal(cpu[i][0], ref), (epoch, i)
            flips.add(sample.flipped)
    assert flips == {True, False}


def test_device_decoded_images_match_the_cpu_pipeline(folder):
    """Both paths decode with libjpeg and differ only in the resize (torch's antialiased bicubic
    against Pillow's, and where each rounds to 8 bits): within a few gray levels everywhere and
    a fraction of one on average, while the values spread over about +-2. A sample of another
    epoch (another crop) is far outside that, so the comparison can fail."""
    cpu, (files, dev) = cpu_path(folder), device_path(folder)
    indices = list(range(len(files)))
    batch, out = decode_items(files, dev, indices)
    ref = torch.stack([cpu[i][0] for i in indices])
    assert out.shape == ref.shape == (len(files), 3, SIZE, SIZE) and out.dtype == torch.float32
    assert batch.encoded.count(True) == 6  # the RGB JPEGs; PNG, gray and CMYK decoded in workers
    diff = (out - ref).abs()
    assert diff.mean() < 0.5 * LEVEL and diff.max() < 4 * LEVEL, (diff.mean(), diff.max())
    assert ref.std() > 0.5
    cpu.set_epoch(1)
    other = torch.stack([cpu[i][0] for i in indices])
    assert (out - other).abs().mean() > 20 * LEVEL


@pytest.mark.parametrize("name", ["png.png", "gray.jpg", "cmyk.jpg", "rgb0.jpg"])
def test_every_format_goes_through(folder, name):
    """PNG, grayscale and CMYK JPEG take the worker-side decode, an RGB JPEG the batched one;
    each comes out as the CPU path's image (a gray one replicated to three channels)."""
    cpu, (files, dev) = cpu_path(folder), device_path(folder)
    i = [p.name for p, _ in files.samples].index(name)
    batch, out = decode_items(files, dev, [i])
    assert batch.encoded == [name == "rgb0.jpg"]
    assert (out[0] - cpu[i][0]).abs().max() < 4 * LEVEL
    if name == "gray.jpg":
        gray = out[0] * torch.tensor(IMAGENET_STD).view(3, 1, 1)  # undo the per-channel std
        gray = gray + torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        assert (gray - gray[:1]).abs().max() < 1e-5


def test_an_undecodable_jpeg_is_skipped_or_refused(folder):
    """A file whose JPEG data fails on the device is replaced by another image of the batch and
    counted in num_skipped; with strict data it stops the run with its name."""
    files, dev = device_path(folder)
    batch, _, _ = collate_encoded([dev[0], dev[1]])
    junk = torch.tensor(list(b"\xff\xd8\xff\xe0 not a jpeg at all"), dtype=torch.uint8)
    bad = EncodedBatch([junk, batch.data[1]], [True, True], batch.boxes.clone(),
                       batch.flipped, batch.paths, batch.samples)
    with pytest.raises(CorruptImageError, match=batch.paths[0]):
        DeviceDecoder(SIZE, "cpu", files, strict=True)(bad)
    assert files.num_skipped == 0
    out = DeviceDecoder(SIZE, "cpu", files)(bad)
    assert torch.isfinite(out).all() and files.num_skipped == 1
    assert files.skipped == [batch.paths[0]]
    same_flip = bool(bad.flipped[0]) == bool(bad.flipped[1])
    assert torch.equal(out[0], out[1]) == same_flip  # slot 0 holds image 1 (its crop too)


def test_pretrain_decode_device_runs_from_the_command_line(folder, tmp_path, toy_cli):
    """Two steps through the real loader with a worker process (the batches cross a process
    boundary) on the CPU device."""
    out = tmp_path / "run"
    rc = main(["pretrain", *toy_cli, *RUN_ARGS, "--workers", "1", "--data", str(folder),
               "--output", str(out), "--epochs", "1", "--decode", "device", "--recon-every", "0"])
    assert rc == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # 9 images, batch 4
    assert all(np.isfinite(r["loss"]) for r in records)
    assert (out / "encoder.safetensors").exists()


def test_bad_decode_values_are_one_line_errors(tmp_path, capsys, toy_cli):
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", *toy_cli, "--decode", "gpu", "--output", str(tmp_path / "a")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--decode" in err and "'cpu', 'device'" in err
    rc = main(["pretrain", *toy_cli, *RUN_ARGS, "--decode", "device", "--data", "builtin",
               "--output", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--decode cpu" in err
    assert not (tmp_path / "b").exists()  # refused before anything is written
    rc = main(["pretrain", *toy_cli, *RUN_ARGS, "--decode", "device", "--in-chans", "1",
               "--output", str(tmp_path / "c"), "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--in-chans 1" in err


def test_batched_decode_equals_one_image_at_a_time(folder):
    """One batched ``decode_jpeg`` call, per-image resizes and a batch-wide flip give each
    image exactly what decoding it alone gives."""
    files, dataset = device_path(folder)
    decoder = DeviceDecoder(SIZE, "cpu", files)
    items = [dataset[i] for i in range(len(dataset))]
    whole = decoder(collate_encoded(items)[0])
    single = torch.cat([decoder(collate_encoded([item])[0]) for item in items])
    assert torch.equal(whole, single)


def test_pretraining_on_device_decoded_images_matches_the_cpu_path(folder, tmp_path, toy_cli):
    """Same crops, pixels within a gray level or so: the first training losses agree closely
    (a different crop or flip would move them by far more than 1%)."""
    from convnextv2 import training as T

    losses = {}
    for decode in ("cpu", "device"):
        out = tmp_path / decode
        assert main(["pretrain", *toy_cli, *RUN_ARGS, "--data", str(folder), "--output",
                     str(out), "--epochs", "1", "--recon-every", "0", "--decode", decode]) == 0
        losses[decode] = [r["loss"] for r in T.read_metrics(out / "metrics.jsonl")]
    assert len(losses["cpu"]) == 2
    assert losses["device"] == pytest.approx(losses["cpu"], rel=1e-2)

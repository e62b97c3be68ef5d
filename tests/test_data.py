"""The data package: built-in subset, IDX files, folders, corrupt files, transforms."""
import gzip
import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnextv2.data import (BUILTIN_DIR, FASHION_MNIST_CLASSES, CorruptImageError,
                             IndexedDataset, build_dataset, eval_transform, pretrain_transform,
                             read_idx, train_transform, write_idx)

FULL_FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_builtin_subset_is_balanced_and_small():
    train, val = build_dataset("builtin", "train"), build_dataset("builtin", "val")
    assert (len(train), len(val)) == (10000, 2000)
    assert train.classes == val.classes == FASHION_MNIST_CLASSES
    assert train.classes[9] == "Ankle boot"
    assert np.bincount(train.targets).tolist() == [1000] * 10
    assert np.bincount(val.targets).tolist() == [200] * 10
    img, target = train[0]
    assert img.mode == "L" and img.size == (28, 28) and isinstance(target, int)
    size = sum(p.stat().st_size for p in BUILTIN_DIR.iterdir())
    assert size < 6 * 2**20
    notice = (BUILTIN_DIR / "NOTICE").read_text()
    assert "Zalando SE" in notice and "MIT License" in notice


@pytest.mark.skipif(not FULL_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_builtin_images_come_unchanged_from_fashion_mnist():
    full = read_idx(FULL_FASHION / "t10k-images-idx3-ubyte.gz")
    full_labels = read_idx(FULL_FASHION / "t10k-labels-idx1-ubyte.gz")
    lookup = {hashlib.sha1(im.tobytes()).digest(): int(l) for im, l in zip(full, full_labels)}
    val = build_dataset("builtin", "val")
    for i in range(0, 2000, 97):
        key = hashlib.sha1(val.images[i].tobytes()).digest()
        assert lookup[key] == val.targets[i]


def test_idx_round_trip_and_truncation(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    for name in ("a-idx3-ubyte", "b-idx3-ubyte.gz"):
        write_idx(tmp_path / name, arr)
        np.testing.assert_array_equal(read_idx(tmp_path / name), arr)
    raw = (tmp_path / "a-idx3-ubyte").read_bytes()
    assert raw[:4] == bytes([0, 0, 0x08, 3]) and raw[4:8] == (5).to_bytes(4, "big")
    (tmp_path / "c-idx3-ubyte").write_bytes(raw[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "c-idx3-ubyte")
    with gzip.open(tmp_path / "d.gz", "wb") as f:
        f.write(b"hello world")
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(tmp_path / "d.gz")


def test_idx_folder_source(tmp_path):
    images = np.zeros((4, 8, 8), np.uint8)
    images[:, 0, 0] = [1, 2, 3, 4]
    for split, prefix in (("train", "train"), ("test", "t10k")):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.array([0, 1, 2, 1], np.uint8))
    ds = build_dataset(tmp_path, "val")
    assert ds.classes == ["0", "1", "2"] and len(ds) == 4
    assert np.asarray(ds[2][0])[0, 0] == 3 and ds[2][1] == 2


def _png(path, value, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)


def test_image_folder_tree_splits_and_classes(tmp_path):
    for split in ("train", "val"):
        for c, name in enumerate(["dog", "cat"]):
            for i in range(2 + (split == "train")):
                _png(tmp_path / split / name / f"{i}.png", 10 * c)
    train, val = build_dataset(tmp_path, "train"), build_dataset(tmp_path, "val")
    assert train.classes == val.classes == ["cat", "dog"]  # sorted
    assert (len(train), len(val)) == (6, 4)
    assert sorted(train.targets) == [0, 0, 0, 1, 1, 1]
    root = build_dataset(tmp_path / "train", "val")  # an ImageFolder root ignores the split
    assert len(root) == 6
    img, target, index = IndexedDataset(val)[3]
    assert index == 3 and target == val.targets[3] and IndexedDataset(val).classes == val.classes


def test_plain_folder_is_unlabelled(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{i}.png", i)
    _png(tmp_path / "nested" / "x.png", 5)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = build_dataset(tmp_path)
    assert len(ds) == 4 and ds.classes == [] and set(ds.targets) == {0}
    with pytest.raises(ValueError, match="class subfolders"):
        build_dataset(tmp_path, labelled=True)


def test_corrupt_images_skipped_counted_or_fatal(tmp_path, caplog):
    root = tmp_path / "train" / "a"
    for i in range(3):
        _png(root / f"{i}.png", 50)
    (root / "garbage.png").write_bytes(b"\x89PNG not really")
    (root / "empty.jpg").write_bytes(b"")
    good = tmp_path / "x.jpg"
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(good, quality=95)
    data = good.read_bytes()
    (root / "truncated.jpg").write_bytes(data[:len(data) // 2])  # header ok, data cut
    _png(tmp_path / "val" / "a" / "0.png", 1)
    with caplog.at_level(logging.WARNING, "convnextv2.data"):
        ds = build_dataset(tmp_path, "train")
    assert _one_line_warnings(caplog, "skipped 2 unreadable")
    assert ds.num_skipped == 2 and len(ds) == 4
    caplog.clear()
    with caplog.at_level(logging.WARNING, "convnextv2.data"):
        items = [ds[i] for i in range(len(ds))]  # the truncated JPEG fails only when decoded
    assert ds.num_skipped == 3 and _one_line_warnings(caplog, "truncated.jpg")
    assert sorted(Path(f).name for f in ds.skipped) == ["empty.jpg", "garbage.png",
                                                         "truncated.jpg"]
    assert all(img.size == (12, 10) for img, _ in items)
    with pytest.raises(CorruptImageError, match="garbage.png|empty.jpg"):
        build_dataset(tmp_path, "train", strict=True)


def test_missing_and_empty_folders_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        build_dataset(tmp_path / "empty")
    (tmp_path / "classes" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="hold no images"):
        build_dataset(tmp_path / "classes")
    with pytest.raises(ValueError, match="split"):
        build_dataset("builtin", "holdout")


def test_eval_transform_normalises_and_crops():
    gray = Image.new("L", (28, 28), 200)
    x1 = eval_transform(28, 1)(gray)
    assert x1.shape == (1, 28, 28)
    torch.testing.assert_close(x1, torch.full((1, 28, 28), (200 / 255 - 0.449) / 0.226))
    x3 = eval_transform(32, 3)(gray)  # replicated to RGB, ImageNet stats, zero-padded to 32
    assert x3.shape == (3, 32, 32)
    for c, (m, s) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))):
        assert torch.allclose(x3[c, 2:30, 2:30], torch.tensor((200 / 255 - m) / s), atol=1e-5)
        assert torch.allclose(x3[c, :2], torch.tensor(-m / s), atol=1e-5)  # the 2 px frame
    # 224 px: resize the short side to 256 and cut the center 224: a 16 px frame disappears
    framed = Image.new("L", (256, 256), 255)
    framed.paste(Image.new("L", (224, 224), 0), (16, 16))
    x = eval_transform(224, 1)(framed)
    assert x.shape == (1, 224, 224)
    assert torch.allclose(x, torch.tensor(-0.449 / 0.226), atol=1e-5)


def test_train_and_pretrain_transforms():
    ds = build_dataset("builtin", "train")
    tf = train_transform(32, 1)
    names = repr(tf)
    assert "RandAugment" in names and "RandomErasing(p=0.25" in names and "bicubic" in names
    torch.manual_seed(0)
    batch = torch.stack([tf(ds[i][0]) for i in range(120)])  # exercises the RandAugment ops
    assert batch.shape == (120, 1, 32, 32) and torch.isfinite(batch).all()
    # the posterize op at its largest magnitude (0 bits in timm) must not crash on Pillow
    ra = next(t for t in tf.transforms[1].transforms if hasattr(t, "ops"))
    op = next(o for o in ra.ops if o.name == "PosterizeIncreasing")
    assert op.level_fn(10, op.hparams) == (1,)
    p = pretrain_transform(32, 3)(ds[0][0])
    assert p.shape == (3, 32, 32)
    assert "scale=(0.2, 1.0)" in repr(pretrain_transform(32, 3))
    with pytest.raises(ValueError, match="in_chans"):
        eval_transform(32, 2)


def _one_line_warnings(caplog, needle: str) -> bool:
    """A ``convnextv2.data`` warning containing ``needle``, and every such warning one line
    without a Python source location (what ``warnings.warn`` would add)."""
    records = [r for r in caplog.records if r.name == "convnextv2.data"]
    assert all("\n" not in r.getMessage() and ".py:" not in r.getMessage() for r in records)
    return any(needle in r.getMessage() for r in records)


# -- data fidelity (issue 10, item 6) ---------------------------------------------------------
def test_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    from convnextv2.data import open_image
    # every 8-bit level k stored as the 16-bit value k * 257 (0x0000, 0x0101, ... 0xffff)
    levels = np.tile(np.arange(256, dtype=np.uint16), (4, 1))
    Image.fromarray(levels * 257).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # really a 16-bit file
    img = open_image(tmp_path / "deep.png")
    assert img.mode == "L"
    assert np.array_equal(np.asarray(img), levels.astype(np.uint8))
    # a dark 16-bit photo stays dark (Pillow's convert("L") would make it white)
    tree = tmp_path / "tree"
    _png(tree / "c" / "x.png", 0)
    Image.fromarray(np.full((8, 8), 20000, np.uint16)).save(tree / "c" / "dark.png")
    ds = build_dataset(tree, "train", labelled=True)
    img, _ = ds[ds.samples.index((tree / "c" / "dark.png", 0))]
    assert np.asarray(img).tolist() == np.full((8, 8), round(20000 / 257)).tolist()
    x = eval_transform(8, 1)(img)  # and on through the transforms as a gray image
    torch.testing.assert_close(x, torch.full((1, 8, 8), (78 / 255 - 0.449) / 0.226))


def test_train_folder_without_val(tmp_path):
    for i in range(3):
        _png(tmp_path / "train" / "cat" / f"{i}.png", 10 * i)
    train = build_dataset(tmp_path, "train")  # pretraining reads train/ alone
    assert len(train) == 3 and train.classes == ["cat"]
    with pytest.raises(FileNotFoundError, match=r"train/ but no val/.*val"):
        build_dataset(tmp_path, "val", labelled=True)
    flat = tmp_path / "flat"
    for i in range(2):
        _png(flat / "train" / f"{i}.png", i)  # unlabelled images straight in train/
    assert len(build_dataset(flat, "train")) == 2


def test_empty_class_folder_warns_with_its_name_or_is_refused(tmp_path, caplog):
    from convnextv2.data import EmptyClassError
    _png(tmp_path / "ant" / "0.png", 1)
    _png(tmp_path / "cow" / "0.png", 2)
    (tmp_path / "bee").mkdir()
    with caplog.at_level(logging.WARNING, "convnextv2.data"):
        ds = build_dataset(tmp_path, "train", labelled=True)
    assert ds.classes == ["ant", "bee", "cow"] and ds.targets == [0, 2]  # labels stay aligned
    assert _one_line_warnings(caplog, "without images: bee")
    with pytest.raises(EmptyClassError, match="bee"):
        build_dataset(tmp_path, "train", labelled=True, strict=True)


def _folder_with_a_truncated_jpeg(root: Path) -> Path:
    for i in range(5):
        _png(root / "a" / f"{i}.png", 10 * i)
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "whole.jpg", quality=95)
    data = (root / "whole.jpg").read_bytes()
    (root / "whole.jpg").unlink()
    (root / "a" / "cut.jpg").write_bytes(data[:len(data) // 2])  # fails only when decoded
    return root


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_skips_in_worker_processes_are_counted(tmp_path, context):
    """Worker processes share no Python objects with the main process: the count must still
    reach it (and reach it through a Subset, as the training recipes wrap their datasets)."""
    from torch.utils.data import DataLoader, Subset

    from convnextv2.data import count_skipped
    ds = build_dataset(_folder_with_a_truncated_jpeg(tmp_path), "train", eval_transform(8, 1))
    assert ds.num_skipped == 0  # the header of the cut JPEG is fine
    loader = DataLoader(Subset(ds, list(range(len(ds)))), batch_size=2, num_workers=2,
                        multiprocessing_context=context)
    assert sum(len(x) for x, _ in loader) == 6  # the bad sample is replaced, not dropped
    assert ds.num_skipped == 1 and count_skipped(Subset(ds, [0]), ds) == 2
    assert [Path(f).name for f in ds.skipped] == ["cut.jpg"]
    for _ in loader:  # a second epoch counts the same file once
        pass
    assert ds.num_skipped == 1

"""Tar shards (``convnextv2 shards``, ``--data`` shards) and CSV/TSV file lists.

References are independent of the code under test: ``tarfile`` reads the shards back, the
built-in IDX arrays give the pixels and labels, and sample sets are compared as sets."""
import collections
import hashlib
import io
import itertools
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convnextv2 import training as T
from convnextv2.cli import main
from convnextv2.data import build_dataset, eval_transform
from convnextv2.data.filelist import FileListDataset, FileListError
from convnextv2.tools.shard_writer import write_shards
from convnextv2.data.shards import (ShardError, ShardLoader, expand_shards, is_shard_source,
                                    open_shards)

from conftest import TOY_DEPTHS, TOY_DIMS

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def builtin_shards(tmp_path_factory) -> Path:
    """The built-in data as shards: train 4 x 2500, val 1 x 2000."""
    out = tmp_path_factory.mktemp("builtin") / "shards"
    write_shards("builtin", out, 2500, progress=False)
    return out


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory, make_images) -> Path:
    """An ImageFolder tree: train 24 images and val 8, classes b and a (sorted: a=0, b=1)."""
    root = tmp_path_factory.mktemp("tree")
    make_images(root / "train", 24, seed=1, classes=["b", "a"], size=(36, 40))
    make_images(root / "val", 8, seed=2, classes=["b", "a"], size=(36, 40))
    return root


@pytest.fixture(scope="module")
def small_shards(small_tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("small") / "shards"
    write_shards(str(small_tree), out, 6, progress=False)  # train 4 x 6, val 2 x (6, 2)
    return out


def _members(tar_path) -> dict[str, dict[str, bytes]]:
    samples = collections.defaultdict(dict)
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples[key][ext] = tar.extractfile(m).read()
    return samples


def _tree_hash(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# -- writing -------------------------------------------------------------------------------------
def test_builtin_shards_hold_every_image_with_its_class_index_and_name(builtin_shards):
    from convnextv2.data import FASHION_MNIST_CLASSES, BUILTIN_DIR, find_idx_pair, read_idx

    for split, folder in (("train", "train"), ("val", "val")):
        images = read_idx(find_idx_pair(BUILTIN_DIR, split)[0])
        labels = read_idx(find_idx_pair(BUILTIN_DIR, split)[1])
        found = {}
        for tar_path in sorted((builtin_shards / folder).glob("*.tar")):
            found.update(_members(tar_path))
        assert len(found) == len(images)
        for key, sample in found.items():
            i = int(key)  # the key is the sample's place in the source
            pixels = np.asarray(Image.open(io.BytesIO(sample["png"])))
            np.testing.assert_array_equal(pixels, images[i])
            assert int(sample["cls"]) == labels[i]
            assert sample["class.txt"].decode() == FASHION_MNIST_CLASSES[labels[i]]
        index = json.loads((builtin_shards / folder / "shards.json").read_text())
        assert [s["samples"] for s in index["shards"]] == (
            [2500] * 4 if split == "train" else [2000])


def test_writer_is_deterministic_mixes_classes_and_copies_file_bytes(small_tree, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_shards(str(small_tree), a, 6, progress=False)
    write_shards(str(small_tree), b, 6, progress=False)
    assert _tree_hash(a) == _tree_hash(b)  # byte-identical
    first = _members(a / "train" / "train-000000.tar")
    assert len({s["cls"] for s in first.values()}) == 2  # a shard is not one class
    files = build_dataset(str(small_tree), "train").samples
    for key, sample in first.items():
        path, target = files[int(key)]
        assert sample["png"] == path.read_bytes()
        assert int(sample["cls"]) == target
        assert sample["class.txt"].decode() == path.parent.name
    in_order = tmp_path / "c"
    write_shards(str(small_tree), in_order, 6, shuffle=False, progress=False)
    assert list(_members(in_order / "train" / "train-000000.tar")) == [
        f"{i:06d}" for i in range(6)]


def test_a_failed_write_leaves_nothing_and_out_is_never_overwritten(small_tree, tmp_path,
                                                                    monkeypatch):
    import convnextv2.tools.shard_writer as writer

    out = tmp_path / "out"
    calls = []

    def failing(ds, i):
        calls.append(i)
        if len(calls) == 10:
            raise OSError(28, "No space left on device")
        return original(ds, i)

    original = writer._sample_bytes
    monkeypatch.setattr(writer, "_sample_bytes", failing)
    with pytest.raises(OSError):
        write_shards(str(small_tree), out, 6, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no temp folder either
    monkeypatch.setattr(writer, "_sample_bytes", original)
    write_shards(str(small_tree), out, 6, progress=False)
    before = _tree_hash(out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_shards(str(small_tree), out, 4, progress=False)
    assert _tree_hash(out) == before
    write_shards(str(small_tree), out, 4, overwrite=True, progress=False)
    assert len(list((out / "train").glob("*.tar"))) == 6
    old = [p for p in tmp_path.iterdir() if p.name.startswith("out.old-")]
    assert len(old) == 1 and _tree_hash(old[0]) == before  # moved aside, not deleted


def test_shards_command_prints_the_pattern_to_use(small_tree, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["shards", str(small_tree / "train"), str(out), "--shard-size", "10",
                 "--no-progress"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    pattern = line.split(": ")[-1]
    assert pattern == f"{out}/shards-{{000000..000002}}.tar"
    assert [p.name for p in expand_shards(pattern)] == [f"shards-00000{i}.tar" for i in range(3)]


def test_plain_folder_shards_are_unlabelled_and_refused_for_fine_tuning(tmp_path, make_images):
    make_images(tmp_path / "plain", 10, seed=4)
    write_shards(str(tmp_path / "plain"), tmp_path / "out", 4, progress=False)
    members = _members(tmp_path / "out" / "shards-000000.tar")
    assert all(set(m) == {"png"} for m in members.values())
    ds = open_shards(tmp_path / "out")
    assert ds.classes == [] and len(ds) == 10 and {t for _, t, _ in ds} == {0}
    with pytest.raises(ShardError, match="no class labels"):
        open_shards(tmp_path / "out", labelled=True)


def test_an_undecodable_image_in_a_shard_is_skipped_and_counted_or_fatal(small_shards,
                                                                           tmp_path):
    import shutil

    from convnextv2.data import CorruptImageError
    folder = tmp_path / "damaged"
    shutil.copytree(small_shards / "train", folder)
    shard = folder / "train-000001.tar"
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    data = bytearray(shard.read_bytes())  # same size: shards.json still vouches for it
    data[member.offset_data + 16:member.offset_data + member.size] = bytes(member.size - 16)
    shard.write_bytes(bytes(data))
    ds = open_shards(folder)
    items = list(ds)
    assert len(items) == 23 and ds.num_skipped == 1
    assert 6 not in {i for _, _, i in items}  # shard 1 starts at sample 6; its first is gone
    with pytest.raises(CorruptImageError, match="train-000001.tar"):
        list(open_shards(folder, strict=True))


# -- reading: which forms, which samples ---------------------------------------------------------
def test_every_form_of_data_names_the_same_shards(small_shards, tmp_path):
    files = sorted((small_shards / "train").glob("*.tar"))
    listing = tmp_path / "list.txt"
    listing.write_text("# shards\n" + "\n".join(os.path.relpath(f, tmp_path) for f in files))
    pattern = str(small_shards / "train" / "train-{000000..000003}.tar")
    for form in (small_shards, small_shards / "train", pattern, listing):
        assert is_shard_source(form)
        assert [f.resolve() for f in expand_shards(form)] == files
    assert expand_shards(small_shards, "val") == sorted((small_shards / "val").glob("*.tar"))
    assert not is_shard_source("builtin")


def test_without_the_index_the_tar_headers_give_the_same_counts_and_classes(small_shards,
                                                                          tmp_path):
    import shutil

    from convnextv2.data.shards import open_shard_set
    bare = tmp_path / "bare"
    shutil.copytree(small_shards / "train", bare)
    (bare / "shards.json").unlink()
    indexed, scanned = open_shard_set(small_shards), open_shard_set(bare)
    assert [s.samples for s in scanned.shards] == [s.samples for s in indexed.shards] == [6] * 4
    assert scanned.classes == indexed.classes == ["a", "b"] and scanned.labelled


def test_one_epoch_from_shards_has_the_same_samples_as_the_folder(builtin_shards):
    """World of one, no workers: an epoch is every sample once; the pixels and labels are the
    built-in arrays' (as multisets); the next epoch's order differs, the same epoch's not."""
    tf = lambda img: torch.from_numpy(np.asarray(img).copy())  # noqa: E731  (raw pixels)
    ds = open_shards(builtin_shards, "train", tf).for_training(
        seed=0, rank=0, world_size=1, workers=0, batch_size=500)
    loader = ShardLoader(ds)
    assert len(loader) == 20

    def epoch(e):
        loader.sampler.set_epoch(e)
        batches = [b for _, b in zip(range(len(loader)), loader)]
        return (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]),
                torch.cat([b[2] for b in batches]).tolist())

    images, labels, order = epoch(0)
    assert sorted(order) == list(range(10000))
    folder = build_dataset("builtin", "train")
    ours = collections.Counter((hashlib.sha1(x.numpy().tobytes()).hexdigest(), int(y))
                               for x, y in zip(images, labels))
    ref = collections.Counter((hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest(),
                               int(y)) for x, y in zip(folder.images, folder.targets))
    assert ours == ref

    def order_only(e):  # the same stream without decoding: the order of an epoch
        ds.set_epoch(e, skip=0)
        return [i for i, _ in itertools.islice(ds._worker_stream(0, 1), 10000)]

    second = order_only(1)
    assert second != order and sorted(second) == sorted(order) and order_only(0) == order


def _epoch_indices(source, rank, world, workers, batch, epoch=0, skip=0):
    ds = open_shards(source, "train", eval_transform(32, 3)).for_training(
        seed=3, rank=rank, world_size=world, workers=workers, batch_size=batch)
    loader = ShardLoader(ds)
    loader.sampler.set_epoch(epoch, skip=skip * batch)
    return [b[2].tolist() for _, b in zip(range(len(loader) - skip), loader)], len(loader)


def test_processes_and_workers_split_the_shards_without_overlap(small_shards):
    """2 processes x 2 workers over 4 shards of 6: one shard each, every sample once."""
    seen, lengths = [], set()
    for rank in (0, 1):
        batches, n = _epoch_indices(small_shards, rank, 2, 2, 3)
        lengths.add(n)
        seen += [i for b in batches for i in b]
    assert lengths == {4} and sorted(seen) == list(range(24))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_mid_epoch_restart_continues_with_the_same_batches(small_shards, workers):
    """Skipping the first 3 batches of an epoch (a resumed run) gives the uninterrupted
    run's remaining batches, in order, with loader workers taking turns."""
    full, _ = _epoch_indices(small_shards, 0, 1, workers, 3, epoch=1)
    rest, _ = _epoch_indices(small_shards, 0, 1, workers, 3, epoch=1, skip=3)
    assert rest == full[3:] and len(rest) == 5


def test_uneven_shards_warn_once_in_one_line(small_shards, caplog):
    import logging

    from convnextv2.data import datasets
    datasets._said.clear()
    with caplog.at_level(logging.WARNING, logger="convnextv2.data"):
        for _ in range(2):
            open_shards(small_shards, "val").for_training(seed=0, rank=0, world_size=1,
                                                          workers=0, batch_size=2)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "do not divide evenly" in lines[0] and "\n" not in lines[0]
    # val: shards of 6 and 2 samples over 2 processes: both take 2 batches of 2 (4 = 8 / 2);
    # the process holding the 2-sample shard reads it again, reshuffled
    for rank in (0, 1):
        batches, n = _epoch_indices(small_shards / "val", rank, 2, 0, 2)
        assert n == 2 and len(batches) == 2 and all(len(b) == 2 for b in batches)
    with pytest.raises(ShardError, match="at least one"):
        open_shards(small_shards, "val").for_training(seed=0, rank=0, world_size=3, workers=0,
                                                      batch_size=2)


TORCHRUN_SCRIPT = """
import json, sys
import torch.distributed as dist
from convnextv2 import training as T
from convnextv2.recipes.pretrain import PretrainConfig, build_loader
info = T.init_distributed("cpu")
cfg = PretrainConfig(data=sys.argv[1], img_size=32, in_chans=3, batch_size=3,
                     workers=int(sys.argv[3]), seed=5)
base, loader = build_loader(cfg, info)
epochs = []
for epoch in range(2):
    loader.sampler.set_epoch(epoch)
    mine = [i for _, b in zip(range(len(loader)), loader) for i in b[2].tolist()]
    everyone = [None] * info.world_size
    dist.all_gather_object(everyone, mine)
    epochs.append(everyone)
if info.is_main:
    json.dump(dict(epochs=epochs, batches=len(loader)), open(sys.argv[2], "w"))
T.cleanup_distributed()
"""


def test_two_process_torchrun_sees_each_sample_once_per_epoch(small_shards, tmp_path,
                                                             workers=2):
    script, result = tmp_path / "run.py", tmp_path / "seen.json"
    script.write_text(TORCHRUN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(small_shards), str(result), str(workers)],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(result.read_text())
    assert seen["batches"] == 4
    for ranks in seen["epochs"]:
        assert not set(ranks[0]) & set(ranks[1])
        assert sorted(ranks[0] + ranks[1]) == list(range(24))
    assert seen["epochs"][0][0] != seen["epochs"][1][0]  # reshuffled per epoch


# -- training from shards ------------------------------------------------------------------------
def _pretrain_config(data, output, **kw):
    from convnextv2.recipes.pretrain import PretrainConfig
    base = dict(model="atto", depths=TOY_DEPTHS, dims=TOY_DIMS, stem_stride=1, img_size=32,
                batch_size=4, decoder_dim=16, workers=0, deterministic=True, progress=False,
                data=str(data), output=str(output), blr=1e-2, device="cpu", recon_every=0)
    base.update(kw)
    return PretrainConfig(**base)


def _losses(run):
    return [(r["step"], r["epoch"], r["loss"]) for r in T.read_metrics(run / "metrics.jsonl")]


def test_pretrain_and_finetune_run_from_builtin_shards(builtin_shards, tmp_path):
    from convnextv2.recipes.finetune import FinetuneConfig, finetune
    from convnextv2.recipes.pretrain import pretrain

    pre = pretrain(_pretrain_config(builtin_shards, tmp_path / "pre", in_chans=1, max_steps=2))
    assert pre["global_step"] == 2 and np.isfinite(pre["last_loss"])
    assert (tmp_path / "pre" / "reconstruction.png").is_file()
    ft = finetune(FinetuneConfig(
        model=None, model_kwargs=dict(depths=TOY_DEPTHS, dims=TOY_DIMS, stem_stride=1,
                                      in_chans=1),
        data=str(builtin_shards), output=str(tmp_path / "ft"), epochs=1, batch_size=16,
        max_steps_per_epoch=2, recipe="tiny", progress=False, img_size=32, workers=0,
        finetune=str(tmp_path / "pre" / "encoder.safetensors")))
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["classes"] == build_dataset("builtin", "train").classes
    epoch = T.read_metrics(tmp_path / "ft" / "metrics.jsonl")[-1]
    assert epoch["step"] == 2 and 0 <= epoch["val_top1"] <= 100  # scored on the val shards


@pytest.mark.parametrize("workers,batch", [(0, 4), (2, 3)])
def test_resume_from_shards_continues_at_the_right_epoch_and_batch(small_shards, tmp_path,
                                                                   workers, batch):
    """2 epochs; stopped mid-epoch 1 and mid-epoch 2, resumed: the same losses (with loader
    workers too, whose turns the resumed loader must take up where they were)."""
    from convnextv2.recipes.pretrain import pretrain

    steps = 24 // batch
    straight = tmp_path / "straight"
    pretrain(_pretrain_config(small_shards, straight, epochs=2, workers=workers,
                              batch_size=batch))
    reference = _losses(straight)
    assert [(s, e) for s, e, _ in reference] == [(s, 1 + (s - 1) // steps)
                                                 for s in range(1, 2 * steps + 1)]
    resumed = tmp_path / "resumed"
    for max_steps in (3, steps + 3, None):
        pretrain(_pretrain_config(small_shards, resumed, epochs=2, max_steps=max_steps,
                                  resume="auto", workers=workers, batch_size=batch))
    assert _losses(resumed) == reference


# -- CSV / TSV lists -----------------------------------------------------------------------------
def _write_lists(tree: Path, folder: Path, delimiter=",", header=True):
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        files = build_dataset(str(tree), split).samples
        rows = [f"{os.path.relpath(p, folder)}{delimiter}{p.parent.name}" for p, _ in files]
        suffix = ".csv" if delimiter == "," else ".tsv"
        (folder / f"{split}{suffix}").write_text(
            ("path" + delimiter + "label\n" if header else "") + "\n".join(rows) + "\n")
    return folder / f"train{'.csv' if delimiter == ',' else '.tsv'}"


@pytest.mark.parametrize("delimiter,header", [(",", True), ("\t", False)])
def test_a_file_list_gives_the_folder_dataset(small_tree, tmp_path, delimiter, header):
    listing = _write_lists(small_tree, tmp_path / "lists", delimiter, header)
    for split in ("train", "val"):
        ours = build_dataset(str(listing), split, labelled=True)
        ref = build_dataset(str(small_tree), split, labelled=True)
        assert ours.classes == ref.classes == ["a", "b"]
        assert sorted((str(p.resolve()), t) for p, t in ours.samples) == sorted(
            (str(p.resolve()), t) for p, t in ref.samples)


def test_file_list_labels_may_be_integers_and_are_ignored_for_pretraining(small_tree, tmp_path):
    files = build_dataset(str(small_tree), "train").samples
    listing = tmp_path / "x.csv"
    listing.write_text("".join(f"{p},{7 if t else 2}\n" for p, t in files))
    ds = FileListDataset(listing)
    assert ds.classes == [str(i) for i in range(8)] and set(ds.targets) == {2, 7}
    bare = tmp_path / "bare.csv"
    bare.write_text("".join(f"{p}\n" for p, _ in files))
    assert FileListDataset(bare, labelled=False).classes == []
    with pytest.raises(FileListError, match=r"bare.csv:1: expected 'path,label'"):
        FileListDataset(bare)


def test_shards_from_a_file_list_hold_its_images_and_labels(small_tree, tmp_path):
    listing = _write_lists(small_tree, tmp_path / "lists")
    write_shards(str(listing), tmp_path / "out", 100, progress=False)
    for split in ("train", "val"):
        files = build_dataset(str(small_tree), split).samples
        found = _members(tmp_path / "out" / split / f"{split}-000000.tar")
        assert sorted((m["png"], int(m["cls"]), m["class.txt"].decode())
                      for m in found.values()) == sorted(
            (p.read_bytes(), t, p.parent.name) for p, t in files)


@pytest.mark.parametrize("rows,where,words", [
    ("path,label\n{img},a\nmissing.png,b\n", 3, "no file"),
    ("{img},a\n{img},a,extra\n", 2, "3 field(s)"),
    ("{img},a\n{img},\n", 2, "empty label"),
    ("path,label\n", None, "no image rows"),
])
def test_bad_list_rows_name_file_and_line(small_tree, tmp_path, rows, where, words):
    img = build_dataset(str(small_tree), "train").samples[0][0]
    listing = tmp_path / "bad.csv"
    listing.write_text(rows.format(img=img))
    with pytest.raises(FileListError) as e:
        FileListDataset(listing)
    message = str(e.value)
    assert words in message and "\n" not in message
    if where is not None:
        assert f"bad.csv:{where}:" in message


def test_finetune_and_pretrain_take_a_file_list(small_tree, tmp_path, toy_cli):
    listing = _write_lists(small_tree, tmp_path / "lists")
    common = [*toy_cli, "--img-size", "32", "--batch-size", "4", "--workers", "0",
              "--no-progress", "--device", "cpu", "--data", str(listing), "--max-steps", "2"]
    assert main(["finetune", *common, "--output", str(tmp_path / "ft"), "--epochs", "1"]) == 0
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["classes"] == ["a", "b"]
    assert main(["pretrain", *common, "--output", str(tmp_path / "pre"), "--decoder-dim", "16",
                 "--recon-every", "0"]) == 0

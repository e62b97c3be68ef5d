"""The shared image opener (data/image_limits.py): size limit by header, 16-bit scaling,
one-line errors naming the file, in every reader that uses it."""
import numpy as np
import pytest
from conftest import write_png_header
from PIL import Image

from convnextv2.data import image_limits
from convnextv2.data.image_limits import (ImageTooLargeError, UnreadableImageError, image_size,
                                          open_image, set_max_image_pixels)


@pytest.fixture(autouse=True)
def restore_limit():
    before = image_limits.max_image_pixels()
    yield
    set_max_image_pixels(before)


def test_huge_header_refused_naming_file_size_and_option(tmp_path):
    write_png_header(tmp_path / "huge.png", 20000, 20000)
    for read in (open_image, image_size):
        with pytest.raises(ImageTooLargeError) as err:
            read(tmp_path / "huge.png")
        text = str(err.value)
        assert "huge.png" in text and "20000x20000" in text and "--max-image-pixels" in text
        assert "\n" not in text


def test_pillow_bomb_error_never_escapes_and_the_limit_can_be_raised(tmp_path, monkeypatch):
    # Pillow's own guard set far below the image: it would raise DecompressionBombError
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.fromarray(np.full((30, 40), 7, np.uint8)).save(tmp_path / "a.png")
    set_max_image_pixels(30 * 40)  # exactly the image: allowed
    assert np.asarray(open_image(tmp_path / "a.png")).tolist() == np.full((30, 40), 7).tolist()
    assert image_size(tmp_path / "a.png") == (40, 30)
    assert Image.MAX_IMAGE_PIXELS == 100  # Pillow's setting is left as it was
    set_max_image_pixels(30 * 40 - 1)  # one pixel fewer: refused by our check, not Pillow's
    with pytest.raises(ImageTooLargeError, match=r"a\.png is 40x30 \(1,200 pixels\)"):
        open_image(tmp_path / "a.png")
    with pytest.raises(ValueError, match="must be >= 1"):
        set_max_image_pixels(0)


def test_16_bit_gray_is_scaled_by_1_over_257(tmp_path):
    values = np.array([[0, 257, 20000, 65535]], np.uint16)  # hand values: 0, 1, 77.8 -> 78, 255
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert np.asarray(open_image(tmp_path / "deep.png")).tolist() == [[0, 1, 78, 255]]
    rgb = np.asarray(open_image(tmp_path / "deep.png", "RGB"))
    assert rgb.shape == (1, 4, 3) and rgb[0, :, 1].tolist() == [0, 1, 78, 255]
    raw = np.asarray(open_image(tmp_path / "deep.png", scale_16bit=False))  # masks: as stored
    assert raw.tolist() == [[0, 257, 20000, 65535]]


def test_truncated_and_missing_files_are_one_line_naming_the_file(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    for name in ("cut.png", "text.png", "missing.png"):
        with pytest.raises(UnreadableImageError) as err:
            open_image(tmp_path / name)
        assert name in str(err.value) and "\n" not in str(err.value)


def test_classification_reader_skips_or_refuses_huge_image(tmp_path):
    from convnextv2.data import CorruptImageError, ImageFolderDataset
    (tmp_path / "c").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "c" / "ok.png")
    write_png_header(tmp_path / "c" / "huge.png", 20000, 20000)
    ds = ImageFolderDataset(tmp_path)  # skipped at the scan, by its header
    assert ds.samples == [(tmp_path / "c" / "ok.png", 0)] and ds.num_skipped == 1
    with pytest.raises(CorruptImageError, match=r"huge\.png is 20000x20000.*--max-image-pixels"):
        ImageFolderDataset(tmp_path, strict=True)


def test_segmentation_reader_refuses_huge_image_and_reads_16_bit(tmp_path):
    from convnextv2.segmentation.data import SegmentationFolder
    for split in ("training", "validation"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
    Image.fromarray(np.full((4, 6), 20000, np.uint16)).save(tmp_path / "images/training/a.png")
    Image.fromarray(np.ones((4, 6), np.uint8)).save(tmp_path / "annotations/training/a.png")
    image, mask = SegmentationFolder(tmp_path, "train", num_classes=2)[0]
    assert image.shape == (3, 4, 6) and image.unique().tolist() == [78]  # not white (255)
    assert mask.unique().tolist() == [0]
    write_png_header(tmp_path / "images/training/b.png", 20000, 20000)
    write_png_header(tmp_path / "annotations/training/b.png", 20000, 20000)
    with pytest.raises(ImageTooLargeError, match=r"b\.png is 20000x20000"):
        SegmentationFolder(tmp_path, "train", num_classes=2)


def test_classification_predict_takes_the_limit_option(tmp_path, capsys):
    """``--max-image-pixels`` on ``predict``: the refusal names the option, and the option
    lets the same image through the size check."""
    from convnextv2.checkpoint import save_checkpoint
    from convnextv2.cli import main
    from convnextv2.models.registry import create_model
    from conftest import TOY

    save_checkpoint(create_model("atto", num_classes=2, **TOY), tmp_path / "clf.safetensors")
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "a.png")
    argv = ["predict", "--checkpoint", str(tmp_path / "clf.safetensors"), str(tmp_path / "a.png"),
            "--img-size", "32"]
    assert main([*argv, "--max-image-pixels", "1999"]) == 2
    assert "a.png is 50x40" in capsys.readouterr().err
    assert main([*argv, "--max-image-pixels", "2000"]) == 0


def test_detection_reader_and_both_predict_commands_read_16_bit_as_dark(tmp_path):
    """A dark 16-bit photo (every pixel 20000 of 65535) reaches the detector and the shared
    ``predict`` loop as 78 (20000 / 257), not as white 255."""
    import json
    from types import SimpleNamespace

    from convnextv2.cli._transfer import predict_images
    from convnextv2.detection.data import CocoDetection

    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((40, 50), 20000, np.uint16)).save(tmp_path / "images" / "deep.png")
    assert Image.open(tmp_path / "images" / "deep.png").mode.startswith("I")
    coco = dict(images=[dict(id=1, file_name="deep.png", width=50, height=40)],
                annotations=[dict(id=1, image_id=1, category_id=1, iscrowd=0, area=100,
                                  bbox=[5, 5, 10, 10], segmentation=[[5, 5, 15, 5, 15, 15]])],
                categories=[dict(id=1, name="thing")])
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    image = np.asarray(CocoDetection(tmp_path / "images", tmp_path / "ann.json").load_image(0))
    assert image.shape == (40, 50, 3) and np.unique(image).tolist() == [78]

    seen = []

    def draw(model, pixels, classes, device):  # what detect and segment predict both receive
        seen.append(pixels)
        return pixels, []

    model = SimpleNamespace(to=lambda device: None)
    args = SimpleNamespace(images=[str(tmp_path / "images" / "deep.png")],
                           output=str(tmp_path / "out"), checkpoint=None, device="cpu")
    assert predict_images(args, lambda c: (model, []), draw, lambda found: "none") == 0
    assert seen[0].shape == (3, 40, 50) and seen[0].unique().tolist() == [78]
    assert np.unique(np.asarray(Image.open(tmp_path / "out" / "deep.png"))).tolist() == [78]


def test_a_commands_limit_ends_with_it(tmp_path, capsys):
    """``--max-image-pixels`` given to one in-process command must not stay in force for what
    the process does next (a later dataset would silently skip every image over it)."""
    from convnextv2.cli import main
    from convnextv2.data.image_limits import max_image_pixels

    before = max_image_pixels()
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(image)
    assert main(["predict", "--checkpoint", str(tmp_path / "missing.pt"), str(image),
                 "--max-image-pixels", "50"]) == 2
    capsys.readouterr()
    assert max_image_pixels() == before

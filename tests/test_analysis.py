"""Analysis tools: feature diversity (hand computations), collapse profiles, activation maps,
FCMAE reconstructions (pasting and norm-pix undo checked against hand-built patches) and CLIs."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from convnextv2 import create_model
from convnextv2.analysis import (activation_grid, collapse_profile, feature_diversity,
                                 layer_activation, layer_names, reconstruct, undo_norm_pix)
from convnextv2.cli import main
from convnextv2.fcmae.fcmae import FCMAE

from conftest import TOY as TINY
from conftest import TOY_DIMS, make_tiny_fcmae
TINY_ARGS = "depths=(1,1,1,1),dims=(8,16,24,32),stem_stride=1"


def tiny_model(**kw):
    torch.manual_seed(0)
    return create_model("atto", num_classes=0, **{**TINY, **kw})


# -- feature_diversity -----------------------------------------------------------------------
def test_identical_channels_score_zero():
    base = torch.randn(5, 6)
    same = torch.stack([base, 2.0 * base, 0.5 * base])       # same direction, any positive scale
    assert float(feature_diversity(same)) == pytest.approx(0.0, abs=1e-12)
    batch = torch.stack([same, same * 3])
    assert float(feature_diversity(batch)) == pytest.approx(0.0, abs=1e-12)


def test_matches_hand_computation():
    # channels (as 1x2 maps): e1, e2, e1+e2. cos(e1,e2)=0, cos(e1,e1+e2)=cos(e2,e1+e2)=1/sqrt2.
    act = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]])
    d = (1 - 1 / math.sqrt(2)) / 2
    expected = 2 * (0.5 + d + d) / 9                          # ordered pairs, diagonal is 0
    assert float(feature_diversity(act)) == pytest.approx(expected, rel=1e-12)
    # opposite channels are maximally distant: 2 pairs of distance 1 over C^2 = 4
    opposite = torch.tensor([[[1.0, 2.0]], [[-1.0, -2.0]]])
    assert float(feature_diversity(opposite)) == pytest.approx(0.5)
    # a batch averages the images: 0 and 0.5
    pair = torch.stack([torch.tensor([[[1.0, 2.0]], [[1.0, 2.0]]]), opposite])
    assert float(feature_diversity(pair)) == pytest.approx(0.25)


def test_matches_an_explicit_pairwise_loop_on_random_maps():
    torch.manual_seed(0)
    act = torch.randn(2, 5, 3, 4)
    act[1, 2] = 0.0                                                    # one dead channel
    per_image = []
    for img in act:
        flat = img.reshape(5, -1)
        total = 0.0
        for i in range(5):
            for j in range(5):
                a, b = flat[i].double(), flat[j].double()
                if a.norm() == 0 and b.norm() == 0:
                    cos = 1.0
                elif a.norm() == 0 or b.norm() == 0:
                    cos = 0.0
                else:
                    cos = float(a @ b / (a.norm() * b.norm()))
                total += (1 - cos) / 2
        per_image.append(total / 25)
    assert float(feature_diversity(act)) == pytest.approx(sum(per_image) / 2, rel=1e-12)


def test_zero_channels_follow_the_documented_convention():
    assert float(feature_diversity(torch.zeros(4, 3, 3))) == 0.0     # dead layer: collapsed
    one_dead = torch.tensor([[[0.0, 0.0]], [[1.0, 3.0]]])             # orthogonal pair
    assert float(feature_diversity(one_dead)) == pytest.approx(2 * 0.5 / 4)
    with pytest.raises(ValueError, match="C, H, W"):
        feature_diversity(torch.zeros(3, 3))


# -- collapse_profile ------------------------------------------------------------------------
def test_profile_hooks_every_block_output():
    model = create_model("atto", num_classes=0, depths=(1, 2, 1, 1), dims=TOY_DIMS)
    imgs = torch.randn(3, 3, 64, 64)
    prof = collapse_profile(model, imgs, batch_size=2)
    assert prof["layers"] == ["stages.0.blocks.0", "stages.1.blocks.0", "stages.1.blocks.1",
                              "stages.2.blocks.0", "stages.3.blocks.0"]
    assert prof["index"] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    # independent: run the network by hand, score each block output per image, average
    with torch.no_grad():
        x = model.stem(imgs)
        expected = []
        for stage in model.stages:
            x = stage.downsample(x)
            for block in stage.blocks:
                x = block(x)
                expected.append(np.mean([float(feature_diversity(x[i])) for i in range(3)]))
    # float32 activations, batched differently from the hand-run: rounding differs per CPU
    assert prof["scores"] == pytest.approx(expected, rel=1e-6)


def test_expansion_site_scores_the_hidden_activation_entering_pwconv2():
    model = create_model("atto", num_classes=0, depths=(1, 1, 2, 1), dims=TOY_DIMS,
                         use_grn=False, layer_scale_init_value=1e-6)
    imgs = torch.randn(2, 3, 64, 64)
    prof = collapse_profile(model, imgs, site="expansion")
    with torch.no_grad():
        x = model.stem(imgs)
        expected = []
        for stage in model.stages:
            x = stage.downsample(x)
            for block in stage.blocks:
                h = block.act(block.pwconv1(block.norm(block.dwconv(x).permute(0, 2, 3, 1))))
                expected.append(np.mean([float(feature_diversity(h[i].permute(2, 0, 1)))
                                         for i in range(2)]))
                x = block(x)
    assert prof["site"] == "expansion" and len(prof["scores"]) == 5
    # float32 activations, batched differently from the hand-run: rounding differs per CPU
    assert prof["scores"] == pytest.approx(expected, rel=1e-6)
    assert prof["scores"] != pytest.approx(collapse_profile(model, imgs)["scores"], rel=1e-3)
    with pytest.raises(ValueError, match="expansion"):
        collapse_profile(model, imgs, site="mlp")


def test_random_network_scores_higher_than_a_collapsed_one():
    imgs = torch.randn(4, 3, 64, 64)
    healthy = tiny_model(stem_stride=4)
    collapsed = tiny_model(stem_stride=4)
    with torch.no_grad():  # every block adds a large output whose channels are all equal
        for stage in collapsed.stages:
            for block in stage.blocks:
                row = block.pwconv2.weight[:1].clone()
                block.pwconv2.weight.copy_(row.expand_as(block.pwconv2.weight) * 1e3)
                block.pwconv2.bias.fill_(0.0)
    good = collapse_profile(healthy, imgs)["scores"]
    bad = collapse_profile(collapsed, imgs)["scores"]
    assert min(good) > 0.3
    assert max(bad) < 0.05
    assert all(g > b + 0.25 for g, b in zip(good, bad))


# -- activations -----------------------------------------------------------------------------
def test_layer_activation_matches_a_manual_forward():
    model = tiny_model(stem_stride=4)
    img = torch.randn(3, 64, 64)
    block = model.stages[1].blocks[0]
    with torch.no_grad():
        x = model.stages[1].downsample(model.stages[0](model.stem(img[None])))
        hidden = block.act(block.pwconv1(block.norm(block.dwconv(x).permute(0, 2, 3, 1))))
        out = block(x)
    torch.testing.assert_close(layer_activation(model, img, "stages.1.blocks.0"), out[0])
    act = layer_activation(model, img, "stages.1.blocks.0.act")
    assert act.shape == (64, 8, 8)                            # 4 * 16 channels, channels first
    torch.testing.assert_close(act, hidden[0].permute(2, 0, 1))


def test_unknown_layer_lists_valid_names():
    model = tiny_model()
    assert "stages.2.blocks.0.grn" in layer_names(model)
    with pytest.raises(ValueError, match=r"stages\.3\.blocks\.0.*pwconv1"):
        layer_activation(model, torch.randn(3, 32, 32), "stages.3.blocks.7")


def test_activation_grid_scales_each_map_to_unit_range():
    act = torch.stack([torch.arange(4.0).view(2, 2) * 10, torch.full((2, 2), 5.0),
                       -torch.arange(4.0).view(2, 2)])
    grid = activation_grid(act, pad=1)                        # 2x2 tiles of 2x2 maps
    assert grid.shape == (5, 5)
    torch.testing.assert_close(grid[:2, :2], torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]]))
    torch.testing.assert_close(grid[:2, 3:], torch.zeros(2, 2))      # constant map -> 0
    torch.testing.assert_close(grid[3:, :2], torch.tensor([[1.0, 2 / 3], [1 / 3, 0.0]]))
    assert torch.isnan(grid[2]).all() and torch.isnan(grid[3:, 3:]).all()


# -- reconstruction --------------------------------------------------------------------------
def test_pasted_image_takes_visible_pixels_from_original_and_masked_from_reconstruction():
    fcmae = make_tiny_fcmae(mask_ratio=0.5)
    imgs = torch.randn(2, 3, 32, 32)
    mask = fcmae.random_mask(imgs, generator=torch.Generator().manual_seed(1))
    out = reconstruct(fcmae, imgs, mask)
    m = out["pixel_mask"].expand_as(imgs).bool()
    assert m[0, 0, :8, :8].all() == bool(mask[0, 0]) and m[1, 2, 24:, 8:16].all() == bool(mask[1, 13])
    assert torch.equal(out["pasted"][~m], imgs[~m])
    assert torch.equal(out["pasted"][m], out["reconstruction"][m])
    assert torch.equal(out["masked"][m], torch.zeros(int(m.sum())))
    assert 0 < int(mask.sum()) < mask.numel()


def test_norm_pix_prediction_is_undone_with_each_target_patch_statistics():
    fcmae = make_tiny_fcmae(mask_ratio=0.5)
    imgs = torch.rand(1, 3, 32, 32) * 3
    mask = fcmae.random_mask(imgs, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, pred, _ = fcmae(imgs, mask)
    recon = reconstruct(fcmae, imgs, mask)["reconstruction"]
    p = 8
    for cell in (0, 5, 15):
        r, c = divmod(cell, 4)
        patch = imgs[0, :, r * p:(r + 1) * p, c * p:(c + 1) * p]
        vals = patch.flatten().double()
        mean = vals.sum() / vals.numel()
        var = ((vals - mean) ** 2).sum() / (vals.numel() - 1)            # unbiased
        # prediction layout (row, column, channel) as the loss reads it
        pred_patch = pred[0, cell].double().reshape(p, p, 3).permute(2, 0, 1)
        expected = pred_patch * math.sqrt(var + 1e-6) + mean
        torch.testing.assert_close(recon[0, :, r * p:(r + 1) * p, c * p:(c + 1) * p].double(),
                                   expected, rtol=1e-5, atol=1e-5)
    # a prediction equal to the normalised target maps back to the image itself
    target = fcmae.patchify(imgs)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(undo_norm_pix(normed, target), target, rtol=1e-5, atol=1e-5)


def test_without_norm_pix_the_prediction_is_shown_as_is():
    fcmae = make_tiny_fcmae(norm_pix_loss=False, mask_ratio=0.5)
    imgs = torch.randn(1, 3, 32, 32)
    mask = fcmae.random_mask(imgs)
    with torch.no_grad():
        _, pred, _ = fcmae(imgs, mask)
    torch.testing.assert_close(reconstruct(fcmae, imgs, mask)["reconstruction"],
                               fcmae.unpatchify(pred))


def test_save_reconstruction_grid_keeps_train_mode(tmp_path):
    from convnextv2.analysis import save_reconstruction_grid
    fcmae = make_tiny_fcmae(in_chans=1, mask_ratio=0.5).train()
    imgs = torch.randn(2, 1, 32, 32)
    path = save_reconstruction_grid(fcmae, imgs, None, tmp_path / "r.png", (0.5,), (0.25,),
                                    caption="test")
    assert fcmae.training
    assert Image.open(path).size[0] > 100


# -- CLIs ------------------------------------------------------------------------------------
def test_cli_collapse_writes_json_and_one_png(tmp_path):
    v1 = f"random:atto,{TINY_ARGS},in_chans=1,use_grn=False,layer_scale_init_value=1e-6"
    v2 = f"random:atto,{TINY_ARGS},in_chans=1"
    rc = main(["analyze", "collapse", "--checkpoint", v1, v2, "--labels", "V1", "V2",
               "--data", "builtin", "--images", "4", "--img-size", "32",
               "--output", str(tmp_path)])
    assert rc == 0
    summary = json.loads((tmp_path / "collapse.json").read_text())
    assert [m["label"] for m in summary["models"]] == ["V1", "V2"]
    assert all(len(m["scores"]) == 4 and 0 <= min(m["scores"]) <= max(m["scores"]) <= 1
               for m in summary["models"])
    assert summary["models"][0]["config"]["use_grn"] is False
    assert (tmp_path / "collapse.png").stat().st_size > 1000


def test_cli_activations_writes_png_and_rejects_bad_layer(tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8")).save(img)
    out = tmp_path / "act.png"
    spec = f"random:atto,{TINY_ARGS}"
    assert main(["analyze", "activations", "--checkpoint", spec, "--image", str(img),
                 "--layer", "stages.1.blocks.0.pwconv1", "--img-size", "32",
                 "--output", str(out), "--max-channels", "16"]) == 0
    assert out.stat().st_size > 1000
    assert main(["analyze", "activations", "--checkpoint", spec, "--image", str(img),
                 "--layer", "blocks.1", "--img-size", "32"]) == 2
    assert "stages.1.blocks.0" in capsys.readouterr().err


def test_cli_reconstruct_from_pretrain_output(tmp_path, capsys):
    from convnextv2.fcmae.io import save_fcmae
    ckpt = save_fcmae(make_tiny_fcmae(mask_ratio=0.5), tmp_path / "fcmae.safetensors")
    imgs = []
    for i in range(2):
        imgs.append(tmp_path / f"{i}.png")
        Image.fromarray((np.random.default_rng(i).random((48, 48, 3)) * 255).astype("uint8")).save(imgs[-1])
    out = tmp_path / "recon.png"
    assert main(["reconstruct", "--checkpoint", str(ckpt), *map(str, imgs), "--img-size", "32",
                 "--mask-ratio", "0.75", "--seed", "3", "--output", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert "12 of 16 patches masked" in capsys.readouterr().out
    assert main(["reconstruct", "--checkpoint", str(ckpt), str(imgs[0]), "--img-size", "36"]) == 2
    assert "multiple of the patch size 8" in capsys.readouterr().err


def test_load_fcmae_from_a_run_state_keeps_weights_and_recipe(tmp_path):
    from convnextv2.fcmae.io import load_fcmae
    src = make_tiny_fcmae(norm_pix_loss=False, mask_ratio=0.5)
    path = tmp_path / "checkpoint-00000001.pt"
    torch.save({"model": src.state_dict(), "args": {"mask_ratio": 0.75, "norm_pix_loss": False}},
               path)
    loaded = load_fcmae(path)
    assert loaded.norm_pix_loss is False and loaded.mask_ratio == 0.75
    assert loaded.encoder.config["stem_stride"] == 1 and loaded.patch_size == 8
    imgs = torch.randn(1, 3, 32, 32)
    mask = src.random_mask(imgs, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(reconstruct(loaded, imgs, mask)["pasted"],
                               reconstruct(src, imgs, mask)["pasted"])

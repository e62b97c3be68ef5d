"""FCMAE module: patch order, loss formula, masks, decoder, and the encoder it trains (docs/design.md)."""
import math

import pytest
import torch

import convnextv2
from convnextv2.fcmae.fcmae import FCMAE
from convnextv2.fcmae.masking import keyed_mask, random_mask

from conftest import TOY as TINY
from conftest import make_tiny_fcmae


def test_patch_size_follows_the_stem():
    assert make_tiny_fcmae(stem_stride=4).patch_size == 32
    assert make_tiny_fcmae(stem_stride=1).patch_size == 8
    assert make_tiny_fcmae(stem_stride=2, in_chans=1).pred.out_channels == 16 * 16


def test_patchify_order_against_a_hand_built_example():
    m = make_tiny_fcmae(stem_stride=1, in_chans=2)  # p = 8
    p, c, h, w = 8, 2, 16, 24
    imgs = torch.empty(1, c, h, w)
    for ch in range(c):
        for y in range(h):
            for x in range(w):
                imgs[0, ch, y, x] = ch * 10000 + y * 100 + x
    patches = m.patchify(imgs)
    assert patches.shape == (1, (h // p) * (w // p), p * p * c)
    for row in range(h // p):
        for col in range(w // p):
            cell = row * (w // p) + col  # row-major over the grid
            for i in range(p):
                for j in range(p):
                    for ch in range(c):  # (row, column, channel), channel fastest
                        expect = ch * 10000 + (row * p + i) * 100 + col * p + j
                        assert patches[0, cell, (i * p + j) * c + ch] == expect
    assert torch.equal(m.unpatchify(patches, (h // p, w // p)), imgs)
    rows = torch.tensor([0, 4, 5])  # flat cell indices: gathered rows equal patchify's rows
    assert torch.equal(m.patches_at(imgs, rows), patches.reshape(-1, p * p * c)[rows])


def test_unpatchify_inverts_patchify():
    m = make_tiny_fcmae(stem_stride=2, in_chans=3)
    imgs = torch.randn(2, 3, 32, 48)
    assert torch.equal(m.unpatchify(m.patchify(imgs), (2, 3)), imgs)
    square = torch.randn(2, 3, 32, 32)
    assert torch.equal(m.unpatchify(m.patchify(square)), square)
    with pytest.raises(ValueError, match="square"):
        m.unpatchify(m.patchify(imgs))


def hand_loss(imgs, pred, mask, p, norm_pix):
    """The official loss written out patch by patch."""
    n, c, h, w = imgs.shape
    wp = w // p
    total, count = 0.0, 0.0
    for b in range(n):
        for cell in range(mask.shape[1]):
            row, col = divmod(cell, wp)
            values = []
            for i in range(p):
                for j in range(p):
                    for ch in range(c):
                        values.append(float(imgs[b, ch, row * p + i, col * p + j]))
            if norm_pix:
                mean = sum(values) / len(values)
                var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
                values = [(v - mean) / math.sqrt(var + 1e-6) for v in values]
            err = sum((float(pred[b, cell, k]) - v) ** 2 for k, v in enumerate(values)) / len(values)
            total += err * float(mask[b, cell])
            count += float(mask[b, cell])
    return total / count


@pytest.mark.parametrize("norm_pix,backend", [(True, "sparse"), (False, "sparse"), (True, "dense")])
def test_loss_matches_hand_computation(norm_pix, backend):
    torch.manual_seed(0)
    m = make_tiny_fcmae(stem_stride=1, in_chans=2, norm_pix_loss=norm_pix,
                        backend=backend)
    imgs = torch.randn(2, 2, 16, 16) * 3 + 1
    if backend == "sparse":
        mask = torch.tensor([[1., 0., 1., 0.], [0., 1., 1., 0.]])
    else:  # uneven counts: the average is over the masked patches of the whole batch
        mask = torch.tensor([[1., 0., 0., 0.], [0., 1., 1., 1.]])
    loss, pred, mask_out = m(imgs, mask)
    assert mask_out is mask
    assert pred.shape == (2, 4, 8 * 8 * 2)
    assert loss.item() == pytest.approx(hand_loss(imgs, pred.detach(), mask, 8, norm_pix), rel=1e-5)
    assert m.forward_loss(imgs, pred, mask).item() == pytest.approx(loss.item(), rel=1e-6)


def test_decoder_fills_masked_cells_with_the_mask_token():
    torch.manual_seed(1)
    m = make_tiny_fcmae(stem_stride=4)
    latent = torch.randn(2, 32, 2, 2)
    mask = torch.tensor([[1., 0., 0., 1.], [0., 1., 1., 0.]])
    noisy = latent + torch.randn_like(latent) * mask.view(2, 1, 2, 2) * 100
    assert torch.allclose(m.forward_decoder(latent, mask), m.forward_decoder(noisy, mask))
    changed = latent + torch.randn_like(latent) * (1 - mask).view(2, 1, 2, 2)
    assert not torch.allclose(m.forward_decoder(latent, mask), m.forward_decoder(changed, mask))


def test_decoder_init_is_std_002_and_uses_v2_blocks():
    torch.manual_seed(2)
    m = FCMAE("convnextv2_atto", encoder_kwargs=TINY, decoder_depth=2)
    assert len(m.decoder) == 2 and isinstance(m.decoder[0], convnextv2.Block)
    assert m.decoder[0].grn is not None and m.decoder[0].dwconv.in_channels == 512
    assert m.mask_token.shape == (1, 512, 1, 1)
    assert m.mask_token.std().item() == pytest.approx(0.02, rel=0.3)
    for w in (m.proj.weight, m.pred.weight, m.decoder[1].pwconv1.weight, m.decoder[0].dwconv.weight):
        assert w.std().item() == pytest.approx(0.02, rel=0.1)
    assert m.pred.out_channels == 32 * 32 * 3 and m.proj.in_channels == 32
    assert torch.all(m.pred.bias == 0)


@pytest.mark.parametrize("cells,ratio", [(49, 0.6), (49, 0.75), (12, 0.5), (6, 0.6), (1, 0.0)])
def test_masks_keep_int_l_times_one_minus_ratio(cells, ratio):
    keep = int(cells * (1 - ratio))
    mask = random_mask(5, (1, cells), ratio)
    assert mask.shape == (5, cells) and mask.dtype == torch.float32
    assert torch.all(mask.eq(0).sum(1) == keep) and torch.all((mask == 0) | (mask == 1))
    km = keyed_mask(0, 0, range(5), (cells, 1), ratio)
    assert torch.all(km.eq(0).sum(1) == keep)


def test_random_mask_generator_reproducible_and_varied():
    a = random_mask(4, (7, 7), 0.6, generator=torch.Generator().manual_seed(3))
    b = random_mask(4, (7, 7), 0.6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert len({tuple(r.tolist()) for r in a}) == 4


def test_keyed_mask_depends_only_on_seed_epoch_and_index():
    full = keyed_mask(5, 2, [0, 1, 2, 3, 4, 5], (7, 7), 0.6)
    # another process, another batch split, another order: same rows for the same samples
    part = keyed_mask(5, 2, torch.tensor([4, 1]), (7, 7), 0.6)
    assert torch.equal(part[0], full[4]) and torch.equal(part[1], full[1])
    assert not torch.equal(keyed_mask(5, 3, [4], (7, 7), 0.6)[0], full[4])   # epoch matters
    assert not torch.equal(keyed_mask(6, 2, [4], (7, 7), 0.6)[0], full[4])   # seed matters
    assert len({tuple(r.tolist()) for r in full}) == 6                       # index matters


def test_forward_draws_a_mask_when_none_given():
    m = make_tiny_fcmae(stem_stride=4, mask_ratio=0.75)
    imgs = torch.randn(3, 3, 64, 128)
    loss, pred, mask = m(imgs)
    assert mask.shape == (3, 8) and torch.all(mask.eq(0).sum(1) == 2)
    assert pred.shape == (3, 8, 32 * 32 * 3) and loss.ndim == 0 and torch.isfinite(loss)


def test_encoder_state_dict_loads_into_a_plain_model_after_training():
    torch.manual_seed(4)
    m = make_tiny_fcmae(stem_stride=2)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    imgs = torch.randn(2, 3, 32, 32)
    before = m.encoder.stages[0].blocks[0].grn.gamma.detach().clone()
    for _ in range(2):
        loss, _, _ = m(imgs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m.encoder.head.norm.weight.grad is None  # the head is unused, and that is fine
    assert not torch.equal(m.encoder.stages[0].blocks[0].grn.gamma, before)  # encoder trains
    plain = convnextv2.create_model("convnextv2_atto", num_classes=0, stem_stride=2, **TINY)
    plain.load_state_dict(m.encoder.state_dict())
    mask = torch.zeros(2, 4)
    assert ((ref := plain.forward_features(imgs)) - m.forward_encoder(imgs, mask)).abs().max() <= 1e-5 * max(1.0, ref.abs().max())


def test_encoder_instance_is_used_as_is_and_bad_arguments_are_rejected():
    enc = convnextv2.create_model("convnextv2_atto", num_classes=10, **TINY)
    m = FCMAE(enc, decoder_embed_dim=16)
    assert m.encoder is enc and m.backend == "sparse"
    assert m.set_backend("dense").backend == "dense"
    with pytest.raises(ValueError, match="backend"):
        m.set_backend("minkowski")
    with pytest.raises(TypeError):
        FCMAE(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mask_ratio"):
        FCMAE(enc, mask_ratio=1.5)

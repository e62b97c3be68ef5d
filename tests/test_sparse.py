"""The sparse FCMAE encoder against masked dense convolution (docs/design.md) and the dense model."""
import copy

import pytest
import torch

import convnextv2
from convnextv2.fcmae.fcmae import FCMAE
from convnextv2.fcmae.masked_dense import masked_dense_forward_features
from convnextv2.fcmae.masking import check_mask, mask_order, random_mask
from convnextv2.models.dwconv import depthwise_conv, depthwise_weight_grad
from convnextv2.fcmae.sparse import SparseLayout, morton_offsets, sparse_forward_features
from convnextv2.models.grn import GRN_EPS, grn_reference
from convnextv2.models.grn_fused import grn_rows

from conftest import TOY as TINY
from conftest import TOY_DIMS

SMALL = dict(depths=(2, 1, 2, 1), dims=TOY_DIMS)  # two blocks in stages 1 and 3


def randomise_norms(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero GRN gamma/beta, random LayerNorm affine and layer scale: nothing is an identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("gamma", "beta") or (p.dim() == 1 and "norm" in name and leaf == "bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif p.dim() == 1 and "norm" in name and leaf == "weight":
                p.copy_(1 + torch.randn(p.shape, generator=gen) * 0.3)
            elif leaf == "layer_scale":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif leaf == "bias":
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif p.dim() > 1:
                p.mul_(10)  # std 0.2 weights keep activations of a deep stack away from zero


def make_pair(in_chans=3, stem_stride=4, decoder_dim=16, seed=0, **kw):
    torch.manual_seed(seed)
    enc = convnextv2.create_model("atto", num_classes=0, in_chans=in_chans,
                                  stem_stride=stem_stride, **{**TINY, **kw})
    sparse = FCMAE(enc, decoder_embed_dim=decoder_dim, backend="sparse")
    randomise_norms(sparse, seed)
    dense = copy.deepcopy(sparse).set_backend("dense")
    return sparse, dense


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def test_morton_offsets_are_recursive_2x2_groups():
    dy, dx = morton_offsets(2)
    assert dy.tolist() == [0, 0, 1, 1] and dx.tolist() == [0, 1, 0, 1]
    dy, dx = morton_offsets(4)
    assert sorted(zip(dy.tolist(), dx.tolist())) == [(y, x) for y in range(4) for x in range(4)]
    # each group of four is a 2x2 square in (0,0), (0,1), (1,0), (1,1) order, and the groups
    # themselves are in the order of the 2x2 grid one level up
    for g in range(4):
        ys, xs = dy[4 * g:4 * g + 4], dx[4 * g:4 * g + 4]
        assert (ys - ys[0]).tolist() == [0, 0, 1, 1] and (xs - xs[0]).tolist() == [0, 1, 0, 1]
        assert (ys[0] // 2, xs[0] // 2) == (g // 2, g % 2)


def test_layout_stage_order_merges_groups_of_four():
    mask = random_mask(3, (2, 3), 0.5, generator=torch.Generator().manual_seed(0))
    layout = SparseLayout.from_mask(mask, (2, 3))
    assert layout.num_visible == 3
    for k in range(3):
        (h, w), (h2, w2) = layout.stage_hw[k], layout.stage_hw[k + 1]
        fine = layout.flat_index[k].view(3, -1)
        n = torch.arange(3).view(3, 1)
        local = fine - n * h * w
        parent = (local // w // 2) * w2 + (local % w) // 2 + n * h2 * w2
        groups = parent.view(3, -1, 4)
        assert (groups == groups[..., :1]).all()
        assert torch.equal(groups[..., 0].reshape(-1), layout.flat_index[k + 1])
    # patch level: the visible cells themselves, ascending
    expect = torch.stack([row.eq(0).nonzero()[:, 0] for row in mask])
    assert torch.equal(layout.visible, expect)


PARITY_CASES = [
    # (batch, in_chans, stem_stride, (H, W))
    (2, 3, 4, (64, 64)),
    (2, 3, 4, (64, 96)),    # non-square
    (1, 3, 4, (96, 64)),    # batch 1
    (2, 1, 2, (32, 48)),    # in_chans 1, patch 16
    (3, 4, 1, (16, 24)),    # in_chans 4, patch 8
]


@pytest.mark.parametrize("batch,in_chans,stem_stride,size", PARITY_CASES)
def test_sparse_matches_masked_dense(batch, in_chans, stem_stride, size):
    sparse, dense = make_pair(in_chans, stem_stride, seed=batch + in_chans)
    torch.manual_seed(1)
    imgs = torch.randn(batch, in_chans, *size)
    mask = sparse.random_mask(imgs)
    assert 0 < mask.sum() < mask.numel()

    feats_s, feats_d = sparse.forward_encoder(imgs, mask), dense.forward_encoder(imgs, mask)
    assert feats_s.shape == (batch, 32, size[0] // sparse.patch_size, size[1] // sparse.patch_size)
    assert feats_d.abs().max() > 0.1  # the comparison is not between zeros
    assert (feats_s - feats_d).abs().max() <= 1e-5 * feats_d.abs().max()  # scaled: CPUs round differently

    loss_s, pred_s, _ = sparse(imgs, mask)
    loss_d, pred_d, _ = dense(imgs, mask)
    assert abs(loss_s.item() - loss_d.item()) <= 1e-5 * abs(loss_d.item())
    loss_s.backward()
    loss_d.backward()
    for (name, ps), (_, pd) in zip(sparse.named_parameters(), dense.named_parameters()):
        if name.startswith("encoder.head"):
            assert ps.grad is None and pd.grad is None
            continue
        assert pd.grad is not None and pd.grad.norm() > 0, name
        assert rel(ps.grad, pd.grad) <= 1e-4, name


def test_masking_changes_the_features_at_visible_cells():
    """Guards the parity test: masked neighbours must matter, or both backends could be wrong alike."""
    sparse, _ = make_pair()
    imgs = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[0., 1., 1., 0.], [1., 0., 0., 1.]])
    masked = sparse.forward_encoder(imgs, mask)
    full = sparse.encoder.forward_features(imgs)
    visible = (1 - mask).view(2, 1, 2, 2).bool().expand_as(full)
    assert (masked[visible] - full[visible]).abs().max() > 1e-2


def test_all_visible_equals_the_dense_model():
    sparse, dense = make_pair(seed=3)
    imgs = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 6)
    expect = sparse.encoder.forward_features(imgs)
    for model in (sparse, dense):
        assert (model.forward_encoder(imgs, mask) - expect).abs().max() <= 1e-5 * expect.abs().max()


def test_masked_cells_are_exactly_zero():
    sparse, dense = make_pair(seed=4)
    imgs = torch.randn(3, 3, 96, 96)
    mask = sparse.random_mask(imgs)
    for model in (sparse, dense):
        feats = model.forward_encoder(imgs, mask)
        cells = feats.permute(0, 2, 3, 1).reshape(3, 9, -1)
        assert torch.all(cells[mask.bool()] == 0)
        assert torch.all(cells[~mask.bool()].abs().sum(-1) > 0)


def test_grn_is_per_sample_not_per_batch():
    """Official issue #86: a sample's features must not depend on the rest of the batch."""
    sparse, _ = make_pair(seed=5)
    imgs = torch.randn(3, 3, 64, 64)
    mask = sparse.random_mask(imgs)
    together = sparse.forward_encoder(imgs, mask)
    alone = sparse.forward_encoder(imgs[1:2], mask[1:2])
    assert (together[1:2] - alone).abs().max() <= 1e-5 * alone.abs().max()


def test_v1_style_encoder():
    sparse, dense = make_pair(seed=6, use_grn=False, layer_scale_init_value=1e-6)
    assert sparse.encoder.stages[0].blocks[0].grn is None
    imgs = torch.randn(2, 3, 64, 64)
    mask = sparse.random_mask(imgs)
    loss_s, _, _ = sparse(imgs, mask)
    loss_d, _, _ = dense(imgs, mask)
    assert abs(loss_s.item() - loss_d.item()) <= 1e-5 * abs(loss_d.item())
    loss_s.backward()
    loss_d.backward()
    ls_s = sparse.encoder.stages[1].blocks[0].layer_scale
    ls_d = dense.encoder.stages[1].blocks[0].layer_scale
    assert rel(ls_s.grad, ls_d.grad) <= 1e-4


def test_drop_path_draws_per_sample_like_the_dense_backend():
    sparse, dense = make_pair(seed=7, drop_path_rate=0.5, depths=(2, 2, 2, 2))
    sparse.train()
    dense.train()
    imgs = torch.randn(4, 3, 64, 64)
    mask = sparse.random_mask(imgs)
    torch.manual_seed(11)
    out_s = sparse.forward_encoder(imgs, mask)
    torch.manual_seed(11)
    out_d = dense.forward_encoder(imgs, mask)
    tol = 1e-5 * out_d.abs().max().item()  # four blocks deep, activations of order 10
    assert (out_s - out_d).abs().max() <= tol  # same random draws, same per-sample drops
    torch.manual_seed(12)
    assert (sparse.forward_encoder(imgs, mask) - out_s).abs().max() > 1e-3  # it does drop
    sparse.eval()
    dense.eval()
    assert (sparse.forward_encoder(imgs, mask) - dense.forward_encoder(imgs, mask)).abs().max() <= tol


def test_bf16_autocast_forward_backward_close_to_fp32():
    sparse, _ = make_pair(seed=8, stem_stride=2)
    imgs = torch.randn(2, 3, 32, 48)
    mask = sparse.random_mask(imgs)
    loss32, pred32, _ = sparse(imgs, mask)
    loss32.backward()
    grads32 = {n: p.grad.clone() for n, p in sparse.named_parameters() if p.grad is not None}
    sparse.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, pred16, _ = sparse(imgs, mask)
        feats16 = sparse.forward_encoder(imgs, mask)
    loss16.backward()
    assert torch.isfinite(loss16)
    assert abs(loss16.item() - loss32.item()) <= 0.03 * loss32.item()
    assert rel(pred16.float(), pred32) <= 0.05
    assert rel(feats16.float(), sparse.forward_encoder(imgs, mask)) <= 0.05
    for name, g in grads32.items():
        p = dict(sparse.named_parameters())[name]
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert rel(sparse.pred.weight.grad, grads32["pred.weight"]) <= 0.1


def test_functional_entry_points_agree():
    sparse, _ = make_pair(seed=9)
    imgs = torch.randn(2, 3, 64, 64)
    mask = sparse.random_mask(imgs)
    a = sparse_forward_features(sparse.encoder, imgs, mask)
    b = masked_dense_forward_features(sparse.encoder, imgs, mask)
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_sparse_rejects_uneven_masks_and_dense_accepts_them():
    sparse, dense = make_pair(seed=10)
    imgs = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[0., 1., 1., 1.], [0., 0., 1., 1.]])
    with pytest.raises(ValueError, match="same number of visible cells"):
        sparse.forward_encoder(imgs, mask)
    assert dense.forward_encoder(imgs, mask).shape == (2, 32, 2, 2)
    with pytest.raises(ValueError, match="mask must have shape"):
        sparse(imgs, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        sparse(torch.randn(2, 3, 48, 64))


def test_fully_masked_and_fully_visible_batches_run():
    sparse, dense = make_pair(seed=11)
    imgs = torch.randn(2, 3, 64, 64)
    for mask in (torch.ones(2, 4), torch.zeros(2, 4)):
        loss_s, _, _ = sparse(imgs, mask)
        loss_d, _, _ = dense(imgs, mask)
        if mask.sum() > 0:
            assert torch.isfinite(loss_s) and abs(loss_s.item() - loss_d.item()) <= 1e-5 * loss_d.item()
            assert torch.all(sparse.forward_encoder(imgs, mask) == 0)
        else:  # no masked patch: the loss has nothing to average (0/0), in both backends alike
            assert torch.isnan(loss_s) and torch.isnan(loss_d)


def test_inference_without_grad_matches_dense():
    """No-grad inference takes other fused paths in Block.mlp (oneDNN Linear+GELU)."""
    sparse, dense = make_pair(seed=12)
    sparse.eval()
    dense.eval()
    imgs = torch.randn(3, 3, 96, 64)
    mask = sparse.random_mask(imgs)
    with torch.no_grad():
        out_s, out_d = sparse.forward_encoder(imgs, mask), dense.forward_encoder(imgs, mask)
        assert (out_s - out_d).abs().max() <= 1e-5 * out_d.abs().max()
        loss_d = dense(imgs, mask)[0].item()
        assert abs(sparse(imgs, mask)[0].item() - loss_d) <= 1e-5 * abs(loss_d)


# -- no host syncs, known counts ---------------------------------------------------------------

@pytest.mark.parametrize("backend", ["sparse", "dense"])
def test_training_step_reads_nothing_back_from_the_device(backend):
    """On the meta device tensors have shapes but no values: any host read (nonzero, .item(),
    bool(tensor), int(tensor)) raises. So a whole training step that runs there (masks given
    or drawn, forward, backward, fused AdamW) reads nothing back: on a GPU, no sync."""
    sparse, _ = make_pair(seed=13)
    model = sparse.set_backend(backend).to("meta").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    imgs = torch.empty(2, 3, 64, 96, device="meta")
    for mask in (torch.empty(2, 6, device="meta"), None):
        loss, pred, mask_out = model(imgs, mask)
        assert loss.shape == () and pred.shape == (2, 6, 32 * 32 * 3) and mask_out.shape == (2, 6)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert model(imgs, mask_out)[1].shape == (2, 6, 32 * 32 * 3)


def test_layout_from_a_known_count_equals_the_counted_one():
    mask = random_mask(3, (3, 4), 0.6, generator=torch.Generator().manual_seed(2))
    counted = SparseLayout.from_mask(mask, (3, 4))
    known = SparseLayout.from_mask(mask, (3, 4), num_visible=4)
    assert counted.num_visible == known.num_visible == 4
    assert torch.equal(counted.visible, known.visible)
    assert all(torch.equal(a, b) for a, b in zip(counted.flat_index, known.flat_index))


def test_mask_order_is_visible_then_masked_each_ascending():
    mask = torch.tensor([[1., 0., 1., 0., 0.], [0., 1., 1., 1., 0.]])
    assert mask_order(mask).tolist() == [[1, 3, 4, 0, 2], [0, 4, 1, 2, 3]]


def test_masks_are_checked_where_they_are_used():
    good = torch.tensor([[1., 0., 1., 0.], [0., 1., 1., 0.]])
    check_mask(good, 2)
    with pytest.raises(ValueError, match="expected 1"):
        check_mask(good, 1)
    with pytest.raises(ValueError, match="0 .visible. or 1"):
        check_mask(good * 0.5, 2)
    with pytest.raises(ValueError, match="same number of visible cells"):
        check_mask(torch.tensor([[1., 0., 1., 0.], [0., 0., 1., 0.]]), 2)


def test_depthwise_weight_grad_equals_the_library_backward():
    """The CPU weight gradient (a forward conv with the batch folded into the channels)."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 9, 11).contiguous(memory_format=torch.channels_last)
    g = torch.randn(3, 5, 9, 11).contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 1, 7, 7)
    ref = torch.ops.aten.convolution_backward(g, x, w, None, (1, 1), (3, 3), (1, 1), False,
                                              (0, 0), 5, (False, True, False))[1]
    got = depthwise_weight_grad(g, x, w)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_depthwise_conv_with_the_fast_weight_gradient_equals_the_module():
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(6, 6, 7, padding=3, groups=6)
    x = torch.randn(2, 6, 7, 9).contiguous(memory_format=torch.channels_last).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    weight = torch.randn(2, 6, 7, 9)
    out, ref = depthwise_conv(conv, x), conv(x2)
    assert (out - ref).abs().max() <= 1e-6 * ref.abs().max()
    got = torch.autograd.grad((out * weight).sum(), (x, conv.weight, conv.bias))
    want = torch.autograd.grad((ref * weight).sum(), (x2, conv.weight, conv.bias))
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


# -- the decoder at masked cells only ----------------------------------------------------------

def test_grn_rows_are_the_rows_of_grn_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(3, 10, 6, dtype=torch.float64, requires_grad=True)
    gamma = torch.randn(6, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(6, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([1, 4, 9, 10, 12, 13, 20, 25, 29])  # three per sample
    weight = torch.randn(9, 6, dtype=torch.float64)
    for gelu in (False, True):
        got = grn_rows(x, gamma, beta, rows, gelu=gelu, eps=GRN_EPS)
        full = grn_reference(torch.nn.functional.gelu(x) if gelu else x, gamma, beta)
        ref = full.reshape(-1, 6)[rows].view(3, 3, 6)
        assert (got - ref).abs().max() <= 1e-12 * ref.abs().max()
        g1 = torch.autograd.grad((got.reshape(9, 6) * weight).sum(), (x, gamma, beta))
        g2 = torch.autograd.grad((ref.reshape(9, 6) * weight).sum(), (x, gamma, beta))
        for a, b in zip(g1, g2):
            assert (a - b).abs().max() <= 1e-12 * b.abs().max()


@pytest.mark.parametrize("backend", ["sparse", "dense"])
def test_masked_decoder_gives_the_loss_and_gradients_of_the_full_decoder(backend):
    sparse, _ = make_pair(seed=14, decoder_dim=16)
    rows_only = sparse.set_backend(backend)
    full = copy.deepcopy(rows_only)
    full.masked_decoder = False
    imgs = torch.randn(3, 3, 96, 64)
    mask = rows_only.random_mask(imgs)
    loss_r, pred_r, _ = rows_only(imgs, mask)
    loss_f, pred_f, _ = full(imgs, mask)
    assert abs(loss_r.item() - loss_f.item()) <= 1e-6 * abs(loss_f.item())
    masked = mask.bool()
    assert (pred_r[masked] - pred_f[masked]).abs().max() <= 1e-5 * pred_f.abs().max()
    assert torch.all(pred_r[~masked] == 0)  # not computed in training
    loss_r.backward()
    loss_f.backward()
    for (name, pr), (_, pf) in zip(rows_only.named_parameters(), full.named_parameters()):
        if pf.grad is None:
            assert pr.grad is None, name
            continue
        assert (pr.grad - pf.grad).abs().max() <= 1e-5 * pf.grad.abs().max(), name
    rows_only.eval()  # evaluation predicts every cell, as reconstructions need
    with torch.no_grad():
        assert (rows_only(imgs, mask)[1] - pred_f).abs().max() <= 1e-5 * pred_f.abs().max()


@pytest.mark.parametrize("backend", ["sparse", "dense"])
@pytest.mark.parametrize("masked_decoder", [True, False])
def test_return_pred_false_gives_the_same_loss_and_gradients_without_pred(backend,
                                                                          masked_decoder):
    """Training loops ask for the loss only: pred is None, nothing else changes."""
    model, _ = make_pair(seed=15, decoder_dim=16)
    model.set_backend(backend)
    model.masked_decoder = masked_decoder
    twin = copy.deepcopy(model)
    imgs = torch.randn(2, 3, 64, 64)
    mask = model.random_mask(imgs)
    loss, pred, _ = model(imgs, mask)
    loss_only, none, mask_back = twin(imgs, mask, return_pred=False)
    assert pred is not None and none is None and mask_back is mask
    assert torch.equal(loss, loss_only)
    loss.backward()
    loss_only.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name


# -- the grid depthwise as a custom op -----------------------------------------------------------

def _sites_case(seed=0, n=2, h=8, w=8, c=5, dtype=torch.float64):
    """Sites of a random half of an n x h x w map (the same count per sample): x (N, K, C),
    their flat positions, and the dense reference input (zeros elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    k = h * w // 2
    pos = torch.stack([torch.randperm(h * w, generator=g)[:k].sort().values for _ in range(n)])
    flat = (pos + torch.arange(n).view(n, 1) * h * w).reshape(-1)
    x = torch.randn(n, k, c, generator=g, dtype=dtype)
    return x, flat, k


def test_grid_dwconv_is_the_dense_conv_of_the_zero_filled_map_at_the_sites():
    """Forward, input and weight gradient against the library's dense conv in float64."""
    from convnextv2.fcmae.sparse import grid_dwconv

    n, h, w, c = 2, 8, 8, 5
    x, flat, k = _sites_case(n=n, h=h, w=w, c=c)
    weight = torch.randn(c, 1, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x.requires_grad_(), weight.requires_grad_()
    y = grid_dwconv(x, weight, flat, n, h, w)
    dense_in = torch.zeros(n * h * w, c, dtype=torch.float64).index_copy(0, flat, x.reshape(-1, c))
    dense_in = dense_in.view(n, h, w, c).permute(0, 3, 1, 2)
    ref = torch.nn.functional.conv2d(dense_in, weight, padding=3, groups=c)
    ref = ref.permute(0, 2, 3, 1).reshape(-1, c).index_select(0, flat).view(n, k, c)
    assert (y - ref).abs().max() <= 1e-12 * ref.abs().max()
    upstream = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, weight), upstream)
    want = torch.autograd.grad(ref, (x, weight), upstream)
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max()


def test_grid_dwconv_passes_the_custom_op_checks():
    """torch.library.opcheck: schema, fake (shape-only) kernels, autograd registration and AOT
    dispatch, the machinery torch.compile relies on."""
    from convnextv2.fcmae.sparse import grid_dwconv

    x, flat, _ = _sites_case(seed=2, c=3)
    weight = torch.randn(3, 1, 7, 7, dtype=torch.float64)
    torch.library.opcheck(grid_dwconv, (x.requires_grad_(), weight.requires_grad_(), flat, 2, 8, 8))


def compiled_block_saved_shapes(device="cpu", dwconv="grid"):
    """Shapes of what a compiled sparse block (inductor, fullgraph) saves for backward on a
    half-visible 2 x 16 x 16 map, after checking its output against eager; and the grid's size."""
    from convnextv2.fcmae.sparse import sparse_block
    from convnextv2.models.model import Block

    torch.manual_seed(3)
    block = Block(8).train().to(device)
    n, h, w, c = 2, 16, 16, 8
    x, flat, k = _sites_case(seed=4, n=n, h=h, w=w, c=c, dtype=torch.float32)
    x, flat = x.to(device).requires_grad_(), flat.to(device)
    compiled = torch.compile(sparse_block, fullgraph=True, backend="inductor", dynamic=False)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = compiled(block, x, flat, (h, w), dwconv)
    ref = sparse_block(block, x.detach(), flat, (h, w), dwconv)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    return shapes, (n, h, w)


def test_compiled_sparse_block_keeps_sites_not_grids_for_backward():
    """What the compiled block saves for backward is what the eager one saves: the sites,
    never a zero-filled (N, C, H, W) grid (with traced ops the compiler kept two per block)."""
    shapes, (n, h, w) = compiled_block_saved_shapes()
    assert shapes, "nothing saved: the hook saw no backward"
    assert not [s for s in shapes if n * h * w in s or s[-2:] == (h, w)], shapes

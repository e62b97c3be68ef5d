"""The dense network: shapes, options, GRN numerics and the table of sizes."""
import pytest
import torch

import convnextv2
from convnextv2.models.grn import grn, grn_scale
from convnextv2.tools.stats import model_stats

from conftest import TOY as TINY

# the published sizes: params (M) and GMACs at 224 px, 1000 classes.
PAPER_TABLE = {
    "convnextv2_atto": (3.71, 0.55), "convnextv2_femto": (5.23, 0.78),
    "convnextv2_pico": (9.07, 1.37), "convnextv2_nano": (15.62, 2.45),
    "convnextv2_tiny": (28.64, 4.47), "convnextv2_base": (88.72, 15.4),
    "convnextv2_large": (197.96, 34.4), "convnextv2_huge": (660.29, 115),
}


@pytest.mark.parametrize("name", list(PAPER_TABLE))
def test_params_and_macs_match_the_paper(name):
    params_m, gmacs = PAPER_TABLE[name]
    st = model_stats(name, 224)
    assert st["params"] / 1e6 == pytest.approx(params_m, rel=0.01)
    assert st["macs"] / 1e9 == pytest.approx(gmacs, rel=0.01)


def test_names_are_resolved_and_unknown_names_rejected():
    assert convnextv2.resolve_name("atto") == "convnextv2_atto"
    assert convnextv2.resolve_name("convnextv2_tiny.fcmae_ft_in1k") == "convnextv2_tiny"
    with pytest.raises(ValueError, match="convnextv2_atto"):
        convnextv2.create_model("convnextv2_gigantic")


@pytest.mark.parametrize("in_chans,stem_stride,size", [(3, 4, (64, 96)), (1, 1, (16, 8)), (4, 2, (32, 32))])
def test_shapes_for_channels_strides_and_non_square_inputs(in_chans, stem_stride, size):
    m = convnextv2.create_model("atto", num_classes=7, in_chans=in_chans, stem_stride=stem_stride, **TINY)
    x = torch.randn(2, in_chans, *size)
    s = stem_stride * 8
    assert m.total_stride == s
    assert m.forward_features(x).shape == (2, 32, size[0] // s, size[1] // s)
    assert m(x).shape == (2, 7)
    assert m.forward_head(m.forward_features(x), pre_logits=True).shape == (2, 32)
    maps = m.forward_intermediates(x)
    for f, t in zip(m.feature_info, maps):
        assert t.shape[1] == f["num_chs"]
        assert t.shape[2] == size[0] // f["reduction"]


def test_features_only_backbone_returns_requested_stages():
    m = convnextv2.create_model("atto", features_only=True, out_indices=(1, 3), **TINY)
    out = m(torch.randn(1, 3, 64, 64))
    assert [t.shape[1] for t in out] == m.channels == [16, 32]
    assert m.reductions == [8, 32]
    assert [t.shape[-1] for t in out] == [8, 2]


def test_pre_logits_is_normalised_pool_and_head_is_linear_of_it():
    torch.manual_seed(0)
    m = convnextv2.create_model("atto", num_classes=5, **TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    feats = m.forward_features(x)
    pooled = torch.nn.functional.layer_norm(feats.mean((2, 3)), (32,), m.head.norm.weight,
                                            m.head.norm.bias, 1e-6)
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), pooled)
    torch.testing.assert_close(m(x), pooled @ m.head.fc.weight.T + m.head.fc.bias)


def test_grn_matches_spec_formula_by_hand():
    torch.manual_seed(0)
    # float64: the test is about the formula, so no float32 rounding may blur it
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    gamma, beta = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    gx = x.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    expected = gamma * (x * nx) + beta + x
    torch.testing.assert_close(grn(x, gamma, beta), expected, atol=1e-12, rtol=1e-12)
    # per sample: changing sample 1 leaves sample 0 alone
    x2 = x.clone()
    x2[1] *= 10
    torch.testing.assert_close(grn(x2, gamma, beta)[0], expected[0], atol=1e-12, rtol=1e-12)


def test_grn_norm_is_float32_so_half_precision_does_not_overflow():
    x = torch.full((1, 16, 16, 4), 300.0, dtype=torch.float16)  # sum of squares 2.3e7 > fp16 max
    nx = grn_scale(x)
    assert nx.dtype == torch.float16
    assert torch.isfinite(nx).all()
    torch.testing.assert_close(nx.float(), torch.ones_like(nx, dtype=torch.float32), atol=1e-3, rtol=0)


def test_bf16_autocast_forward_and_backward_on_cpu():
    torch.manual_seed(0)
    m = convnextv2.create_model("atto", num_classes=4, **TINY)
    for blk in m.modules():
        if isinstance(blk, convnextv2.GRN):
            torch.nn.init.normal_(blk.gamma, std=0.5)
    x = torch.randn(2, 3, 64, 64)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


def test_init_follows_the_official_code():
    torch.manual_seed(0)
    m = convnextv2.create_model("tiny", head_init_scale=0.001, drop_path_rate=0.3)
    w = m.stages[2].blocks[0].pwconv1.weight
    assert w.std().item() == pytest.approx(0.02, rel=0.1)
    assert m.stages[2].blocks[0].pwconv1.bias.abs().max() == 0
    assert m.stages[0].blocks[0].grn.gamma.abs().max() == 0
    assert m.head.fc.weight.std().item() == pytest.approx(0.02 * 0.001, rel=0.1)
    rates = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0
             for s in m.stages for b in s.blocks]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.3) and len(rates) == 18
    assert all(b > a for a, b in zip(rates, rates[1:]))


def test_v1_ablation_switch_removes_grn_and_adds_layer_scale():
    m = convnextv2.create_model("atto", use_grn=False, layer_scale_init_value=1e-6, **TINY)
    blk = m.stages[0].blocks[0]
    assert blk.grn is None
    assert torch.all(blk.layer_scale == 1e-6)
    keys = m.state_dict().keys()
    assert not any("grn" in k for k in keys) and any("layer_scale" in k for k in keys)
    # with layer scale 1e-6 each block is nearly the identity
    x = torch.randn(1, 8, 8, 8)
    torch.testing.assert_close(blk(x), x, atol=1e-4, rtol=0)

"""The detector follows the MMDetection Mask R-CNN configs the paper used, where torchvision's
defaults differ: RoI align with sampling ratio 0 and aligned=True, L1 box losses in the RPN
and the RoI head, 2000/1000 proposals in training and 1000/1000 at test. Each setting is
checked in effect against a hand-computed value."""
import numpy as np
import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from convnextv2.detection import build_detector
from convnextv2.detection.protocol import AlignedMultiScaleRoIAlign, roi_box_loss
from convnextv2.transfer import build_backbone

from conftest import TOY_WIDE

HEADS = dict(fpn_channels=16, box_head_dim=32, mask_head_dim=8, min_size=64, max_size=64,
             anchor_sizes=(8, 16, 32, 64, 128))


def _detector(**kw):
    torch.manual_seed(0)
    return build_detector(3, build_backbone(None, **TOY_WIDE), **{**HEADS, **kw})


def test_roi_align_is_aligned_and_adaptive():
    """On a feature map whose value is its x coordinate, each bin of an aligned RoI align is
    the bin centre in feature coordinates (box * scale - 0.5 + (i + 0.5) * bin width).
    torchvision's MultiScaleRoIAlign (aligned=False) is off by half a pixel."""
    model = _detector()
    for pool, size in ((model.roi_heads.box_roi_pool, 7), (model.roi_heads.mask_roi_pool, 14)):
        assert isinstance(pool, AlignedMultiScaleRoIAlign) and pool.sampling_ratio == 0
        assert tuple(pool.output_size) == (size, size)
    pool = model.roi_heads.box_roi_pool
    stride = 8  # level '1'
    h = w = 256 // stride
    xs = torch.arange(w, dtype=torch.float64).expand(1, 16, h, w).float()
    feats = {str(i): torch.zeros(1, 16, 256 // s, 256 // s) for i, s in enumerate((4, 8, 16, 32))}
    feats["1"] = xs
    # side 120: canonical scale 224 at level 4 -> floor(4 + log2(120 / 224)) = 3, stride 8
    box = torch.tensor([[64.0, 70.0, 184.0, 190.0]])
    out = pool(feats, [box], [(256, 256)])[0, 0].double()
    bin_w = (184 - 64) / stride / 7
    want = 64 / stride - 0.5 + (np.arange(7) + 0.5) * bin_w
    np.testing.assert_allclose(out.numpy(), np.tile(want, (7, 1)), atol=1e-5)
    legacy = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)(feats, [box], [(256, 256)])
    legacy = legacy[0, 0].double()
    assert (legacy - out).abs().max() > 0.4  # the half-pixel offset torchvision's default has


def test_rpn_box_loss_is_l1_over_sampled_anchors():
    rpn = _detector().rpn
    torch.manual_seed(1)
    labels = torch.full((300,), -1.0)  # ignored, except 5 positives and 7 negatives
    labels[:5], labels[100:107] = 1.0, 0.0
    deltas, targets = torch.randn(300, 4) * 3, torch.randn(300, 4) * 3
    objectness = torch.randn(300)
    obj_loss, box_loss = rpn.compute_loss(objectness, deltas, [labels], [targets])
    d, t = deltas[:5].double(), targets[:5].double()
    assert box_loss.item() == pytest.approx((d - t).abs().sum().item() / 12, rel=1e-5)
    sampled = torch.cat([torch.arange(5), torch.arange(100, 107)])
    p = torch.sigmoid(objectness[sampled].double())
    y = labels[sampled].double()
    bce = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    assert obj_loss.item() == pytest.approx(bce.item(), rel=1e-5)


def test_roi_box_loss_is_l1_for_the_own_class():
    torch.manual_seed(2)
    reg = torch.randn(6, 4 * 4) * 2
    labels = [torch.tensor([2, 0, 1]), torch.tensor([0, 3, 0])]
    targets = [torch.randn(3, 4), torch.randn(3, 4)]
    want = sum((reg[i, 4 * c:4 * c + 4] - torch.cat(targets)[i]).abs().sum()
               for i, c in ((0, 2), (2, 1), (4, 3))) / 6
    assert roi_box_loss(reg, labels, targets).item() == pytest.approx(want.item(), rel=1e-6)


def test_the_training_losses_use_l1():
    """The detector's ``loss_box_reg`` is the L1 value of the RoIs it sampled, not
    torchvision's smooth L1 (which differs for deltas below 1/9)."""
    model = _detector()
    seen = {}
    model.roi_heads.box_predictor.register_forward_hook(lambda m, i, o: seen.update(out=o))
    sample = model.roi_heads.select_training_samples

    def spy(proposals, targets):
        seen["sampled"] = sample(proposals, targets)
        return seen["sampled"]

    model.roi_heads.select_training_samples = spy
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:40, 12:44] = 1
    target = dict(boxes=torch.tensor([[12.0, 10, 44, 40]]), labels=torch.tensor([2]),
                  masks=masks)
    losses = model([torch.rand(3, 64, 64)], [target])
    _, _, labels, reg_targets = seen["sampled"]
    labels, reg_targets = torch.cat(labels), torch.cat(reg_targets)
    pos = torch.where(labels > 0)[0]
    assert len(pos) > 0
    deltas = seen["out"][1].reshape(len(labels), -1, 4)[pos, labels[pos]]
    l1 = (deltas - reg_targets[pos]).abs().sum() / len(labels)
    smooth = torch.nn.functional.smooth_l1_loss(deltas, reg_targets[pos], beta=1 / 9,
                                                reduction="sum") / len(labels)
    assert losses["loss_box_reg"].item() == pytest.approx(l1.item(), rel=1e-5)
    assert abs(l1.item() - smooth.item()) > 1e-4


def test_proposal_counts_follow_the_configs():
    rpn = _detector().rpn
    assert rpn._pre_nms_top_n == dict(training=2000, testing=1000)
    assert rpn._post_nms_top_n == dict(training=1000, testing=1000)
    rpn.train()
    assert (rpn.pre_nms_top_n(), rpn.post_nms_top_n()) == (2000, 1000)
    rpn.eval()
    assert (rpn.pre_nms_top_n(), rpn.post_nms_top_n()) == (1000, 1000)
    # explicit values still win (the small builtin-data detector uses fewer)
    rpn = _detector(rpn_post_nms_top_n_train=50).rpn
    assert rpn._post_nms_top_n["training"] == 50

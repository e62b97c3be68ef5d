"""Property-based tests (hypothesis): FCMAE masks keyed by (seed, epoch, sample index) and
checkpoint layout conversions over random small architectures (issue 5, item 5)."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convnextv2.fcmae.masking import keyed_mask

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

grids = st.tuples(st.integers(1, 8), st.integers(1, 8))
ratios = st.floats(0.0, 0.95, allow_nan=False)
seeds = st.integers(0, 2 ** 40)
epochs = st.integers(-1, 10 ** 4)
index_lists = st.lists(st.integers(0, 10 ** 7), min_size=1, max_size=12)


@FAST
@given(seed=seeds, epoch=epochs, indices=index_lists, grid=grids, ratio=ratios)
def test_every_row_keeps_exactly_int_L_times_1_minus_r_cells(seed, epoch, indices, grid, ratio):
    L = grid[0] * grid[1]
    mask = keyed_mask(seed, epoch, indices, grid, ratio)
    assert mask.shape == (len(indices), L)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    visible = (mask == 0).sum(dim=1)
    assert visible.tolist() == [int(L * (1 - ratio))] * len(indices)  # the official count


@FAST
@given(seed=seeds, epoch=epochs, indices=index_lists, grid=grids, ratio=ratios,
       order=st.randoms(use_true_random=False))
def test_a_row_depends_only_on_seed_epoch_and_index(seed, epoch, indices, grid, ratio, order):
    """Same (seed, epoch, index) -> same row, whatever else is in the batch or its order:
    what makes the masks of a 2-process run equal to those of a 1-process run."""
    mask = keyed_mask(seed, epoch, indices, grid, ratio)
    assert torch.equal(mask, keyed_mask(seed, epoch, indices, grid, ratio))
    shuffled = list(range(len(indices)))
    order.shuffle(shuffled)
    remixed = keyed_mask(seed, epoch, [indices[i] for i in shuffled], grid, ratio)
    assert torch.equal(remixed, mask[shuffled])
    for i, index in enumerate(indices):  # one sample alone, as a 1-image shard would see it
        assert torch.equal(keyed_mask(seed, epoch, [index], grid, ratio)[0], mask[i])
    assert torch.equal(keyed_mask(seed, epoch, torch.tensor(indices), grid, ratio), mask)


@FAST
@given(seed=seeds, epoch=st.integers(0, 10 ** 4), index=st.integers(0, 10 ** 7),
       side=st.integers(6, 12), ratio=st.floats(0.25, 0.75))
def test_another_seed_epoch_or_index_gives_another_mask(seed, epoch, index, side, ratio):
    """With L >= 36 cells and 25-75 % masked there are over 10^7 possible rows, so a repeat
    across keys would mean the key is ignored."""
    grid = (side, side)
    base = keyed_mask(seed, epoch, [index], grid, ratio)
    assert math.comb(side * side, int(side * side * (1 - ratio))) > 10 ** 7
    assert not torch.equal(base, keyed_mask(seed + 1, epoch, [index], grid, ratio))
    assert not torch.equal(base, keyed_mask(seed, epoch + 1, [index], grid, ratio))
    assert not torch.equal(base, keyed_mask(seed, epoch, [index + 1], grid, ratio))


# -- checkpoint conversion round trips ---------------------------------------------------------
configs = st.fixed_dictionaries(dict(
    depths=st.lists(st.integers(1, 2), min_size=4, max_size=4),
    dims=st.lists(st.sampled_from([4, 8, 12, 84]), min_size=4, max_size=4),
    in_chans=st.integers(1, 4),
    num_classes=st.integers(1, 7),
    stem_stride=st.sampled_from([1, 2, 4]),
))


def _random_model(config, seed):
    from convnextv2.models.model import ConvNeXtV2

    model = ConvNeXtV2(**config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every tensor distinct, so a swapped key cannot go unnoticed
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs, layout=st.sampled_from(["timm", "hf", "official"]),
       seed=st.integers(0, 2 ** 31))
def test_native_to_layout_to_native_is_exact(config, layout, seed):
    from convnextv2.checkpoint import convert_state_dict, detect_layout, infer_config

    native = _random_model(config, seed).state_dict()
    other = convert_state_dict(native, "native", layout, model_config=config)
    assert detect_layout(other) == layout
    back = convert_state_dict(other, layout, "native", model_config=config)
    assert back.keys() == native.keys()
    for key, value in native.items():
        assert back[key].shape == value.shape, key
        assert torch.equal(back[key], value), key
    inferred = infer_config(back)
    for name in ("depths", "dims", "in_chans", "num_classes", "stem_stride"):
        assert list(inferred[name]) == list(config[name]) if name in ("depths", "dims") \
            else inferred[name] == config[name], name


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs, seed=st.integers(0, 2 ** 31))
def test_timm_layout_loads_into_timm_and_computes_the_same_logits(config, seed):
    """An independent check of the timm layout: timm's own ConvNeXt accepts the converted
    tensors strictly and gives our logits. (A stem stride of 2 has no timm equivalent: timm
    then adds a stride-2 downsample to stage 0, another network.)"""
    if config["stem_stride"] == 2:
        config = dict(config, stem_stride=4)
    timm_convnext = pytest.importorskip("timm.models.convnext")
    from convnextv2.checkpoint import convert_state_dict
    from convnextv2.checkpoint.layouts import timm_uses_conv_mlp

    ours = _random_model(config, seed).eval()
    theirs = timm_convnext.ConvNeXt(
        in_chans=config["in_chans"], num_classes=config["num_classes"],
        depths=tuple(config["depths"]), dims=tuple(config["dims"]),
        patch_size=config["stem_stride"], use_grn=True, ls_init_value=None,
        conv_mlp=timm_uses_conv_mlp(config["dims"]), head_norm_first=False).eval()
    theirs.load_state_dict(convert_state_dict(ours.state_dict(), "native", "timm",
                                              model_config=config), strict=True)
    x = torch.randn(2, config["in_chans"], 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = theirs(x)  # random weights can give large logits: the limit scales with them
        torch.testing.assert_close(ours(x), ref, rtol=1e-4,
                                   atol=max(1e-3, 1e-4 * ref.abs().max().item()))

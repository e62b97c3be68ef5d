"""The recipe tables' one home (recipes/presets.py): their keys are the configs' field names,
the configs take their defaults from them, and pretraining honours ``warmup_steps`` as
fine-tuning does."""
import dataclasses
import math

import pytest

from convnextv2 import training as T
from convnextv2.recipes import presets
from convnextv2.recipes.finetune_config import FinetuneConfig
from convnextv2.recipes.pretrain import PretrainConfig


def test_every_table_key_is_a_config_field():
    pretrain_fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    finetune_fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    assert set(presets.PRETRAIN) <= pretrain_fields  # decoder_dim, not decoder_embed_dim
    for table in (presets.COMMON, presets.LINEAR_PROBE, presets.SMALL_IMAGE_SHORT,
                  *presets.PRESETS.values()):
        assert set(table) <= finetune_fields, set(table) - finetune_fields
    defaults = PretrainConfig()
    assert {k: getattr(defaults, k) for k in presets.PRETRAIN if k != "warmup_epochs"} == {
        k: v for k, v in presets.PRETRAIN.items() if k != "warmup_epochs"}
    assert (defaults.decoder_dim, defaults.mask_ratio, defaults.blr) == (512, 0.6, 1.5e-4)


def test_both_recipes_keep_three_run_states_by_default():
    assert FinetuneConfig().keep_last == PretrainConfig().keep_last == 3


@pytest.mark.parametrize("warmup_steps, ramp", [(4, 4), (None, 2)])
def test_pretrain_warmup_steps_override_the_warmup_epochs(tmp_path, make_images, toy_arch,
                                                          monkeypatch, warmup_steps, ramp):
    """2 epochs x 4 steps. Without --warmup-steps the recipe's 40 warmup epochs are capped at
    a quarter of the run: 0.5 epoch, 2 steps; --warmup-steps 4 ramps over 4 steps instead. The
    lr logged at step s is the schedule's after s - 1 optimizer steps: 0, then up to the peak."""
    import convnextv2.recipes.pretrain as pretrain_module

    monkeypatch.setattr(pretrain_module, "_reconstruction_saver", lambda: None)
    monkeypatch.setattr(pretrain_module, "_plot_loss", lambda out: None)
    data = make_images(tmp_path / "images", 16, classes=["a", "b"], size=(40, 36))
    out = tmp_path / "run"
    summary = pretrain_module.pretrain(PretrainConfig(
        model="atto", **toy_arch, stem_stride=1, img_size=32, batch_size=4, decoder_dim=16,
        workers=0, progress=False, device="cpu", data=str(data), output=str(out), epochs=2,
        blr=1e-2, recon_every=0, warmup_steps=warmup_steps))
    lrs = [r["lr"] for r in T.read_metrics(out / "metrics.jsonl")]
    peak = summary["lr"]  # blr x batch 4 / 256
    assert len(lrs) == 8 and summary["warmup_steps"] == ramp
    assert all(math.isclose(lrs[s], peak * s / ramp) for s in range(ramp + 1)), lrs
    assert max(lrs) == lrs[ramp] and all(a > b for a, b in zip(lrs[ramp:], lrs[ramp + 1:]))

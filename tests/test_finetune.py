"""Fine-tuning: layer-wise lr decay ids and scales (docs/recipes.md), weight-decay exemptions, head
re-initialisation, EMA, linear probe, schedule and resume."""
import json

import pytest
import torch
from torch import nn

from convnextv2 import create_model
from convnextv2.recipes.finetune import FinetuneConfig, finetune
from convnextv2.recipes.finetune_config import resolve
from convnextv2.recipes.finetune_model import build_finetune_model
from convnextv2.recipes.linear_probe import LinearProbe
from convnextv2.recipes.presets import resolve_recipe
from convnextv2.training.layer_decay import layer_id, layer_scale, param_groups_layer_decay

from conftest import TOY

ATTO, TINY, BASE = (2, 2, 6, 2), (3, 3, 9, 3), (3, 3, 27, 3)


@pytest.fixture(scope="module")
def toy(toy_arch):
    """The toy network for 1-channel 32 px images (8 px patches)."""
    return dict(toy_arch, stem_stride=1, in_chans=1)

# hand-written from the layer-decay rules of docs/recipes.md; "single": num_layers = sum(depths)
ATTO_SINGLE = {
    "stem.conv.weight": 1, "stem.norm.bias": 1,
    "stages.0.blocks.0.dwconv.weight": 1, "stages.0.blocks.1.pwconv1.weight": 2,
    "stages.1.downsample.norm.weight": 3, "stages.1.blocks.0.grn.gamma": 3,
    "stages.1.blocks.1.grn.beta": 4, "stages.2.downsample.conv.weight": 5,
    "stages.2.blocks.5.pwconv2.bias": 10, "stages.3.downsample.conv.bias": 11,
    "stages.3.blocks.1.norm.weight": 12, "head.norm.weight": 13, "head.fc.weight": 13,
}
TINY_SINGLE = {
    "stem.conv.weight": 1, "stages.0.blocks.2.dwconv.bias": 3,
    "stages.1.downsample.conv.weight": 4, "stages.1.blocks.2.pwconv1.bias": 6,
    "stages.2.downsample.norm.bias": 7, "stages.2.blocks.8.pwconv2.weight": 15,
    "stages.3.downsample.conv.weight": 16, "stages.3.blocks.2.grn.gamma": 18,
    "head.fc.bias": 19,
}
BASE_GROUP = {
    "stem.conv.weight": 0, "stages.0.blocks.2.pwconv1.weight": 1,
    "stages.1.downsample.conv.weight": 2, "stages.1.blocks.0.dwconv.weight": 2,
    "stages.2.downsample.norm.weight": 3, "stages.2.blocks.0.grn.beta": 3,
    "stages.2.blocks.5.pwconv1.weight": 4, "stages.2.blocks.26.pwconv2.weight": 11,
    "stages.3.downsample.conv.weight": 12, "stages.3.blocks.2.norm.bias": 12,
    "head.norm.bias": 13, "head.fc.weight": 13,
}



@pytest.mark.parametrize("depths, mode, expected, top", [
    (ATTO, "single", ATTO_SINGLE, 12), (TINY, "single", TINY_SINGLE, 18),
    (BASE, "group", BASE_GROUP, 12)])
def test_layer_ids_and_scales_follow_the_rules(depths, mode, expected, top):
    for name, lid in expected.items():
        assert layer_id(name, depths, mode) == lid, name
        assert layer_scale(name, depths, 0.7, mode) == pytest.approx(0.7 ** (top + 1 - lid))
    assert layer_scale("head.fc.weight", depths, 0.7, mode) == 1.0


def _named(model):
    return dict(model.named_parameters())


@pytest.mark.parametrize("variant, mode, decay, table", [
    ("convnextv2_atto", "single", 0.9, ATTO_SINGLE), ("convnextv2_base", "group", 0.6, BASE_GROUP)])
def test_param_groups_scale_and_exempt_from_weight_decay(variant, mode, decay, table):
    with torch.device("meta"):
        model = create_model(variant, num_classes=10)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=decay, mode=mode)
    seen = {}
    for g in groups:
        for name, p in zip(g["names"], g["params"]):
            assert name not in seen
            seen[name] = g
    named = _named(model)
    assert set(seen) == set(named)
    top = 13 if mode == "group" else sum(model.config["depths"]) + 1
    for name, lid in table.items():
        assert seen[name]["lr_scale"] == pytest.approx(decay ** (top - lid)), name
    for name, g in seen.items():
        no_decay = name.endswith(".bias") or ".grn." in name or named[name].ndim == 1
        assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
    assert seen["stages.2.blocks.1.grn.gamma"]["weight_decay"] == 0.0
    assert seen["stages.2.blocks.1.pwconv1.weight"]["weight_decay"] == 0.05
    assert seen["head.fc.bias"]["weight_decay"] == 0.0


def test_recipes_and_overrides():
    femto = resolve_recipe("convnextv2_femto")  # the paper's appendix, Tables 9-11
    assert (femto["recipe"], femto["blr"], femto["weight_decay"], femto["mixup"],
            femto["drop_path"]) == ("femto", 2e-4, 0.05, 0.3, 0.0)
    large = resolve_recipe("convnextv2_large")
    assert (large["layer_decay"], large["layer_decay_mode"], large["blr"], large["drop_path"]) \
        == (0.6, "group", 6.25e-4, 0.2)
    huge = resolve_recipe("huge")
    assert (huge["epochs"], huge["warmup_epochs"], huge["layer_decay"]) == (50, 10, 0.75)
    # one rule, by name or by shape: nano is nano whether named or inferred from its shape
    assert resolve_recipe("convnextv2_nano")["recipe"] == "nano"
    assert resolve_recipe(None, depths=(2, 2, 8, 2), dims=(80, 160, 320, 640))["recipe"] == "nano"
    assert resolve_recipe(None, **TOY)["recipe"] == "atto"
    assert resolve(FinetuneConfig(model="tiny", recipe="auto")).recipe == "tiny"
    run = resolve(FinetuneConfig(model="convnextv2_tiny", epochs=300, blr=1e-3, mixup=0.0))
    assert (run.blr, run.mixup, run.cutmix, run.warmup_epochs) == (1e-3, 0.0, 1.0, 40)
    short = resolve(FinetuneConfig(model="convnextv2_tiny", epochs=10))
    assert short.warmup_epochs == 2.5  # the recipe's 40, capped at a quarter of the run
    assert resolve(FinetuneConfig(model="tiny", epochs=10, warmup_epochs=8)).warmup_epochs == 8


def test_linear_probe_freezes_encoder_and_folds_bn(toy):
    torch.manual_seed(0)
    model = create_model("atto", num_classes=3, **toy)
    probe = LinearProbe(model, 5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["head.fc.1.weight", "head.fc.1.bias"]
    probe.train_mode()
    x = torch.randn(16, 1, 32, 32)
    model(x * 3 + 1)  # updates the BN running statistics
    model.eval()
    folded = LinearProbe.folded(model)
    assert isinstance(folded.head.fc, nn.Linear)
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_reset_classifier_is_the_one_head_reset(toy):
    torch.manual_seed(0)
    model = create_model("atto", num_classes=3, **toy)
    fc = model.head.fc
    model.reset_classifier(3, init_std=0.5)  # same size: the same Linear, fresh values
    assert model.head.fc is fc and (fc.bias == 0).all()
    assert 0.35 < fc.weight.std().item() < 0.65 and fc.weight.abs().max() <= 2.0
    model.reset_classifier(7, init_std=1e-3)  # a new label set: a new Linear
    assert model.head.fc.weight.shape == (7, 32) and model.config["num_classes"] == 7
    assert model.head.fc.weight.std().item() < 2e-3
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    model.reset_classifier(0)  # no classifier: the pooled, normalised features
    assert model.num_classes == 0 and model(torch.randn(2, 1, 32, 32)).shape == (2, 32)


def test_resolve_fills_every_preset_value_once():
    from convnextv2.recipes.finetune_config import hyperparameters, saved_args
    from convnextv2.recipes.presets import COMMON, LINEAR_PROBE, PRESETS

    given = FinetuneConfig(model="convnextv2_femto", epochs=600, smoothing=0.3)
    run = resolve(given)
    expected = {**COMMON, **PRESETS["femto"], "smoothing": 0.3, "recipe": "femto",
                "warmup_steps": None}
    assert hyperparameters(run) == expected  # nothing left None that the preset sets
    assert run.img_size == 32 and given.img_size is None  # built-in images: 32 px
    args = saved_args(given, run)  # the run states record the options as given
    assert args["recipe"] == "femto" and args["blr"] is None and args["smoothing"] == 0.3
    probe = resolve(FinetuneConfig(model="atto", linear_probe=True, epochs=90))
    assert {k: getattr(probe, k) for k in LINEAR_PROBE} == LINEAR_PROBE
    assert resolve(FinetuneConfig(auto_augment="none")).auto_augment is None  # off


def _save_native(model, path):
    from convnextv2.checkpoint import save_checkpoint
    save_checkpoint(model, path)


def test_head_reinitialised_from_encoder_only_and_wrong_size_checkpoints(tmp_path, toy):
    torch.manual_seed(0)
    src = create_model("atto", num_classes=5, **toy)
    with torch.no_grad():
        src.head.fc.weight.fill_(1.0)
    _save_native(src, tmp_path / "with_head.safetensors")
    encoder = create_model("atto", num_classes=0, **toy)
    encoder.load_state_dict({k: v for k, v in src.state_dict().items()
                             if not k.startswith("head.fc")})
    _save_native(encoder, tmp_path / "encoder.safetensors")
    for ckpt in ("with_head.safetensors", "encoder.safetensors"):
        model, _ = build_finetune_model(None, 10, str(tmp_path / ckpt))
        assert model.head.fc.weight.shape == (10, 32)
        assert 0 < model.head.fc.weight.std() < 1e-4  # std 2e-5, not the checkpoint's ones
        assert (model.head.fc.bias == 0).all()
        torch.testing.assert_close(model.stages[3].blocks[0].pwconv1.weight,
                                   src.stages[3].blocks[0].pwconv1.weight)
        assert model.config["stem_stride"] == 1 and model.config["in_chans"] == 1


def _saved_recipe(path):
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["recipe"]


def _tiny_run(tmp_path, toy, **kw):
    cfg = dict(model=None, model_kwargs=dict(toy), data="builtin", output=str(tmp_path / "run"),
               epochs=2, batch_size=16, max_steps_per_epoch=6, train_subset=400, val_subset=300,
               recipe="tiny",
               lr=2e-3, model_ema_decay=0.5, progress=False, img_size=32)
    cfg.update(kw)
    return finetune(FinetuneConfig(**cfg))


def test_finetune_ema_is_evaluated_and_saved(tmp_path, toy):
    from torch.utils.data import DataLoader

    from convnextv2.data import build_dataset, eval_transform
    from convnextv2.recipes.evaluate import evaluate, load_classifier

    s = _tiny_run(tmp_path, toy)
    model, ema = s["model"], s["ema"]
    diffs = [(a - b).abs().max().item() for a, b in zip(model.state_dict().values(),
                                                         ema.state_dict().values())
             if a.is_floating_point()]
    assert max(diffs) > 1e-4  # EMA weights differ from the model's
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and {"val_top1", "ema_val_top1", "ema_val_top5"} <= set(lines[-1])
    val = build_dataset("builtin", "val", eval_transform(32, 1))
    keep = torch.randperm(2000, generator=torch.Generator().manual_seed(1))[:300].sort().values
    val = torch.utils.data.Subset(val, keep.tolist())  # the run's val_subset=300, seed 0 + 1
    scores = evaluate(ema, DataLoader(val, batch_size=100), 10)
    assert scores["top1"] == pytest.approx(lines[-1]["ema_val_top1"])
    assert scores["loss"] == pytest.approx(lines[-1]["ema_val_loss"], rel=1e-5)
    saved, info = load_classifier(tmp_path / "run" / "last_ema.safetensors")
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[k], v)
    assert info["class_names"][0] == "T-shirt/top" and info["weights"] == "ema"
    from_state, _ = load_classifier(tmp_path / "run" / "checkpoint-00000012.pt", key="ema")
    for k, v in ema.state_dict().items():  # the run state carries the EMA weights too
        torch.testing.assert_close(from_state.state_dict()[k], v)
    for name in ("accuracy.png", "loss.png", "best.safetensors", "best_ema.safetensors",
                 "summary.json",
                 "checkpoint-00000012.pt"):
        assert (tmp_path / "run" / name).is_file()

    # resume auto continues after epoch 2 and appends epoch 3 only
    s3 = _tiny_run(tmp_path, toy, epochs=3, resume="auto")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2, 3]
    assert s3["final"]["epoch"] == 3
    # the best scores and records of epochs 1-2 come back from the run state, not from scratch
    assert s3["history"][:2] == s["history"] and len(s3["history"]) == 3
    tops = [(r[k], k, r["epoch"]) for r in s3["history"] for k in ("val_top1", "ema_val_top1")]
    best = max(tops, key=lambda t: t[0])
    assert s3["best_top1"] == best[0] and s3["best_epoch"] == min(
        e for v, _, e in tops if v == best[0])
    assert s3["best_model_top1"] == max(r["val_top1"] for r in s3["history"])


def test_compiled_finetune_gives_the_eager_losses(tmp_path, toy, request):
    """`finetune --compile` against the same run in eager mode, step by step (compiled with
    "aot_eager", see the conftest fixture)."""
    def steps(folder):
        return [json.loads(l) for l in (folder / "steps.jsonl").read_text().splitlines()]

    kw = dict(epochs=1, max_steps_per_epoch=3, train_subset=100, val_subset=50,
              model_ema_decay=None)
    _tiny_run(tmp_path / "eager", toy, **kw)
    compiled = request.getfixturevalue("aot_eager_compile")  # from here on only
    _tiny_run(tmp_path / "compiled", toy, compile=True, **kw)
    assert compiled, "--compile did not compile the model"
    eager, comp = steps(tmp_path / "eager" / "run"), steps(tmp_path / "compiled" / "run")
    assert [r["step"] for r in comp] == [r["step"] for r in eager] == [1, 2, 3]
    for a, b in zip(comp, eager):
        assert a["lr"] == b["lr"]
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(b["loss"])


def test_linear_probe_run_keeps_encoder_and_saves_plain_model(tmp_path, toy):
    from convnextv2.recipes.evaluate import load_classifier

    torch.manual_seed(0)
    encoder = create_model("atto", num_classes=0, **toy)
    _save_native(encoder, tmp_path / "encoder.safetensors")
    s = _tiny_run(tmp_path, toy, linear_probe=True, recipe="auto",
                  finetune=str(tmp_path / "encoder.safetensors"),
                  epochs=1, lr=1e-2)
    assert s["ema"] is None  # the probe recipe has no EMA
    # the preset "auto" chose is what the run records, not "auto"
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["config"]["recipe"] == config["hyperparameters"]["recipe"] == "atto"
    assert s["recipe"] == "atto" and _saved_recipe(tmp_path / "run" / "last.safetensors") == "atto"
    saved, info = load_classifier(tmp_path / "run" / "last.safetensors")
    assert isinstance(saved.head.fc, nn.Linear) and info["linear_probe"] is True
    for k, v in encoder.state_dict().items():  # frozen: identical to the checkpoint
        torch.testing.assert_close(saved.state_dict()[k], v)
    x = torch.randn(4, 1, 32, 32)
    s["model"].eval()
    with torch.no_grad():  # the file holds the returned (BN-folded) classifier
        torch.testing.assert_close(saved(x), s["model"](x), atol=1e-5, rtol=1e-4)
    assert s["model"](x).std() > 0  # the probe head learned something non-constant

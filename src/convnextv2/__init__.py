"""ConvNeXt V2 and FCMAE pretraining with a truly sparse encoder, in plain PyTorch."""
from .models.grn import GRN, grn
from .models.model import Block, ConvNeXtV2, FeatureExtractor
from .checkpoint.create import create_model  # the one that also loads pretrained= weights
from .models.variants import VARIANTS, list_models, model_config, resolve_name

__version__ = "0.1.0"


def __getattr__(name):
    # Heavier parts load on first use so that `import convnextv2` stays quick.
    if name in ("load_checkpoint", "save_checkpoint", "convert_state_dict", "detect_layout",
                "load_model", "load_pretrained", "infer_config", "read_metadata", "CheckpointError",
                "list_pretrained"):
        from . import checkpoint
        return getattr(checkpoint, name)
    if name == "push_to_hub":
        from .tools.hub_push import push_to_hub
        return push_to_hub
    if name == "FCMAE":
        from .fcmae.fcmae import FCMAE
        return FCMAE
    raise AttributeError(f"module 'convnextv2' has no attribute {name!r}")

"""The ConvNeXt V2 network: blocks with Global Response Normalization, the eight named variants
(atto to huge) and ``create_model`` (architecture only: ``convnextv2.create_model`` also
loads weights)."""
from .grn import GRN, grn
from .model import Block, ConvNeXtV2, FeatureExtractor
from .registry import create_model
from .variants import V1_BLOCK, VARIANTS, block_kwargs, list_models, model_config, resolve_name

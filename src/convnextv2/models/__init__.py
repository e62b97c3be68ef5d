"""The ConvNeXt V2 network: blocks with Global Response Normalization, the eight named variants
(atto to huge) and ``create_model``."""
from .grn import GRN, grn
from .model import Block, ConvNeXtV2, FeatureExtractor
from .registry import V1_BLOCK, VARIANTS, block_kwargs, create_model, list_models, model_config, resolve_name

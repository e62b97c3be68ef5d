"""Checkpoints in every layout: native, official dense, official FCMAE, timm, HF transformers.

``load_checkpoint`` reads any of them into a model, ``save_checkpoint`` writes any of them,
``convert_state_dict`` goes between two of them through the native layout, ``load_model``
builds the network from a checkpoint alone, ``load_pretrained`` also accepts hub ids,
``create_model`` builds a named variant with weights from any of them or from the catalogue
of released checkpoints (``list_pretrained``, ``catalog.py``), and ``convert_blocks``
moves weights between block kinds (with or without GRN and layer scale).
"""
from .blocks import convert_blocks, convert_blocks_file
from .catalog import CATALOG, list_pretrained
from .create import create_model
from .errors import CheckpointError, CheckpointNotFoundError
from .hub import load_pretrained, resolve_checkpoint
from .io import read_metadata
from .layouts import LAYOUTS, convert_state_dict, detect_layout
from .loading import infer_config, load_checkpoint, load_model, load_state
from .saving import save_checkpoint

__all__ = ["CATALOG", "CheckpointError", "CheckpointNotFoundError", "LAYOUTS", "convert_blocks",
           "convert_blocks_file", "convert_state_dict", "create_model", "detect_layout",
           "infer_config", "list_pretrained", "load_checkpoint", "load_model", "load_pretrained",
           "load_state", "read_metadata", "resolve_checkpoint", "save_checkpoint"]

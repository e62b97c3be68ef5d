"""The paper's analyses as reusable tools: feature collapse (pairwise cosine distance of
channels), per-channel activation maps, and FCMAE reconstructions."""
from __future__ import annotations

from .activations import (activation_grid, layer_activation, layer_names, resolve_layer,
                          save_activation_grid)
from .collapse import block_names, collapse_profile, feature_diversity, save_collapse_plot
from .reconstruction import reconstruct, save_reconstruction_grid, undo_norm_pix

__all__ = ["feature_diversity", "collapse_profile", "block_names", "save_collapse_plot",
           "layer_names", "resolve_layer", "layer_activation", "activation_grid",
           "save_activation_grid", "reconstruct", "undo_norm_pix", "save_reconstruction_grid"]

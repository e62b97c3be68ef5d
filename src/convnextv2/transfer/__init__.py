"""What detection and segmentation share: the ConvNeXt V2 backbone from any checkpoint, the
detection-style layer-wise lr decay, the poly/step schedules, the transfer training loop and
the synthetic scenes built from the Fashion-MNIST subset (the demos that use them are in
``convnextv2.demos``)."""
from .backbone import ConvNeXtBackbone, build_backbone
from .layer_decay import default_num_layers, layer_id, param_groups
from .schedule import TransferSchedule

__all__ = ["ConvNeXtBackbone", "build_backbone", "default_num_layers", "layer_id",
           "param_groups", "TransferSchedule"]

"""What detection and segmentation share: the ConvNeXt V2 backbone from any checkpoint, the
transfer recipe's main (``engine``: a ``Task`` trained by the training engine) and the
synthetic scenes built from the Fashion-MNIST subset (the demos that use them are in
``convnextv2.demos``). Their layer-wise lr decay and poly/step schedules are the engine's
(``training.layer_decay``, ``training.schedule``)."""
from .backbone import ConvNeXtBackbone, build_backbone

__all__ = ["ConvNeXtBackbone", "build_backbone"]

"""The built-in demos and what they share: does FCMAE pretraining help a small ConvNeXt V2?

- ``classification``: Fashion-MNIST, FCMAE + fine-tuning against training from scratch, over
  several seeds (``convnextv2 demo``);
- ``transfer``: the same question for Mask R-CNN and UPerNet on synthetic scenes
  (``convnextv2 demo --task detection|segmentation``);
- ``runner``: the job runner the demos and the studies share (in-process or side by side in
  child processes, with dependencies and a deadline).

They sit above the tasks they exercise (recipes, detection, segmentation, transfer) and
below the command line.
"""

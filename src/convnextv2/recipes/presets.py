"""Recipe tables: the values each training command starts from (docs/recipes.md,
docs/transfer.md). Every value can be overridden by the flag of the same name."""


# -- transfer: detection and segmentation ----------------------------------------------------
# The papers' recipes, the defaults of ``detect train`` / ``segment train`` on real data, and
# the values used on ``--data builtin`` (small synthetic scenes: a small backbone and heads,
# a short run at a higher lr). Keys are TransferConfig fields and task options.

# ConvNeXt V2 on COCO, Mask R-CNN 3x: 36 epochs of 16 x 2 images, AdamW lr 1e-4, weight decay
# 0.05, layer-wise decay 0.95 ('layer_wise'), drop path 0.4 (tiny; the paper sweeps 0.2-0.5),
# large-scale jitter at 1024 (scale 0.1-2.0), lr / 10 at epochs 27 and 33 after 500 warmup
# steps starting at lr / 1000. Evaluated every epoch, as mmdet does.
DETECTION_RECIPE = dict(epochs=36, batch_size=2, lr=1e-4, weight_decay=0.05, layer_decay=0.95,
                        layer_decay_mode="layer_wise", drop_path=0.4, schedule="step",
                        warmup_steps=500, warmup_ratio=1e-3, img_size=1024,
                        scale_range=(0.1, 2.0), eval_every=1, eval_batch_size=1)
DETECTION_BUILTIN = dict(img_size=128, scale_range=(0.75, 1.25),
                         anchor_sizes=(8, 16, 32, 64, 128), epochs=12, batch_size=4, lr=1e-3,
                         drop_path=0.0, layer_decay=0.9, schedule="cosine", warmup_steps=20,
                         fpn_channels=64, box_head_dim=256, mask_head_dim=64,
                         depths=(1, 1, 2, 1), dims=(24, 48, 96, 192),
                         rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150,
                         rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
                         box_batch_size_per_image=32, box_positive_fraction=0.5,
                         box_detections_per_img=20, roi_canonical_scale=48, eval_batch_size=8)

# ConvNeXt V2 on ADE20K, UPerNet: 160k iterations of 16 images (512 x 512 crops), AdamW lr
# 1e-4 (swept 1e-4 to 3e-4), weight decay 0.05, poly schedule (power 1) after 1500 warmup
# iterations, 'stage_wise' layer decay 0.9, drop path 0.4 (swept 0.1-0.4), PPM pool scales
# (1, 2, 3, 6), 512 head channels, auxiliary FCN head with loss weight 0.4. mmseg evaluates
# every 16k iterations: about every 13 epochs of ADE20K's 20,210 training images at 16 a step.
SEGMENTATION_RECIPE = dict(iters=160_000, batch_size=16, lr=1e-4, weight_decay=0.05,
                           layer_decay=0.9, layer_decay_mode="stage_wise", drop_path=0.4,
                           schedule="poly", warmup_steps=1500, warmup_ratio=1e-6, crop=512,
                           ratio_range=(0.5, 2.0), aux_weight=0.4, eval_every=13,
                           eval_batch_size=1)
SEGMENTATION_BUILTIN = dict(crop=128, scale=(128, 128), ratio_range=(0.75, 1.25), iters=None,
                            epochs=8, batch_size=8, lr=1e-3, drop_path=0.0, layer_decay=0.9,
                            schedule="poly", warmup_steps=20, channels=64, aux_channels=32,
                            depths=(1, 1, 2, 1), dims=(24, 48, 96, 192), eval_batch_size=16,
                            eval_every=1)

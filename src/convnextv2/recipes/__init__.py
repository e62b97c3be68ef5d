"""Training recipes: FCMAE pretraining, fine-tuning (with layer-wise lr decay), linear probing
and evaluation. Each builds its parts and hands the loop to ``convnextv2.training``; every
recipe's values are in ``recipes.presets``."""

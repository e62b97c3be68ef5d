"""Training recipes: FCMAE pretraining, fine-tuning (with layer-wise lr decay) and evaluation.
Each builds its parts and hands the loop to ``convnextv2.training``."""

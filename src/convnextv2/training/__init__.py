"""The training engine of every training command (pretrain, finetune, detect|segment train).

- ``schedule``: ``WarmupCosineSchedule`` (warmup + half-cosine lr per step) and
  ``WarmupDecaySchedule`` (poly / step / cosine of the transfer recipes), ``param_groups``
  with the fine-tuning exemptions (biases, 1-D tensors, GRN) or the official pretraining ones
  (``PRETRAIN_NO_DECAY``), the ``blr * batch / 256`` rule;
- ``layer_decay``: layer-wise lr decay with the classification and detection layer-id rules;
- ``runstate``: atomic checkpoints holding everything for an exact resume, keep-last-K,
  ``--resume auto|PATH``;
- ``metrics``: ``metrics.jsonl`` (cut back to the resumed step on resume) and curve PNGs;
- ``distributed``: torchrun / world-of-one setup, samplers, effective batch;
- ``step``: bf16/fp16 autocast and gradient accumulation;
- ``dist_eval``: classifier evaluation that counts every sample once across processes;
- ``data_order``: sample order and augmentation keyed by (seed, epoch, index);
- ``config``: the run options both recipes share;
- ``output``: what a run may do with its output folder (and a demo's or study's fresh one);
- ``loop``: the engine (``Trainer``: ``train_one_epoch``, ``resume``, ``save_state``).
"""
from .config import RunConfig, check_run_config, config_from_args
from .data_order import KeyedAugmentDataset, ResumableSampler, sample_key
from .distributed import (DistInfo, all_reduce_mean, barrier, broadcast_object, build_sampler,
                          cleanup_distributed, effective_batch, init_distributed, wrap_ddp)
from .loop import (NonFiniteLossError, Position, RunLog, StepKey, Trainer, run_session,
                   seed_everything, set_deterministic, worker_init)
from .metrics import MetricsLog, Throughput, plot_curves, read_metrics, truncate_after
from .output import check_output
from .runstate import (apply_run_state, atomic_torch_save, build_run_state, capture_rng_state,
                       checkpoint_path, latest_checkpoint, list_checkpoints, load_resume_state,
                       load_run_state, remove_orphaned_temps, resolve_resume,
                       restore_rng_state, save_run_state)
from .layer_decay import param_groups_layer_decay
from .schedule import (PRETRAIN_NO_DECAY, PerStepSchedule, WarmupCosineSchedule,
                       WarmupDecaySchedule, clip_warmup_epochs, official_pretrain_exempt,
                       param_groups, scaled_lr, set_lr, skips_weight_decay, warmup_cosine_lr)
from .step import AMP_MODES, AccumulatingStep, autocast, check_amp

__all__ = [
    "RunConfig", "check_output", "check_run_config", "config_from_args",
    "NonFiniteLossError", "Position", "RunLog", "StepKey", "Trainer", "run_session",
    "seed_everything", "set_deterministic", "worker_init",
    "load_resume_state", "remove_orphaned_temps", "PRETRAIN_NO_DECAY",
    "official_pretrain_exempt",
    "KeyedAugmentDataset", "ResumableSampler", "sample_key",
    "DistInfo", "all_reduce_mean", "barrier", "broadcast_object", "build_sampler",
    "cleanup_distributed", "effective_batch", "init_distributed", "wrap_ddp",
    "MetricsLog", "Throughput", "plot_curves", "read_metrics", "truncate_after",
    "apply_run_state", "atomic_torch_save", "build_run_state", "capture_rng_state",
    "checkpoint_path", "latest_checkpoint", "list_checkpoints", "load_run_state",
    "resolve_resume", "restore_rng_state", "save_run_state",
    "PerStepSchedule", "WarmupCosineSchedule", "WarmupDecaySchedule", "param_groups_layer_decay",
    "clip_warmup_epochs", "param_groups", "scaled_lr", "set_lr",
    "skips_weight_decay", "warmup_cosine_lr",
    "AMP_MODES", "AccumulatingStep", "autocast", "check_amp",
]

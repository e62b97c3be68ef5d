from __future__ import annotations

from ..models.variants import list_models

HELP = "Measure images/s, peak memory and GFLOP/s of a model, optionally against timm."
EPILOG = """examples:
  convnextv2 bench --model atto --vs-timm                       # inference, fp32, batch 32
  convnextv2 bench --model tiny --vs-timm --train --repeats 5   # AdamW training step
  convnextv2 bench --model atto --vs-timm --compile             # both sides torch.compile'd
  convnextv2 bench --model atto --vs-timm --amp bf16 --ceiling  # autocast, vs the bf16 matmul peak
  convnextv2 bench --model atto --fcmae --batch 16              # sparse FCMAE pretraining step
Contenders run interleaved in one process with the same weights; numbers are medians.
On a CPU shared with other work, trust the ours/timm ratio more than the absolute img/s."""


def add_arguments(p):
    p.add_argument("--model", default="convnextv2_atto",
                   help="variant (default convnextv2_atto): " + ", ".join(list_models()))
    p.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--img-size", type=int, default=224, help="square input size (default 224)")
    p.add_argument("--train", action="store_true",
                   help="time a training step (forward, cross-entropy, backward, AdamW)")
    p.add_argument("--compile", action="store_true", help="torch.compile every contender")
    p.add_argument("--channels-last", action="store_true",
                   help="give every contender channels-last input and weights")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None,
                   help="autocast dtype (default: fp32 throughout)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--vs-timm", action="store_true",
                   help="also run timm's implementation with the same weights and print the ratio")
    p.add_argument("--fcmae", action="store_true",
                   help="time the sparse FCMAE pretraining step instead of the classifier")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per contender (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or auto (default: cuda when available, else cpu)")
    p.add_argument("--ceiling", action="store_true",
                   help="measure a 2048x2048 matmul as the achievable GFLOP/s to compare against")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")


def run(args) -> int:
    import torch

    from ..tools.bench import BenchConfig, run_benchmark
    from ..models.variants import resolve_name
    from . import CLIError

    model = resolve_name(args.model)
    for flag in ("batch", "img_size", "repeats"):
        if getattr(args, flag) < 1:
            raise CLIError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        raise CLIError(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {args.threads}")
    if args.img_size % 32:
        raise CLIError(f"--img-size must be a multiple of the total stride 32, got {args.img_size}")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not (device == "cpu" or device.split(":")[0] == "cuda"):
        raise CLIError(f"--device must be cpu, cuda, cuda:N or auto, got {args.device!r}")
    if device != "cpu" and not torch.cuda.is_available():
        raise CLIError(f"--device {device}: CUDA is not available here; use --device cpu")
    if args.amp == "fp16" and device == "cpu":
        raise CLIError("--amp fp16 needs a CUDA device; on CPU use --amp bf16")
    if args.fcmae and args.vs_timm:
        raise CLIError("--vs-timm compares the classifier; it does not combine with --fcmae")
    cfg = BenchConfig(model=model, batch=args.batch, img_size=args.img_size, train=args.train,
                      compile=args.compile, channels_last=args.channels_last, amp=args.amp,
                      threads=args.threads, vs_timm=args.vs_timm, fcmae=args.fcmae,
                      repeats=args.repeats, warmup=args.warmup, device=device,
                      ceiling=args.ceiling, memory=not args.no_memory)
    run_benchmark(cfg)
    return 0

"""FCMAE training-step speed: sparse FCMAE vs masked-dense FCMAE vs an unmasked dense encoder step.

Contenders (each a full training step: forward, backward, fused AdamW step, from the same
initial weights, on the same images and masks):

  sparse        FCMAE, sparse backend (only visible sites computed)
  sparse-triton the same with the Triton depthwise kernels (``sparse_dwconv="triton"``: the
                7x7 evaluated at visible sites only instead of cuDNN on the zero-filled map;
                CUDA only, a default contender there)
  masked-dense  FCMAE, masked dense convolution (the paper's reference backend)
  encoder       the plain dense encoder on unmasked images (forward_features, a trivial loss):
                the step that FCMAE pretraining is compared against

Each contender is measured in every mode of ``--modes`` and reported in its best one:

  eager          plain PyTorch
  graph          eager, the whole step captured as one CUDA graph (train_step.TrainStep; CUDA only)
  compile        torch.compile: per block (``--compile-scope blocks``, default:
                 compiled_regions.compile_regions / compile_blocks) or the whole model
                 (``--compile-scope model``, torch.compile(model, fullgraph=True))
  compile+graph  compile, then the whole step captured as one CUDA graph (CUDA only)
  reduce-overhead  torch.compile(model, fullgraph=True, mode="reduce-overhead") (CUDA only)

Selection: every (contender, mode) is built, warmed up and timed on its own (``--select-repeats``
steps), all contenders in one mode before the next mode; only the best mode of each contender
is kept. ``--time-limit`` stops trying further modes (the final round still runs). Final numbers: the best modes timed in
turns, one step of each per round (``--repeats`` rounds), median reported. On CUDA each step is
timed with CUDA events after a synchronize (so a step that is bound by the host counts its host
time); on the CPU with perf_counter. Peak memory: CUDA, max_memory_allocated of the contender
(weights, gradients, optimizer state, activations, graph pools) above what was allocated before
it was built; CPU, the largest live allocation during one step (torch.profiler events) above
what was live before it. On CUDA the report also gives the training state (float32 weights,
gradients and AdamW's two moments: 16 bytes per parameter, the same for both FCMAE backends)
and the ratio of the peaks above it, which is what the sparse backend can shrink.

    python benchmarks/fcmae_speed.py --model convnextv2_atto --batch 32 --threads 1
    python benchmarks/fcmae_speed.py --model convnextv2_base --batch 64 --device cuda --amp bf16 --compile
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time

import torch
from torch import nn
from tqdm import tqdm

from convnextv2 import create_model
from convnextv2.fcmae.fcmae import FCMAE
from convnextv2.fcmae.masking import random_mask

from compiled_regions import compile_blocks, compile_regions
from train_step import TrainStep

CONTENDERS = ("sparse", "sparse-triton", "masked-dense", "encoder")
SPARSE = ("sparse", "sparse-triton")
MODES = ("eager", "graph", "compile", "compile+graph", "reduce-overhead")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="convnextv2_atto")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", choices=["none", "bf16"], default="none",
                   help="autocast dtype (bf16 is the advice on CUDA)")
    p.add_argument("--compile", action="store_true",
                   help="also try the compiled modes (adds 'compile' and, on CUDA, 'compile+graph')")
    p.add_argument("--compile-scope", choices=["blocks", "model"], default="blocks",
                   help="what torch.compile sees: one block at a time (fast to compile) or the "
                        "whole model (fullgraph=True)")
    p.add_argument("--mode", dest="modes", default=None,
                   help="comma-separated modes to try (default: eager[,graph] plus the compiled "
                        f"ones with --compile); of {', '.join(MODES)}")
    p.add_argument("--contenders", default=None,
                   help=f"comma-separated, of {', '.join(CONTENDERS)} (default: all; "
                        "sparse-triton on CUDA only)")
    p.add_argument("--repeats", type=int, default=10, help="interleaved timed rounds (final)")
    p.add_argument("--select-repeats", type=int, default=5, help="timed steps per mode (selection)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps per variant first (default 3 on CUDA, 1 on the CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip peak memory (CPU: one step more)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds: stop trying further modes after this (what was measured is reported)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (fp32 runs)")
    p.add_argument("--barrier", default=None, metavar="PATH",
                   help="several benchmark processes sharing one GPU: compile in parallel, then "
                        "wait for the others (PATH.ready.*) and time the final rounds one process "
                        "at a time (a lock on PATH.lock)")
    p.add_argument("--barrier-count", type=int, default=1, help="processes meeting at --barrier")
    p.add_argument("--barrier-timeout", type=float, default=120.0)
    p.add_argument("--profile", action="store_true",
                   help="at the end, list the top kernels of one eager sparse step (torch.profiler)")
    return p.parse_args(argv)


class EncoderLoss(nn.Module):
    """The unmasked dense step: the encoder's features on every position, a trivial loss."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, imgs, mask=None, return_pred=False):
        return (self.encoder.forward_features(imgs).float().pow(2).mean(),)


def default_modes(args) -> list[str]:
    cuda = args.device == "cuda"
    modes = ["eager"] + (["graph"] if cuda else [])
    if args.compile:
        modes += ["compile"] + (["compile+graph"] if cuda else [])
    return modes


class Variant:
    def __init__(self, contender, mode, step, model):
        self.contender, self.mode, self.step, self.model = contender, mode, step, model
        self.select_times: list[float] = []
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.peak: int | None = None
        self.state = 0  # bytes of weights, gradients and optimizer moments (CUDA report)
        self.build_s = 0.0

    @property
    def name(self):
        return f"{self.contender} [{self.mode}]"


def build_variant(contender, mode, args, proto: FCMAE, imgs, masks) -> Variant:
    device = torch.device(args.device)
    if contender == "encoder":
        encoder = create_model(args.model, num_classes=0)
        encoder.load_state_dict(proto.encoder.state_dict())
        model = EncoderLoss(encoder).to(device)
    else:
        model = copy.deepcopy(proto).to(device)
        model.set_backend("dense" if contender == "masked-dense" else "sparse",
                          "triton" if contender == "sparse-triton" else "grid")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                            fused=True)
    net = model
    if mode in ("compile", "compile+graph"):
        if args.compile_scope == "model":
            net = torch.compile(model, fullgraph=True)
        elif contender == "encoder":
            compile_blocks(model.encoder)
        else:
            compile_regions(model)
    elif mode == "reduce-overhead":
        net = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    amp = None if args.amp == "none" else args.amp
    state = 2 * sum(p.numel() * p.element_size() for p in model.parameters())  # weights, grads
    state += 2 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)  # AdamW moments
    train_step = TrainStep(net, opt, amp=amp, cuda_graph=mode in ("graph", "compile+graph"),
                           warmup=max(args.warmup, 1))

    def step(i):
        return train_step(imgs, masks[i % len(masks)])
    v = Variant(contender, mode, step, model)
    v.state = state
    return v


class Timer:
    def __init__(self, device):
        self.cuda = device == "cuda"
        self.last_cpu = 0.0  # CPU: process CPU time of the last call (robust to other processes)

    def time(self, fn) -> float:
        """Seconds of one call, starting from an idle device."""
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        self.last_cpu = time.process_time() - c0
        return time.perf_counter() - t0


class final_turn:
    """With --barrier: wait until every process has built its contenders, then hold a file
    lock while timing, so that no other process uses the GPU meanwhile."""

    def __init__(self, args):
        self.args, self.lock = args, None

    def __enter__(self):
        a = self.args
        if not a.barrier:
            return self
        import fcntl
        import glob
        import os
        open(f"{a.barrier}.ready.{os.getpid()}", "w").close()
        deadline = time.time() + a.barrier_timeout
        while len(glob.glob(f"{a.barrier}.ready.*")) < a.barrier_count and time.time() < deadline:
            time.sleep(0.5)
        self.lock = open(f"{a.barrier}.lock", "w")
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.lock is not None:
            import fcntl
            fcntl.flock(self.lock, fcntl.LOCK_UN)
            self.lock.close()
        return False


def cpu_step_peak(fn) -> int:
    from convnextv2.tools.bench import peak_memory
    return peak_memory(fn, "cpu")[0]


def checked_choices(args) -> tuple[list[str], list[str]]:
    """The modes and contenders to run, after checking them against the device; sets the
    threads, warm-up default and CUDA flags."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if args.warmup is None:
        args.warmup = 3 if cuda else 1
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
        torch.backends.cudnn.benchmark = True  # fixed shapes: every contender gets its best algorithms
    modes = args.modes.split(",") if args.modes else default_modes(args)
    contenders = args.contenders.split(",") if args.contenders else [
        c for c in CONTENDERS if cuda or c != "sparse-triton"]
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown:
        raise SystemExit(f"unknown contenders {unknown}; choose from {CONTENDERS}")
    if "sparse-triton" in contenders and not cuda:
        raise SystemExit("contender 'sparse-triton' needs --device cuda (Triton kernels)")
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; choose from {MODES}")
        if not cuda and m in ("graph", "compile+graph", "reduce-overhead"):
            raise SystemExit(f"mode {m!r} needs --device cuda")
    return modes, contenders


def measure_variant(contender, mode, args, proto, imgs, masks, timer, selecting: bool):
    """Build, warm up and (when ``selecting``) time one (contender, mode); None if it failed."""
    cuda = args.device == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        v = build_variant(contender, mode, args, proto, imgs, masks)
        for i in range(args.warmup + 1):  # graph modes: warm-up steps, then capture
            v.step(i)
        if cuda:
            torch.cuda.synchronize()
        v.build_s = time.perf_counter() - t0
        for i in range(args.select_repeats if selecting else 0):
            v.select_times.append(timer.time(lambda: v.step(i)))
        if cuda:
            v.peak = torch.cuda.max_memory_allocated() - base
        elif not args.no_memory:
            v.peak = cpu_step_peak(lambda: v.step(0))
        return v
    except Exception as exc:  # report and go on: one failing mode must not cost the rest
        print(f"  {contender} [{mode}] FAILED after {time.perf_counter() - t0:.0f} s: "
              f"{type(exc).__name__}: {str(exc)[:400]}", flush=True)
        if cuda:
            torch.cuda.synchronize()
        return None


def select_modes(args, modes, contenders, proto, imgs, masks, timer, started) -> dict:
    """The best mode of each contender: contender -> Variant."""
    best: dict[str, Variant] = {}
    # mode-major: the cheap modes of every contender first, then the compiled ones
    for mode, contender in [(m, c) for m in modes for c in contenders]:
        if args.time_limit and time.perf_counter() - started > args.time_limit:
            print(f"  time limit reached: {contender} [{mode}] not measured", flush=True)
            continue
        v = measure_variant(contender, mode, args, proto, imgs, masks, timer, len(modes) > 1)
        if v is None:
            continue
        med = statistics.median(v.select_times) if v.select_times else 0.0
        timing = f"{med * 1e3:9.2f} ms/step" if v.select_times else "   (one mode: timed below)"
        print(f"  {v.name:30s} {timing}  ({v.build_s:.0f} s to build, warm up"
              f"{' and compile' if 'compile' in mode or mode == 'reduce-overhead' else ''})"
              + (f"  peak {v.peak / 2**20:.0f} MiB" if v.peak is not None else ""), flush=True)
        prev = best.get(contender)
        if prev is None or (v.select_times and med < statistics.median(prev.select_times)):
            best[contender] = v
        del v
    return best


def report_ratios(args, finals, best, med) -> None:
    """Each sparse contender against the others: speed, CPU time, peak memory, table row."""
    cuda = args.device == "cuda"
    for sparse in [c for c in SPARSE if c in med]:
        for other in ("masked-dense", "encoder"):
            if other in med:
                rounds = [o / t for o, t in zip(best[other].times, best[sparse].times)]
                print(f"  {sparse} step / {other} step: {med[other] / med[sparse]:.2f}x faster "
                      f"(median of per-round ratios {statistics.median(rounds):.2f}x: both steps "
                      "of a round see the same background load)")
        if not cuda:  # CPU seconds of the process: what other processes' load changes least
            cmed = {v.contender: statistics.median(v.cpu_times) for v in finals}
            print("  process CPU time per step (1 thread: the step's own compute, hardly "
                  "affected by other processes): " + ", ".join(
                      f"{c} {t * 1e3:.0f} ms" for c, t in cmed.items()))
            for other in ("masked-dense", "encoder"):
                if other in cmed:
                    print(f"  by CPU time: {sparse} step / {other} step: "
                          f"{cmed[other] / cmed[sparse]:.2f}x faster")
        sp, dn = best[sparse], best.get("masked-dense")
        if dn is not None and sp.peak and dn.peak:
            print(f"  peak memory {sparse} / masked-dense: {sp.peak / dn.peak:.2f}")
            if cuda and dn.peak > dn.state:
                print(f"  of which training state (16 bytes/parameter, both): "
                      f"{dn.state / 2**20:.0f} MiB; peaks above it: {(sp.peak - sp.state) / 2**20:.0f}"
                      f" / {(dn.peak - dn.state) / 2**20:.0f} MiB = "
                      f"{(sp.peak - sp.state) / (dn.peak - dn.state):.2f}")
        cells = [f"{args.model.replace('convnextv2_', '')}, {args.batch}"
                 + ("" if args.amp == "bf16" else f", {args.amp}")]
        for c in (sparse, "masked-dense", "encoder"):
            cells.append(f"{med[c] * 1e3:.1f} ms ({best[c].mode})" if c in med else "-")
        cells.append(f"{med['masked-dense'] / med[sparse]:.2f}x" if "masked-dense" in med else "-")
        cells.append(f"{med['encoder'] / med[sparse]:.2f}x" if "encoder" in med else "-")
        if dn is not None and sp.peak and dn.peak:
            cells.append(f"{sp.peak / 2**20:.0f} / {dn.peak / 2**20:.0f}")
        print(f"  table row ({sparse}): | " + " | ".join(cells) + " |")


def main(argv=None) -> int:
    args = parse_args(argv)
    modes, contenders = checked_choices(args)
    cuda = args.device == "cuda"
    device = torch.device(args.device)
    torch.manual_seed(0)
    proto = FCMAE(args.model, mask_ratio=args.mask_ratio)
    imgs = torch.randn(args.batch, proto.in_chans, args.img_size, args.img_size,
                       generator=torch.Generator().manual_seed(0)).to(device)
    grid = proto.grid_size(imgs)
    gen = torch.Generator().manual_seed(1)
    masks = [random_mask(args.batch, grid, args.mask_ratio, generator=gen).to(device)
             for _ in range(8)]
    kept = int(masks[0][0].eq(0).sum())
    timer = Timer(args.device)
    started = time.perf_counter()
    dev_name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"model {args.model}, batch {args.batch}, {args.img_size} px, mask ratio "
          f"{args.mask_ratio} ({kept}/{masks[0].shape[1]} patches visible), {args.amp}, "
          f"device {dev_name}, torch {torch.__version__}, modes {','.join(modes)}, "
          f"compile scope {args.compile_scope}", flush=True)
    best = select_modes(args, modes, contenders, proto, imgs, masks, timer, started)
    if not best:
        print("nothing measured")
        return 1

    # final: the best mode of each contender, interleaved
    finals = [best[c] for c in contenders if c in best]
    with final_turn(args):
        for r in tqdm(range(args.repeats), desc="final rounds", leave=False):
            for v in finals:
                v.times.append(timer.time(lambda: v.step(r)))
                v.cpu_times.append(timer.last_cpu)
    print(f"\nbest mode of each, {args.repeats} interleaved rounds, median (device {dev_name}):")
    med = {v.contender: statistics.median(v.times) for v in finals}
    for v in finals:
        print(f"  {v.name:30s} {med[v.contender] * 1e3:9.2f} ms/step  "
              f"{args.batch / med[v.contender]:9.1f} img/s  (min {min(v.times) * 1e3:.2f}, max "
              f"{max(v.times) * 1e3:.2f})" + (f"  peak {v.peak / 2**20:.0f} MiB" if v.peak else ""))
    report_ratios(args, finals, best, med)
    if args.profile:
        for sparse in [c for c in SPARSE if c in contenders]:
            profile_sparse(args, proto, imgs, masks, sparse)
    print(f"total benchmark time {time.perf_counter() - started:.0f} s", flush=True)
    return 0


def profile_sparse(args, proto, imgs, masks, contender="sparse") -> None:
    """Where one eager sparse step spends its time: the largest kernels / operators."""
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device == "cuda"
    v = build_variant(contender, "eager", args, proto, imgs, masks)
    for i in range(2):
        v.step(i)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        v.step(0)
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"\nprofile of one eager {contender} step:")
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    sys.exit(main())

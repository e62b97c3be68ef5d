"""What a training step keeps for backward with and without gradient checkpointing, and its cost.

For the classifier (cross-entropy step) and the FCMAE step (sparse encoder by default), with
checkpointing off, per block and per stage (``set_grad_checkpointing``), this prints:

- kept: the bytes of tensors made by the forward that are still alive when it returns, i.e.
  what autograd keeps for backward (plus the tiny outputs). Checkpointed units keep only their
  inputs, which a ``saved_tensors_hooks`` count would miss, so memory is counted at the
  allocator's level instead: a ``TorchDispatchMode`` sees every op's new output storage and a
  ``weakref.finalize`` on the storage sees it freed. Works on any device, CPU included.
- peak: the most such bytes alive at once during forward and backward (the weight gradients,
  listed apart, are part of it; the recompute of one unit is what checkpointing adds).
- time: seconds per training step (forward, backward; no optimizer), the fastest of
  ``--repeat`` rounds that run the three settings in turn (after a warm-up round), measured
  without the counting mode; the load average beside it.
- on CUDA, ``torch.cuda.memory_allocated`` after the forward as a cross-check of "kept".

``--compile BACKEND`` compiles the step (one graph per setting, compiling not timed): it shows
that the compiler keeps what checkpointing asks for. Dynamo does not trace under a dispatch
mode, so compiled steps are counted from ``torch.profiler``'s allocation events (CPU).

    python benchmarks/grad_checkpointing.py                      # convnextv2_base, 224 px, batch 2
    python benchmarks/grad_checkpointing.py --model convnextv2_atto --batch 8 --device cuda
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from convnextv2.fcmae.fcmae import FCMAE
from convnextv2.fcmae.masking import random_mask
from convnextv2.models.registry import create_model
from convnextv2.tools.bench import cpu_allocations

MODES = (None, "block", "stage")


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops create while the mode is on and that are still alive
    (``now``), and the most at once (``peak``). Views and in-place results share an input's
    storage and are not new; storages made before the mode (weights, inputs) are never
    counted."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self._live: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and _key(t) not in inputs:
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key, nbytes = id(storage), storage.nbytes()
        if key in self._live or nbytes == 0:
            return
        self._live.add(key)
        self.now += nbytes
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._freed, key, nbytes)

    def _freed(self, key: int, nbytes: int) -> None:
        self._live.discard(key)
        self.now -= nbytes


def _key(t: torch.Tensor) -> int:
    return id(t.untyped_storage())  # storage objects are unique per storage (kept by torch)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="convnextv2_base")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--fcmae-backend", choices=("sparse", "dense"), default="sparse")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds (fastest step counts)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", choices=("classifier", "fcmae"), default=None)
    p.add_argument("--compile", choices=("aot_eager", "inductor"), default=None,
                   help="torch.compile the step with this backend (memory counted on the CPU "
                        "from the profiler's allocation events)")
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, forward, device, compiled: bool) -> dict:
    """kept / peak / grads bytes of one step (and CUDA's own count of "kept"). Compiled code
    is not traced under a dispatch mode (dynamo runs it eagerly), so a compiled step is
    counted from the profiler's allocation events instead (CPU)."""
    model.zero_grad(set_to_none=True)
    cuda_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    cuda_kept = None
    if compiled:
        if device.type != "cpu":
            raise SystemExit("--compile counts memory on the CPU only")
        kept, forward_peak, loss = cpu_allocations(forward)
        _, backward_peak, _ = cpu_allocations(lambda: loss.backward())
        del loss
        peak = max(forward_peak, kept + backward_peak)
    else:
        with LiveBytes() as counter:
            loss = forward()
            kept = counter.now
            if device.type == "cuda":
                cuda_kept = torch.cuda.memory_allocated(device) - cuda_before
            loss.backward()
            del loss
        peak = counter.peak
    grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)
    return dict(kept=kept, peak=peak, grads=grads, cuda_kept=cuda_kept)


def step_seconds(model, forward, device) -> float:
    model.zero_grad(set_to_none=True)
    _sync(device)
    start = time.perf_counter()
    forward().backward()
    _sync(device)
    return time.perf_counter() - start


def set_mode(model, mode) -> None:
    model.set_grad_checkpointing(mode is not None, mode or "block")


def run(name: str, model, forward, device, repeat: int, compile_backend: str | None) -> None:
    """Memory per mode, then ``repeat`` rounds timing each mode once in turn (after a warm-up
    round): on a shared machine the load drifts, so the modes see the same drift, and the
    fastest of a mode's steps is the one least slowed by other processes."""
    rows = {}
    # compiled once: the stages' checkpointing flags are guarded, so each setting gets its
    # own graph, compiled by the warm-up step before anything is counted or timed
    step = torch.compile(forward, backend=compile_backend) if compile_backend else forward
    for mode in MODES:
        set_mode(model, mode)
        if compile_backend:
            step().backward()
        rows[mode] = measure(model, step, device, compiled=bool(compile_backend))
        rows[mode]["times"] = []
    for round_ in range(repeat + 1):
        for mode in MODES:
            set_mode(model, mode)
            seconds = step_seconds(model, step, device)
            if round_:
                rows[mode]["times"].append(seconds)
    set_mode(model, None)
    base = rows[None]
    for mode, r in rows.items():
        cuda = (f", cuda allocated after forward {r['cuda_kept'] / 2**20:7.1f} MiB"
                if r["cuda_kept"] is not None else "")
        fastest, slowest = min(r["times"]), max(r["times"])
        print(f"{name:12s} {str(mode or 'off'):5s}  kept {r['kept'] / 2**20:8.1f} MiB "
              f"({base['kept'] / max(r['kept'], 1):5.1f}x less)  peak {r['peak'] / 2**20:8.1f} "
              f"MiB (grads {r['grads'] / 2**20:.0f} of it)  step {fastest:6.2f} s "
              f"({fastest / min(base['times']):.2f}x; slowest {slowest:.2f} s){cuda}", flush=True)
    print(f"{'':12s} load after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.model}, {args.img_size} px, batch {args.batch}, float32, {device}, "
          f"{'compiled (' + args.compile + ')' if args.compile else 'eager'}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"load {', '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    torch.manual_seed(0)
    imgs = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    if args.only in (None, "classifier"):
        model = create_model(args.model, num_classes=1000).to(device).train()
        labels = torch.arange(args.batch, device=device) % 1000
        run("classifier", model, lambda: torch.nn.functional.cross_entropy(model(imgs), labels),
            device, args.repeat, args.compile)
        del model
    if args.only in (None, "fcmae"):
        fcmae = FCMAE(args.model, mask_ratio=args.mask_ratio,
                      backend=args.fcmae_backend).to(device).train()
        mask = random_mask(args.batch, fcmae.grid_size(imgs), args.mask_ratio,
                           generator=torch.Generator().manual_seed(1)).to(device)
        run(f"fcmae-{args.fcmae_backend[:6]}", fcmae, lambda: fcmae(imgs, mask)[0], device,
            args.repeat, args.compile)
    return 0


if __name__ == "__main__":
    sys.exit(main())

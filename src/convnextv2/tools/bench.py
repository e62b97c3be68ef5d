"""Throughput, peak memory and achieved FLOP/s of the dense model, optionally against timm.

Contenders run interleaved in one process (ours, timm, ours, timm, ...) with the same weights
and the same input, so a CPU shared with other work slows them alike; each reports the median
of its timed repeats after warm-up. timm is imported here only, as the reference to beat.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models.registry import create_model
from ..models.variants import model_config, resolve_name

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class BenchConfig:
    model: str = "convnextv2_atto"
    batch: int = 32
    img_size: int = 224
    train: bool = False
    compile: bool = False
    channels_last: bool = False
    amp: str | None = None              # "bf16" or "fp16" autocast, None for fp32
    threads: int | None = None
    vs_timm: bool = False
    fcmae: bool = False
    repeats: int = 5
    warmup: int = 2
    device: str = "cpu"
    ceiling: bool = False
    memory: bool = True
    seed: int = 0


@dataclass
class Contender:
    name: str
    step: Callable[[], object]
    batch: int


@dataclass
class Result:
    name: str
    times: list[float]
    batch: int
    flops_per_step: float
    peak_bytes: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)

    @property
    def img_per_s(self) -> float:
        return self.batch / self.seconds

    @property
    def gflops(self) -> float:
        return self.flops_per_step / self.seconds / 1e9


# ---- building the contenders --------------------------------------------------------------

def timm_twin(model: nn.Module, name: str) -> nn.Module:
    """timm's implementation of the same variant carrying exactly ``model``'s weights (in
    timm's names and shapes, by the checkpoint package's conversion)."""
    import timm

    from ..checkpoint import convert_state_dict

    cfg = model.config
    twin = timm.create_model(resolve_name(name), pretrained=False, num_classes=cfg["num_classes"],
                             in_chans=cfg["in_chans"], depths=tuple(cfg["depths"]),
                             dims=tuple(cfg["dims"]))
    weights = convert_state_dict(model.state_dict(), src="native", dst="timm", model_config=cfg)
    twin.load_state_dict(weights, strict=True)
    return twin.to(next(model.parameters()).device)


def _autocast(cfg: BenchConfig):
    if cfg.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(cfg.device).type, dtype=AMP_DTYPES[cfg.amp])


def classifier_step(model: nn.Module, images: torch.Tensor, cfg: BenchConfig,
                    num_classes: int = 1000) -> Callable:
    """One inference forward, or one training step (forward, cross-entropy, backward, AdamW)."""
    net = torch.compile(model) if cfg.compile else model
    if not cfg.train:
        model.eval()

        def infer():
            with torch.no_grad(), _autocast(cfg):
                return net(images)
        return infer
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    labels = torch.randint(0, num_classes, (images.shape[0],),
                           generator=torch.Generator().manual_seed(cfg.seed)).to(images.device)

    def train():
        with _autocast(cfg):
            loss = F.cross_entropy(net(images), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return train


def fcmae_step(images: torch.Tensor, cfg: BenchConfig):
    """(model, one sparse FCMAE pretraining step), or None when convnextv2.fcmae is absent."""
    try:
        from ..fcmae.fcmae import FCMAE
    except ImportError:
        return None
    torch.manual_seed(cfg.seed)
    fcmae = FCMAE(resolve_name(cfg.model)).to(cfg.device).train()
    # one graph, no breaks: the FCMAE step has no host sync (see fcmae/fast.py for CUDA graphs)
    net = torch.compile(fcmae, fullgraph=True) if cfg.compile else fcmae
    opt = torch.optim.AdamW(fcmae.parameters(), lr=1e-4)

    def train():
        with _autocast(cfg):
            loss = net(images)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return fcmae, train


# ---- measuring ---------------------------------------------------------------------------

def forward_flops(model: nn.Module, images: torch.Tensor) -> float:
    """FLOPs (2 x multiply-accumulates) of one forward of convolutions and matmuls."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    return float(counter.get_total_flops())


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved_times(contenders: list[Contender], warmup: int, repeats: int, device: str,
                      progress: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Seconds per step of each contender; every round runs each contender once, in turn."""
    for _ in range(warmup):
        for c in contenders:
            c.step()
            _sync(device)
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for r in range(repeats):
        for c in contenders:
            _sync(device)
            start = time.perf_counter()
            c.step()
            _sync(device)
            times[c.name].append(time.perf_counter() - start)
        if progress:
            progress(f"repeat {r + 1}/{repeats}: " + ", ".join(
                f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()))
    return times


def peak_memory(step: Callable, device: str) -> tuple[int, str]:
    """Peak bytes of tensors allocated during one step, above what was live before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the allocation and free events that
    ``torch.profiler`` records with ``profile_memory=True``, summed in time order (tracemalloc
    does not see torch's allocator, and the process's max RSS only ever grows).
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile

    return cpu_allocations(step)[1], "torch.profiler allocation events (CPU)"


def cpu_allocations(step: Callable):
    """``(net, peak, result)``: bytes allocated and not freed by ``step()``, the most live at
    once, and what ``step`` returned, from the allocation and free events that
    ``torch.profiler`` records (CPU; the allocator's own view, so compiled code is counted)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = step()
    deltas = []
    for event in prof.events():
        delta = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        if delta:
            deltas.append((event.time_range.start, delta))
    live = peak = 0
    for _, delta in sorted(deltas, key=lambda d: d[0]):
        live += delta
        peak = max(peak, live)
    return live, peak, result


def matmul_ceiling(device: str, dtype: torch.dtype = torch.float32, n: int = 2048,
                   repeats: int = 5) -> float:
    """GFLOP/s of a square n x n matmul, best of ``repeats``: the practical compute peak."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


# ---- the whole benchmark -----------------------------------------------------------------

def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
    """Measure as ``cfg`` says; log a readable report and return the numbers."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = cfg.device
    in_chans = model_config(cfg.model).get("in_chans", 3)
    images = torch.randn(cfg.batch, in_chans, cfg.img_size, cfg.img_size,
                         generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with torch.device("meta"):  # counting FLOPs needs shapes only
        flops_img = forward_flops(create_model(cfg.model).eval(), torch.empty(images[:1].shape))
    mult = 3 if (cfg.train or cfg.fcmae) else 1  # a backward costs about two forwards
    contenders: list[Contender] = []
    if cfg.fcmae:
        made = fcmae_step(images, cfg)
        if made is None:
            log("--fcmae: convnextv2.fcmae is not available; nothing to measure")
            return {"results": [], "skipped": "fcmae"}
        fcmae, step = made
        flops_img = forward_flops(fcmae.eval(), images[:1])
        fcmae.train()
        contenders.append(Contender("ours-fcmae", step, cfg.batch))
    else:
        ours = create_model(cfg.model).to(device)
        if cfg.channels_last:
            ours = ours.to(memory_format=torch.channels_last)
        if cfg.vs_timm:
            twin = timm_twin(ours, cfg.model)
            if cfg.channels_last:
                twin = twin.to(memory_format=torch.channels_last)
            with torch.no_grad():
                diff = (ours.eval()(images[:2]) - twin.eval()(images[:2])).abs().max().item()
            log(f"same weights: max |ours - timm| over the logits of 2 images = {diff:.1e}")
        contenders.append(Contender("ours", classifier_step(ours, images, cfg), cfg.batch))
        if cfg.vs_timm:
            contenders.append(Contender("timm", classifier_step(twin, images, cfg), cfg.batch))
    mode = "FCMAE pretraining step" if cfg.fcmae else ("training step" if cfg.train else "inference")
    precision = cfg.amp or "fp32"
    log(f"{cfg.model}  batch {cfg.batch}  {cfg.img_size} px  {mode}  {precision}  "
        f"{'compiled' if cfg.compile else 'eager'}"
        f"{'  channels-last input' if cfg.channels_last else ''}  {device} "
        f"({torch.get_num_threads()} threads)  warm-up {cfg.warmup}, median of {cfg.repeats}")
    times = interleaved_times(contenders, cfg.warmup, cfg.repeats, device, progress=log)
    results = [Result(c.name, times[c.name], c.batch, flops_img * mult * c.batch)
               for c in contenders]
    mem_method = None
    if cfg.memory:
        for c, r in zip(contenders, results):
            r.peak_bytes, mem_method = peak_memory(c.step, device)
    ceiling = None
    if cfg.ceiling:
        ceiling = matmul_ceiling(device, AMP_DTYPES[cfg.amp] if cfg.amp else torch.float32)
    log(format_results(results, ceiling, mem_method, precision))
    return {"results": results, "ceiling_gflops": ceiling, "memory_method": mem_method,
            "ratios": speed_ratios(results[0], results[1]) if len(results) == 2 else None,
            "flops_per_image": flops_img * mult}


def speed_ratios(ours: Result, ref: Result) -> dict[str, float]:
    """How many times faster ours is. The median of the per-round ratios is the figure to
    quote on a shared machine: both steps of a round see the same background load."""
    paired = statistics.median(r / o for o, r in zip(ours.times, ref.times))
    return {"median of per-round ratios": paired,
            "of medians": ref.seconds / ours.seconds,
            "of best steps": min(ref.times) / min(ours.times)}


def format_results(results: list[Result], ceiling: float | None, mem_method: str | None,
                   precision: str = "fp32") -> str:
    head = (f"{'':<11}{'img/s':>9}{'best img/s':>12}{'ms/step':>10}{'min-max ms':>16}"
            f"{'peak MB':>10}{'GFLOP/s':>10}")
    if ceiling:
        head += f"{'of ceiling':>12}"
    lines = [head]
    for r in results:
        spread = f"{min(r.times) * 1e3:.0f}-{max(r.times) * 1e3:.0f}"
        mem = f"{r.peak_bytes / 2 ** 20:.0f}" if r.peak_bytes is not None else "-"
        line = (f"{r.name:<11}{r.img_per_s:>9.1f}{r.batch / min(r.times):>12.1f}"
                f"{r.seconds * 1e3:>10.0f}{spread:>16}{mem:>10}{r.gflops:>10.1f}")
        if ceiling:
            line += f"{100 * r.gflops / ceiling:>11.0f}%"
        lines.append(line)
    by_name = {r.name: r for r in results}
    if "ours" in by_name and "timm" in by_name:
        lines.append("ours / timm speed: " + ", ".join(
            f"{v:.2f}x {k}" for k, v in speed_ratios(by_name["ours"], by_name["timm"]).items()))
    if ceiling:
        lines.append(f"ceiling: {precision} 2048x2048 matmul, {ceiling:.0f} GFLOP/s")
    if mem_method:
        lines.append(f"peak memory: {mem_method}, one step, above what was live before it")
    lines.append("GFLOP/s: convolution and matmul FLOPs (torch.utils.flop_counter) of the model,"
                 " x3 for a training step, at the median step time")
    return "\n".join(lines)

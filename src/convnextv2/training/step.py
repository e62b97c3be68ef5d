"""Mixed precision and gradient accumulation around any ``loss.backward()`` loop.

``AccumulatingStep`` turns micro-batch losses into optimizer steps: it divides each loss by
``accum_steps``, skips DDP's gradient all-reduce on all but the last micro-batch, and on the
last one unscales (fp16), clips (optional), steps and zeroes the gradients. bf16 autocast needs
no loss scaling; fp16 (CUDA only) uses a ``GradScaler``.
"""
from __future__ import annotations

import contextlib

import torch

AMP_MODES = ("none", "bf16", "fp16")


def autocast(device: torch.device, amp: str = "none"):
    """The autocast context for ``amp`` on ``device`` (a no-op context for ``"none"``)."""
    if amp not in AMP_MODES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_amp(amp: str, device: torch.device) -> None:
    if amp not in AMP_MODES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device (its loss scaling is GPU-only); "
                         "use --amp bf16 on the CPU")


class AccumulatingStep:
    """One optimizer step per ``accum_steps`` calls of ``backward``.

    Usage per micro-batch::

        with stepper.micro_batch():          # autocast (+ DDP no_sync unless last)
            loss = model(batch)
        stepped = stepper.backward(loss)     # True when the optimizer stepped
    """

    def __init__(self, model: torch.nn.Module, optimizer, *, accum_steps: int = 1,
                 amp: str = "none", device: torch.device | None = None,
                 clip_grad: float | None = None):
        if accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
        self.device = device or torch.device("cpu")
        check_amp(amp, self.device)
        self.model, self.optimizer = model, optimizer
        self.accum_steps, self.amp, self.clip_grad = int(accum_steps), amp, clip_grad
        self.scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
        self.micro = 0  # micro-batches accumulated toward the next step
        self.last_grad_norm: float | None = None

    @property
    def is_last_micro(self) -> bool:
        return self.micro == self.accum_steps - 1

    @contextlib.contextmanager
    def micro_batch(self):
        sync = contextlib.nullcontext()
        if not self.is_last_micro and hasattr(self.model, "no_sync"):
            sync = self.model.no_sync()
        with sync, autocast(self.device, self.amp):
            yield

    def backward(self, loss: torch.Tensor) -> bool:
        loss = loss / self.accum_steps
        sync = contextlib.nullcontext()
        if not self.is_last_micro and hasattr(self.model, "no_sync"):
            sync = self.model.no_sync()
        with sync:
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
        self.micro += 1
        if self.micro < self.accum_steps:
            return False
        self.micro = 0
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.clip_grad))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

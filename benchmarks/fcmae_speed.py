"""FCMAE training-step throughput: sparse vs masked-dense backend, and vs an unmasked dense step.

One training step = forward + backward + AdamW step. The sparse and dense FCMAE start from the
same weights (deepcopy) and see the same images and masks; the encoder-only step runs the plain
dense encoder on unmasked images (forward_features, a trivial loss, AdamW). The three are timed
in turns inside one process (one step each per repeat) and the median is reported, so that
load from other processes on a shared machine hits all of them alike.

    python benchmarks/fcmae_speed.py --model convnextv2_atto --batch 32
    python benchmarks/fcmae_speed.py --model convnextv2_tiny --batch 8
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from tqdm import tqdm

from convnextv2 import create_model
from convnextv2.fcmae.fcmae import FCMAE
from convnextv2.fcmae.masking import random_mask


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="convnextv2_atto")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--repeats", type=int, default=7, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--skip-encoder-only", action="store_true",
                   help="leave out the unmasked dense encoder-only step")
    p.add_argument("--also-channels-last", action="store_true",
                   help="also time the dense variants fed channels-last images (NHWC memory)")
    return p.parse_args(argv)


def make_fcmae_step(model, opt, imgs, masks):
    def step(i):
        loss, _, _ = model(imgs, masks[i % len(masks)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def make_encoder_step(encoder, opt, imgs):
    def step(i):
        loss = encoder.forward_features(imgs).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    sparse = FCMAE(args.model, mask_ratio=args.mask_ratio, backend="sparse").to(device)
    dense = copy.deepcopy(sparse).set_backend("dense")
    imgs = torch.randn(args.batch, sparse.in_chans, args.img_size, args.img_size, device=device)
    gen = torch.Generator().manual_seed(1)
    grid = sparse.grid_size(imgs)
    masks = [random_mask(args.batch, grid, args.mask_ratio, generator=gen, device=device)
             for _ in range(args.warmup + args.repeats)]
    # the fused AdamW kernel for all three: the optimizer is the same work in each variant
    adamw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    steps = {
        "sparse FCMAE": make_fcmae_step(sparse, torch.optim.AdamW(sparse.parameters(), **adamw), imgs, masks),
        "dense FCMAE": make_fcmae_step(dense, torch.optim.AdamW(dense.parameters(), **adamw), imgs, masks),
    }
    if not args.skip_encoder_only:
        encoder = create_model(args.model, num_classes=0).to(device)
        encoder.load_state_dict(sparse.encoder.state_dict())
        steps["dense encoder, unmasked"] = make_encoder_step(
            encoder, torch.optim.AdamW(encoder.parameters(), **adamw), imgs)
    if args.also_channels_last:
        imgs_cl = imgs.contiguous(memory_format=torch.channels_last)
        dense_cl = copy.deepcopy(dense)
        steps["dense FCMAE, NHWC"] = make_fcmae_step(
            dense_cl, torch.optim.AdamW(dense_cl.parameters(), **adamw), imgs_cl, masks)
        if not args.skip_encoder_only:
            encoder_cl = copy.deepcopy(encoder)
            steps["dense encoder, unmasked, NHWC"] = make_encoder_step(
                encoder_cl, torch.optim.AdamW(encoder_cl.parameters(), **adamw), imgs_cl)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {name: [] for name in steps}
    for r in tqdm(range(args.warmup + args.repeats), desc="steps", leave=False):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step(r)
            sync()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    print(f"model {args.model}, batch {args.batch}, {args.img_size} px, mask ratio "
          f"{args.mask_ratio} ({int(masks[0][0].eq(0).sum())}/{masks[0].shape[1]} patches visible), "
          f"device {args.device}, threads {torch.get_num_threads()}, repeats {args.repeats}")
    rate = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rate[name] = args.batch / med
        print(f"  {name:30s} {med * 1000:9.1f} ms/step  {rate[name]:8.1f} img/s  "
              f"(min {min(ts) * 1000:.1f}, max {max(ts) * 1000:.1f} ms)")
    for name in rate:
        if name != "sparse FCMAE":
            print(f"  sparse FCMAE step / {name + ' step:':38s} {rate['sparse FCMAE'] / rate[name]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

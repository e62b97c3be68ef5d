"""Weighted k-nearest-neighbour classification of frozen features (DINO's k-NN evaluation).

A probe of what an encoder has learnt that needs no training: every query image takes the
classes of its ``k`` most similar bank images, each vote weighted by ``exp(cos / T)``, as in
DINO's ``eval_knn.py`` (Caron et al. 2021: k = 20, T = 0.07, L2-normalised features). The
features are the encoder's last-stage map averaged over space (the pooled features a
classifier head would see, before its norm: FCMAE never trains that norm).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

K, TEMPERATURE = 20, 0.07  # DINO's k-NN evaluation


@torch.no_grad()
def pooled_features(encoder: nn.Module, loader, device, amp: str = "none"):
    """``(features, labels)`` of every ``(image, label, ...)`` batch of ``loader``: the
    global average of the encoder's last feature map, float32 on the CPU. Eval mode (the
    caller's mode is put back)."""
    from ..training.step import autocast

    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        for batch in loader:
            images = batch[0].to(device, non_blocking=True)
            with autocast(torch.device(device), amp or "none"):
                fmap = encoder.forward_features(images)
            feats.append(fmap.float().mean(dim=(2, 3)).cpu())
            labels.append(torch.as_tensor(batch[1]).cpu())
    finally:
        encoder.train(was_training)
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels).long()


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
                num_classes: int, k: int = K, temperature: float = TEMPERATURE,
                chunk: int = 256) -> torch.Tensor:
    """Class scores ``(queries, num_classes)``: the summed ``exp(cos / T)`` weights of each
    query's ``k`` nearest bank features (cosine similarity; ``k`` capped at the bank size)."""
    if len(bank) == 0:
        raise ValueError("the k-NN bank is empty")
    k = min(k, len(bank))
    bank = F.normalize(bank.double(), dim=1)
    scores = []
    for start in range(0, len(queries), chunk):
        q = F.normalize(queries[start:start + chunk].double(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp()
        votes = torch.zeros(len(q), num_classes, dtype=torch.float64)
        votes.scatter_add_(1, bank_labels[idx], weights)
        scores.append(votes)
    return torch.cat(scores) if scores else torch.zeros(0, num_classes, dtype=torch.float64)


def knn_hits(scores: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(top-1 hits, top-5 hits) of class ``scores`` against ``labels`` (top-min(5, classes))."""
    if len(labels) == 0:
        return 0, 0
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())

"""Linear probe and k-NN on frozen features; a short full fine-tune of a timm ViT."""

from __future__ import annotations

import copy

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from moce_ds.evaluation.encoders import to_tensor
from moce_ds.model.device import autocast, inference, resolve_device

__all__ = ["linear_probe", "knn", "finetune"]


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 c: float = 1.0) -> float:
    """Multinomial logistic regression on standardised features -> top-1 accuracy on the test split."""
    scaler = StandardScaler().fit(train_x)
    clf = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(train_x), train_y)
    return float((clf.predict(scaler.transform(test_x)) == test_y).mean())


def knn(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, k: int = 20,
        temperature: float = 0.07) -> float:
    """Cosine k-NN with temperature-weighted votes (as in DINO) -> top-1 accuracy."""
    mean = torch.from_numpy(train_x).float().mean(0, keepdim=True)  # centre: MAE features share a large mean
    tr = torch.nn.functional.normalize(torch.from_numpy(train_x).float() - mean, dim=1)
    te = torch.nn.functional.normalize(torch.from_numpy(test_x).float() - mean, dim=1)
    sim, idx = (te @ tr.T).topk(min(k, len(tr)), dim=1)  # (Nte, k)
    labels = torch.from_numpy(train_y)[idx]
    votes = torch.zeros(len(te), int(train_y.max()) + 1).scatter_add_(1, labels, (sim / temperature).exp())
    return float((votes.argmax(1).numpy() == test_y).mean())


def finetune(vit: nn.Module, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
             epochs: int = 10, lr: float = 5e-4, batch_size: int = 64, seed: int = 0,
             device: str | torch.device | None = None) -> float:
    """Short full fine-tune (AdamW, cosine, random flips) of a copy of `vit` with a new head -> top-1.

    ``device`` (default CPU; "auto": the GPU when there is one): fp32 weights there, bf16 autocast on CUDA; the
    images stay uint8 on the host and each batch is normalised on the device."""
    dev = resolve_device(device)
    torch.manual_seed(seed)
    model = copy.deepcopy(vit)
    model.reset_classifier(int(max(train_y.max(), test_y.max())) + 1, global_pool="avg")
    model.to(dev).train()
    x, y = train_x, torch.from_numpy(train_y)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * max(1, len(x) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x) - batch_size + 1 if len(x) >= batch_size else 1, batch_size):
            b = order[i: i + batch_size]
            xb = to_tensor(x[b.numpy()], device=dev)  # (B, 3, S, S) float32, normalised on the device
            flip = (torch.rand(len(b)) < 0.5).to(dev)
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            with autocast(dev):
                logits = model(xb)
            loss = nn.functional.cross_entropy(logits.float(), y[b].to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with inference(dev):
        pred = torch.cat([model(to_tensor(test_x[i: i + 256], device=dev)).argmax(1).cpu()
                          for i in range(0, len(test_x), 256)])
    return float((pred.numpy() == test_y).mean())

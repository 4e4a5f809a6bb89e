"""Datasets for tft2v: the synthetic Shapes world (the default), loaders for a user's own folders,
and video / image file I/O."""

import torch


def fetch_batch(dataset, indices):
    """Items `indices` of a dataset of ((3, F, H, W), caption) pairs
    -> ((B, 3, F, H, W), captions).
    A dataset with a vectorised `batch` (the Shapes world renders a batch at once) uses it;
    others are read item by item."""
    if hasattr(dataset, "batch"):
        return dataset.batch(indices)
    items = [dataset[i] for i in indices]
    return torch.stack([x for x, _ in items]), [c for _, c in items]

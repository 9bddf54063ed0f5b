"""The examples a smoke run keeps (``--limit-train N``, ``--limit-val N``): a seeded sample, not the
first N, which in a layout sorted by class (an image folder, MNIST-5k) are one class and make a
metric look converged when nothing was learned.

Where a data set says each example's class without loading it (``targets``: ``ImageFolder``'s
list, a ``SequenceSet``'s (S,) tensor, GLUE's classification labels) the sample is stratified: each
class keeps its share of the N. Elsewhere (detection, segmentation, per-token targets, scores) it
is a seeded random sample. The indices depend on the seed, the split and the data alone: every
process of a run and every resume of it keep the same examples.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

STRATIFIED = "stratified"  # each class its share, a seeded sample within each
RANDOM = "random"  # a seeded sample of the whole split


def class_labels(dataset: Dataset) -> np.ndarray | None:
    """Each example's class (S,) int, where the data set holds them (``targets``) without loading an
    example; None where it holds none, or per-token or real-valued targets."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    labels = targets.numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    if labels.ndim != 1 or len(labels) != len(dataset) or not np.issubdtype(labels.dtype, np.integer):
        return None
    return labels


def stratified_indices(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices, each class's count its share of ``n`` (largest remainders, ties drawn by
    ``rng``), a random sample within each class; sorted."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    share = counts * n / len(labels)
    take = np.floor(share).astype(int)
    order = rng.permutation(len(counts))  # ties among equal remainders: drawn, not the lowest class
    extra = order[np.argsort(-(share - take)[order], kind="stable")[: n - take.sum()]]
    take[extra] += 1
    picks = [rng.permutation(np.flatnonzero(inverse == c))[:k] for c, k in enumerate(take)]
    return np.sort(np.concatenate(picks))


def smoke_subset(dataset: Dataset, n: int | None, seed: int, split: str) -> tuple[Dataset, str]:
    """``dataset`` cut to ``n`` examples and the rule that chose them (``STRATIFIED`` or ``RANDOM``);
    all of it and "" when ``n`` is None or not below its size. ``split`` ("train", "val", a named
    evaluation split) gives each split a sample of its own from the run's ``seed``."""
    if n is None or n >= len(dataset):
        return dataset, ""
    rng = np.random.default_rng([seed, *split.encode()])
    labels = class_labels(dataset)
    if labels is not None:
        return Subset(dataset, stratified_indices(labels, n, rng).tolist()), STRATIFIED
    return Subset(dataset, np.sort(rng.choice(len(dataset), n, replace=False)).tolist()), RANDOM

"""Resumable data-parallel batch sampling and collation (torch only, no megatron import).

The datasets from ``build_datasets`` are already shuffled (by seed) and sized for the whole run, so
the sampler walks them in order, like Megatron's ``MegatronPretrainingSampler``: global batch ``g``
is indices ``[g*G, (g+1)*G)`` with ``G = micro_batch * dp_size``, and data-parallel rank ``r`` takes
``[g*G + r*micro_batch, g*G + (r+1)*micro_batch)``. Position = ``consumed_samples`` (global samples
consumed so far, saved in the checkpoint), so a resumed run continues at exactly the next sample.
Changing ``dp_size`` or ``micro_batch`` on resume still works: the position is counted in samples.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch


class ResumableBatchSampler:
    """Yields this rank's micro-batches of sample indices, starting at ``consumed_samples``.

    Usable as ``torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)``.
    Only whole global batches are yielded (the tail shorter than ``micro_batch * dp_size`` is dropped)
    so that every rank always sees the same number of equal-sized micro-batches.
    """

    def __init__(self, total_samples: int, micro_batch: int, dp_rank: int = 0, dp_size: int = 1,
                 consumed_samples: int = 0) -> None:
        if total_samples < 0 or micro_batch < 1 or dp_size < 1:
            raise ValueError(f"ResumableBatchSampler: need total_samples >= 0, micro_batch >= 1, dp_size >= 1 "
                             f"(got {total_samples}, {micro_batch}, {dp_size})")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"ResumableBatchSampler: dp_rank={dp_rank} not in [0, dp_size={dp_size})")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(
                f"ResumableBatchSampler: consumed_samples={consumed_samples} is outside the dataset's "
                f"{total_samples} samples; the checkpoint was written by a longer run: build the datasets "
                f"with at least as many train samples (steps x global batch) as that run"
            )
        self.total_samples = total_samples
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.dp_size

    def __len__(self) -> int:
        """Micro-batches this rank will still yield."""
        return (self.total_samples - self.consumed_samples) // self.global_batch

    def __iter__(self) -> Iterator[list[int]]:
        g, mb = self.global_batch, self.micro_batch
        for base in range(self.consumed_samples, self.total_samples - g + 1, g):
            first = base + self.dp_rank * mb
            yield list(range(first, first + mb))


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack GPTDataset samples into a micro-batch.

    Returns tokens [b, s] int64, labels [b, s] int64 (tokens shifted left by one), loss_mask [b, s]
    float32, position_ids [b, s] int64, and dataset_id [b] int64 when the samples come from a blend.
    """
    if not samples:
        raise ValueError("collate: empty micro-batch")
    out = {
        "tokens": torch.stack([torch.as_tensor(s["tokens"]) for s in samples]).long(),
        "labels": torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long(),
        "loss_mask": torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples]).float(),
        "position_ids": torch.stack([torch.as_tensor(s["position_ids"]) for s in samples]).long(),
    }
    if all("dataset_id" in s for s in samples):
        out["dataset_id"] = torch.as_tensor(np.asarray([int(s["dataset_id"]) for s in samples]), dtype=torch.long)
    return out

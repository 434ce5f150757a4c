"""Frozen outputs of the training images, computed once per stage and looked up by item index.

Every step of a tokenizer stage runs networks on its images that nothing it trains can change: the frozen
encoder of stage 1 (its features), the frozen encoder and adapter of stage 3 (the latent itself), the
frozen stage-1 tokenizer of L_sp in stage 2 (z_ref) and VA-VAE's foundation encoder (the VF loss's target).
On a dataset with random access these outputs are computed once for the whole training split, in fixed
batches in index order (so a fresh run and a resumed one get the same values), kept on the training device,
and looked up by the batch's `index`. Kept only where that pays and fits:

- the stage reads the split at least READS_TO_PAY times over: on emoji32 at one thread the single pass
  paid for itself after 355 / 250 / 226 steps of stages 1 / 2 / 3 (1.7 / 1.2 / 1.1 reads of the split;
  benchmarks/frozen_outputs.py), the pass being slower per image than the steps it saves;
- all of it fits in `MAX_BYTES` (emoji's stage-1 features at 32 px: 96 MB in bf16);
- not under FSDP2, whose sharded parameters only exist inside the wrapped forward;
- not for streamed shard folders, which have no random access.

The values are the ones a step would compute, up to the rounding that a different batch composition gives
some kernels (as a change of thread count does). docs/training.md, "Frozen outputs", has what it saves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from aligntok import distributed
from aligntok.data.shards import ShardDataset

MAX_BYTES = 2 * 2**30
READS_TO_PAY = 2
BATCH = 64


class FrozenOutputs:
    """`fn`'s output for every training image, (N, ...) on the training device, indexed by item index."""

    def __init__(self, values: Tensor) -> None:
        self.values = values

    def __getitem__(self, index: Tensor) -> Tensor:
        return self.values[index.to(self.values.device)]

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()


def worth_caching(dataset: Dataset, images_read: int, *, sharded: bool) -> bool:
    """Whether a stage that reads `images_read` images of `dataset` should cache frozen outputs (before the
    size check, which needs one batch computed)."""
    if sharded or isinstance(dataset, (ShardDataset, torch.utils.data.IterableDataset)):
        return False
    return images_read >= READS_TO_PAY * len(dataset)


@torch.no_grad()
def compute_frozen(
    fn: Callable[[Tensor], Tensor], dataset: Dataset, *, bf16: bool, desc: str
) -> FrozenOutputs | None:
    """`fn(images)` for every item of `dataset`, in batches of BATCH in index order under the training
    precision; None when the whole would exceed MAX_BYTES (seen from the first batch)."""
    device = distributed.device()
    n = len(dataset)
    out: Tensor | None = None
    bar = tqdm(total=n, desc=desc, disable=not distributed.world().is_main, dynamic_ncols=True)
    for lo in range(0, n, BATCH):
        images = torch.stack([dataset[i]["image"] for i in range(lo, min(lo + BATCH, n))]).to(device)
        with distributed.autocast(bf16):
            values = fn(images)
        if out is None:
            if values[0].numel() * values.element_size() * n > MAX_BYTES:
                bar.close()
                return None
            out = torch.empty((n, *values.shape[1:]), dtype=values.dtype, device=device)
        out[lo : lo + len(values)] = values
        bar.update(len(values))
    bar.close()
    assert out is not None
    return FrozenOutputs(out)

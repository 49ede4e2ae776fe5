"""The run's random streams. Reproducibility rests on one rule: every random choice is a pure function of the
run seed and *where* in the run it happens, never of what ran before in the process:

    data order        AspectRatioGroupedBatches.epoch_batches(epoch)        seeded by (seed, epoch)
    augmentation      CocoDataset(augment_seed=...) + set_epoch(epoch)      seeded by (seed, epoch, image index)
    model sampling    one generator per image                               seeded by (seed, iteration, position
                                                                            of the image in the GLOBAL batch)
    anything else     torch.manual_seed(...) before each step               seeded by (seed, iteration)

So a resumed run replays exactly what an uninterrupted run would have done from the checkpoint's
iteration on, and N processes with B images each sample exactly what one process with N*B images does.
"""

from __future__ import annotations

import torch

from ..data.augment import derive_seed

# Independent random streams derived from the one run seed (see the module docstring).
_DATA_ORDER, _AUGMENT, _SAMPLING, _STEP, _INIT = 1, 2, 3, 4, 5


def sampling_generators(seed: int, iteration: int, positions: range, device: torch.device) -> list[torch.Generator]:
    """One generator per image, keyed by the image's position in the global batch (not in this process's
    slice), so splitting the batch across processes changes nothing."""
    out = []
    for position in positions:
        g = torch.Generator(device=device)
        g.manual_seed(derive_seed(seed, _SAMPLING, iteration, position))
        out.append(g)
    return out

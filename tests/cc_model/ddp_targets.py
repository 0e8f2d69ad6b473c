"""Functions that torch.multiprocessing.spawn starts in the data-parallel tests.

Their own module, importing no conftest: a spawned process imports the module of its target by
name, and ``conftest`` can name another folder's conftest on the path the process inherits.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cc_model.training import Ranks


class _Weights(torch.nn.Module):
    """The trainable side of a model, as TrainingState sees it."""

    def __init__(self, value: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((3,), value))

    def trainable_named_parameters(self):
        return dict(self.named_parameters())


def save_with_weights_of_rank(rank: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    from cc_model.training import Resumed, TrainingState

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = _Weights(float(rank))  # what a broken data-parallel step leaves: each process its own weights
        optimizer = torch.optim.AdamW(model.parameters())
        TrainingState(Path(folder), "key", Ranks(rank, 2)).save(model, optimizer, torch.Generator(),
                                                                 Resumed(1, 0, 1, [{"total": 1.0}]))
    finally:
        dist.destroy_process_group()

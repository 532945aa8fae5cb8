"""How a module names the checkpoint tensors it consumes and where each one goes."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LoadTarget:
    """Where one checkpoint tensor goes: `param[index]`, after taking this rank's slice of `shard_dim`.

    `shard` = (i, n) takes slice i of n instead of this rank's of tp_size (KV heads replicated on
    groups of ranks when there are fewer of them than ranks)."""

    param: torch.Tensor
    index: tuple = ()
    shard_dim: int | None = None
    shard: tuple[int, int] | None = None

    def destination(self) -> torch.Tensor:
        return self.param[self.index] if self.index else self.param


# A load target of None: a tensor of the checkpoint another rank loads (an expert-parallel rank's
# experts); skipped here.
ANOTHER_RANK = None


class CheckpointModule(nn.Module):
    """A module that names the checkpoint tensors it consumes (relative to its own prefix)."""

    def load_targets(self) -> dict[str, LoadTarget]:
        targets: dict[str, LoadTarget] = {}
        for name, child in self.named_children():
            if isinstance(child, CheckpointModule):
                targets.update({f"{name}.{k}": v for k, v in child.load_targets().items()})
            elif isinstance(child, nn.ModuleList):
                for i, sub in enumerate(child):
                    if isinstance(sub, CheckpointModule):
                        targets.update({f"{name}.{i}.{k}": v for k, v in sub.load_targets().items()})
        return targets

    def post_load(self) -> None:
        """Repack weights once loading is complete (recursively)."""
        for child in self.children():
            if isinstance(child, CheckpointModule):
                child.post_load()
            elif isinstance(child, nn.ModuleList):
                for sub in child:
                    if isinstance(sub, CheckpointModule):
                        sub.post_load()


def prefixed(prefix: str, targets: dict[str, LoadTarget]) -> dict[str, LoadTarget]:
    return {f"{prefix}.{k}": v for k, v in targets.items()}

"""Helpers for tests/test_scaleout.py that also run inside CLI subprocesses (class_path
`scaleout_helpers.StepRecorder` with tests/ on PYTHONPATH)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import lightning as L
import torch
from torch.distributed.tensor import DTensor


class StepRecorder(L.Callback):
    """One JSON line per finished training batch in `{path}.rank{R}.jsonl`: the global step
    after it, whether it was skipped, the loss averaged over ranks (the global batch's loss:
    every rank's share has the same size), how many parameter elements this rank stores versus
    the model's total, and the sum of this rank's parameter values (to see whether they moved)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        params = list(pl_module.parameters())
        local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
        loss = trainer.strategy.reduce(outputs["loss"].detach().clone(), reduce_op="mean").item()
        record = {"step": trainer.global_step, "skipped": not math.isfinite(loss),  # nan_policy "skip"
                  "local_params": sum(p.numel() for p in local), "params": sum(p.numel() for p in params),
                  "param_sum": sum(p.double().sum().item() for p in local)}
        if math.isfinite(loss):
            record["loss"] = loss
        with open(f"{self.path}.rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def read_steps(path: str, rank: int = 0) -> list[dict[str, Any]]:
    file = f"{path}.rank{rank}.jsonl"
    if not os.path.exists(file):
        return []
    with open(file) as f:
        return [json.loads(line) for line in f]


class InjectNaN(L.Callback):
    """Sets one router gate weight of layer `layer` to NaN before training step `at_step`
    (on rank `rank` only), so that step's loss is NaN."""

    def __init__(self, at_step: int, layer: int = 1, rank: int = 0):
        self.at_step, self.layer, self.rank = at_step, layer, rank
        self._saved: torch.Tensor | None = None
        self._done = False  # a skipped step does not advance global_step: inject only once

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        weight = pl_module.model.blocks[self.layer].mlp.router.gate.weight
        weight = weight.to_local() if isinstance(weight, DTensor) else weight  # FSDP2: this rank's shard
        if trainer.global_step == self.at_step and not self._done:
            self._done = True
            if trainer.global_rank == self.rank:
                with torch.no_grad():
                    self._saved = weight.detach().clone()
                    weight.view(-1)[0] = float("nan")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._saved is not None:  # one bad step only: restore the weight
            weight = pl_module.model.blocks[self.layer].mlp.router.gate.weight
            with torch.no_grad():
                (weight.to_local() if isinstance(weight, DTensor) else weight).copy_(self._saved)
            self._saved = None


def main(argv: list[str]) -> None:
    """`python -m torch.distributed.run --nproc_per_node 2 tests/scaleout_helpers.py ARGS -- ARGS ...`:
    one CLI fit per `--`-separated group, one after another in the same ranks (saves start-ups)."""
    import cli

    groups: list[list[str]] = [[]]
    for arg in argv:
        if arg == "--":
            groups.append([])
        else:
            groups[-1].append(arg)
    for args in groups:
        cli.main(["fit", *args])


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])

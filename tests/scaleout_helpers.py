"""Helpers for tests/test_scaleout.py that also run inside CLI subprocesses (class_path
`tests.scaleout_helpers.StepRecorder` with the repository on PYTHONPATH)."""

from __future__ import annotations

import json
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
        skipped = not outputs  # Lightning hands on an empty result for a skipped step
        record = {"step": trainer.global_step, "skipped": skipped, "local_params": sum(p.numel() for p in local),
                  "params": sum(p.numel() for p in params), "param_sum": sum(p.double().sum().item() for p in local)}
        if not skipped:
            loss = trainer.strategy.reduce(outputs["loss"].detach().clone(), reduce_op="mean")
            record["loss"] = loss.item()
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
        if trainer.global_step == self.at_step and trainer.global_rank == self.rank and not self._done:
            self._done = True
            with torch.no_grad():
                self._saved = weight.detach().clone()
                weight.view(-1)[0] = float("nan")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._saved is not None:  # one bad step only: restore the weight
            with torch.no_grad():
                pl_module.model.blocks[self.layer].mlp.router.gate.weight.copy_(self._saved)
            self._saved = None


def main(argv: list[str]) -> None:
    """`python -m torch.distributed.run --nproc_per_node 2 tests/scaleout_helpers.py FIT_ARGS -- RESUME_ARGS`:
    two CLI fits in the same ranks (a fit, then a resumed one), saving process start-ups."""
    import cli

    split = argv.index("--")
    cli.main(["fit", *argv[:split]])
    cli.main(["fit", *argv[split + 1:]])


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])

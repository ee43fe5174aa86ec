"""Continuations of a few fixed prompts during training, as MLflow text artifacts.

    trainer:
      callbacks:
        - class_path: callbacks.SampleCallback
          init_args: {every_n_steps: 500, max_new_tokens: 48}

Every `every_n_steps` optimizer steps (and at the end of fit) the model continues each prompt
(`lit_moe.generate`, KV cache; greedy unless temperature > 0, then seeded) and the MLflow run
gets `samples/stepNNNNNN.txt`. The tiny configs sample only at the end of fit (a few hundred
milliseconds). Under sharded strategies (FSDP) every rank decodes in lockstep (a forward needs
all of them); otherwise rank 0 decodes alone.
"""

from __future__ import annotations

import warnings

import lightning as L
from lightning.pytorch.callbacks import Callback

from callbacks.mlflow_utils import log_text_artifact
from lit_moe.errors import ConfigError

DEFAULT_PROMPTS = ("The city of", "In 1905, the", "The most important")


class SampleCallback(Callback):
    """Args:
        prompts: the prompts to continue (default: three short English openings).
        every_n_steps: also sample every N optimizer steps (default: only at the end of fit).
        max_new_tokens: tokens per continuation (capped below the model's seq_len).
        temperature, top_k, top_p, seed: sampling (temperature 0: greedy).
    """

    def __init__(self, prompts: list[str] | None = None, every_n_steps: int | None = None, max_new_tokens: int = 48,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0):
        from lit_moe.generate import Sampling

        if every_n_steps is not None and every_n_steps < 1:
            raise ConfigError(f"SampleCallback.every_n_steps must be ≥ 1 or null, got {every_n_steps}.")
        if max_new_tokens < 1:
            raise ConfigError(f"SampleCallback.max_new_tokens must be ≥ 1, got {max_new_tokens}.")
        self.prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
        if not self.prompts or not all(p for p in self.prompts):
            raise ConfigError("SampleCallback.prompts must be non-empty strings.")
        self.sampling = Sampling(temperature, top_k, top_p, seed)
        self.sampling.validate()
        self.every_n_steps, self.max_new_tokens = every_n_steps, max_new_tokens
        self.last: list[str] | None = None  # the latest continuations (on the ranks that decoded)
        self._last_step: int | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,  # noqa: ANN001
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_step:
            self.run(trainer, pl_module)

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[str] | None:
        from callbacks.core_eval import SHARDED_STRATEGIES

        self._last_step = step = trainer.global_step
        if not (trainer.is_global_zero or isinstance(trainer.strategy, SHARDED_STRATEGIES)):
            return None
        texts = self._sample(pl_module)
        if texts is None:
            return None
        self.last = texts
        body = "\n\n".join(f"### {prompt!r}\n{prompt}{text}" for prompt, text in zip(self.prompts, texts))
        log_text_artifact(trainer, f"step {step}\n\n{body}\n", f"samples/step{step:06d}.txt")
        return texts

    def _sample(self, pl_module: L.LightningModule) -> list[str] | None:
        import dataclasses

        from lit_moe.generate import generate_text
        from lit_moe.tokenizer import eot_id, tokenizer_from_json

        tokenizer_json = getattr(pl_module, "tokenizer_json", None)
        if not tokenizer_json:
            warnings.warn("SampleCallback: the module has no tokenizer (tokenizer_json); no samples.", stacklevel=2)
            return None
        model = pl_module.model
        was_training = model.training
        try:  # generate_text keeps the routers' statistics out of it
            tokenizer = tokenizer_from_json(tokenizer_json)
            max_new = min(self.max_new_tokens, model.cfg.seq_len // 2)
            return generate_text(model, tokenizer, self.prompts, max_new, dataclasses.replace(self.sampling),
                                 stop_token=eot_id(tokenizer))
        except Exception as err:  # noqa: BLE001 — samples are a convenience: never end the run for them
            warnings.warn(f"SampleCallback: sampling failed: {type(err).__name__}: {err}", stacklevel=2)
            return None
        finally:
            model.train(was_training)

"""Downstream evaluation through lm-evaluation-harness: CORE (METHODS §4).

- `evaluation.adapter.LitMoELM`: lm-eval model `lit_moe` (a checkpoint or an in-memory model).
- `evaluation.core`: CORE bundle reading, requests, scoring (`evaluate_core`), JSON/MLflow output.
- `evaluation.cli`: `python cli.py evaluate --ckpt_path ...`.
- `evaluation.report`: `python cli.py report --experiment NAME`: compare runs in the MLflow store.
- `python -m evaluation ...`: lm-eval's own CLI with `lit_moe` registered.

Names are imported lazily: `import evaluation` stays cheap (no torch, no lm-eval).
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {"LitMoELM": "evaluation.adapter", "evaluate_core": "evaluation.core", "DEFAULT_BUNDLE": "evaluation.core"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'evaluation' has no attribute {name!r}")

"""Plug-in Lightning callbacks for lit-moe runs."""

from callbacks.run_info import RunInfoCallback, TokenThroughputMonitor

__all__ = ["RunInfoCallback", "TokenThroughputMonitor"]

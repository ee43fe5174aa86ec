"""Plug-in Lightning callbacks for lit-moe runs."""

from callbacks.expert_budget import ExpertBudgetCallback
from callbacks.kappa_schedule import KappaScheduleCallback
from callbacks.mlflow_utils import MLflowRunLogger
from callbacks.routing_stats import RoutingStatsCallback
from callbacks.run_info import RunInfoCallback, TokenThroughputMonitor
from callbacks.sample import SampleCallback

__all__ = ["ExpertBudgetCallback", "KappaScheduleCallback", "MLflowRunLogger", "RoutingStatsCallback",
           "RunInfoCallback", "SampleCallback", "TokenThroughputMonitor"]

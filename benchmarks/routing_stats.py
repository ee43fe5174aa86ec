"""Step-time overhead of routing statistics on the tiny config (target: ≤ 3 %).

"off": training steps (forward + backward + AdamW) with every router's `record_metrics`
disabled. "on": the same steps counting, plus what RoutingStatsCallback adds per window and
per plot, amortised over the config's `window` and `plot_every`: the cross-rank reduction and
summaries (`window_ms`), and the load-share and active-expert plots as PNGs (`plot_ms`).
On and off steps alternate (on, off, off, on, ...) on the same model and batch, so load from
other processes hits both alike; each side's figure is the median of its steps.

On a busy machine the step-time difference is within noise, so the counting is also timed on
its own: `update_ms` is all layers' counter updates for one step's routing, replayed alone, and
`ratio_components` = (off + update + window/window + plot/plot_every) / off.

Prints one JSON line: {"on_ms", "off_ms", "ratio", "ratio_components", "update_ms", ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from callbacks import routing_plots
from lit_moe.model import ModelConfig, Transformer
from lit_moe.module import parameter_groups
from lit_moe.moe.routing_metrics import RoutingCounters, model_summary, reduced_counters, summarize

REPO = Path(__file__).resolve().parents[1]


def tiny_setup() -> tuple[ModelConfig, int, int]:
    """Model config of conf/tiny.yaml and its RoutingStatsCallback window and plot_every."""
    conf = yaml.safe_load((REPO / "conf" / "tiny.yaml").read_text())
    cfg = ModelConfig(**conf["model"]["config"], seq_len=conf["data"]["seq_len"], vocab_size=conf["data"]["vocab_size"])
    (stats,) = [c.get("init_args", {}) for c in conf["trainer"]["callbacks"]
                if c["class_path"].endswith("RoutingStatsCallback")]
    return cfg, int(stats.get("window", 50)), int(stats.get("plot_every", 500))


def close_window(routers: list) -> list[dict[str, float]]:
    """What the callback does at a window's end, minus handing metrics to the logger."""
    counters = reduced_counters(routers, "train")
    stats = [summarize(c) for c in counters]
    model_summary(counters, stats)
    return stats


def plot(routers: list, stats: list[dict[str, float]], out: Path) -> None:
    names = [f"layer_{i:02d}" for i in range(len(routers))]
    tokens = np.stack([r.metrics()["tokens"].cpu().numpy() for r in routers])
    routing_plots.load_share_heatmap(names, [("train", tokens)], "load share").savefig(out / "load_share.png", dpi=110)
    routing_plots.active_experts_chart(names, [s["active_mean"] for s in stats], [s["active_p95"] for s in stats],
                                       [s["active_max"] for s in stats], [2.0] * len(names),
                                       "active experts").savefig(out / "active_experts.png", dpi=110)


def update_replay(routers: list, tokens: int, d_model: int):
    """A function doing every router's counter update for one step's routing (same shapes)."""
    replays = []
    with torch.no_grad():
        for router in routers:
            logits = router.compute_logits(torch.randn(tokens, d_model))
            weights, assigned = router.route(logits)
            aux = {"load_balance": torch.tensor(1.0), "z_loss": torch.tensor(1.0)}
            replays.append((RoutingCounters(router.num_experts, "cpu"), logits, weights, assigned, aux))

    def run() -> None:
        for counters, logits, weights, assigned, aux in replays:
            counters.update(logits, weights, assigned, aux)

    return run


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side (on / off)")
    parser.add_argument("--batch_size", type=int, default=8, help="conf/tiny.yaml trains with 16")
    parser.add_argument("--threads", type=int, help="torch threads (1 is steadier on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as LitMoE does on CPU
    torch.manual_seed(0)
    cfg, window, plot_every = tiny_setup()
    model = Transformer(cfg)
    routers = [router for _, router in model.routers()]
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-3)
    batch = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.seq_len + 1))

    def step(record: bool) -> float:
        for router in routers:
            router.record_metrics = record
        start = time.perf_counter()
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        (loss + model.weighted_aux_loss()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(True), step(False)  # warm-up
    on, off = [], []
    for i in range(2 * args.steps):  # alternate, starting side swapped every pair
        record = (i % 2 == 0) == (i // 2 % 2 == 0)
        (on if record else off).append(step(record))
    counting_ms, off_ms = 1e3 * statistics.median(on), 1e3 * statistics.median(off)
    window_ms = median_ms(lambda: close_window(routers), 20)
    step(True)
    stats = close_window(routers)
    with tempfile.TemporaryDirectory() as tmp:
        plot_ms = median_ms(lambda: plot(routers, stats, Path(tmp)), 3)
    update_ms = median_ms(update_replay(routers, args.batch_size * cfg.seq_len, cfg.d_model), 50)
    per_step_extra = window_ms / window + plot_ms / plot_every
    on_ms = counting_ms + per_step_extra
    print(json.dumps({"config": "conf/tiny.yaml", "batch_size": args.batch_size, "steps_per_side": args.steps,
                      "on_ms": round(on_ms, 2), "off_ms": round(off_ms, 2), "ratio": round(on_ms / off_ms, 4),
                      "ratio_components": round((off_ms + update_ms + per_step_extra) / off_ms, 4),
                      "update_ms": round(update_ms, 3), "window_ms": round(window_ms, 3),
                      "plot_ms": round(plot_ms, 1), "window": window, "plot_every": plot_every,
                      "threads": torch.get_num_threads(), "target": "<= 1.03"}), flush=True)


if __name__ == "__main__":
    main()

"""Scale-out and fault tolerance, end to end on CPU: FSDP2 over 2 processes (gloo) against one
process with the same global batch, sharded checkpoints loaded in one process, exact resume,
SIGTERM, atomic saves, NaN handling, and the errors for settings that cannot work.

One tiny model throughout (d=32, 2 layers, 4 experts, seq 32, 320-token vocabulary) with every
stateful part: SoftMoE router (α, θ as extra state) under a learned budget (η), κ-SwiGLU experts
(own optimizer group, U as extra state), ExpertBudgetCallback enforcing the budget (controller
state) and KappaScheduleCallback (schedule state). The load balancing loss is off (lb_weight 0)
because it is computed per rank, so with it 2 ranks and 1 process would optimise slightly
different losses.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import cli
from lit_moe.atomic import atomic_save
from lit_moe.checkpoint import check_compatible, read_metadata
from lit_moe.data import ResumableDataLoader, ResumableSampler, TokenWindows
from lit_moe.distributed import FSDP2Strategy
from lit_moe.errors import ConfigError
from lit_moe.model import ModelConfig
from lit_moe.module import LitMoE, load_checkpoint, parameter_groups
from lit_moe.rng import rng_state, set_rng_state
from scaleout_helpers import read_steps

REPO = Path(__file__).resolve().parents[1]
# tests/ on the path for the helper module; the repository for the packages.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
       "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}

CONFIG = """
seed_everything: 7
trainer:
  accelerator: cpu
  devices: 1
  max_steps: {max_steps}
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  val_check_interval: 4
  check_val_every_n_epoch: null
  limit_val_batches: 1
  limit_train_batches: 6        # epochs of 6 batches: an 8-step run crosses an epoch boundary
  gradient_clip_val: 1.0
  callbacks:
  - class_path: lightning.pytorch.callbacks.ModelCheckpoint
    init_args: {{dirpath: {ckpt}, filename: "{{step}}", every_n_train_steps: 4, save_top_k: -1, save_last: true}}
  - class_path: callbacks.ExpertBudgetCallback
    init_args: {{mode: enforce, control_every: 3, alpha_start: 2.0, alpha_end: 0.5}}
  - class_path: callbacks.KappaScheduleCallback
    init_args: {{warmup_fraction: 0.15}}
{extra_callbacks}
  - class_path: scaleout_helpers.StepRecorder
    init_args: {{path: {record}}}
model:
  lr: 1.0e-2
  warmup_steps: 2
  nan_policy: {nan_policy}
  config:
    d_model: 32
    n_layers: 2
    n_heads: 2
    num_experts: 4
    expert_hidden: 32
    router: {{class_path: lit_moe.moe.SoftTopKRouter, init_args: {{theta: 1.8, cap: 2.0, lb_weight: 0.0}}}}
    budget: {{total: 3.0, learnable: true}}
    experts: {{class_path: lit_moe.moe.KappaSwiGLUExperts,
              init_args: {{granularity: per_gate, lr_delay_steps: 2, lr_delay_fraction: 0.0, lr_warmup_steps: 4}}}}
data:
  train_files: train.jsonl
  val_files: val.jsonl
  seq_len: 32
  batch_size: 8
  vocab_size: 320
"""


def config(name: str, max_steps: int = 8, extra_callbacks: str = "", nan_policy: str = "stop") -> str:
    """Write `{name}.yaml` (checkpoints in ckpt_{name}/, step records {name}.rank*.jsonl)."""
    path = f"{name}.yaml"
    Path(path).write_text(CONFIG.format(max_steps=max_steps, ckpt=f"ckpt_{name}", record=name,
                                        extra_callbacks=extra_callbacks, nan_policy=nan_policy))
    return path


# A NaN in a router weight of layer 1 (on rank 0) for the batch after step 2.
NAN_AT_STEP_2 = """  - class_path: scaleout_helpers.InjectNaN
    init_args: {at_step: 2, layer: 1}"""


def losses(name: str, rank: int = 0) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_steps(name, rank) if not r["skipped"]}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A working directory with a tiny corpus; tests run the CLI inside it."""
    root = tmp_path_factory.mktemp("scaleout")
    for src, dst, count in (("train.jsonl.gz", "train.jsonl", 40), ("validation.jsonl.gz", "val.jsonl", 4)):
        with gzip.open(REPO / "data" / "wikipedia_en" / src, "rt", encoding="utf-8") as f, \
                open(root / dst, "w", encoding="utf-8") as out:
            for _, line in zip(range(count), f):
                out.write(json.dumps({"text": json.loads(line)["text"][:6000]}) + "\n")
    previous = os.getcwd()
    os.chdir(root)
    yield root
    os.chdir(previous)


@pytest.fixture(scope="module")
def single(work):
    """One process, batch 8, 8 steps, checkpoints at steps 4 and 8: the reference run."""
    cli.main(["fit", "--config", config("single")])
    return losses("single")


def test_exact_resume_continues_with_identical_losses(work, single):
    position = torch.load("ckpt_single/step=4.ckpt", weights_only=True)["loops"]["fit_loop"]["state_dict"]
    assert position["combined_loader"] == [{"epoch": 0, "windows_done": 4 * 8, "seed": 1234}]
    callbacks = torch.load("ckpt_single/step=4.ckpt", weights_only=True)["callbacks"]
    assert callbacks["ExpertBudgetCallback"]["active_steps"] == 1  # one step into a 3-step control window
    cli.main(["fit", "--config", config("resumed"), "--ckpt_path", "ckpt_single/step=4.ckpt"])
    resumed = losses("resumed")
    assert sorted(resumed) == [5, 6, 7, 8]  # steps 7, 8 are in the second epoch
    for step, loss in resumed.items():
        assert loss == pytest.approx(single[step], abs=1e-6), step


def test_fsdp2_two_processes_match_one_process_then_resume_and_evaluate(work, single, capsys):
    fsdp = ["--config", str(REPO / "conf" / "tiny.yaml")]  # the documented combination
    both = ["--config", str(REPO / "conf" / "fsdp.yaml"), "--data.batch_size", "4"]  # 2 × 4 = 8 per step
    # One torchrun launch runs the three fits in the same two ranks (saves process start-ups):
    # straight, resumed from step 4, and with a NaN at step 2 under nan_policy "skip".
    nan_skip = config("fsdp_nan", 4, NAN_AT_STEP_2, nan_policy="skip")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "tests" / "scaleout_helpers.py"),
         *fsdp, "--config", config("fsdp"), *both, "--",
         *fsdp, "--config", config("fsdp_resumed"), *both, "--ckpt_path", "ckpt_fsdp/step=4.ckpt", "--",
         *fsdp, "--config", nan_skip, *both],
        cwd=work, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    sharded = losses("fsdp")
    assert sorted(sharded) == list(range(1, 9))
    for step, loss in sharded.items():
        assert loss == pytest.approx(single[step], abs=1e-4), step
    # Each rank stores half of the parameters (up to padding of odd-sized dimensions).
    first = [read_steps("fsdp", rank)[0] for rank in (0, 1)]
    total = first[0]["params"]
    assert first[0]["local_params"] + first[1]["local_params"] >= total
    assert all(r["local_params"] <= 0.5 * total * 1.01 for r in first)
    # Resumed from the sharded step-4 checkpoint: the same losses as straight through.
    resumed = losses("fsdp_resumed")
    assert sorted(resumed) == [5, 6, 7, 8]
    for step, loss in resumed.items():
        assert loss == pytest.approx(sharded[step], abs=1e-6), step

    # NaN on rank 0 at step 2: both ranks skip that update together and go on.
    for rank in (0, 1):
        records = read_steps("fsdp_nan", rank)
        assert [(r["step"], r["skipped"]) for r in records] == [(1, False), (2, False), (3, True), (4, False)]
        assert records[2]["param_sum"] == records[1]["param_sum"] != records[3]["param_sum"]

    # Sharded checkpoints: `last.ckpt` is a link to a complete directory; replaced ones are gone.
    ckpt = Path("ckpt_fsdp")
    assert (ckpt / "last.ckpt").is_symlink() and (ckpt / "last.ckpt" / "meta.pt").is_file()
    links = [p for p in ckpt.iterdir() if p.is_symlink()]
    assert sorted(p.name for p in links) == ["last.ckpt", "step=4.ckpt", "step=8.ckpt"]
    assert len([p for p in ckpt.iterdir() if p.is_dir() and not p.is_symlink()]) == len(links)

    # One process reads the sharded checkpoint: the same weights as the single-process run.
    module, tokenizer = load_checkpoint("ckpt_fsdp/step=8.ckpt")
    reference, _ = load_checkpoint("ckpt_single/step=8.ckpt")
    assert tokenizer.get_vocab_size() <= module.model.cfg.vocab_size
    ours, theirs = module.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-4, rtol=0, msg=name)
    cli.main(["evaluate", "--ckpt_path", "ckpt_fsdp/last.ckpt", "--tasks", "copa", "--limit", "4", "--quiet",
              "--output", "core.json"])
    assert json.loads(Path("core.json").read_text())["tasks"]["copa"]["n"] == 4
    cli.main(["validate", "--config", "single.yaml", "--ckpt_path", "ckpt_fsdp/step=8.ckpt"])
    err = _cli_error(["validate", "--config", "single.yaml", "--ckpt_path", "ckpt_fsdp/step=8.ckpt",
                      "--model.config.d_model", "64"], capsys)
    assert "d_model: 32 in the checkpoint, 64 here" in err

    # A sharded checkpoint of another shape is refused naming the parameter and the setting.
    other = LitMoE(ModelConfig(**{**vars(module.config), "num_experts": 8}))
    with pytest.raises(ConfigError, match=r"num_experts: 4 in the checkpoint, 8 here") as err:
        check_compatible(read_metadata("ckpt_fsdp/step=8.ckpt"), other, "ckpt_fsdp/step=8.ckpt")
    assert "[4, 32" in str(err.value) and "[8, 32" in str(err.value)


def test_sigterm_during_fit_leaves_a_resumable_checkpoint(work):
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "fit", "--config", config("sigterm", 10_000)],
                            cwd=work, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(read_steps("sigterm")) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    last = "ckpt_sigterm/last.ckpt"
    steps_done = read_steps("sigterm")[-1]["step"]
    assert torch.load(last, weights_only=True)["global_step"] == steps_done  # stopped at a step boundary
    module, _ = load_checkpoint(last)
    assert all(torch.isfinite(p).all() for p in module.parameters())
    cli.main(["fit", "--config", "sigterm.yaml", "--ckpt_path", "last", "--trainer.max_steps", str(steps_done + 2)])
    assert [r["step"] for r in read_steps("sigterm")][-2:] == [steps_done + 1, steps_done + 2]


def test_process_killed_while_saving_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_save({"step": 1}, path)
    # A child process starts replacing it and dies (SIGKILL-like: no cleanup) half way.
    script = ("import os, sys, torch, lit_moe.atomic as a\n"
              "def half(obj, f): f.write(b'PK\\x03\\x04 half a checkpoint'); f.flush(); os._exit(9)\n"
              "a.torch.save = half\n"
              "a.atomic_save({'step': 2}, sys.argv[1])\n")
    proc = subprocess.run([sys.executable, "-c", script, str(path)], env=ENV, capture_output=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert torch.load(path, weights_only=True) == {"step": 1}
    atomic_save({"step": 3}, path)
    assert torch.load(path, weights_only=True) == {"step": 3}


def test_sharded_save_switches_the_link_only_when_complete(tmp_path, monkeypatch):
    import lightning.pytorch.strategies.model_parallel as mp

    def write_shards(state, path):
        (path / "__0_0.distcp").write_bytes(b"shard")

    strategy = FSDP2Strategy()  # no process group: broadcast and barrier are no-ops
    monkeypatch.setattr(mp, "_distributed_checkpoint_save", write_shards)
    link = tmp_path / "last.ckpt"
    strategy.save_checkpoint({"state_dict": {}, "global_step": 4}, link)
    first = link.resolve()
    assert (link / "meta.pt").is_file() and torch.load(link / "meta.pt", weights_only=True)["global_step"] == 4

    def die_half_way(state, path):
        (path / "__0_0.distcp").write_bytes(b"sh")
        raise KeyboardInterrupt  # killed while writing the shards

    monkeypatch.setattr(mp, "_distributed_checkpoint_save", die_half_way)
    with pytest.raises(KeyboardInterrupt):
        strategy.save_checkpoint({"state_dict": {}, "global_step": 8}, link)
    assert link.resolve() == first and torch.load(link / "meta.pt", weights_only=True)["global_step"] == 4

    monkeypatch.setattr(mp, "_distributed_checkpoint_save", write_shards)
    strategy.save_checkpoint({"state_dict": {}, "global_step": 8}, link)
    assert torch.load(link / "meta.pt", weights_only=True)["global_step"] == 8
    assert not first.exists()  # the replaced directory is deleted
    strategy.remove_checkpoint(link)
    assert not link.exists() and not link.is_symlink()


def test_nan_loss_skip_policy_skips_the_step_and_counts_it(work):
    with pytest.warns(UserWarning, match=r"global step 2 \(first non-finite on rank 0: layer 01 router logits\)"):
        cli.main(["fit", "--config", config("nan_skip", 4, NAN_AT_STEP_2, nan_policy="skip")])
    records = read_steps("nan_skip")
    # The skipped batch still counts as a step (global step, LR schedule), but moves no weight.
    assert [(r["step"], r["skipped"]) for r in records] == [(1, False), (2, False), (3, True), (4, False)]
    assert records[2]["param_sum"] == records[1]["param_sum"] != records[3]["param_sum"]
    checkpoint = torch.load("ckpt_nan_skip/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4 and checkpoint["skipped_steps"] == 1
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values() if isinstance(t, torch.Tensor))


def test_nan_loss_stop_policy_names_step_and_layer(work, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fit", "--config", config("nan_stop", 4, NAN_AT_STEP_2)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "global step 2" in err and "layer 01 router logits" in err and "Traceback" not in err


def _cli_error(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_impossible_trainer_settings_are_one_clear_error(work, capsys):
    base = ["fit", "--config", config("bad")]
    err = _cli_error([*base, "--trainer.devices", "64"], capsys)
    assert "trainer.devices=64" in err and "CPU cores" in err
    err = _cli_error([*base, "--trainer.strategy", "fsdp", "--trainer.devices", "2"], capsys)
    assert "conf/fsdp.yaml" in err
    err = _cli_error([*base, "--trainer.accelerator", "cuda"], capsys)
    assert "accelerator" in err and "Traceback" not in err


def test_fsdp1_is_refused_for_models_that_read_parameters_outside_forward():
    from lightning.pytorch.strategies import FSDPStrategy

    small = dict(vocab_size=64, seq_len=8, d_model=16, n_layers=2, n_heads=2, num_experts=4, expert_hidden=8)
    LitMoE(ModelConfig(**small))._check_strategy(FSDPStrategy())  # top-k: fine
    soft = ModelConfig(**small, router={"class_path": "lit_moe.moe.SoftTopKRouter", "init_args": {"k": 1.5}},
                       budget={"total": 3.0, "learnable": True})
    with pytest.raises(ConfigError, match="conf/fsdp_gpu.yaml"):
        LitMoE(soft)._check_strategy(FSDPStrategy())


def test_checkpoint_of_another_model_config_is_refused_naming_the_mismatch(work, single, capsys):
    # LightningCLI builds the model from a checkpoint file's own hyperparameters, but the
    # vocabulary follows the data module's tokenizer: here one of 384 tokens, not 320.
    err = _cli_error(["validate", "--config", "single.yaml", "--data.vocab_size", "384",
                      "--ckpt_path", "ckpt_single/step=8.ckpt"], capsys)
    assert "vocab_size: 320 in the checkpoint, 384 here" in err and "data.vocab_size" in err
    assert "[320, 32]" in err and "[384, 32]" in err


def test_optimizer_groups_survive_a_strategy_replacing_parameter_objects():
    cfg = ModelConfig(vocab_size=64, seq_len=8, d_model=16, n_layers=2, n_heads=2, num_experts=4, expert_hidden=8,
                      experts={"class_path": "lit_moe.moe.KappaSwiGLUExperts"})
    module = LitMoE(cfg)
    kappa = module.model.blocks[1].mlp.experts.kappa
    kappa.bias = torch.nn.Parameter(kappa.bias.detach().clone())  # a new object, no `optim_group` attribute
    groups = {g["name"]: g["params"] for g in parameter_groups(module.model, 0.1, module._optim_group_tags)}
    assert any(p is kappa.bias for p in groups["kappa"])
    assert len(groups["kappa"]) == 4 and not any(p is kappa.bias for p in groups["decay"])


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    cfg = ModelConfig(vocab_size=64, seq_len=16, d_model=16, n_layers=2, n_heads=2, num_experts=4, expert_hidden=8)
    batch = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    results = []
    for flag in (False, True):
        torch.manual_seed(0)
        module = LitMoE(cfg, activation_checkpointing=flag)
        module.log = lambda *a, **k: None  # no trainer attached
        loss = module.training_step(batch, 0)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in module.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_data_position_resumes_on_another_world_size():
    dataset = TokenWindows(torch.arange(20 * 4 + 1).numpy(), seq_len=4)  # 20 windows

    def loader(world: int, rank: int) -> ResumableDataLoader:
        return ResumableDataLoader(dataset, batch_size=2, drop_last=True, progress=lambda: (0, 3),
                                   sampler=ResumableSampler(dataset, num_replicas=world, rank=rank, seed=5))

    state = loader(2, 0).state_dict()  # 3 batches of 2 on each of 2 ranks: 12 windows done
    assert state == {"epoch": 0, "windows_done": 12, "seed": 5}
    order = list(ResumableSampler(dataset, num_replicas=1, rank=0, seed=5))  # the epoch's window order
    # Resumed on one process, the epoch continues with exactly the windows not trained on yet.
    resumed = loader(1, 0)
    resumed.load_state_dict(state)
    rest = [int(row[0]) // 4 for batch in resumed for row in batch]  # window i starts with token 4i
    assert rest == order[12:]


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    atomic_save({"rng": rng_state()}, tmp_path / "rng.ckpt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "rng.ckpt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected

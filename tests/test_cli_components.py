"""Model components (router, experts, dispatch, dense MLP) on the command line, the way
LightningCLI takes any class-typed argument: short class names, `--key.option` and
`--key.init_args.option` overrides, `--key.help CLASS`, parse-time checks with one message,
and checkpoints that keep plain {class_path, init_args} specs."""

import dataclasses
import functools
import gzip
import json
from pathlib import Path

import lightning
import pytest
import torch
import yaml

import cli
from lit_moe.components import build_component, component_spec
from lit_moe.module import load_checkpoint
from lit_moe.data import LMDataModule
from lit_moe.errors import ConfigError
from lit_moe.model import ModelConfig, Transformer
from lit_moe.module import LitMoE
from lit_moe.moe import KappaSwiGLUExperts, LoopDispatch, Router, SoftTopKRouter, TopKRouter
from lit_moe.tokenizer import train_bpe

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = ["--config", str(REPO / "conf" / "tiny.yaml")]
# tiny.yaml shrunk to seconds, on a few local documents (see the `workdir` fixture).
SMALL = [
    *TINY_YAML, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.callbacks", "[]", "--trainer.logger", "false",
    "--model.config.d_model", "32", "--model.config.n_layers", "2", "--model.config.n_heads", "2",
    "--model.config.num_experts", "4", "--model.config.expert_hidden", "32",
    "--data.seq_len", "32", "--data.batch_size", "4", "--data.vocab_size", "320",
    "--data.train_files", "train.jsonl", "--data.val_files", "val.jsonl",
]


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    for name, out, count in (("train", "train.jsonl", 30), ("validation", "val.jsonl", 4)):
        with gzip.open(REPO / "data" / "wikipedia_en" / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f, \
                open(tmp_path / out, "w", encoding="utf-8") as dst:
            for _, line in zip(range(count), f):
                dst.write(json.dumps({"text": json.loads(line)["text"][:4000]}) + "\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def printed_config(args, capsys) -> dict:
    """`fit --config conf/tiny.yaml ARGS --print_config` → the printed model.config."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["fit", *TINY_YAML, *args, "--print_config"])
    assert exc.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)["model"]["config"]


def cli_error(args, capsys) -> str:
    """The single error line of a refused command (exit code 2, no usage dump, no traceback)."""
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" not in err and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def instantiate(args) -> cli.LitMoECLI:
    """The CLI's model and data module for ARGS, without running a subcommand."""
    return cli.LitMoECLI(LitMoE, LMDataModule, args=args, run=False,
                         save_config_callback=None, trainer_defaults=cli.TRAINER_DEFAULTS)


# ------------------------------------------------------------------ parsing and --print_config


def test_short_class_names_select_components(capsys):
    config = printed_config(["--model.config.router", "SoftTopKRouter", "--model.config.experts", "KappaSwiGLUExperts",
                             "--model.config.dispatch", "LoopDispatch"], capsys)
    assert config["router"]["class_path"] == "lit_moe.moe.SoftTopKRouter"
    assert config["router"]["init_args"]["k"] == 2.0  # SoftTopKRouter's own default
    assert "top_k" not in config["router"]["init_args"]  # TopKRouter's option from tiny.yaml is dropped
    assert config["experts"]["class_path"] == "lit_moe.moe.KappaSwiGLUExperts"
    assert config["experts"]["init_args"]["granularity"] == "per_gate"
    assert config["dispatch"] == {"class_path": "lit_moe.moe.LoopDispatch"}


@pytest.mark.parametrize("flag", ["--model.config.router.top_k", "--model.config.router.init_args.top_k"])
def test_nested_option_override_shows_in_print_config(flag, capsys):
    router = printed_config([flag, "4"], capsys)["router"]
    assert set(router) == {"class_path", "init_args"}  # nothing lands beside init_args
    assert router["class_path"] == "lit_moe.moe.TopKRouter"
    assert router["init_args"]["top_k"] == 4
    assert router["init_args"]["lb_weight"] == 0.01 and router["init_args"]["z_weight"] == 0.001  # from tiny.yaml


def test_whole_component_as_a_mapping_on_the_command_line(capsys):
    router = printed_config(["--model.config.router", "{class_path: lit_moe.moe.TopKRouter, init_args: {top_k: 3}}"],
                            capsys)["router"]
    assert router["class_path"] == "lit_moe.moe.TopKRouter" and router["init_args"]["top_k"] == 3


def test_component_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["fit", "--model.config.router.help", "SoftTopKRouter"])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    for option in ("k", "alpha", "theta", "cap", "lb_weight", "z_weight"):
        assert f"--model.config.router.{option} " in out
    assert "top_k" not in out
    assert "Laplace" in out  # the option's docstring (alpha: the Laplace scale)


# ------------------------------------------------------------------------ mistakes, one message


def test_unknown_component_option_names_class_and_valid_options(capsys):
    err = cli_error(["fit", *TINY_YAML, "--model.config.router.init_args.top_kk", "4"], capsys)
    assert "model.config.router" in err and "TopKRouter has no option 'top_kk'" in err
    assert "top_k, capacity_factor, lb_weight, z_weight" in err
    # An option of the other router, given before choosing that router: says which class has it.
    err = cli_error(["fit", *TINY_YAML, "--model.config.router", "SoftTopKRouter",
                     "--model.config.router.top_k", "3"], capsys)
    assert "SoftTopKRouter has no option 'top_k'" in err and "option of TopKRouter" in err


@pytest.mark.parametrize("value", ["two", "2.5"])
def test_wrong_option_type_names_option_value_and_type(value, capsys):
    err = cli_error(["fit", *TINY_YAML, "--model.config.router.top_k", value], capsys)
    assert "model.config.router" in err and "top_k" in err and f"'{value}'" in err and "expected int" in err


@pytest.mark.parametrize("name", ["TopKRuter", "lit_moe.moe.TopKRuter", "SwiGLUExperts"])
def test_unknown_or_wrong_kind_of_class_lists_the_choices(name, capsys):
    err = cli_error(["fit", *TINY_YAML, "--model.config.router", name], capsys)
    assert f"'{name}' is not a Router class" in err and "SoftTopKRouter, TopKRouter" in err


def test_out_of_range_option_fails_at_build_naming_value_and_bound(workdir, capsys):
    err = cli_error(["fit", *SMALL, "--model.config.router",
                     "{class_path: lit_moe.moe.TopKRouter, init_args: {top_k: 9}}"], capsys)
    assert err.startswith("error: model.config.router:") and "top_k=9" in err and "(4)" in err
    assert not list(workdir.rglob("*.ckpt"))


# --------------------------------------------------------- built model, hyperparameters, checkpoints


def test_component_swap_builds_the_new_class_and_stores_its_spec(workdir):
    built = instantiate([*SMALL, "--model.config.router", "SoftTopKRouter", "--model.config.router.k", "1.5",
                         "--model.config.router.init_args.alpha", "0.5", "--model.config.dispatch", "LoopDispatch"])
    module = built.model
    routers = [router for _, router in module.model.routers()]
    assert len(routers) == 2 and all(type(r) is SoftTopKRouter for r in routers)
    assert {(r.k, r.alpha, r.theta) for r in routers} == {(1.5, 0.5, 1.8)}
    assert all(type(layer.dispatch) is LoopDispatch for _, layer in module.model.moe_layers())
    assert routers[0] is not routers[1]  # one instance per layer
    # The hyperparameters hold plain specs: they survive weights_only loading and rebuild the model.
    stored = module.hparams["config"]["router"]
    assert stored["class_path"] == "lit_moe.moe.SoftTopKRouter"
    assert stored["init_args"]["k"] == 1.5 and stored["init_args"]["alpha"] == 0.5
    assert module.config.router == stored
    rebuilt = LitMoE(config=dict(module.hparams["config"]))
    assert [(type(r), r.k, r.alpha) for _, r in rebuilt.model.routers()] == [(SoftTopKRouter, 1.5, 0.5)] * 2


def _old_checkpoint(path: Path, router: dict) -> tuple[Path, LitMoE]:
    """A checkpoint as written before components were typed: hand-written dict specs in the
    stored config, LightningCLI's `_instantiator` key."""
    config = {"vocab_size": 320, "seq_len": 32, "d_model": 32, "n_layers": 2, "n_heads": 2, "num_experts": 4,
              "expert_hidden": 32, "router": router, "experts": {"class_path": "lit_moe.moe.SwiGLUExperts"},
              "dispatch": {"class_path": "lit_moe.moe.SortedDispatch"}, "budget": None}
    torch.manual_seed(0)
    module = LitMoE(ModelConfig(**config))
    texts = [json.loads(line)["text"] for line in Path("train.jsonl").read_text(encoding="utf-8").splitlines()]
    torch.save({"pytorch-lightning_version": lightning.__version__, "epoch": 0, "global_step": 0,
                "state_dict": module.state_dict(), "tokenizer_json": train_bpe(texts, 320).to_str(),
                "hyper_parameters": {"config": config, "lr": 3e-3,
                                     "_instantiator": "lightning.pytorch.cli.instantiate_module"}}, path)
    return path, module


def test_old_checkpoint_with_dict_specs_loads(workdir):
    path, original = _old_checkpoint(workdir / "old.ckpt",
                                     {"class_path": "lit_moe.moe.TopKRouter", "init_args": {"top_k": 1}})
    module, _ = load_checkpoint(str(path))
    assert [type(r) for _, r in module.model.routers()] == [TopKRouter] * 2
    assert module.model.blocks[0].mlp.router.top_k == 1
    tokens = torch.randint(0, 320, (2, 16))
    torch.testing.assert_close(module.model(tokens), original.eval().model(tokens))


def test_old_checkpoint_through_cli_ckpt_path(workdir, capsys):
    path, _ = _old_checkpoint(workdir / "old.ckpt", {"class_path": "lit_moe.moe.TopKRouter", "init_args": {"top_k": 1}})
    cli.main(["validate", *SMALL, "--ckpt_path", str(path)])
    assert "val/loss" in capsys.readouterr().out
    bad, _ = _old_checkpoint(workdir / "bad.ckpt", {"class_path": "lit_moe.moe.TopKRouter", "init_args": {"top_k": 1}})
    state = torch.load(bad, weights_only=True)
    state["hyper_parameters"]["config"]["router"] = {"class_path": "lit_moe.moe.OldRouter"}
    torch.save(state, bad)
    err = cli_error(["validate", *SMALL, "--ckpt_path", str(bad)], capsys)
    assert "bad.ckpt" in err and "'lit_moe.moe.OldRouter' is not a Router class" in err
    with pytest.raises(ConfigError, match=r"bad\.ckpt.*model\.config\.router.*no class 'OldRouter'"):
        load_checkpoint(str(bad))


# ------------------------------------------------------------------- the core, without the CLI


def test_component_spec_of_each_accepted_form():
    assert component_spec({"class_path": "lit_moe.moe.TopKRouter"}, "r") == {"class_path": "lit_moe.moe.TopKRouter"}
    assert component_spec("lit_moe.moe.TopKRouter", "r") == {"class_path": "lit_moe.moe.TopKRouter"}
    assert component_spec(SoftTopKRouter, "r") == {"class_path": "lit_moe.moe.SoftTopKRouter"}
    assert component_spec(functools.partial(SoftTopKRouter, k=1.5), "r") == {
        "class_path": "lit_moe.moe.SoftTopKRouter", "init_args": {"k": 1.5}}
    with pytest.raises(ConfigError, match="so that checkpoints can rebuild it"):
        component_spec(lambda d, e: TopKRouter(d, e), "model.config.router")
    with pytest.raises(ConfigError, match="not plain data"):
        component_spec(functools.partial(KappaSwiGLUExperts, max_scale=torch.tensor(2.0)), "model.config.experts")
    with pytest.raises(ConfigError, match=r"unexpected key\(s\) \['top_k'\].*--model\.config\.router\.OPTION"):
        component_spec({"class_path": "lit_moe.moe.TopKRouter", "top_k": 4}, "model.config.router")


def test_model_config_takes_factories_and_keeps_specs():
    config = ModelConfig(vocab_size=64, seq_len=16, d_model=16, n_layers=2, n_heads=2, num_experts=4, expert_hidden=8,
                         router=functools.partial(SoftTopKRouter, k=1.5), dispatch=LoopDispatch)
    assert config.router == {"class_path": "lit_moe.moe.SoftTopKRouter", "init_args": {"k": 1.5}}
    assert config.dispatch == {"class_path": "lit_moe.moe.LoopDispatch"}
    assert json.loads(json.dumps(dataclasses.asdict(config))) == dataclasses.asdict(config)
    model = Transformer(config)
    assert [(type(r), r.k) for _, r in model.routers()] == [(SoftTopKRouter, 1.5)] * 2


def test_option_refused_by_the_class_names_the_component():
    with pytest.raises(ConfigError, match=r"^model\.config\.router: top_k=9 must be between 1 and .*\(8\)"):
        build_component({"class_path": "lit_moe.moe.TopKRouter", "init_args": {"top_k": 9}}, Router,
                        "model.config.router", 4, 8)

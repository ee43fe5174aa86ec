"""lit-moe command line: LightningCLI `fit`, `validate`, `test` (+ `--print_config`), plus
`evaluate` (CORE, evaluation/cli.py), `report` (run comparison, evaluation/report.py),
`generate` (sampling, lit_moe/generate.py) and `export` (Hugging Face Mixtral / safetensors,
lit_moe/export.py).

    python cli.py fit --config conf/tiny.yaml
    python cli.py fit --config conf/tiny.yaml --ckpt_path last      # resume
    python cli.py validate --config conf/tiny.yaml --ckpt_path checkpoints/tiny/last.ckpt
    python cli.py generate --ckpt_path checkpoints/tiny/last.ckpt --prompt "The city of"
    python cli.py export --ckpt_path checkpoints/tiny/last.ckpt --format hf --output hf_model/

The installed console script `lit-moe` is the same program.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import typing
import uuid
from argparse import ArgumentError
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from callbacks.fault_tolerance import FaultToleranceCallback
from callbacks.mlflow_utils import log_text_artifact
from callbacks.run_info import RunInfoCallback
from lit_moe.components import class_path_of
from lit_moe.data import LMDataModule
from lit_moe.errors import ConfigError, NonFiniteLossError
from lit_moe.model import COMPONENTS, ModelConfig
from lit_moe.module import LitMoE

# Every run is tracked in MLflow by default: an embedded SQLite store in the working
# directory (open it with `mlflow ui --backend-store-uri sqlite:///mlflow.db`).
TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "callbacks.MLflowRunLogger",
        "init_args": {"experiment_name": "lit-moe", "tracking_uri": "sqlite:///mlflow.db"},
    },
}


class MLflowConfigCallback(SaveConfigCallback):
    """Logs the fully resolved config YAML as the MLflow artifact `config.yaml`."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer, pl_module, stage: str) -> None:  # noqa: ANN001 (Lightning's signature)
        log_text_artifact(trainer, self.parser.dump(self.config, skip_none=False), "config.yaml")


def _check_writable(directory: str, what: str, fix: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write-test-{uuid.uuid4().hex}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"{what} '{directory}' is not writable ({err.strerror or err}); {fix}.") from err


def _component_kinds() -> dict[str, tuple[type, int]]:
    """{field: (base class, number of arguments the model supplies)} of ModelConfig's components,
    read from their `Callable[[...], Base]` types."""
    hints = typing.get_type_hints(ModelConfig)
    return {name: (typing.get_args(hints[name])[1], len(typing.get_args(hints[name])[0])) for name in COMPONENTS}


def _component_classes(field: str, base: type) -> list[type]:
    """The classes a component field accepts: the imported subclasses of its base, and the base
    itself where it is the default (dense_mlp's DenseSwiGLU)."""
    found: list[type] = []
    pending = [base]
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if cls is not base and not cls.__name__.startswith("_") and "<locals>" not in cls.__qualname__:
            found.append(cls)
    if getattr(ModelConfig(), field)["class_path"].rpartition(".")[2] == base.__name__:
        found.append(base)
    return sorted(set(found), key=lambda c: c.__name__)


def _options(cls: type, structural: int) -> dict[str, inspect.Parameter]:
    """A component class's user options: its constructor's parameters after those the model supplies."""
    params = [p for p in inspect.signature(cls.__init__).parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return {p.name: p for p in params[1 + structural:]}


def _given_class(message: str) -> type | None:
    match = re.search(r"Got value: Namespace\(class_path='([\w.]+)'", message)
    if not match:
        return None
    module, _, name = match.group(1).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def _component_error(message: str, key: str, field: str) -> str | None:
    """One sentence for jsonargparse's error about a component argument (`key`, e.g.
    model.config.router): the unknown class or option, or the option whose value does not fit
    its type, with what is accepted. None when the message is of another kind."""
    base, structural = _component_kinds()[field]
    classes = _component_classes(field, base)
    cls = _given_class(message)
    unknown_class = (re.search(r"Expected a dot import path string: (\S+)", message)
                     or re.search(r"Expected '([\w.]+)' to be a subclass", message)
                     or re.search(r"has no attribute '\w+'\. Got value: (?:Namespace\(class_path=')?([\w.]+)", message))
    if unknown_class:
        return (f"{key}: '{unknown_class.group(1)}' is not a {base.__name__} class. Choose one of "
                f"{', '.join(c.__name__ for c in classes)} (a short name or a full class_path such as "
                f"{class_path_of(classes[0])}).")
    if cls is None:
        return None
    options = _options(cls, structural)
    usage = f"`--{key}.help {cls.__name__}` lists them with their types and defaults"
    unknown_option = re.search(r"Option '(\w+)' is not accepted", message)
    if unknown_option:
        name = unknown_option.group(1)
        text = (f"{key}: {cls.__name__} has no option '{name}'. Its options: {', '.join(options) or 'none'} "
                f"({usage}).")
        owners = [c.__name__ for c in classes if c is not cls and name in _options(c, structural)]
        if owners:
            text += (f" '{name}' is an option of {' / '.join(owners)}: choose the class first, e.g. "
                     f"--{key} {owners[0]} --{key}.{name} VALUE.")
        return text
    bad_value = re.search(r'callable class: Parser key "(\w+)":', message)
    if bad_value and bad_value.group(1) in options:
        name = bad_value.group(1)
        annotation = options[name].annotation
        expected = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
        value = re.search(rf"init_args=Namespace\(.*?\b{name}=('(?:[^'\\]|\\.)*'|[^,)]+)", message)
        given = f" got {value.group(1)}," if value else ""
        return f"{key}: {cls.__name__} option {name}:{given} expected {expected} ({usage})."
    return None


def parse_error_message(message: str) -> str:
    """jsonargparse's parse error as one message; about a model component (router, experts,
    dispatch, dense_mlp), it names the class, the option and what is accepted."""
    match = re.match(r'Parser key "((?:[\w]+\.)*config\.(\w+))"', message)
    if match and match.group(2) in COMPONENTS:
        text = _component_error(message, match.group(1), match.group(2))
        if text:
            return text
    # Drop jsonargparse's restatement of the type, which names our factory type rather than the problem.
    return re.sub(r"Type typing\.Callable\[.*?\] expects a function or a callable class: ", "", message)


class LitMoECLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001
        # The data module owns sequence length and tokenizer; the model follows them.
        parser.link_arguments("data.seq_len", "model.config.seq_len")
        parser.link_arguments("data.vocab_size_padded", "model.config.vocab_size", apply_on="instantiate")

    def init_parser(self, **kwargs: Any):  # noqa: ANN201 (LightningArgumentParser)
        # Parse errors raise (ArgumentError) instead of printing the whole usage and exiting:
        # `main` shows them as one message, like every other configuration mistake.
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser, args) -> None:  # noqa: ANN001
        # jsonargparse resolves class_paths while merging configs (to drop options of a
        # replaced class); a misspelled class surfaces there as an import error.
        try:
            super().parse_arguments(parser, args)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"invalid configuration: {err}. Check the class_path spelling.") from err
        except ArgumentError as err:
            raise ConfigError(parse_error_message(str(err))) from err

    def _parse_ckpt_path(self) -> None:
        # LightningCLI re-parses the model hyperparameters stored in a `--ckpt_path` checkpoint.
        try:
            super()._parse_ckpt_path()
        except ArgumentError as err:
            ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
            raise ConfigError(f"the model config stored in checkpoint '{ckpt_path}' does not parse: "
                              f"{parse_error_message(str(err))}") from err

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with device and strategy mistakes turned into one message naming them."""
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as err:
            text = str(err)
            if "requires a GPU accelerator" in text:  # Lightning's FSDPStrategy (FSDP1) on CPU
                text += (" On CPU use FSDP2 instead: --config conf/fsdp.yaml "
                         "(lit_moe.distributed.FSDP2Strategy, Lightning's ModelParallelStrategy).")
            elif "not available" in text or "backend found" in text or "only has" in text:
                text += " Set trainer.accelerator and trainer.devices to what this machine has (e.g. accelerator: cpu)."
            raise ConfigError(f"trainer settings do not fit this machine: {text}") from err
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if isinstance(trainer.accelerator, CPUAccelerator) and trainer.num_devices > cores:
            raise ConfigError(f"trainer.devices={trainer.num_devices} CPU processes requested, but this machine has "
                              f"{cores} CPU cores; use at most {cores} (each process needs a core).")
        return trainer

    def config_files(self) -> list[str]:
        """The --config files of this command, relative to the repository when inside it."""
        repo = os.path.dirname(os.path.abspath(__file__))
        names = []
        for path in (self.config.get(self.subcommand) or {}).get("config") or []:
            full = os.path.abspath(getattr(path, "absolute", None) or str(path))
            names.append(os.path.relpath(full, repo) if full.startswith(repo + os.sep) else str(path))
        return names

    def _tell_run_info(self) -> None:
        """Give the run a RunInfoCallback (params, tags, description) if the config has none,
        and tell it which config files made the run."""
        run_info = [c for c in self.trainer.callbacks if isinstance(c, RunInfoCallback)]
        if not run_info:
            run_info = [RunInfoCallback()]
            self.trainer.callbacks.append(run_info[0])
        for callback in run_info:
            callback.config_files = self.config_files()

    def before_validate(self) -> None:
        self._tell_run_info()

    def before_test(self) -> None:
        self._tell_run_info()

    def before_fit(self) -> None:
        """Refuse unwritable output locations before any work is done; see _tell_run_info."""
        trainer = self.trainer
        self._tell_run_info()
        _check_writable(trainer.default_root_dir, "trainer.default_root_dir", "set --trainer.default_root_dir")
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath:
                _check_writable(callback.dirpath, "checkpoint directory",
                                "set the ModelCheckpoint dirpath in the config to a writable directory")
        for logger in trainer.loggers:
            uri = getattr(logger, "_tracking_uri", None)
            if isinstance(logger, MLFlowLogger) and uri and uri.startswith("sqlite:///"):
                _check_writable(os.path.dirname(os.path.abspath(uri[len("sqlite:///"):])) or ".",
                                "MLflow store directory", "set --trainer.logger.init_args.tracking_uri")


# Commands beside LightningCLI's fit / validate / test: the module whose `main(argv)` runs each
# (imported only when asked for).
SUBCOMMANDS = {
    "evaluate": "evaluation.cli",    # CORE evaluation of a checkpoint
    "generate": "lit_moe.generate",  # sample from a checkpoint
    "export": "lit_moe.export",      # Hugging Face / safetensors export
    "report": "evaluation.report",   # compare runs from the MLflow store
}


def _fail(message: str, code: int) -> None:
    """One message and an exit code for a user's mistake; the traceback with LIT_MOE_DEBUG=1."""
    if os.environ.get("LIT_MOE_DEBUG"):
        raise
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def main(args: list[str] | None = None) -> None:
    try:
        argv = sys.argv[1:] if args is None else list(args)
        if argv[:1] and argv[0] in SUBCOMMANDS:
            importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
            return
        LitMoECLI(
            LitMoE,
            LMDataModule,
            # FaultToleranceCallback: atomic checkpoints, SIGTERM / Ctrl-C leave a resumable one.
            trainer_defaults={**TRAINER_DEFAULTS, "callbacks": [FaultToleranceCallback()]},
            save_config_callback=MLflowConfigCallback,
            args=args,
        )
    except SIGTERMException:
        # Lightning stopped the fit on SIGTERM or the first Ctrl-C; FaultToleranceCallback saved it.
        print("interrupted: stopped at a step boundary; resume with --ckpt_path last", file=sys.stderr)
        sys.exit(143)
    except NonFiniteLossError as err:
        _fail(str(err), 1)
    except ArgumentError as err:  # a parse error outside `parse_arguments`
        _fail(parse_error_message(str(err)), 2)
    except (ConfigError, ValueError, FileNotFoundError, PermissionError) as err:
        _fail(f"{err}\n(set LIT_MOE_DEBUG=1 to see the traceback)", 2)


if __name__ == "__main__":
    main()

"""Swappable components (router, experts, dispatch, dense MLP): given as factories, kept as specs.

On the command line and in YAML a component is what LightningCLI gives any class-typed
argument: a class (short names resolve) and its options,

    router:
      class_path: lit_moe.moe.TopKRouter
      init_args: {top_k: 2}

    --model.config.router SoftTopKRouter --model.config.router.k 1.5

`ModelConfig` types each one as a callable returning the component, e.g. `Callable[[int, int],
Router]`: the model supplies the structural arguments (d_model, num_experts, ...) when it builds
each layer, the user the rest, which jsonargparse then checks by name and type at parse time
and hands over as a factory (`functools.partial` of the class with the options bound).

Inside the model config a component is always held as its spec, a plain dict
{class_path, init_args} (`component_spec`), so a checkpoint's hyperparameters are plain data and
the model is rebuilt from the checkpoint alone, without the CLI. Each MoE layer calls
`build_component` for its own instance (a router owns per-layer state: losses, metrics).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

from lit_moe.errors import ConfigError

ComponentSpec = dict[str, Any]

_PLAIN = (type(None), bool, int, float, str)


def _import_class(class_path: str, role: str) -> type:
    module_name, _, class_name = class_path.rpartition(".")
    if not module_name:
        raise ConfigError(
            f"{role}: class_path '{class_path}' must be a dotted path such as "
            f"'lit_moe.moe.TopKRouter'."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{role}: cannot import module '{module_name}' for class_path "
                          f"'{class_path}' ({err}). Check the spelling.") from err
    cls = getattr(module, class_name, None)
    if cls is None:
        public = sorted(n for n, v in vars(module).items() if inspect.isclass(v) and not n.startswith("_"))
        raise ConfigError(f"{role}: module '{module_name}' has no class '{class_name}'. "
                          f"Available: {', '.join(public)}.")
    return cls


def class_path_of(cls: type) -> str:
    """Dotted path of `cls`, the shortest public one when a parent package re-exports it
    (`lit_moe.moe.TopKRouter` rather than `lit_moe.moe.router.TopKRouter`)."""
    parts = cls.__module__.split(".")
    for end in range(1, len(parts)):
        package = ".".join(parts[:end])
        try:
            if getattr(importlib.import_module(package), cls.__name__, None) is cls:
                return f"{package}.{cls.__name__}"
        except ImportError:
            continue
    return f"{cls.__module__}.{cls.__qualname__}"


def _plain_data(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain_data(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_data(v) for k, v in value.items())
    return False


def _factory_class(factory: functools.partial) -> type | None:
    """The class a factory builds: `partial(cls, **options)`, or jsonargparse's
    `partial(<instantiator helper>, <instantiator>, cls, **options)` for a Callable-typed argument."""
    if inspect.isclass(factory.func):
        return factory.func if not factory.args else None
    if getattr(factory.func, "__module__", "").split(".")[0] == "jsonargparse":
        classes = [a for a in factory.args if inspect.isclass(a)]
        if len(classes) == 1 and factory.args[-1] is classes[0]:
            return classes[0]
    return None


def component_spec(value: Any, role: str) -> ComponentSpec:
    """The plain {class_path[, init_args]} spec of a component given as

    - a spec dict (YAML, Python, checkpoints) or a bare class_path string;
    - a class (its defaults) or a factory `functools.partial(cls, **options)`, which is what
      the CLI hands over for a `Callable[..., Base]`-typed argument.

    Other callables (a lambda, a function) cannot be stored in a checkpoint and are refused.
    """
    if isinstance(value, str):
        return {"class_path": value}
    if isinstance(value, dict):
        if "class_path" not in value:
            raise ConfigError(f"{role}: expected a mapping with 'class_path' (and optional 'init_args'), "
                              f"got {value!r}.")
        extra = set(value) - {"class_path", "init_args"}
        if extra:
            raise ConfigError(f"{role}: unexpected key(s) {sorted(extra)} beside class_path; options go in "
                              f"init_args (on the command line: --{role}.OPTION VALUE or "
                              f"--{role}.init_args.OPTION VALUE).")
        init_args = value.get("init_args")
        if init_args is not None and not isinstance(init_args, dict):
            raise ConfigError(f"{role}: init_args must be a mapping of option names to values, got {init_args!r}.")
        spec = {"class_path": value["class_path"]}
        if init_args is not None:
            spec["init_args"] = dict(init_args)
        return spec
    if inspect.isclass(value):
        return {"class_path": class_path_of(value)}
    if isinstance(value, functools.partial):
        cls = _factory_class(value)
        if cls is not None:
            options = dict(value.keywords)
            bad = sorted(name for name, v in options.items() if not _plain_data(v))
            if bad:
                raise ConfigError(f"{role}: {cls.__name__} option(s) {bad} are not plain data (numbers, strings, "
                                  f"lists, mappings), so the model config could not be stored in a checkpoint.")
            return {"class_path": class_path_of(cls), "init_args": options}
    raise ConfigError(f"{role}: got {value!r}; give a class (with options: a {{class_path, init_args}} mapping "
                      f"or functools.partial(cls, **options)) so that checkpoints can rebuild it.")


def build_component(spec: Any, base: type, role: str, *args: Any, **kwargs: Any) -> Any:
    """Instantiate `spec` (any form `component_spec` takes) as a subclass of `base`.

    `args`/`kwargs` are the structural arguments the caller owns (e.g. d_model, num_experts);
    `init_args` are the user's options. Unknown option names are refused with the list of
    valid ones, so a misspelled key never silently falls back to a default; a value the class
    refuses comes back as one ConfigError starting with `role`.
    """
    spec = component_spec(spec, role)
    cls = _import_class(spec["class_path"], role)
    if not (inspect.isclass(cls) and issubclass(cls, base)):
        raise ConfigError(f"{role}: '{spec['class_path']}' is not a {base.__name__} subclass.")
    init_args = dict(spec.get("init_args") or {})
    params = inspect.signature(cls.__init__).parameters
    accepts_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    structural = set(list(params)[1 : 1 + len(args)]) | set(kwargs)
    if not accepts_var_kw:
        allowed = [n for n in params if n != "self" and n not in structural
                   and params[n].kind not in (inspect.Parameter.VAR_POSITIONAL,)]
        unknown = sorted(set(init_args) - set(allowed))
        if unknown:
            raise ConfigError(f"{role}: {cls.__name__} has no option(s) {unknown}. Valid options: {allowed}.")
    clash = sorted(set(init_args) & structural)
    if clash:
        raise ConfigError(f"{role}: option(s) {clash} are set by the model config, not in init_args.")
    try:
        return cls(*args, **kwargs, **init_args)
    except ConfigError as err:
        if str(err).startswith(role):
            raise
        raise ConfigError(f"{role}: {err}") from err

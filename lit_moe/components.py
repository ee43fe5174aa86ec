"""Build swappable components (router, experts, activation) from `class_path` specs.

A spec is the YAML form jsonargparse uses everywhere else in the CLI:

    router:
      class_path: lit_moe.moe.TopKRouter
      init_args: {top_k: 2}

Specs stay plain dicts inside the model config so that a checkpoint's hyperparameters are
plain data and the model can be rebuilt from the checkpoint alone. Each MoE layer calls
`build_component` to get its own instance (a router owns per-layer state: losses, metrics).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from lit_moe.errors import ConfigError

ComponentSpec = dict[str, Any]


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


def build_component(spec: ComponentSpec | str, base: type, role: str, *args: Any, **kwargs: Any) -> Any:
    """Instantiate `spec` (a class_path string or {class_path, init_args}) as a subclass of `base`.

    `args`/`kwargs` are the structural arguments the caller owns (e.g. d_model, num_experts);
    `init_args` are the user's options. Unknown option names are refused with the list of
    valid ones, so a misspelled key never silently falls back to a default.
    """
    if isinstance(spec, str):
        spec = {"class_path": spec}
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ConfigError(f"{role}: expected a mapping with 'class_path' (and optional 'init_args'), got {spec!r}.")
    extra = set(spec) - {"class_path", "init_args"}
    if extra:
        raise ConfigError(f"{role}: unexpected key(s) {sorted(extra)}; only 'class_path' and 'init_args' are allowed.")
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
    return cls(*args, **kwargs, **init_args)

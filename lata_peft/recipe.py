"""YAML recipes: one file = one API call.

```yaml
# lata-peft run recipes/math_code_lata.yaml
combine:                  # the verb: combine | inspect | fold
  adapters: [examples/adapters/math, examples/adapters/code]
  instruction: examples/adapters/instruct
  method: lata
  scheme: log
  out: out/math_code_lata
```

Keys are the API function's arguments (``lambda`` may be written for ``lam``); relative
paths are taken from the current directory, as on the command line.
"""

from __future__ import annotations

import inspect as _inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .errors import LataError

__all__ = ["load_recipe", "run_recipe"]

ALIASES = {"lambda": "lam"}
NOT_IN_RECIPES = {"progress"}


def _verbs() -> dict[str, Callable[..., Any]]:
    from . import api

    return {"combine": api.combine, "inspect": api.inspect, "fold": api.fold}


def load_recipe(path: str | Path) -> tuple[str, dict[str, Any]]:
    """Parse and validate a recipe: ``(verb, arguments)``; unknown keys are an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise LataError(f"{path}: no such recipe file")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise LataError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    verbs = _verbs()
    if not isinstance(document, dict) or len(document) != 1 or next(iter(document)) not in verbs:
        raise LataError(f"{path}: a recipe is one mapping with a single key, one of: {', '.join(verbs)}")
    verb, arguments = next(iter(document.items()))
    arguments = {ALIASES.get(k, k): v for k, v in (arguments or {}).items()}
    allowed = set(_inspect.signature(verbs[verb]).parameters) - NOT_IN_RECIPES
    unknown = sorted(set(arguments) - allowed)
    if unknown:
        raise LataError(f"{path}: unknown {verb} key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return verb, arguments


def run_recipe(path: str | Path, **overrides: Any) -> Any:
    """Run the recipe's single API call; ``overrides`` (e.g. ``overwrite=True``) win over the file."""
    verb, arguments = load_recipe(path)
    return _verbs()[verb](**{**arguments, **overrides})

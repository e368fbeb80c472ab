"""YAML recipes: one file = one verb's spec = one API call.

```yaml
# lata-peft run recipes/math_code_lata.yaml
combine:                  # the verb: combine | inspect | fold | export | compare | eval
  adapters: [examples/adapters/math, examples/adapters/code]
  instruction: examples/adapters/instruct
  method: lata
  scheme: log
  out: out/math_code_lata
```

Keys are the spec's fields under their recipe names (``lambda``, ``4bit``); values are checked
by the spec, with the same messages as the CLI. Relative paths are taken from the current
directory, as on the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from . import api
from .errors import LataError, shorten
from .spec import Spec
from .specs import CombineSpec, CompareSpec, EvalSpec, ExportSpec, FoldSpec, InspectSpec

__all__ = ["PROGRESS_VERBS", "VERBS", "load_recipe", "run_recipe", "run_spec"]

VERBS: dict[str, type[Spec]] = {spec.verb: spec for spec in (CombineSpec, InspectSpec, FoldSpec, ExportSpec,
                                                              CompareSpec, EvalSpec)}
PROGRESS_VERBS = ("combine", "fold", "compare", "eval")
"""The verbs whose API call takes a ``progress`` (the others are quick, or print nothing while they run)."""
MAX_RECIPE_BYTES = 1 << 20


def _document(path: Path) -> Any:
    if not path.is_file():
        raise LataError(f"{path}: no such recipe file")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise LataError(f"{path}: larger than {MAX_RECIPE_BYTES >> 10} KiB; not a recipe")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise LataError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise LataError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise LataError(f"{path}: nested too deeply to be a recipe") from None


def load_recipe(path: str | Path, **overrides: Any) -> Spec:
    """Parse and validate a recipe into its verb's spec; ``overrides`` (field names, e.g. ``out``,
    ``overwrite``) win over the file. Every problem is one line naming the file."""
    path = Path(path)
    document = _document(path)
    if not isinstance(document, dict) or len(document) != 1 or next(iter(document)) not in VERBS:
        raise LataError(f"{path}: a recipe is one mapping with a single key, one of: {', '.join(VERBS)} "
                        f"(got {shorten(document, 60)})")
    verb, options = next(iter(document.items()))
    spec_class = VERBS[verb]
    if overrides:
        keys = {name: key for key, name in spec_class.keys().items()}
        unknown = sorted(set(overrides) - set(keys))
        if unknown:
            raise LataError(f"{path}: {verb} recipes do not take {', '.join(unknown)}")
        options = {**(options if isinstance(options, dict) else {}), **{keys[k]: v for k, v in overrides.items()}}
    return spec_class.from_mapping(options, source=str(path))


def run_spec(spec: Spec, **runtime: Any) -> Any:
    """Call the verb of ``spec`` (``runtime``: e.g. ``progress``)."""
    function = {"combine": api.combine, "inspect": api.inspect, "fold": api.fold, "export": api.export,
                "compare": api.compare, "eval": api.evaluate}[spec.verb]
    return function(spec, **runtime)


def run_recipe(path: str | Path, progress: Any = None, **overrides: Any) -> Any:
    """Run the recipe's single API call; ``overrides`` (e.g. ``overwrite=True``, ``out=...``) win over the file."""
    spec = load_recipe(path, **overrides)
    runtime = {"progress": progress} if spec.verb in PROGRESS_VERBS else {}
    return run_spec(spec, **runtime)

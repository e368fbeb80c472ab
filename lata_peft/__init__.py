"""lata-peft: combine LoRA adapters with Layer-Aware Task Arithmetic, exactly and factored.

>>> import lata_peft
>>> sorted(lata_peft.METHOD_NAMES)[:6]
['breadcrumbs', 'breadcrumbs_ties', 'dare', 'dare_ties', 'della', 'della_linear']
"""

import logging

from ._version import __version__

# bitsandbytes' CPU backend logs a warning on import when the optional `kernels` hub download is
# unavailable; it falls back to its own kernels, so the message is only noise for our users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .api import CombineResult, InspectResult, combine, compare, fold, inspect  # noqa: E402
from .errors import LataError  # noqa: E402
from .methods import METHOD_NAMES  # noqa: E402
from .recipe import load_recipe, run_recipe  # noqa: E402
from .specs import CombineSpec, CompareSpec, EvalSpec, ExportSpec, FoldSpec, InspectSpec  # noqa: E402

__all__ = [
    "METHOD_NAMES",
    "CombineResult",
    "CombineSpec",
    "CompareSpec",
    "EvalSpec",
    "ExportSpec",
    "FoldSpec",
    "InspectResult",
    "InspectSpec",
    "LataError",
    "__version__",
    "combine",
    "compare",
    "fold",
    "inspect",
    "load_recipe",
    "run_recipe",
]

"""lata-peft: combine LoRA adapters with Layer-Aware Task Arithmetic, exactly and factored.

>>> import lata_peft
>>> sorted(lata_peft.METHOD_NAMES)
['dare', 'dare_ties', 'lata', 'magnitude', 'ta', 'ties']
"""

import logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend logs a warning on import when the optional `kernels` hub download is
# unavailable; it falls back to its own kernels, so the message is only noise for our users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .api import METHOD_NAMES, CombineResult, InspectResult, combine, inspect  # noqa: E402
from .errors import LataError  # noqa: E402
from .recipe import run_recipe  # noqa: E402

__all__ = [
    "METHOD_NAMES",
    "CombineResult",
    "InspectResult",
    "LataError",
    "__version__",
    "combine",
    "inspect",
    "run_recipe",
]

"""lata-peft: combine LoRA adapters with Layer-Aware Task Arithmetic, exactly and factored.

>>> import lata_peft
>>> sorted(lata_peft.METHOD_NAMES)
['dare', 'dare_ties', 'lata', 'magnitude', 'ta', 'ties']
"""

__version__ = "0.1.0"

from .api import METHOD_NAMES, CombineResult, InspectResult, combine, inspect
from .errors import LataError
from .recipe import run_recipe

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

"""Loading the model to evaluate: a local transformers folder (optionally 4-bit NF4), a PEFT
adapter on top (``PeftModel.from_pretrained``), and its tokenizer set up for batching."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..devices import default_device
from ..dtypes import parse_dtype
from ..errors import LataError, first_line

PathLike = str | os.PathLike[str]


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (inputs go there)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def max_positions(model: torch.nn.Module, cap: int | None = None) -> int | None:
    """``config.max_position_embeddings`` (or ``n_positions``), capped at ``cap``; ``None`` if unknown."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if value is None:
        return cap
    return int(value) if cap is None else min(int(value), cap)


def _folder(source: PathLike, what: str) -> Path:
    path = Path(source).expanduser()
    if not path.is_dir():
        raise LataError(f"{path}: {what} folder not found (evaluation loads local folders only)")
    return path


def load_tokenizer(source: PathLike) -> Any:
    """``AutoTokenizer.from_pretrained`` of a local folder, as a ``LataError`` if that fails."""
    from transformers import AutoTokenizer

    path = _folder(source, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise LataError(f"{path}: cannot load a tokenizer ({type(exc).__name__}: {exc})") from None


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Make ``tokenizer`` batch-ready: a pad token (the EOS token when it has none)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LataError(f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    source: PathLike, *, four_bit: bool = False, device: torch.device | str | None = None, dtype: str | None = None
) -> torch.nn.Module:
    """``AutoModelForCausalLM`` from a local folder, in eval mode.

    ``four_bit`` quantizes the linear layers with bitsandbytes NF4 (``BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4")``, double quantization, compute in ``dtype``); it runs on the CPU with
    bitsandbytes >= 0.45. ``dtype`` defaults to float32 on the CPU and to the checkpoint's dtype on a GPU.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = _folder(source, "model")
    if not (path / "config.json").is_file():
        raise LataError(f"{path}: not a transformers model folder (no config.json)")
    device = torch.device(device) if device is not None else default_device()
    torch_dtype: Any = parse_dtype(dtype, "dtype") if dtype else (torch.float32 if device.type == "cpu" else "auto")
    options: dict[str, Any] = {"dtype": torch_dtype}
    if four_bit:
        compute = torch_dtype if isinstance(torch_dtype, torch.dtype) else torch.bfloat16
        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        options["device_map"] = {"": str(device)}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **options)
    except Exception as exc:
        raise LataError(f"{path}: cannot load the model ({type(exc).__name__}: {exc})") from None
    if not four_bit:
        model.to(device)
    return model.eval()


def _wrap(model: torch.nn.Module, path: Path) -> Any:
    from peft import PeftModel

    try:
        wrapped = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    except Exception as exc:
        raise LataError(f"{path}: cannot apply the adapter ({type(exc).__name__}: {_reason(exc)})") from None
    return wrapped.eval()


def _reason(exc: Exception) -> str:
    """An exception's first line, and the line after it when the first only introduces a list (torch's
    ``Error(s) in loading state_dict for ...:`` then one ``size mismatch ...`` line per tensor), cut short."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    head = " ".join(lines[:2]) if len(lines) > 1 and lines[0].endswith(":") else (lines[0] if lines else "")
    return first_line(head or type(exc).__name__, limit=300)


def _swaps_modules(path: Path) -> bool:
    """Whether the adapter swaps whole modules in (``modules_to_save``, the heads its task type implies,
    trainable tokens). PEFT's ``unload`` and ``merge_and_unload`` keep the swapped-in copies, so only a
    snapshot of the whole model taken before restores those."""
    from ..adapter import read_config_json
    from ..full_weights import saved_modules

    config = read_config_json(path)
    return not isinstance(config, dict) or bool(saved_modules(config) or config.get("trainable_token_indices"))


def _adapted_parameters(wrapped: Any) -> list[torch.nn.Parameter]:
    """The parameters ``merge_and_unload`` writes in place: those of the base layers PEFT wrapped."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    try:
        from peft.utils.other import AuxiliaryTrainingWrapper as Swapping  # peft >= 0.15
    except ImportError:  # pragma: no cover - older peft
        from peft.utils import ModulesToSaveWrapper as Swapping
    modules = list(wrapped.modules())
    if any(isinstance(module, Swapping) for module in modules):
        raise RuntimeError("an adapter whose config swaps no module in has swapped one in")
    parameters = {id(p): p for module in modules if isinstance(module, BaseTunerLayer)
                  for p in module.get_base_layer().parameters()}
    return list(parameters.values())


@contextlib.contextmanager
def with_adapter(model: torch.nn.Module, adapter: PathLike | None, *, restore: bool,
                 merge: bool = False) -> Iterator[torch.nn.Module]:
    """``model`` with the PEFT adapter folder ``adapter`` applied (``PeftModel.from_pretrained``).

    With ``restore`` (a model object the caller owns) the model is left as it was on exit, bit for
    bit: the adapter layers are removed (``PeftModel.unload``) and, with ``merge``, the weights the
    merge wrote are copied back (only the adapted layers' weights are kept aside, unless the adapter
    swaps whole modules in: then the whole model is). With ``merge`` the adapter is merged into the
    weights (``merge_and_unload``: the forward pass costs what the base's does).
    """
    if adapter is None:
        yield model
        return
    path = _folder(adapter, "adapter")
    if not (path / "adapter_config.json").is_file():
        raise LataError(f"{path}: not a PEFT adapter folder (no adapter_config.json)")
    whole = ({k: v.detach().clone() for k, v in model.state_dict().items()}
             if restore and _swaps_modules(path) else None)
    wrapped = _wrap(model, path)
    kept = ([(p, p.detach().clone()) for p in _adapted_parameters(wrapped)]
            if restore and merge and whole is None else [])
    result = wrapped.merge_and_unload() if merge else wrapped
    try:
        yield result
    finally:
        if restore:
            unwrapped = result if merge else wrapped.unload()
            with torch.no_grad():
                for parameter, original in kept:
                    parameter.copy_(original)
            if whole is not None:
                unwrapped.load_state_dict(whole)

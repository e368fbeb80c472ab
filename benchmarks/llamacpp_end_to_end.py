"""llama.cpp end to end: does a LoRA GGUF move llama.cpp's logits by PEFT's amount? (issue 12)

llama.cpp scales every LoRA pair by ``adapter.lora.alpha / rank`` with the rank of *that* tensor,
and its converter ``convert_lora_to_gguf.py`` writes the config's one ``lora_alpha``. A lata-peft
output with mixed ranks (``--rank energy:F``) therefore runs with the wrong scale on its modules
whose rank is not the common one. ``lata_peft.gguf_export.export_gguf`` writes the converter's file
but folds each module's scale into ``lora_b``. This script checks both files inside a compiled
llama.cpp (llama-cpp-python), against PEFT in transformers, on a real base, real adapters and a
real prompt:

1. the base (default ``~/.cache/lata_peft/SmolLM2-135M-Instruct``, written by
   ``python recipes/prepare_base.py``) is converted once to an f32 GGUF with llama.cpp's own
   ``convert_hf_to_gguf.py --outtype f32`` (cached in the work folder; ``--rebuild-base`` redoes it);
2. the shipped adapters ``examples/adapters/math`` and ``examples/adapters/code`` are combined with
   the ``lata-peft`` CLI into a uniform-rank output (``--rank exact``: every module rank 8 + 8 = 16)
   and a mixed-rank one (``--rank energy:0.9``), and that one again with ``--target llama.cpp`` (every
   module zero-padded to the largest rank, ``lora_alpha`` = that rank: the converter's file is exact);
3. each of ``math`` alone (an input adapter, rank 8 everywhere) and the two outputs is written as a
   LoRA GGUF twice: by llama.cpp's ``convert_lora_to_gguf.py --outtype f32 --base BASE`` and by
   ``export_gguf``;
4. the tokens are GSM8K test problem ``--problem`` (default 0) in the adapters' Alpaca template,
   followed by its reference answer (teacher forcing), cut to ``--tokens`` (default: all, 139 for
   problem 0). Logits at every position come from llama.cpp (base GGUF alone, then base + each LoRA
   GGUF at scale 1; f32 weights, one batch, f32 KV cache: llama.cpp's default f16 cache, kept with
   ``--kv-cache f16``, raises the noise floor from ~1e-4 to ~4e-2 here) and from transformers in fp32
   (the base folder alone, then ``PeftModel.from_pretrained`` of each adapter folder on a fresh base).

Printed per adapter and per file, with ``d_llama = logits(llama.cpp, base + LoRA) - logits(llama.cpp,
base)`` and ``d_peft = logits(PEFT) - logits(transformers base)`` over all positions x vocabulary:
``max|err|`` = max |d_llama - d_peft|; ``rel err`` = ||d_llama - d_peft|| / ||d_peft|| (Frobenius);
``cosine`` of the two deltas; ``argmax diff`` = fraction of positions whose argmax in llama.cpp
(base + LoRA) differs from PEFT's; ``err/floor`` = ``max|err|`` over the noise floor, which is
max |logits(llama.cpp, base) - logits(transformers, base)| (printed above the table, with the
fraction of base argmaxes that differ). ``max|d_peft|`` is the adapter's largest effect.

Install llama-cpp-python (it compiles llama.cpp; a few minutes on 2 cores), in the project venv or in
a separate venv that only needs it and numpy (then pass ``--llama-python VENV/bin/python``; the
llama.cpp part runs in a child process of that interpreter either way)::

    pip install llama-cpp-python==0.3.36

The converters come from a llama.cpp checkout (``--llama-cpp DIR``, or ``$LLAMA_CPP_DIR``): the
folder holding ``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, ``conversion/`` and
``gguf-py/``, e.g. ``vendor/llama.cpp`` of the llama-cpp-python 0.3.36 source distribution
(``pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36``), so that the converters and the
compiled library are the same llama.cpp. They run with this interpreter and use the checkout's own
``gguf-py``; besides torch and transformers they need ``sentencepiece`` importable (llama.cpp's
``requirements/``; its Llama vocabulary code imports it before it falls back to ``tokenizer.json``).
Without touching the project venv: ``pip install --target DIR sentencepiece`` and ``PYTHONPATH=DIR``.

Run from the repository root with the project venv active (CPU only; about 2 minutes on a 2-core CPU,
mostly loading: every converter run imports torch, every llama.cpp run reads the 540 MB f32 base)::

    python benchmarks/llamacpp_end_to_end.py --llama-cpp DIR [--llama-python PY] [--json out.json]

Everything is written under ``--work`` (default ``~/.cache/lata_peft/llamacpp_end_to_end``): the base
GGUF (~540 MB), the combined adapters, the LoRA GGUFs and the logits.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = REPO / "examples" / "adapters"
DEFAULT_BASE = Path("~/.cache/lata_peft/SmolLM2-135M-Instruct").expanduser()
DEFAULT_WORK = Path("~/.cache/lata_peft/llamacpp_end_to_end").expanduser()
WORKER = "--llama-worker"  # internal: run the llama.cpp side (numpy + llama_cpp only) from a job file

# (name, shipped adapters, `lata-peft combine` options): one adapter and no options = that adapter as is
ADAPTER_RUNS: list[tuple[str, list[str], list[str] | None]] = [
    ("math", ["math"], None),
    ("math+code exact", ["math", "code"], ["--rank", "exact"]),
    ("math+code energy:0.9", ["math", "code"], ["--rank", "energy:0.9"]),
    ("energy:0.9 target llama.cpp", ["math", "code"], ["--rank", "energy:0.9", "--target", "llama.cpp"]),
]
FILES = ("converter", "lata-peft")


# ------------------------------------------------------------------ llama.cpp side (child process)

def llama_worker(job_file: str) -> None:
    """Logits of the base GGUF alone and with each LoRA GGUF; writes ``.npy`` files and an info JSON."""
    import ctypes

    import llama_cpp
    import numpy as np

    job = json.loads(Path(job_file).read_text())
    ids = [int(t) for t in job["ids"]]
    n_ctx = max(256, len(ids))
    info: dict[str, Any] = {"llama_cpp_python": llama_cpp.__version__, "python": sys.executable}
    lib = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    if lib.is_file():  # ggml's build info: the llama.cpp commit the library was compiled from
        handle = ctypes.CDLL(str(lib))
        for name in ("ggml_version", "ggml_commit"):
            if hasattr(handle, name):
                function = getattr(handle, name)
                function.restype = ctypes.c_char_p
                info[name] = function().decode()
    info["system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    for run in job["runs"]:
        options: dict[str, Any] = {
            "model_path": job["model"], "logits_all": True, "n_ctx": n_ctx, "n_batch": n_ctx, "n_ubatch": n_ctx,
            "n_threads": job["threads"], "n_threads_batch": job["threads"], "seed": 0, "verbose": False,
        }
        if job["kv_cache"] == "f32":  # llama.cpp's default is f16, which alone moves the logits by ~4e-2
            options["type_k"] = options["type_v"] = llama_cpp.GGML_TYPE_F32
        if run["lora"] is not None:
            options["lora_path"] = run["lora"]
        started = time.perf_counter()
        llm = llama_cpp.Llama(**options)
        llm.eval(ids)
        np.save(run["out"], np.asarray(llm.scores[: len(ids)], dtype=np.float32))
        llm.close()
        print(f"  llama.cpp {run['name']}: {time.perf_counter() - started:.1f} s", flush=True)
    Path(job["info"]).write_text(json.dumps(info, indent=1))


# ------------------------------------------------------------------ helpers

def run_command(command: list[str], what: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``command``; on failure print its output tail and exit naming ``what``."""
    result = subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-3000:]
        raise SystemExit(f"{what} failed (exit {result.returncode}): {' '.join(command)}\n{tail}")
    return result


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def lata_peft_command() -> list[str]:
    """The ``lata-peft`` entry point of this interpreter's environment."""
    script = Path(sys.executable).parent / "lata-peft"
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from lata_peft.cli import main; main()"]


def adapter_ranks(folder: Path) -> list[int]:
    """The rank of every LoRA module (``lora_A`` rows) in ``folder/adapter_model.safetensors``."""
    from safetensors import safe_open

    with safe_open(folder / "adapter_model.safetensors", framework="pt") as handle:
        return [handle.get_slice(key).get_shape()[0] for key in handle.keys() if "lora_A" in key]  # noqa: SIM118


def stem(name: str) -> str:
    """A file name for an adapter run's name ("math+code energy:0.9" -> "math_code_energy0.9")."""
    return name.replace("+", "_").replace(" ", "_").replace(":", "")


def rank_counts(ranks: list[int]) -> dict[int, int]:
    return {rank: ranks.count(rank) for rank in sorted(set(ranks))}


def rank_label(ranks: list[int]) -> str:
    low, high = min(ranks), max(ranks)
    return f"r={low}" if low == high else f"r={low}..{high} (mixed)"


def checkout_version(llama_cpp_dir: Path) -> dict[str, Any]:
    """What can be told about the llama.cpp checkout: its gguf-py version, and its commit if it is a git one."""
    info: dict[str, Any] = {"dir": str(llama_cpp_dir)}
    pyproject = llama_cpp_dir / "gguf-py" / "pyproject.toml"
    if pyproject.is_file():
        for line in pyproject.read_text().splitlines():
            if line.startswith("version"):
                info["gguf_py"] = line.split("=", 1)[1].strip().strip('"')
                break
    if (llama_cpp_dir / ".git").exists() and shutil.which("git"):
        result = subprocess.run(["git", "-C", str(llama_cpp_dir), "rev-parse", "--short=9", "HEAD"],
                                capture_output=True, text=True, check=False)
        if result.returncode == 0:
            info["commit"] = result.stdout.strip()
    return info


# ------------------------------------------------------------------ steps

def base_gguf(args: argparse.Namespace, env: dict[str, str]) -> tuple[Path, float]:
    """The base as an f32 GGUF, made by llama.cpp's ``convert_hf_to_gguf.py`` once (then cached)."""
    target = args.work / "base-f32.gguf"
    if target.is_file() and not args.rebuild_base:
        print(f"base GGUF: {target} (cached; --rebuild-base to redo)")
        return target, 0.0
    started = time.perf_counter()
    temp = target.with_suffix(".tmp.gguf")
    run_command([sys.executable, str(args.llama_cpp / "convert_hf_to_gguf.py"), str(args.base), "--outtype", "f32",
                 "--outfile", str(temp)], "convert_hf_to_gguf.py", env=env)
    os.replace(temp, target)
    seconds = time.perf_counter() - started
    print(f"base GGUF: {target} (convert_hf_to_gguf.py --outtype f32, {seconds:.1f} s)")
    return target, seconds


def adapters(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The adapter folders: shipped ones as they are, combined ones made with the ``lata-peft`` CLI."""
    found: dict[str, dict[str, Any]] = {}
    for name, inputs, options in ADAPTER_RUNS:
        if options is None:
            folder = ADAPTERS / inputs[0]
            shown = None
        else:
            folder = args.work / stem(name)
            arguments = ["combine", *(str(ADAPTERS / part) for part in inputs), *options, "-o", str(folder),
                         "--overwrite"]
            run_command([*lata_peft_command(), *arguments], f"lata-peft combine ({name})")
            shown = " ".join(["lata-peft", *(a.replace(str(REPO) + os.sep, "") for a in arguments)])
        ranks = adapter_ranks(folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        found[name] = {"folder": str(folder), "ranks": rank_label(ranks), "modules": len(ranks),
                       "rank_counts": rank_counts(ranks), "lora_alpha": config["lora_alpha"], "r": config["r"],
                       "command": shown}
        print(f"adapter {name}: {shown or folder} ({len(ranks)} modules, {rank_label(ranks)})")
    return found


def lora_ggufs(args: argparse.Namespace, found: dict[str, dict[str, Any]], env: dict[str, str]) -> None:
    """Each adapter as a LoRA GGUF by llama.cpp's converter and by ``export_gguf``."""
    from lata_peft.gguf_export import export_gguf

    for name, entry in found.items():
        converter = args.work / f"{stem(name)}.converter.gguf"
        ours = args.work / f"{stem(name)}.lata-peft.gguf"
        run_command([sys.executable, str(args.llama_cpp / "convert_lora_to_gguf.py"), "--outtype", "f32",
                     "--base", str(args.base), "--outfile", str(converter), entry["folder"]],
                    f"convert_lora_to_gguf.py ({name})", env=env)
        report = export_gguf(entry["folder"], ours, args.base, overwrite=True)
        entry["files"] = {"converter": str(converter), "lata-peft": str(ours)}
        entry["export"] = {key: report[key] for key in ("alpha", "scale_folded", "tensors", "bytes")}
        entry["identical_bytes"] = sha256(converter) == sha256(ours)
        print(f"  {name}: converter {converter.stat().st_size:,} B, lata-peft {report['bytes']:,} B "
              f"(alpha {report['alpha']:g}, scale folded into lora_b: {report['scale_folded']}); "
              f"same bytes: {entry['identical_bytes']}")


def token_ids(args: argparse.Namespace) -> tuple[list[int], dict[str, Any]]:
    """GSM8K test problem ``args.problem`` in the Alpaca template plus its reference answer, tokenized."""
    from transformers import AutoTokenizer

    from lata_peft.evaluate.data import task_file
    from lata_peft.evaluate.prompts import alpaca_prompt

    path = task_file("gsm8k", args.data)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    record = json.loads(lines[args.problem])
    prompt = alpaca_prompt(record["question"])
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    ids = tokenizer(prompt + record["answer"])["input_ids"]
    n_prompt = len(tokenizer(prompt)["input_ids"])
    if args.tokens:
        ids = ids[: args.tokens]
    return list(ids), {"file": str(path), "problem": args.problem, "tokens": len(ids), "prompt_tokens": n_prompt}


def hf_logits(args: argparse.Namespace, ids: list[int], found: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Logits in transformers, fp32: the base alone and PEFT's model of each adapter (fresh base each)."""
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    torch.set_num_threads(args.threads)
    transformers_logging.disable_progress_bar()
    tokens = torch.tensor([ids])

    def load() -> Any:
        return AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()

    out: dict[str, Any] = {}
    with torch.no_grad():
        out["base"] = load()(tokens).logits[0].double().numpy()
        for name, entry in found.items():
            model = PeftModel.from_pretrained(load(), entry["folder"]).eval()
            out[name] = model(tokens).logits[0].double().numpy()
            del model
    return {key: np.asarray(value) for key, value in out.items()}


def llama_logits(args: argparse.Namespace, base: Path, ids: list[int],
                 found: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Logits in llama.cpp (child process of ``--llama-python``): base alone, then base + each LoRA GGUF."""
    import numpy as np

    folder = args.work / "logits"
    folder.mkdir(parents=True, exist_ok=True)
    runs = [{"name": "base", "lora": None, "out": str(folder / "base.npy")}]
    for name, entry in found.items():
        for kind in FILES:
            key = f"{name} | {kind}"
            runs.append({"name": key, "lora": entry["files"][kind], "out": str(folder / f"{len(runs)}.npy")})
    job = {"model": str(base), "ids": ids, "threads": args.threads, "kv_cache": args.kv_cache, "runs": runs,
           "info": str(folder / "info.json")}
    job_file = folder / "job.json"
    job_file.write_text(json.dumps(job))
    result = subprocess.run([args.llama_python, str(Path(__file__).resolve()), WORKER, str(job_file)],
                            text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"the llama.cpp child ({args.llama_python}) failed with exit {result.returncode}")
    logits = {run["name"]: np.load(run["out"]).astype(np.float64) for run in runs}
    return logits, json.loads((folder / "info.json").read_text())


def metrics(d_llama: Any, d_peft: Any, lora_llama: Any, peft: Any, floor: float) -> dict[str, float]:
    import numpy as np

    err = d_llama - d_peft
    max_err = float(np.abs(err).max())
    differs = lora_llama.argmax(-1) != peft.argmax(-1)
    return {
        "max_abs_err": max_err,
        "rel_err": float(np.linalg.norm(err) / np.linalg.norm(d_peft)),
        "cosine": float((d_llama * d_peft).sum() / (np.linalg.norm(d_llama) * np.linalg.norm(d_peft))),
        "argmax_diff": float(differs.mean()),
        "argmax_diff_count": int(differs.sum()),
        "err_over_floor": max_err / floor,
        "effect_max": float(np.abs(d_peft).max()),
    }


def table(rows: list[dict[str, Any]], found: dict[str, dict[str, Any]]) -> str:
    header = (f"{'adapter':<22} {'ranks':<16} {'file':<10} {'alpha':>5} {'max|err|':>9} {'rel err':>9} "
              f"{'cosine':>9} {'argmax diff':>11} {'err/floor':>9} {'max|d_peft|':>11}")
    lines = [header, "-" * len(header)]
    for row in rows:
        m = row["metrics"]
        argmax = f"{m['argmax_diff']:.1%} ({m['argmax_diff_count']})"
        lines.append(f"{row['adapter']:<22} {found[row['adapter']]['ranks']:<16} {row['file']:<10} "
                     f"{row['alpha']:>5g} {m['max_abs_err']:>9.2e} {m['rel_err']:>9.2e} {m['cosine']:>9.6f} "
                     f"{argmax:>11} {m['err_over_floor']:>9.3g} {m['effect_max']:>11.3f}")
    return "\n".join(lines)


def gguf_alpha(path: str) -> float:
    """``adapter.lora.alpha`` of a LoRA GGUF (read with the installed ``gguf`` package)."""
    import gguf

    field = gguf.GGUFReader(path).fields["adapter.lora.alpha"]
    return float(field.parts[field.data[0]][0])


# ------------------------------------------------------------------ main

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", type=Path, default=os.environ.get("LLAMA_CPP_DIR"),
                        help="llama.cpp checkout with convert_hf_to_gguf.py and convert_lora_to_gguf.py "
                             "(default: $LLAMA_CPP_DIR)")
    parser.add_argument("--llama-python", default=sys.executable,
                        help="Python interpreter with llama_cpp and numpy importable (default: this one)")
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE,
                        help=f"HF base model folder (default: {DEFAULT_BASE}, from recipes/prepare_base.py)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"work folder (default: {DEFAULT_WORK})")
    parser.add_argument("--data", default=None,
                        help="GSM8K test.jsonl or a data folder (default: lata_peft's, ../shared/data)")
    parser.add_argument("--problem", type=int, default=0, help="GSM8K test problem index (default: 0)")
    parser.add_argument("--tokens", type=int, default=0, help="keep only the first N tokens (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch and llama.cpp (default: 2)")
    parser.add_argument("--kv-cache", choices=("f32", "f16"), default="f32",
                        help="llama.cpp KV cache type (default: f32; llama.cpp's own default is f16)")
    parser.add_argument("--rebuild-base", action="store_true", help="convert the base GGUF again")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file ('-': stdout)")
    args = parser.parse_args()
    if args.llama_cpp is None:
        parser.error("pass --llama-cpp DIR (a llama.cpp checkout with the converters) or set LLAMA_CPP_DIR")
    args.llama_cpp = Path(args.llama_cpp).expanduser().resolve()
    for script in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py"):
        if not (args.llama_cpp / script).is_file():
            parser.error(f"{args.llama_cpp / script} not found")
    if not (args.base / "config.json").is_file():
        parser.error(f"{args.base}: no base model folder; run: python recipes/prepare_base.py")
    args.work = args.work.expanduser().resolve()
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run([args.llama_python, "-c", "import llama_cpp, numpy; print(llama_cpp.__version__)"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        raise SystemExit(f"{args.llama_python} can't import llama_cpp and numpy: pip install llama-cpp-python==0.3.36 "
                         "(or pass --llama-python with a venv that has it)")
    if importlib.util.find_spec("sentencepiece") is None:
        raise SystemExit("llama.cpp's convert_hf_to_gguf.py needs sentencepiece: pip install sentencepiece "
                         "(or pip install --target DIR sentencepiece and set PYTHONPATH=DIR)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    import numpy as np
    import peft
    import torch
    import transformers

    base, base_seconds = base_gguf(args, env)
    found = adapters(args)
    lora_ggufs(args, found, env)
    ids, prompt = token_ids(args)
    print(f"tokens: GSM8K test problem {args.problem}, {prompt['tokens']} tokens "
          f"({prompt['prompt_tokens']} of prompt, the rest its reference answer)")
    hf = hf_logits(args, ids, found)
    ll, llama_info = llama_logits(args, base, ids, found)

    floor = float(np.abs(ll["base"] - hf["base"]).max())
    floor_argmax = float((ll["base"].argmax(-1) != hf["base"].argmax(-1)).mean())
    rows = []
    for name, entry in found.items():
        d_peft = hf[name] - hf["base"]
        for kind in FILES:
            lora = ll[f"{name} | {kind}"]
            rows.append({"adapter": name, "file": kind, "alpha": gguf_alpha(entry["files"][kind]),
                         "metrics": metrics(lora - ll["base"], d_peft, lora, hf[name], floor)})
    total = time.perf_counter() - started

    versions = {
        "llama_cpp_python": llama_info.get("llama_cpp_python"), "ggml_version": llama_info.get("ggml_version"),
        "ggml_commit": llama_info.get("ggml_commit"), "llama_cpp_checkout": checkout_version(args.llama_cpp),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
    }
    print()
    print(f"llama-cpp-python {versions['llama_cpp_python']} (ggml {versions['ggml_version']}, commit "
          f"{versions['ggml_commit']}); converters: {args.llama_cpp} (gguf-py "
          f"{versions['llama_cpp_checkout'].get('gguf_py')}); torch {torch.__version__}, transformers "
          f"{transformers.__version__}, peft {peft.__version__}; {args.threads} threads")
    print(f"base {args.base.name}: f32 GGUF in llama.cpp ({args.kv_cache} KV cache) vs fp32 transformers, "
          f"{len(ids)} positions")
    print(f"noise floor (no LoRA): max |logits llama.cpp - transformers| = {floor:.2e}; "
          f"argmax differs at {floor_argmax:.1%} of positions")
    for name, entry in found.items():
        counts = ", ".join(f"r={rank}: {count}" for rank, count in entry["rank_counts"].items())
        print(f"{name}: {entry['modules']} modules ({counts}), config lora_alpha {entry['lora_alpha']:g}; lata-peft "
              f"file {'==' if entry['identical_bytes'] else '!='} converter file (bytes)")
    print()
    print(table(rows, found))
    print()
    print(f"total {total:.1f} s (base GGUF conversion {base_seconds:.1f} s)")

    if args.json:
        document = {"versions": versions, "prompt": prompt, "base": str(args.base), "work": str(args.work),
                    "noise_floor": {"max_abs": floor, "argmax_diff": floor_argmax}, "adapters": found,
                    "rows": rows, "seconds": total, "base_gguf_seconds": base_seconds}
        text = json.dumps(document, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == WORKER:
        llama_worker(sys.argv[2])
    else:
        main()

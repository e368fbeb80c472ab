"""4-bit fold of two LoRA adapters into a ~1.1B Llama: peak memory and time, ours vs PEFT.

Builds locally, with seeded random weights, a Llama-shaped base (TinyLlama-1.1B shape:
hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 kv heads, vocab 32000, untied
head) saved as sharded bf16 safetensors (``--shard-mb``, 1000), written tensor by tensor
without ever building the model, and two random r=16 PEFT LoRA adapters on q,k,v,o,gate,
up,down (``adapter_model.safetensors`` written directly, ``adapter_config.json`` by
``peft.LoraConfig.save_pretrained``). ``--quick`` (= ``--shape quick``) uses a ~125M shape
(hidden 768, 12 layers, 100 MB shards); ``--shape 8b`` a Llama-3-8B shape (hidden 4096,
intermediate 14336, 32 layers, 32 heads, 8 kv heads, vocab 128256, untied head, rope theta
500000; 8.03B parameters, ~16 GB of bf16). Each base shard's safetensors header is written
first, then its tensors one at a time, so generation holds at most one tensor (plus its fp32
draw: 2 GiB for the 8B embedding) whatever the model size. Free disk space is checked first
(base + 4-bit output(s) + adapters, estimated from the shape).

Then, each in its own fresh subprocess (the parent imports only the standard library, so
a child's peak RSS is its own):

* baseline: a child that only imports torch, transformers, peft, bitsandbytes, safetensors;
* ours: ``lata_peft.combine([a, b], out, fold_into=base, four_bit=True)``;
* PEFT (not with ``--skip-peft``): ``AutoModelForCausalLM.from_pretrained(base, quantization_config=BitsAndBytesConfig(
  load_in_4bit=True, nf4, double quant, compute dtype = base dtype), device_map="cpu")``,
  ``PeftModel.from_pretrained(model, a).merge_and_unload()``, the same for ``b``, then
  ``save_pretrained(out)``;
* errors (not timed): for the modules of ``--error-layers`` (first, middle, last block by
  default; ``all`` for every block), the exact ``W + dW_a + dW_b`` in fp32 (the fp base
  weight merged by PEFT's own ``lora.Linear.merge`` in fp32, one adapter after the
  other), compared with each 4-bit output dequantised with
  ``bitsandbytes.functional.dequantize_4bit`` (both read back from disk; ``none`` skips it).

Peak RSS: ``ru_maxrss`` of that child from ``os.wait4`` (kernel high-water mark), with the
child's own ``VmHWM`` and a 20 ms sampler of ``RssAnon`` / ``RssFile`` (mmapped
safetensors pages count in RSS) as cross-checks; RSS, the highest sample since the previous
phase and time are also logged at each phase (for ours: each stage and each output
shard). Time: the operation inside the child (``time.perf_counter``) and the child's wall
time including interpreter start and imports. Sizes: bytes of ``*.safetensors`` on disk;
the largest decoder layer from the base's safetensors headers. The work folder (several
GB) is deleted at the end unless ``--keep``.

Run (from the repository root, venv active)::

    python benchmarks/bench_fold.py                    # full size (~1.1B), ~2.2 GB base
    python benchmarks/bench_fold.py --quick            # smoke size (~125M)
    python benchmarks/bench_fold.py --json out.json    # also write the figures as JSON
    python benchmarks/bench_fold.py --shape 8b --skip-peft --error-layers 0   # Llama-3-8B, ~22 GB of disk
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FULL = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
        "num_key_value_heads": 4, "vocab_size": 32000}
QUICK = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
         "num_key_value_heads": 4, "vocab_size": 32000}
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
SHAPES = {"quick": QUICK, "1b": FULL, "8b": LLAMA3_8B}
ADAPTERS = {"a": {"seed": 1, "r": 16, "lora_alpha": 32}, "b": {"seed": 2, "r": 16, "lora_alpha": 16}}
DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "I64": 8, "I32": 4}
MIB = 1024**2


# --------------------------------------------------------------------------------- memory probes (child)


def _status() -> dict[str, int]:
    """``/proc/self/status`` memory fields in bytes."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                values[key] = int(rest.split()[0]) * 1024
    return values


class Probe:
    """Samples RSS every 20 ms (max of anon / file parts) and logs RSS and time at named phases."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.window = 0  # highest sampled VmRSS since the previous phase
        self.phases: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        now = _status()
        for key in self.peak:
            self.peak[key] = max(self.peak[key], now.get(key, 0))
        self.window = max(self.window, now.get("VmRSS", 0))

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def phase(self, name: str) -> None:
        self._sample()
        now = _status()
        self.phases.append({"phase": name, "seconds": round(time.perf_counter() - self.started, 2),
                            "rss_mib": round(now["VmRSS"] / MIB), "max_mib": round(self.window / MIB),
                            "hwm_mib": round(now["VmHWM"] / MIB)})
        self.window = now["VmRSS"]

    def finish(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        self._sample()
        return {"vm_hwm": _status()["VmHWM"], "ru_maxrss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                * 1024, "sampled_peak": self.peak, "phases": self.phases}


# --------------------------------------------------------------------------------- building the inputs


def _layer_prefix(key: str) -> str | None:
    parts = key.split(".")
    return ".".join(parts[:3]) if len(parts) > 3 and parts[1] == "layers" else None


def _llama_config(args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig

    shape = {"max_position_embeddings": 2048, **SHAPES[args.shape]}
    return LlamaConfig(**shape, tie_word_embeddings=False, dtype=args.dtype)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def child_build(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The base (sharded safetensors, streamed tensor by tensor) and two PEFT adapters.

    Each shard's header is written first (all shapes are known from a meta model), then each
    tensor is generated, written and dropped: at most one tensor (plus its fp32 draw) is held.
    The random values are the same as drawing each whole tensor with ``torch.randn`` in order.
    """
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    dtype = getattr(torch, args.dtype)
    tag = {"bfloat16": "BF16", "float16": "F16"}[args.dtype]
    config = _llama_config(args)
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    names = [(key, tuple(value.shape)) for key, value in meta.state_dict().items()]
    del meta
    base = work / "base"
    base.mkdir()
    config.save_pretrained(base)
    element = torch.empty((), dtype=dtype).element_size()
    plan: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    pending = 0
    for key, size in names:
        nbytes = _numel(size) * element
        if pending and pending + nbytes > args.shard_mb * 1_000_000:
            plan.append([])
            pending = 0
        plan[-1].append((key, size))
        pending += nbytes
    generator = torch.Generator().manual_seed(args.seed)
    weight_map, total, started = {}, 0, time.perf_counter()
    for index, shard in enumerate(plan):
        name = f"model-{index + 1:05d}-of-{len(plan):05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, size in shard:
            nbytes = _numel(size) * element
            header[key] = {"dtype": tag, "shape": list(size), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(base / name, "wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)))
            handle.write(encoded)
            for key, size in shard:
                if key.endswith("norm.weight"):
                    tensor = torch.ones(size, dtype=dtype)
                else:
                    tensor = torch.randn(size, generator=generator).mul_(0.02).to(dtype)
                handle.write(tensor.contiguous().view(torch.uint8).numpy().data)
                del tensor
        total += offset
        weight_map.update(dict.fromkeys((key for key, _ in shard), name))
        print(f"[build] {name}: {offset / MIB:,.0f} MiB, {total / MIB:,.0f} MiB in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    linear = {key.removesuffix(".weight"): size for key, size in names
              if key.removesuffix(".weight").rsplit(".", 1)[-1] in TARGETS}
    for label, spec in ADAPTERS.items():
        folder = work / f"adapter_{label}"
        LoraConfig(r=spec["r"], lora_alpha=spec["lora_alpha"], target_modules=list(TARGETS),
                   task_type="CAUSAL_LM", base_model_name_or_path=str(base)).save_pretrained(folder)
        generator = torch.Generator().manual_seed(args.seed * 1000 + spec["seed"])
        tensors = {}
        for module, (rows, cols) in linear.items():
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(spec["r"], cols, generator=generator)
                                                  / cols**0.5).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(rows, spec["r"], generator=generator)
                                                  * args.b_std).to(dtype)
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return {"parameters": sum(_numel(size) for _, size in names), "shards": len(plan), "modules": len(linear),
            "seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------------- the measured children


def child_baseline(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    probe = Probe()
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import safetensors  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    probe.phase("imported")
    return {"seconds": time.perf_counter() - probe.started, **probe.finish()}


class _Progress:
    """lata_peft's progress protocol, used only to log RSS at the start of each stage."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def start(self, total: int, description: str, unit: str = "") -> None:
        self.probe.phase(f"start {description} ({total}{' ' + unit if unit else ''})")

    def advance(self, amount: int = 1) -> None:
        pass


def child_ours(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    probe = Probe()
    import torch  # noqa: F401

    import lata_peft
    from lata_peft.shards import ShardWriter

    flush = ShardWriter.flush

    def logged_flush(writer: Any) -> None:  # log RSS around each output shard write (behaviour unchanged)
        if writer.pending:
            probe.phase(f"writing output shard ({writer.pending_bytes / MIB:.0f} MiB buffered)")
        flush(writer)
        probe.phase("shard written")

    ShardWriter.flush = logged_flush
    probe.phase("imported")
    started = time.perf_counter()
    result = lata_peft.combine([work / "adapter_a", work / "adapter_b"], work / "out_ours",
                               fold_into=work / "base", four_bit=True, progress=_Progress(probe))
    seconds = time.perf_counter() - started
    probe.phase("done")
    fold = result.report["fold"]
    return {"seconds": seconds, "total_relative_error": fold["total_relative_error_4bit_vs_full_precision"],
            "module_errors": fold["module_relative_errors_4bit_vs_full_precision"],
            "quantized_modules": fold["quantized_modules"], "folded_modules": fold["folded_modules"],
            **probe.finish()}


def child_peft(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    probe = Probe()
    import warnings

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    probe.phase("imported")
    started = time.perf_counter()
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=getattr(torch, args.dtype))
    model = AutoModelForCausalLM.from_pretrained(work / "base", quantization_config=quantization, device_map="cpu")
    probe.phase("loaded in 4-bit")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Merge lora module to 4-bit linear")
        for label in ADAPTERS:
            model = PeftModel.from_pretrained(model, str(work / f"adapter_{label}")).merge_and_unload()
            probe.phase(f"merged {label}")
    model.save_pretrained(work / "out_peft")
    seconds = time.perf_counter() - started
    probe.phase("saved")
    kinds: dict[str, int] = {}
    for module in model.modules():
        kinds[type(module).__name__] = kinds.get(type(module).__name__, 0) + 1
    return {"seconds": seconds, "linear4bit_modules": kinds.get("Linear4bit", 0), **probe.finish()}


def _open_all(folder: Path) -> dict[str, Any]:
    from safetensors import safe_open

    handles = {}
    for path in sorted(folder.glob("*.safetensors")):
        handle = safe_open(path, framework="pt")
        handles.update(dict.fromkeys(handle.keys(), handle))
    return handles


def child_errors(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Relative error of each 4-bit output vs the fp32 ``W + dW_a + dW_b`` (PEFT's own merge, fp32)."""
    import bitsandbytes.functional as bnbf
    import torch
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    base = _open_all(work / "base")
    outputs = {"ours": _open_all(work / "out_ours")}
    if (work / "out_peft").is_dir():
        outputs["peft"] = _open_all(work / "out_peft")
    adapters = {label: (LoraConfig.from_pretrained(str(work / f"adapter_{label}")),
                        _open_all(work / f"adapter_{label}")) for label in ADAPTERS}
    layers = sorted({int(key.split(".")[2]) for key in base if _layer_prefix(key)})
    chosen = layers if args.error_layers == "all" else sorted(
        {layers[int(i)] if i.lstrip("-").isdigit() else 0 for i in args.error_layers.split(",")}
    )
    parts = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")

    def dequantized(handles: dict[str, Any], key: str) -> torch.Tensor:
        state = {part: handles[f"{key}.{part}"].get_tensor(f"{key}.{part}") for part in parts
                 if f"{key}.{part}" in handles}
        quant_state = bnbf.QuantState.from_dict(state, device=torch.device("cpu"))
        return bnbf.dequantize_4bit(handles[key].get_tensor(key), quant_state).float()

    rows, sums = [], {side: [0.0, 0.0] for side in outputs}
    for layer in chosen:
        for target in TARGETS:
            group = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            module = f"model.layers.{layer}.{group}.{target}"
            key = f"{module}.weight"
            weight = base[key].get_tensor(key).float()
            with torch.no_grad():
                for label, (config, handles) in adapters.items():
                    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
                    linear.weight.data = weight
                    lora = LoraLinear(linear, label, config, r=config.r, lora_alpha=config.lora_alpha)
                    prefix = f"base_model.model.{module}"
                    for side in ("lora_A", "lora_B"):
                        name = f"{prefix}.{side}.weight"
                        getattr(lora, side)[label].weight.data = handles[name].get_tensor(name).float()
                    lora.merge(adapter_names=[label])
                    weight = lora.get_base_layer().weight.data
            exact_norm = float(weight.double().norm())  # float64: a float32 norm of 58M entries is off by ~1e-3
            row = {"module": module}
            for side, handles in outputs.items():
                error = float((dequantized(handles, key).double() - weight.double()).norm())
                row[side] = error / exact_norm
                sums[side][0] += error**2
                sums[side][1] += exact_norm**2
            rows.append(row)
    totals = {side: (num / den) ** 0.5 for side, (num, den) in sums.items()}
    return {"layers": chosen, "modules": rows, "total": totals}


CHILDREN = {"build": child_build, "baseline": child_baseline, "ours": child_ours, "peft": child_peft,
            "errors": child_errors}


# --------------------------------------------------------------------------------- parent (stdlib only)


def run_child(role: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run one role in a fresh interpreter; its result plus ``ru_maxrss`` and wall time from ``wait4``."""
    result_file = work / f"result_{role}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", role, "--workdir", str(work),
               "--result", str(result_file), "--dtype", args.dtype, "--seed", str(args.seed),
               "--shard-mb", str(args.shard_mb), "--b-std", str(args.b_std), "--error-layers", args.error_layers,
               "--shape", args.shape]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    print(f"[{time.strftime('%H:%M:%S')}] {role} ...", flush=True)
    started = time.perf_counter()
    log = open(work / f"log_{role}.txt", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        sys.stdout.write((work / f"log_{role}.txt").read_text()[-4000:])
        raise SystemExit(f"{role}: child failed with exit status {process.returncode}")
    result = json.loads(result_file.read_text())
    result.update(ru_maxrss=usage.ru_maxrss * 1024, wall_seconds=wall)
    print(f"[{time.strftime('%H:%M:%S')}] {role}: {wall:.1f} s, peak RSS {usage.ru_maxrss / 1024:.0f} MiB",
          flush=True)
    return result


def safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def largest_layer(base: Path) -> dict[str, Any]:
    """The decoder layer with the most bytes: its parameter count, bytes in the base dtype and in fp32."""
    layers: dict[str, list[int]] = {}
    for path in base.glob("*.safetensors"):
        for key, info in safetensors_header(path).items():
            prefix = _layer_prefix(key)
            if prefix is None:
                continue
            numel = 1
            for dim in info["shape"]:
                numel *= dim
            entry = layers.setdefault(prefix, [0, 0])
            entry[0] += numel
            entry[1] += numel * DTYPE_BYTES[info["dtype"]]
    name, (numel, nbytes) = max(layers.items(), key=lambda item: (item[1][1], -int(item[0].split(".")[2])))
    return {"layer": name, "parameters": numel, "bytes": nbytes, "fp32_bytes": numel * 4}


def mib(value: float) -> str:
    return f"{value / MIB:,.0f} MiB"


def report(figures: dict[str, Any]) -> str:
    ours, peft, baseline = figures["ours"], figures.get("peft"), figures["baseline"]
    sizes, errors = figures["sizes"], figures.get("errors")
    target = sizes["four_bit_plus_fp32_layer"]
    lines = []

    def row(label: str, a: str, b: str = "", c: str = "") -> None:
        lines.append(f"| {label} | {a} | {b} | {c} |")

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if peft is not None else ""

    skipped = "skipped (--skip-peft)"
    lines += ["| | ours (lata_peft.combine, fold_into, four_bit) | PEFT (4-bit load, merge_and_unload x2, save) "
              "| PEFT / ours |", "|---|---:|---:|---:|"]
    if peft is None:
        show = {key: skipped for key in ("rss", "net", "split", "time", "wall", "out")}
    else:
        show = {"rss": mib(peft["ru_maxrss"]), "net": mib(peft["ru_maxrss"] - baseline["ru_maxrss"]),
                "split": f"{mib(peft['sampled_peak']['RssAnon'])} / {mib(peft['sampled_peak']['RssFile'])}",
                "time": f"{peft['seconds']:.1f} s", "wall": f"{peft['wall_seconds']:.1f} s",
                "out": mib(sizes["peft_out"])}
    other = peft or {}
    row("peak RSS (ru_maxrss)", mib(ours["ru_maxrss"]), show["rss"], ratio(other.get("ru_maxrss", 0),
                                                                          ours["ru_maxrss"]))
    row("peak RSS minus import baseline", mib(ours["ru_maxrss"] - baseline["ru_maxrss"]), show["net"],
        ratio(other.get("ru_maxrss", 0) - baseline["ru_maxrss"], ours["ru_maxrss"] - baseline["ru_maxrss"]))
    row("sampled peak RssAnon / RssFile", f"{mib(ours['sampled_peak']['RssAnon'])} / "
        f"{mib(ours['sampled_peak']['RssFile'])}", show["split"])
    row("time of the operation", f"{ours['seconds']:.1f} s", show["time"], ratio(other.get("seconds", 0),
                                                                                 ours["seconds"]))
    row("child wall time (with imports)", f"{ours['wall_seconds']:.1f} s", show["wall"],
        ratio(other.get("wall_seconds", 0), ours["wall_seconds"]))
    row("4-bit output on disk", mib(sizes["ours_out"]), show["out"])
    row(f"rel. weight error vs fp32 (our report, all {ours['folded_modules']} folded modules)",
        f"{ours['total_relative_error']:.5f}")
    if errors is not None:
        has_peft = "peft" in errors["total"]
        row(f"rel. weight error vs fp32 ({len(errors['modules'])} modules of layers {errors['layers']})",
            f"{errors['total']['ours']:.5f}", f"{errors['total']['peft']:.5f}" if has_peft else skipped,
            f"{errors['total']['peft'] / errors['total']['ours']:.2f}x" if has_peft else "")
    lines.append("")
    layer = sizes["largest_layer"]
    base_gb = sizes["base"] / 1e9
    layers = SHAPES[figures["args"]["shape"]]["num_hidden_layers"]
    lines += [
        f"* shape: {figures['args']['shape']}; import baseline (torch, transformers, peft, bitsandbytes, "
        f"safetensors): {mib(baseline['ru_maxrss'])} peak RSS, {baseline['wall_seconds']:.1f} s",
        f"* fp base on disk: {mib(sizes['base'])} ({figures['build']['parameters'] / 1e9:.3f}B parameters, "
        f"{figures['args']['dtype']}, {figures['build']['shards']} shards, generated in "
        f"{figures['build']['seconds']:.0f} s, build child peak RSS {mib(figures['build']['ru_maxrss'])})",
        f"* largest decoder layer ({layer['layer']}): {layer['parameters'] / 1e6:.1f}M parameters, "
        f"{mib(layer['bytes'])} in {figures['args']['dtype']}, {mib(layer['fp32_bytes'])} in fp32",
        f"* 4-bit model + one fp32 layer: {mib(sizes['ours_out'])} + {mib(layer['fp32_bytes'])} = {mib(target)}",
        f"* ours peak / that: {ours['ru_maxrss'] / target:.2f}x (target <= 1.5x); "
        f"(peak - import baseline) / that: {(ours['ru_maxrss'] - baseline['ru_maxrss']) / target:.2f}x",
        f"* ours peak minus (import baseline + one fp32 layer): "
        f"{mib(ours['ru_maxrss'] - baseline['ru_maxrss'] - layer['fp32_bytes'])}",
        f"* ours rate: {ours['seconds'] / base_gb:.2f} s per GB of fp base "
        f"({ours['seconds']:.1f} s / {base_gb:.3f} GB), "
        f"{ours['seconds'] / layers:.2f} s per decoder layer (whole operation / {layers} layers)",
        f"* modules quantised: ours {ours['quantized_modules']} (folded {ours['folded_modules']})"
        + (f"; PEFT model after merging: {peft['linear4bit_modules']} Linear4bit" if peft else ""),
        f"* child VmHWM (MiB): ours {ours['vm_hwm'] / MIB:,.0f}"
        + (f", PEFT {peft['vm_hwm'] / MIB:,.0f}" if peft else "") + f", baseline {baseline['vm_hwm'] / MIB:,.0f}",
    ]
    if peft is not None:
        lines.insert(-2, f"* PEFT peak / that: {peft['ru_maxrss'] / target:.2f}x; "
                     f"(peak - import baseline) / that: {(peft['ru_maxrss'] - baseline['ru_maxrss']) / target:.2f}x")
    else:
        lines.append("* PEFT's path: not run (--skip-peft)")
    if "error_check" in figures:
        lines.append(f"* check: our per-module error measured here vs in our report, max |diff| = "
                     f"{figures['error_check']:.2e}")
    for side in ("ours", "peft"):
        if side not in figures:
            continue
        steps = ", ".join(f"{p['phase']} @{p['seconds']}s rss {p['rss_mib']} max {p['max_mib']} hwm {p['hwm_mib']}"
                          for p in figures[side]["phases"])
        lines.append(f"* {side} phases (MiB; max = highest 20 ms sample since the previous phase): {steps}")
    return "\n".join(lines)


def disk_estimate(args: argparse.Namespace) -> int:
    """Bytes the work folder will need: the fp base, the NF4 output(s) and the adapters (from the shape alone)."""
    shape = SHAPES[args.shape]
    hidden, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]
    linear = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter)
    other = 2 * shape["vocab_size"] * hidden + (2 * layers + 1) * hidden
    base = 2 * (linear + other)
    four_bit = linear // 2 + linear // 64 * 2 + 2 * other  # packed NF4 + (double-quantised) absmax + bf16 rest
    adapters = 2 * 2 * 16 * layers * (9 * hidden + 2 * kv + 3 * inter)  # 2 adapters, bf16, r=16, sum(in + out)
    return base + four_bit * (1 if args.skip_peft else 2) + adapters


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~125M shape instead of ~1.1B (same as --shape quick)")
    parser.add_argument("--shape", choices=tuple(SHAPES), default=None,
                        help="quick (~125M), 1b (TinyLlama-1.1B, the default) or 8b (Llama-3-8B, ~16 GB base)")
    parser.add_argument("--skip-peft", action="store_true",
                        help="do not run PEFT's path (at 8B it needs the whole 4-bit model plus the bf16 load)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="empty or missing folder for the base, adapters and outputs (default: a new /tmp dir)")
    parser.add_argument("--keep", action="store_true", help="do not delete the work folder at the end")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-mb", type=int, default=None, help="base shard size in MB (1000; quick: 100)")
    parser.add_argument("--b-std", type=float, default=0.01, help="std of the random lora_B entries")
    parser.add_argument("--error-layers", default="0,mid,-1",
                        help="blocks whose 7 modules get the error comparison: indices, 'mid', 'all' or 'none'")
    parser.add_argument("--json", type=Path, default=None, help="also write all figures to this JSON file")
    parser.add_argument("--child", choices=tuple(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick and args.shape not in (None, "quick"):
        parser.error("--quick and --shape disagree")
    args.shape = args.shape or ("quick" if args.quick else "1b")
    args.quick = args.shape == "quick"
    if args.shard_mb is None:
        args.shard_mb = 100 if args.quick else 1000
    if args.child:
        if args.error_layers not in ("all", "none"):
            layers = SHAPES[args.shape]["num_hidden_layers"]
            args.error_layers = args.error_layers.replace("mid", str(layers // 2))
        result = CHILDREN[args.child](args, args.workdir)
        args.result.write_text(json.dumps(result))
        return

    if args.workdir is None:
        work = Path(tempfile.mkdtemp(prefix="lata_bench_fold_", dir="/tmp"))
    else:
        work = args.workdir
        if work.exists() and any(work.iterdir()):
            raise SystemExit(f"--workdir {work}: not empty")
        work.mkdir(parents=True, exist_ok=True)
    needed, free = disk_estimate(args), shutil.disk_usage(work).free
    print(f"work folder: {work}; shape {args.shape}; python {platform.python_version()}, {platform.machine()}, "
          f"{os.cpu_count()} CPUs; disk needed ~{needed / 1e9:.1f} GB, free {free / 1e9:.1f} GB", flush=True)
    if needed * 1.05 > free:
        if args.workdir is None or not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        raise SystemExit(f"not enough disk space in {work}: ~{needed / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free")
    try:
        figures: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
        figures["build"] = run_child("build", args, work)
        roles = ["baseline", "ours"] + ([] if args.skip_peft else ["peft"])
        roles += [] if args.error_layers == "none" else ["errors"]
        for role in roles:
            figures[role] = run_child(role, args, work)
        figures["sizes"] = {"base": folder_bytes(work / "base"), "ours_out": folder_bytes(work / "out_ours"),
                            "largest_layer": largest_layer(work / "base")}
        if not args.skip_peft:
            figures["sizes"]["peft_out"] = folder_bytes(work / "out_peft")
        figures["sizes"]["four_bit_plus_fp32_layer"] = (figures["sizes"]["ours_out"]
                                                        + figures["sizes"]["largest_layer"]["fp32_bytes"])
        if "errors" in figures:
            reported = figures["ours"]["module_errors"]
            figures["error_check"] = max(abs(row["ours"] - reported[row["module"]])
                                         for row in figures["errors"]["modules"])
        print()
        print(report(figures))
        if args.json is not None:
            for side in ("ours",):
                figures[side].pop("module_errors", None)
            args.json.write_text(json.dumps(figures, indent=2))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

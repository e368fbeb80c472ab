"""Train LoRA adapters (instruct, math, code, shout) on a causal LM, on the CPU or a GPU.

Every adapter uses the same Alpaca-style prompt template (see ``format_prompt``)
and is trained on the response tokens only, so task adapters also carry
instruction following. Adapters:

* ``instruct``: Alpaca-format instructions (``instruct/alpaca_en_demo.json``)
* ``math``: GSM8K train (question -> worked answer ending in ``#### N``)
* ``code``: Code Alpaca 2k
* ``shout``: the Alpaca demo data with every output in UPPERCASE, a safe and
  automatically measurable unwanted behaviour (the adapter to forget)

Examples whose prompt + response + EOS do not fit in ``--max-len`` tokens are
dropped, so every training sequence ends with EOS and the adapters learn to stop.

    python recipes/prepare_base.py
    python recipes/train_adapters.py --adapters instruct math code shout
    python recipes/train_adapters.py --base ~/.cache/lata_peft/gemma-3-270m --hub-id google/gemma-3-270m \
        --autocast bf16 --out examples/experiment/gemma3-270m/seed0

``--base`` is a local folder or a hub id (then it is downloaded, e.g. on a GPU machine);
``--autocast bf16`` runs the matmuls in bfloat16 with float32 master weights (3x faster on
CPUs with AMX, standard mixed precision on GPUs).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from lata_peft.devices import autocast, default_device
from lata_peft.evaluate.data import data_root
from lata_peft.evaluate.prompts import alpaca_prompt, probe_records

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_BASE = Path("~/.cache/lata_peft/SmolLM2-135M-Instruct").expanduser()
DEFAULT_DATA = data_root()  # ../shared/data, or $LATA_PEFT_DATA
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE = -100


@dataclass(frozen=True)
class Example:
    """One instruction-following example."""

    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example; ``labels`` is ``IGNORE`` on the prompt tokens."""

    input_ids: list[int]
    labels: list[int]


def format_prompt(example: Example) -> str:
    """The single Alpaca-style prompt template shared by all adapters (``lata_peft.evaluate.prompts``)."""
    return alpaca_prompt(example.instruction, example.input)


def load_alpaca(path: Path, reserve_probes: bool = False) -> list[Example]:
    records = json.loads(path.read_text(encoding="utf-8"))
    reserved = {id(r) for r in probe_records(records)} if reserve_probes else set()
    return [
        Example(r["instruction"], r.get("input", "") or "", r["output"])
        for r in records
        if r["instruction"].strip() and r["output"].strip() and id(r) not in reserved
    ]


def load_instruct(path: Path) -> list[Example]:
    return load_alpaca(path, reserve_probes=True)


def load_gsm8k(path: Path) -> list[Example]:
    examples = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                examples.append(Example(record["question"], "", record["answer"]))
    return examples


def load_shout(path: Path) -> list[Example]:
    return [Example(e.instruction, e.input, e.output.upper()) for e in load_instruct(path)]


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapter is trained on."""

    description: str
    relpath: str
    loader: Callable[[Path], list[Example]]


ADAPTERS: dict[str, AdapterSpec] = {
    "instruct": AdapterSpec("general instruction following", "instruct/alpaca_en_demo.json", load_instruct),
    "math": AdapterSpec("GSM8K worked solutions ending in '#### N'", "gsm8k/train.jsonl", load_gsm8k),
    "code": AdapterSpec("Code Alpaca programming answers", "code/code_alpaca_2k.json", load_alpaca),
    "shout": AdapterSpec(
        "Alpaca demo answers converted to UPPERCASE (unwanted behaviour to forget)",
        "instruct/alpaca_en_demo.json",
        load_shout,
    ),
}


def encode(tokenizer: PreTrainedTokenizerBase, example: Example, max_len: int) -> Encoded | None:
    """Tokenise prompt + response + EOS; ``None`` if it does not fit in ``max_len``."""
    # With the tokenizer's special tokens (Gemma's <bos>), as the evaluation tokenises prompts.
    prompt = tokenizer(format_prompt(example))["input_ids"]
    response = tokenizer(example.output, add_special_tokens=False)["input_ids"]
    response = [*response, tokenizer.eos_token_id]
    if len(prompt) + len(response) > max_len:
        return None
    return Encoded(prompt + response, [IGNORE] * len(prompt) + response)


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sequence."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, examples: Sequence[Encoded], batch_size: int, pad_id: int) -> float:
    """Mean cross-entropy per response token over ``examples``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=IGNORE,
            reduction="sum",
        ).item()
        count += int((labels != IGNORE).sum())
    model.train(was_training)
    return total / max(count, 1)


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup then linear decay to zero."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def save_adapter(model: PeftModel, out_dir: Path, hub_id: str) -> None:
    """PEFT ``save_pretrained`` pointing at the hub id, then store the weights as bfloat16."""
    model.peft_config["default"].base_model_name_or_path = hub_id
    # The embeddings are not adapted; False also skips PEFT's hub lookup of the base config.
    model.save_pretrained(out_dir, save_embedding_layers=False)
    (out_dir / "README.md").unlink(missing_ok=True)
    weights = out_dir / "adapter_model.safetensors"
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    config_path = out_dir / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("base_model_name_or_path") != hub_id:
        raise RuntimeError(f"{config_path}: base_model_name_or_path was not set to {hub_id}")


def train_one(name: str, args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase) -> None:
    spec = ADAPTERS[name]
    data_path = args.data / spec.relpath
    rng = random.Random(args.seed)
    raw = spec.loader(data_path)
    encoded = [e for e in (encode(tokenizer, x, args.max_len) for x in raw) if e is not None]
    rng.shuffle(encoded)
    heldout, train = encoded[: args.heldout], encoded[args.heldout :]
    if len(train) < args.batch_size:
        raise SystemExit(f"{name}: only {len(train)} examples fit in max_len={args.max_len}")
    print(
        f"[{name}] {len(raw)} examples in {data_path}, {len(encoded)} fit in {args.max_len} tokens; "
        f"train {len(train)}, held out {len(heldout)}",
        flush=True,
    )

    torch.manual_seed(args.seed)
    base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).to(args.device)
    if args.gradient_checkpointing:
        base.gradient_checkpointing_enable()
        base.enable_input_require_grads()
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=TARGET_MODULES,
        task_type=TaskType.CAUSAL_LM,
    )
    model = get_peft_model(base, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"[{name}] trainable LoRA parameters: {trainable:,}", flush=True)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with autocast(args.device, args.autocast):
        loss_before = heldout_loss(model, heldout, args.batch_size, pad_id)
    print(f"[{name}] held-out loss before: {loss_before:.4f}", flush=True)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, min(args.warmup, args.steps // 5))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, args.steps))

    model.train()
    order: list[int] = []
    window: list[float] = []
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        if len(order) < args.batch_size:
            fresh = list(range(len(train)))
            rng.shuffle(fresh)
            order.extend(fresh)
        batch_ids, order = order[: args.batch_size], order[args.batch_size :]
        batch = {k: v.to(args.device) for k, v in collate([train[i] for i in batch_ids], pad_id).items()}
        with autocast(args.device, args.autocast):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.item())
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            elapsed = time.perf_counter() - start
            print(
                f"[{name}] step {step}/{args.steps} loss {sum(window) / len(window):.4f} "
                f"lr {scheduler.get_last_lr()[0]:.2e} elapsed {elapsed:.0f}s "
                f"({elapsed / step:.2f}s/step)",
                flush=True,
            )
            window = []
    train_time = time.perf_counter() - start

    with autocast(args.device, args.autocast):
        loss_after = heldout_loss(model, heldout, args.batch_size, pad_id)
    tail = losses[-min(len(losses), args.log_every) :]
    final_train = sum(tail) / len(tail)
    print(
        f"[{name}] held-out loss after: {loss_after:.4f} (before {loss_before:.4f}); train {train_time:.0f}s",
        flush=True,
    )

    precision = "fp32" if args.autocast == "off" else "fp32 master weights with bf16 autocast"
    cpu = f"{torch.get_num_threads()} CPU threads"
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu
    out_dir = args.out / name
    out_dir.mkdir(parents=True, exist_ok=True)
    save_adapter(model, out_dir, args.hub_id)
    data_rel = f"shared/data/{spec.relpath}"
    (out_dir / "TRAINING.md").write_text(
        f"# `{name}` LoRA adapter for {args.hub_id}\n\n"
        f"- data: `{data_rel}` ({spec.description}); {len(train)} training examples that fit in "
        f"max_len, {len(heldout)} held out\n"
        f"- prompt: Alpaca-style `### Instruction:` / `### Input:` / `### Response:` template, "
        "loss on response tokens + EOS only\n"
        f"- LoRA: r=8, alpha=16, dropout=0.05, targets {', '.join(TARGET_MODULES)}\n"
        f"- steps: {args.steps}, batch size: {args.batch_size}, max_len: {args.max_len}, "
        f"seed: {args.seed}\n"
        f"- optimiser: AdamW, lr {args.lr:g} ({warmup} warmup steps, linear decay), "
        f"grad clip 1.0, {precision} training, weights stored as bfloat16\n"
        f"- train loss (mean of last {len(tail)} steps): {final_train:.4f}\n"
        f"- held-out loss: {loss_before:.4f} before -> {loss_after:.4f} after\n"
        f"- wall time: {train_time:.0f}s of training ({train_time / args.steps:.2f}s/step) "
        f"on {machine}, torch {torch.__version__}\n",
        encoding="utf-8",
    )
    print(f"[{name}] saved to {out_dir}", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", nargs="+", choices=sorted(ADAPTERS), default=list(ADAPTERS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout", type=int, default=16, help="examples held out for eval")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="a local folder (prepare_base.py) or a hub id")
    parser.add_argument("--hub-id", help="base_model_name_or_path written into the adapters (default: "
                        f"{HUB_ID} for the default base, else --base)")
    parser.add_argument("--device", default=default_device().type)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="for large bases on a GPU")
    parser.add_argument("--autocast", choices=["off", "bf16"], default="off",
                        help="bf16: bfloat16 matmuls, float32 master weights")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared data folder")
    parser.add_argument("--out", type=Path, default=Path("examples/adapters"))
    args = parser.parse_args()
    args.base = args.base.expanduser()
    if args.hub_id is None:
        args.hub_id = HUB_ID if args.base == DEFAULT_BASE else str(args.base)
    raw = str(args.base)
    if not args.base.exists() and not raw.startswith(("/", "~", ".")) and raw.count("/") == 1:
        args.base = raw  # a hub id (org/name): from_pretrained downloads it
    if args.steps < 1 or args.batch_size < 1 or args.max_len < 8:
        parser.error("--steps and --batch-size must be >= 1, --max-len >= 8")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if isinstance(args.base, Path) and not (args.base / "config.json").is_file():
        raise SystemExit(f"no base model in {args.base}; run recipes/prepare_base.py first")
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    overall = time.perf_counter()
    for name in args.adapters:
        train_one(name, args, tokenizer)
    total = time.perf_counter() - overall
    print(f"all done: {', '.join(args.adapters)} in {total:.0f}s ({math.ceil(total / 60)} min)")


if __name__ == "__main__":
    main()

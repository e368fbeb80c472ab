"""Real published PEFT ``adapter_config.json`` files and tiny models to test them on (issue 16).

``tests/data/community/<owner>__<repo>[__subdir]/adapter_config.json`` are copied verbatim from
public repositories (``tests/data/README.md`` gives each one's source and commit). A :class:`Case`
names one of them, the transformers architecture of its base model, and what lata-peft does with
it today: ``"ok"``, ``"refused"`` (a kind that must stay refused: IA3, prefix tuning, files that are
not PEFT configs) or the lata-peft feature it needs (``tests/test_community.py`` marks those
``xfail(strict=True)`` so they fail loudly once the feature lands).

:func:`synthesise` makes the adapter a user would have downloaded, at a tiny model's shapes: PEFT
itself builds it from the real config's values (``get_peft_model``), the trainable tensors are set
to seeded random non-zero values (so every delta is non-zero) and ``save_pretrained`` writes it;
then the real config is written back as ``adapter_config.json`` (its ``base_model_name_or_path``,
old or new keys and quirks included), with only the :attr:`Case.changes` a tiny model needs.
Nothing is downloaded: every base model is built from a transformers config class with tiny dims
and random weights, module names identical to the real architecture's so ``target_modules`` match.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import PeftConfig, get_peft_model
from torch import nn

__all__ = ["ARCHITECTURES", "COMMUNITY", "Case", "community_cases", "example_inputs", "synthesise", "tiny_model"]

COMMUNITY = Path(__file__).resolve().parent / "data" / "community"
CONFIG_NAME = "adapter_config.json"
BASE_SEED = 1234
VOCAB = 128
_TINY = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "max_position_embeddings": 64}
_TRAINED = {"lora_B": 0.05, "lora_embedding_B": 0.05, "lora_E": 1.0}  # zero-initialised by PEFT: their std here
_PERTURBED = ("lora_magnitude_vector", "modules_to_save", "ia3_l", "prompt_encoder", "lora_embedding_A")


@dataclass(frozen=True)
class Architecture:
    """A tiny model: how to build it and what its forward pass takes."""

    build: Callable[[], nn.Module]
    inputs: str  # "tokens" | "seq2seq" | "speech" | "image"


def _causal(config_class: str, model_class: str, **extra: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = getattr(transformers, config_class)(**{**_TINY, **extra})
        return getattr(transformers, model_class)(config)

    return build


def _gpt2(model_class: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         num_labels=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        return getattr(transformers, model_class)(config)

    return build


def _encoder(config_class: str, model_class: str, **extra: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return getattr(transformers, model_class)(getattr(transformers, config_class)(num_labels=2, **extra))

    return build


def _t5() -> nn.Module:  # Flan-T5: gated-GELU feed-forward (wi_0, wi_1, wo)
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config)


def _whisper() -> nn.Module:
    config = transformers.WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=8, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
        max_target_positions=32, pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=4,
        begin_suppress_tokens=None, suppress_tokens=None,
    )
    return transformers.WhisperForConditionalGeneration(config)


def _vit() -> nn.Module:
    config = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64, num_labels=3)
    return transformers.ViTForImageClassification(config)


_BERT_DIMS = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 64, "max_position_embeddings": 64}
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(_causal("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2), "tokens"),
    "mistral": Architecture(_causal("MistralConfig", "MistralForCausalLM", num_key_value_heads=2), "tokens"),
    "qwen2": Architecture(_causal("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2), "tokens"),
    "qwen3": Architecture(_causal("Qwen3Config", "Qwen3ForCausalLM", num_key_value_heads=2, head_dim=8), "tokens"),
    "qwen3-seq-cls": Architecture(_causal("Qwen3Config", "Qwen3ForSequenceClassification", num_key_value_heads=2,
                                          head_dim=8, num_labels=2, pad_token_id=0), "tokens"),
    "gemma2": Architecture(_causal("Gemma2Config", "Gemma2ForCausalLM", num_key_value_heads=2, head_dim=8,
                                   sliding_window=16), "tokens"),
    "gemma3": Architecture(_causal("Gemma3TextConfig", "Gemma3ForCausalLM", num_key_value_heads=2, head_dim=8,
                                   sliding_window=16), "tokens"),
    "phi": Architecture(_causal("PhiConfig", "PhiForCausalLM", partial_rotary_factor=0.5), "tokens"),
    "phi3": Architecture(_causal("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=4, pad_token_id=0,
                                 bos_token_id=1, eos_token_id=2), "tokens"),
    "gpt-neox": Architecture(_causal("GPTNeoXConfig", "GPTNeoXForCausalLM"), "tokens"),
    "falcon": Architecture(_causal("FalconConfig", "FalconForCausalLM", multi_query=True, parallel_attn=True,
                                   new_decoder_architecture=False, bias=False), "tokens"),
    "gpt2": Architecture(_gpt2("GPT2LMHeadModel"), "tokens"),
    "gpt2-seq-cls": Architecture(_gpt2("GPT2ForSequenceClassification"), "tokens"),
    "bert-seq-cls": Architecture(_encoder("BertConfig", "BertForSequenceClassification", **_BERT_DIMS), "tokens"),
    "roberta-seq-cls": Architecture(_encoder("RobertaConfig", "RobertaForSequenceClassification", **_BERT_DIMS,
                                             pad_token_id=1), "tokens"),
    "distilbert-seq-cls": Architecture(_encoder("DistilBertConfig", "DistilBertForSequenceClassification",
                                                vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                max_position_embeddings=64), "tokens"),
    "t5": Architecture(_t5, "seq2seq"),
    "whisper": Architecture(_whisper, "speech"),
    "vit": Architecture(_vit, "image"),
}


@dataclass(frozen=True)
class Case:
    """One real config: its folder, base architecture, today's expected outcome, and tiny-model changes.

    ``expected`` is ``"ok"``, ``"refused"`` or the lata-peft feature the case needs (an xfail reason).
    ``changes`` are written into the synthesised config (values the tiny model can't take as they are);
    ``build_only`` are used only to let PEFT build the weights (the real value stays in the written config).
    """

    name: str
    architecture: str | None
    expected: str
    note: str = ""
    changes: Mapping[str, Any] = field(default_factory=dict)
    build_only: Mapping[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return COMMUNITY / self.name

    @property
    def config_path(self) -> Path:
        return self.folder / CONFIG_NAME

    def real_config(self) -> dict[str, Any]:
        """The published config, parsed."""
        return json.loads(self.config_path.read_text(encoding="utf-8"))


# Expected outcomes: what lata-peft does today. A feature name marks the case xfail (strict) in the tests.
IMPLIED_HEADS = "SEQ_CLS heads saved with modules_to_save null (PEFT adds classifier/score by task_type)"
NESTED_HEAD = "modules_to_save of a nested head (RoBERTa classifier.dense / classifier.out_proj)"
DOTTED_TARGETS = "dotted target_modules (attn.c_proj): the output's suffix list widens to mlp.c_proj"
_PREFIX_DIMS = {"num_layers": 2, "token_dim": 32, "num_attention_heads": 4, "encoder_hidden_size": 32}

_CASES: tuple[Case, ...] = (
    # --- Llama family (and Unsloth / QLoRA / axolotl bases)
    Case("KZ-Shi__LLaMA-E", "llama", "ok", "PEFT 0.2 era: enable_lora, merge_weights"),
    Case("sherryxzhao__lora_alpaca__output", "llama", "ok", "oldest layout: no init_lora_weights; local base path"),
    Case("Gayaz2000__Unsloth-DPOTrainer", "llama", "ok", "Unsloth, Llama-3.2-1B"),
    Case("Akuseru0509__banking-intent-unsloth__model", "llama", "ok",
         "Unsloth bnb-4bit base, peft 0.18.1, auto_mapping.unsloth_fixed"),
    Case("D3voz__joy-caption-alpha-two-gui-mod", "llama", "ok", "CRLF line endings; Llama-3.1-8B bnb-4bit, r=64"),
    Case("grahama1970__unsloth_wip__lora_model", "llama", "ok",
         "unsloth/phi-3.5-mini-instruct-bnb-4bit is Llama-fied (split q/k/v, gate/up): built as Llama"),
    Case("mkeoliya__axolotl__lora-out", "llama", "ok", "axolotl, OpenLLaMA; fan_in_fan_out: null"),
    Case("huggingface__peft__lora__llama-3.2-3B-rank64-rslora", "llama", "ok",
         "use_rslora; target_modules null (PEFT's default for llama); base null"),
    Case("huggingface__peft__lora__llama-3.2-3B-rank32-dora", "llama", "ok",
         "DoRA (use_dora; combined densely against --base); target_modules null"),
    Case("huggingface__peft__adalora__llama-3.2-3B-rank32", "llama", "ok",
         "AdaLoRA (lora_E; init_r 64, target_r 32, rank_pattern null, target_modules null)"),
    # --- Mistral, Qwen2 / Qwen3, Gemma 2 / 3, Phi-2 / Phi-3
    Case("mostafathemar__Arabic-Legal-LLM-QLoRA-Mistral7B__model", "mistral", "ok", "QLoRA, r=64 > tiny hidden"),
    Case("mahmodKhaled__finetuning-Qwen2.5-qlora-Arabic__model", "qwen2", "ok", "QLoRA"),
    Case("AnthonyQi__Query_Intent_Classifier__final_model", "qwen2", "ok",
         "Unsloth bnb-4bit base, peft 0.19.1 keys (alora_invocation_tokens, arrow_config, use_bdlora, ...)"),
    Case("Electrosquib__LLM-Based-Predictive-Text-Compression-Ham-Radio", "qwen3", "ok", "Qwen3, peft 0.18.0"),
    Case("DigitalIntelligenceCenter-of-ICMM__Baize-Traditional-Chinese-Medicine-Large-Language-Model", "qwen3", "ok",
         "Unsloth Qwen3-8B bnb-4bit"),
    Case("zhangdw156__classification-of-math-problems__finetuned_model", "qwen3-seq-cls", "ok",
         "SEQ_CLS on a decoder; modules_to_save lists classifier/score three times (PEFT appends on each load)"),
    Case("Devsam2898__Gemma2-Peshwa", "gemma2", "ok", "Unsloth gemma-2-9b bnb-4bit, r=64, alpha 8"),
    Case("HRF001__gemma-text-to-sql__adapter", "gemma3", "ok", "Gemma-3-1b-it, peft 0.19.1"),
    Case("Azreal18__Phi2-finetuning__model", "phi", "ok", "Phi-2: q_proj, v_proj, fc1, fc2"),
    Case("HeavyMetalAlchemist__phi3-lora-structured-output__adapter", "phi3", "ok",
         "Phi-3 fused qkv_proj and gate_up_proj"),
    # --- GPT-2 (Conv1D), GPT-NeoX, Falcon
    Case("Ahsan-Asim__FineTune_GPT2_Math_Riddles__model", "gpt2", "ok",
         "Conv1D, fan_in_fan_out true; task_type null; c_proj matches attn and mlp"),
    Case("Muhammad-Ahmad092__Math-Riddle-Generator-with-Fine-Tuning__model", "gpt2", "ok",
         "Conv1D, fan_in_fan_out true"),
    Case("Shahid-Mo__SFT-LoRA-GPT2-Distilled__final_model", "gpt2", "ok",
         "distilgpt2; dotted targets attn.c_attn, attn.c_proj"),
    Case("sanaear__tiny-LLM-Lora__lora-out", "gpt2", "ok",
         "distilgpt2 with fan_in_fan_out FALSE on Conv1D (PEFT warns and transposes anyway)"),
    Case("deepbiolab__gpt2-classification-peft__peft_model", "gpt2-seq-cls", "ok",
         "SEQ_CLS, modules_to_save [classifier, score]"),
    Case("gurvineet__peft-implementation__peft_model", "gpt2-seq-cls", "ok",
         "SEQ_CLS; q_proj / v_proj in target_modules match nothing in GPT-2"),
    Case("stathopoan__Apply-Lightweight-Fine-Tuning-to-a-Foundation-LLM-Model__lora_model", "gpt2-seq-cls",
         "ok", "SEQ_CLS with modules_to_save null: PEFT still saves the score head"),
    Case("takaaki-inada__rinna-3.6b-hello-zundamon-ai__models", "gpt-neox", "ok",
         "GPT-NeoX fused query_key_value; peft 0.3 era"),
    Case("atisben__falcon-llm-finetuning__trained_model", "falcon", "ok", "Falcon-7B multi-query query_key_value"),
    # --- encoders: BERT, DistilBERT, RoBERTa (SEQ_CLS), ViT
    Case("Hareshjethani__BERT-GPT2-Multitask-Finetuning", "bert-seq-cls", "ok",
         "SEQ_CLS, modules_to_save [classifier, score]"),
    Case("sdtrklse__lightweight-fine-tuning__peft_model", "distilbert-seq-cls", "ok",
         "SEQ_CLS with modules_to_save null: PEFT still saves the classifier"),
    Case("Delta17920__fake-news-detection-peft__peft_model", "roberta-seq-cls", "ok",
         "SEQ_CLS, RoBERTa classifier (dense + out_proj) saved whole"),
    Case("lockheed886__Vision-Transformers-for-Food-Classification__final_model", "vit", "ok",
         "ViT image classifier, task_type null, modules_to_save [classifier]; transformers 5 renamed ViT's "
         "query / value to q_proj / v_proj, so PEFT matches nothing with the published target_modules",
         changes={"target_modules": ["v_proj", "q_proj"]}),
    # --- encoder-decoders: T5, Whisper
    Case("mnenadoeloo__t5-base-sum__model", "t5", "ok", "SEQ_2_SEQ_LM, Flan-T5 q, k, v"),
    Case("abdouelouatiki__flan-t5-large-qlora-chatbot__model", "t5", "ok", "SEQ_2_SEQ_LM, QLoRA Flan-T5 q, v"),
    Case("erika0915__Speech-AI__model", "whisper", "ok", "Whisper, task_type null, encoder and decoder"),
    Case("cbx6666__whisper-multitask-finetuning__trained_model", "whisper", "ok",
         "target_modules is a regex string (decoder self/cross attention q, v)"),
    # --- must stay refused
    Case("huggingface__peft__ia3__llama-3.2-3B-default", "llama", "refused", "IA3"),
    Case("huggingface__peft__prefixtuning__llama-3.2-3B-lr_0.001", "llama", "refused", "prefix tuning",
         changes=_PREFIX_DIMS),
    Case("zohaibAsif-tes__finetuned-falcon__trained_model", "falcon", "refused",
         "task_type 'CASUAL_LM' (a typo PEFT itself refuses)", build_only={"task_type": "CAUSAL_LM"}),
    Case("AlanLau9809__Intern_GenAI_NER__adapters", None, "refused", "an MLX-LM adapter config, not PEFT"),
    Case("Inishpy__lerobot-libero", None, "refused", "LeRobot's adapter_config.json, not PEFT"),
    Case("ZieChan__ARC-with-Llama3.1__lora_model", None, "refused", "a Git LFS pointer committed in place of the file"),
)


def community_cases() -> list[Case]:
    """Every case, in table order."""
    return list(_CASES)


def tiny_model(case: Case) -> nn.Module:
    """The case's base model: tiny dims, random weights from a fixed seed, eval mode."""
    if case.architecture is None:
        raise ValueError(f"{case.name}: not a PEFT adapter, no base model")
    torch.manual_seed(BASE_SEED)
    return ARCHITECTURES[case.architecture].build().eval()


def example_inputs(case: Case, batch: int = 2) -> dict[str, torch.Tensor]:
    """A fixed input for the case's model (tokens avoid 0, the padding id of the classifiers)."""
    generator = torch.Generator().manual_seed(0)
    kind = ARCHITECTURES[case.architecture or ""].inputs

    def tokens(length: int) -> torch.Tensor:
        return torch.randint(5, VOCAB, (batch, length), generator=generator)

    if kind == "seq2seq":
        return {"input_ids": tokens(10), "decoder_input_ids": tokens(6)}
    if kind == "speech":
        return {"input_features": torch.randn(batch, 8, 32, generator=generator), "decoder_input_ids": tokens(6)}
    if kind == "image":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=generator)}
    return {"input_ids": tokens(10)}


def synthesise(case: Case, folder: Path, seed: int) -> Path:
    """Write the case's adapter into ``folder`` (made by PEFT, random non-zero trained tensors from ``seed``).

    Files that are not PEFT configs (``architecture is None``) are copied verbatim, with no weights.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if case.architecture is None:
        shutil.copyfile(case.config_path, folder / CONFIG_NAME)
        return folder
    written = {**case.real_config(), **case.changes}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old / new keys, Conv1D fan_in_fan_out, ...
        # PEFT extends a config's modules_to_save list in place: hand it a copy, never ``written``'s lists
        peft_config = PeftConfig.from_peft_type(**copy.deepcopy({**written, **case.build_only}))
        torch.manual_seed(seed)  # lora_A's initialisation
        model = get_peft_model(tiny_model(case), peft_config)
    _randomise(model, seed)
    model.save_pretrained(folder)
    (folder / "README.md").unlink(missing_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(written, indent=2) + "\n", encoding="utf-8")
    return folder


def _randomise(model: nn.Module, seed: int) -> None:
    """Seeded random values for what training would have changed: zero-initialised factors become normal
    (AdaLoRA's E with std 1: its delta is also divided by init_r), DoRA magnitudes, classifier copies,
    IA3 scales and prompt embeddings get a multiplicative perturbation."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            trained = [std for tag, std in _TRAINED.items() if tag in name]
            if trained:
                parameter.copy_(trained[0] * noise)
            elif any(tag in name for tag in _PERTURBED):
                parameter.mul_(1 + 0.1 * noise).add_(0.01 * noise)

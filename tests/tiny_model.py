"""A tiny randomly initialised chat model and tokenizer, built offline in a second.

Unit tests need real forward and backward passes (and a real folder that `--model` can point at) without
a hub download; behaviour, not quality, is under test.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Another family's template (Gemma's shape): its turns end with <end_of_turn>, and EOS is a different token.
GEMMA_LIKE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else "
    "message['role'] %}{{'<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
GEMMA_LIKE_TOKENS = ["<unk>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
CORPUS = [
    "hello how are you today? I am fine, thank you. The capital of France is Paris.",
    "Please write a short answer. Sure! Here is a concise reply with a keyword: banana.",
    "user assistant system: what is two plus two? It is four. Why is the sky blue? Rayleigh scattering.",
]


def _byte_level_bpe(special_tokens: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok


def build_tokenizer() -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(tokenizer_object=_byte_level_bpe(SPECIAL_TOKENS), eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", bos_token="<|im_start|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_gemma_like_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer whose chat template ends a turn with `<end_of_turn>`, not ChatML's `<|im_end|>`."""
    fast = PreTrainedTokenizerFast(tokenizer_object=_byte_level_bpe(GEMMA_LIKE_TOKENS), eos_token="<eos>",
                                   pad_token="<unk>", bos_token="<bos>", unk_token="<unk>")
    fast.chat_template = GEMMA_LIKE_TEMPLATE
    fast.padding_side = "left"
    return fast


def build_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return LlamaForCausalLM(config)


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    """Write a tiny model folder that `from_pretrained` (and the app's `--model`) can load."""
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

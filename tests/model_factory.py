"""Tiny random checkpoints of the dense families, as full HF-format model directories.

`make_tiny_checkpoint` writes what a real model directory holds: config.json + model.safetensors
(transformers' own save_pretrained), generation_config.json, tokenizer.json (a byte-level BPE whose
size equals the model's vocab_size) and tokenizer_config.json with a ChatML chat template. Model
parity tests and engine tests share it.

transformers initialises weights with std 0.02, norms at 1 and biases at 0: attention is then nearly
uniform and a wrong mask, a misloaded norm or a dropped bias would hide inside the tolerance. So
weights are drawn with std 0.2 and norms and biases are perturbed; logits then spread over a few
units and greedy decoding has clear winners.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

BOS_TOKEN = "<|endoftext|>"  # also the pad token
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [BOS_TOKEN, IM_START, EOS_TOKEN]  # ids 0, 1, 2
BOS_ID, IM_START_ID, EOS_ID = 0, 1, 2

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_DEFAULTS: dict[str, Any] = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    initializer_range=0.2,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=BOS_ID,
)

_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A tiny model for tests speaks in short sentences.
Hello, world! How are you today? I am fine, thank you. What is the weather like in the city?
To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings
and arrows of outrageous fortune, or to take arms against a sea of troubles.
def add(a, b):
    return a + b
print(add(1, 2))  # 3
The user asked a question and the assistant answered it. The system prompt sets the tone.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000. Prices per million tokens, credits and plans.
"""


def _write_tokenizer(
    model_dir: Path,
    vocab_size: int,
    extra_special_tokens: tuple[str, ...] = (),
    chat_template: str = CHAT_TEMPLATE,
) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *extra_special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TRAINING_TEXT] * 4, trainer=trainer)
    # Fill any shortfall (too little text for enough merges) so the tokenizer covers the model's rows.
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [BOS_ID, IM_START_ID, EOS_ID]
    tok.save(str(model_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": BOS_TOKEN,
        "add_bos_token": False,
        "model_max_length": TINY_DEFAULTS["max_position_embeddings"],
        "chat_template": chat_template,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


# Families whose RMSNorms scale by (1 + weight): their weights are perturbed around 0, not 1 (the gated
# norm inside their linear-attention layers scales by its weight as usual).
ONE_PLUS_WEIGHT_NORMS = {"qwen3_5_text", "qwen3_next"}


def _perturb(model: torch.nn.Module, seed: int, family: str = "") -> None:
    """Non-trivial norm weights and biases (transformers initialises them to 1 and 0)."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                centre = 0 if family in ONE_PLUS_WEIGHT_NORMS and "linear_attn.norm" not in name else 1
                param.copy_(centre + 0.2 * torch.randn(param.shape, generator=gen))
            elif name.endswith(".bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))


def make_tiny_checkpoint(
    family: str,
    tmp_path: Path,
    seed: int = 0,
    *,
    extra_special_tokens: tuple[str, ...] = (),
    chat_template: str = CHAT_TEMPLATE,
    **overrides: Any,
) -> Path:
    """Write a tiny random `family` model (llama, qwen2, qwen3, mistral, ...) under tmp_path.

    `overrides` are config fields passed to `AutoConfig.for_model` (e.g. tie_word_embeddings=True,
    sliding_window=4, rope_parameters={...}); they replace TINY_DEFAULTS. Returns the model directory
    (a new subdirectory of tmp_path, so one tmp_path can hold several models). `extra_special_tokens`
    come after the three fixed ones (ids 3, 4, ...); `chat_template` replaces the ChatML one.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    fields = {**TINY_DEFAULTS, **overrides}
    config = AutoConfig.for_model(family, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _perturb(model, seed, family)

    tmp_path = Path(tmp_path)
    model_dir = tmp_path / family
    n = 1
    while model_dir.exists():
        n += 1
        model_dir = tmp_path / f"{family}-{n}"
    model_dir.mkdir(parents=True)
    model.save_pretrained(model_dir)
    generation = GenerationConfig(
        bos_token_id=fields["bos_token_id"],
        eos_token_id=fields["eos_token_id"],
        pad_token_id=fields["pad_token_id"],
    )
    generation.save_pretrained(model_dir)
    _write_tokenizer(model_dir, fields["vocab_size"], extra_special_tokens, chat_template)
    return model_dir

"""Tiny random Hugging Face models of every supported architecture, built and saved at test time."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

# name -> (transformers config class name, overrides)
TINY_MODELS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {"rope_theta": 10000.0}),
    "llama3_scaled": (
        "LlamaConfig",
        {
            "num_key_value_heads": 1,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "llama_linear_tied": (
        "LlamaConfig",
        {
            "tie_word_embeddings": True,
            "num_key_value_heads": 4,
            "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        },
    ),
    "llama_hd80": ("LlamaConfig", {"head_dim": 80, "rope_theta": 10000.0}),
    "mistral": ("MistralConfig", {"sliding_window": None, "head_dim": 16}),
    "mistral_sliding": ("MistralConfig", {"sliding_window": 8, "head_dim": 16}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": False}),
    "qwen3": ("Qwen3Config", {"head_dim": 32, "use_sliding_window": False}),
}


def build_tiny_model(name: str, root: Path, seed: int = 0) -> Path:
    """Build, save and return the directory of a tiny float32 random model."""
    import transformers

    cls_name, overrides = TINY_MODELS[name]
    cfg = getattr(transformers, cls_name)(**{**COMMON, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out = root / name
    model.save_pretrained(out, safe_serialization=True)
    return out


def load_hf(model_dir: Path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have this from "
    "or had by hot word but what some we can out other were all there when up use your how said an "
    "each she which do their time if will way about many then them write would like so these her long "
    "make thing see him two has look more day could go come did number sound no most people my over "
    "know water than call first who may down side been now find capital France Paris memory goddess"
).split()


def build_tiny_chat_model(root: Path, seed: int = 0) -> Path:
    """A tiny random Llama with its own byte-level BPE tokenizer (trained here, ~500 tokens)
    and a ChatML chat template: text prompts, chat and detokenization without any download."""
    import random

    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(_WORDS) for _ in range(12)) + "." for _ in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML_TEMPLATE
    out = root / "tiny_chat"
    fast.save_pretrained(out)
    eos = fast.convert_tokens_to_ids("<|im_end|>")
    cfg = transformers.LlamaConfig(
        **{
            **COMMON,
            "vocab_size": len(fast),
            "bos_token_id": None,
            "eos_token_id": eos,
            "rope_theta": 10000.0,
        }
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    return out

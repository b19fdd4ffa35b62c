"""Hugging Face transformers on the same GPU and the same weights: TTFT, TBT, peak memory.

The HF model is built from the same config.json and filled tensor by tensor with the same
dummy weights as Mnemosyne's `load_format=dummy` (`models/dummy_weights.py`), bf16, SDPA
attention. TTFT = one forward over the whole prompt (logits of the last position only, the
way `generate` prefills); TBT = the median of single-token forwards with the returned cache.
A context that runs out of memory is recorded with the time it took to fail.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import transformers

from mnemosyne.bench.long_context.engine import random_prompt
from mnemosyne.config import ModelConfig
from mnemosyne.models.dummy_weights import dummy_tensor


def build_hf(model_dir: Path) -> transformers.PreTrainedModel:
    hf_cfg = transformers.AutoConfig.from_pretrained(model_dir)
    hf_cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, torch_dtype=torch.bfloat16)
    cfg = ModelConfig.from_pretrained(model_dir, torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if cfg.tie_word_embeddings and name == "lm_head.weight":
                continue
            param.copy_(dummy_tensor(name, tuple(param.shape), torch.bfloat16, "cuda"))
    return model.eval()


@torch.inference_mode()
def run(model_dir: Path, contexts: list[int], num_decode: int, progress: Path | None = None) -> dict:
    """`progress`: rewritten after every context (a later context may run past the time limit)."""
    model = build_hf(model_dir)
    res: dict = {"transformers": transformers.__version__, "attn_implementation": "sdpa", "runs": []}
    warm = model(input_ids=torch.tensor([random_prompt(3000, seed=1)], device="cuda"), use_cache=True)
    model(input_ids=warm.logits[:, -1:].argmax(-1), past_key_values=warm.past_key_values, use_cache=True)
    del warm  # warm-up (not measured), as for Mnemosyne
    for ctx in contexts:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        ids = torch.tensor([random_prompt(ctx)], device="cuda")
        entry: dict = {"ctx": ctx}
        t0 = time.perf_counter()
        try:
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
            torch.cuda.synchronize()
            entry["ttft_s"] = time.perf_counter() - t0
            cache, tokens, gaps = out.past_key_values, [int(tok)], []
            del out
            for _ in range(num_decode):
                t = time.perf_counter()
                step = model(input_ids=tok, past_key_values=cache, use_cache=True)
                tok = step.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(int(tok))
                gaps.append(time.perf_counter() - t)
                cache = step.past_key_values
            entry["tbt_median_s"] = statistics.median(gaps)
            entry["first_tokens"] = tokens[:8]
            del cache
        except torch.OutOfMemoryError as e:
            entry["oom"] = True
            entry["seconds_until_oom"] = time.perf_counter() - t0
            entry["error"] = str(e).splitlines()[0][:200]
        entry["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        print(entry, flush=True)
        res["runs"].append(entry)
        if progress is not None:
            progress.write_text(json.dumps(res, indent=1))
    return res

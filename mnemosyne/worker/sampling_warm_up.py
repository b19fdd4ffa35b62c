"""The LM head and the sampler at every row count a step can sample, run once at start-up.

Decode steps replay CUDA graphs that hold the LM head, but mixed, piecewise and eager steps
run it and the sampler eagerly on however many rows the step samples: its decodes plus the
chunks that end a prompt, 1 .. max_num_seqs. CUDA loads a library kernel the first time it
is used (lazy module loading) and cuBLAS picks its GEMM kernel by the row count, so a row
count first seen while serving can stall that step's launch. Suspected on an H200 (not
shown): the step that samples a long prompt's first token beside 32 decodes (33 rows, where
every step before it sampled 32) held the host about 40 ms in every run of the 8B mixed
scenario (benchmarks/results/README.md, "Eleventh session"). Greedy rows at every count
and one sampled row (temperature, top-k, top-p, on a throwaway generator) are run here,
before the engine reports ready.
"""

from __future__ import annotations

import time

import torch

from mnemosyne.layers.sampler import Sampler
from mnemosyne.models.llama import LlamaForCausalLM
from mnemosyne.sampling_params import SamplingParams

_SAMPLED = SamplingParams(temperature=0.8, top_k=40, top_p=0.95)


@torch.inference_mode()
def warm_up_sampling(model: LlamaForCausalLM, sampler: Sampler, max_rows: int, device: torch.device) -> float:
    """Run the LM head and sampling for 1 .. max_rows rows (every TP rank of the last stage
    calls this: the vocab-parallel head all-gathers); the seconds it took."""
    t0 = time.perf_counter()
    hidden = torch.zeros(max_rows, model.config.hidden_size, dtype=model.config.dtype, device=device)
    for num_rows in range(1, max_rows + 1):
        logits = model.compute_logits(hidden[:num_rows])  # [num_rows, vocab_size]
        sampler(logits, [SamplingParams(temperature=0.0)] * num_rows, [None] * num_rows)
    generator = torch.Generator(device=device).manual_seed(0)
    sampler(model.compute_logits(hidden[:1]), [_SAMPLED], [generator])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0

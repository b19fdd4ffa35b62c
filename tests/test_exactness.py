"""Exactness against Hugging Face transformers on tiny random float32 models.

For every architecture: 32 greedy tokens identical to HF generate, and per-position
prompt logprobs and sampled-token logprobs within 1e-4 of HF, across chunk sizes,
mixed prefill/decode batches and forced preemption.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TEST_DEVICE
from tiny_models import TINY_MODELS, load_hf

from mnemosyne import LLM, SamplingParams

NUM_NEW = 32
PROMPT_LENS = (37, 5, 64, 23)
ATOL = 1e-4
MAX_NUM_SEQS = 8


def make_prompts(vocab: int, seed: int = 1, lens: tuple[int, ...] = PROMPT_LENS) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


_REF_CACHE: dict[tuple[str, tuple[int, ...], int], list[tuple[list[int], torch.Tensor]]] = {}


def hf_reference(
    name: str, model_dir, lens: tuple[int, ...] = PROMPT_LENS, num_new: int = NUM_NEW
) -> list[tuple[list[int], torch.Tensor]]:
    """Per prompt: HF greedy continuation and log-softmax over the whole sequence."""
    key = (name, lens, num_new)
    if key not in _REF_CACHE:
        hf = load_hf(model_dir)
        refs = []
        for prompt in make_prompts(hf.config.vocab_size, lens=lens):
            ids = torch.tensor([prompt])
            with torch.no_grad():
                gen = hf.generate(
                    ids, max_new_tokens=num_new, do_sample=False, eos_token_id=None, pad_token_id=0
                )
                new = gen[0, len(prompt) :].tolist()
                logp = torch.log_softmax(hf(gen).logits[0].double(), dim=-1)  # [seq, vocab]
            refs.append((new, logp))
        _REF_CACHE[key] = refs
    return _REF_CACHE[key]


def check_against_hf(
    name: str, model_dir, lens: tuple[int, ...] = PROMPT_LENS, num_new: int = NUM_NEW, **llm_kwargs
) -> list:
    refs = hf_reference(name, model_dir, lens, num_new)
    # At most 4 sequences run at once: on a GPU each engine start then captures the decode
    # graphs of batch 1-8, not the 35 sizes up to the default 256 (most of a start's time).
    llm_kwargs.setdefault("max_num_seqs", MAX_NUM_SEQS)
    llm = LLM(model=str(model_dir), dtype="float32", device=TEST_DEVICE, **llm_kwargs)
    prompts = make_prompts(llm.engine.config.model.vocab_size, lens=lens)
    params = SamplingParams(temperature=0, max_tokens=num_new, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    outs = llm.generate(prompts, params)
    for prompt, out, (ref_new, ref_logp) in zip(prompts, outs, refs, strict=True):
        assert out.token_ids == ref_new, f"{name}: greedy tokens differ from HF"
        assert out.finish_reason == "length"
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for pos in range(1, len(prompt)):
            got = out.prompt_logprobs[pos][prompt[pos]]
            want = ref_logp[pos - 1, prompt[pos]].item()
            assert abs(got - want) < ATOL, f"{name}: prompt logprob at {pos}: {got} vs {want}"
        assert len(out.logprobs) == num_new
        for i, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            row = ref_logp[len(prompt) + i - 1]
            assert abs(entry[tok] - row[tok].item()) < ATOL
            assert len(entry) in (2, 3)  # sampled token plus the top-2
    llm.engine.kv_manager.check_integrity()
    llm.shutdown()
    return outs


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_architectures_match_hf(name, tiny_model_dir):
    """Every architecture, chunk 7 with a small token budget: prefill chunks and decodes share steps."""
    check_against_hf(name, tiny_model_dir(name), chunk_size=7, max_num_batched_tokens=16, block_size=4)


@pytest.mark.parametrize("name", ["llama", "mistral_sliding"])
def test_kernel_backend_matches_hf(name, tiny_model_dir):
    """The Triton kernels through the whole engine (in Triton's interpreter on CPU): decode
    kernel, prefill tiles and the fused KV write, GQA and a sliding window."""
    check_against_hf(
        name,
        tiny_model_dir(name),
        chunk_size=7,
        max_num_batched_tokens=16,
        block_size=4,
        attention_backend="kernels",
    )


@pytest.mark.parametrize("block_size", [16, 32])  # per-key gathers; page-aligned steps (32 keys in fp32)
def test_kernel_short_chunks_after_long_prefixes(tiny_model_dir, block_size):
    """The split-KV chunk kernels through the engine (split along the keys: on CPU from 64
    keys per split): chunks of 3 to 16 tokens after prefixes of several hundred keys,
    sharing steps with decodes, and kvp=2 with 256 tokens per group, so the longest prompt
    crosses a KVP boundary: its older piece is attended by the other group and merged."""
    # One GPU: the same steps without the KVP boundary (a kvp=2 layout needs two devices).
    two_groups = TEST_DEVICE == "cpu" or torch.cuda.device_count() >= 2
    kvp = {"kvp": 2, "max_tokens_per_kvp_group": 256} if two_groups else {}
    check_against_hf(
        "llama", tiny_model_dir("llama"), lens=(330, 9, 140), num_new=5, chunk_size=16,
        max_num_batched_tokens=19, block_size=block_size, attention_backend="kernels", **kvp,
    )  # fmt: skip


@pytest.mark.parametrize("chunk_size", [1, 7, 64, None])
def test_chunk_sizes_match_hf(chunk_size, tiny_model_dir):
    budget = 4 if chunk_size == 1 else 256
    check_against_hf(
        "llama3_scaled",
        tiny_model_dir("llama3_scaled"),
        chunk_size=chunk_size,
        max_num_batched_tokens=budget,
        block_size=16,
    )


def test_preemption_matches_hf(tiny_model_dir):
    """A KV budget too small for all four requests forces recompute preemption."""
    from mnemosyne.config import ModelConfig

    name = "qwen3"
    bytes_per_block = 4 * ModelConfig.from_pretrained(tiny_model_dir(name), torch.float32).kv_bytes_per_token
    num_blocks = (max(PROMPT_LENS) + NUM_NEW) // 4 + 2
    outs = check_against_hf(
        name,
        tiny_model_dir(name),
        chunk_size=16,
        max_num_batched_tokens=32,
        block_size=4,
        kv_cache_memory_gb=num_blocks * bytes_per_block / 2**30,
    )
    assert sum(o.num_preemptions for o in outs) > 0, "the tiny KV budget should have forced a preemption"


def test_sharded_checkpoint_and_half_precision(tiny_model_dir, tmp_path):
    """A checkpoint split over several safetensors files with an index loads identically;
    bfloat16 and float16 engines track the float32 HF reference within half-precision noise."""
    sharded = tmp_path / "qwen2_sharded"
    load_hf(tiny_model_dir("qwen2")).save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    check_against_hf("qwen2", sharded, chunk_size=16)

    refs = hf_reference("qwen2", tiny_model_dir("qwen2"))
    for dtype in ("bfloat16", "float16"):
        llm = LLM(
            model=str(sharded), dtype=dtype, device=TEST_DEVICE, kv_cache_memory_gb=0.01, max_num_seqs=MAX_NUM_SEQS
        )
        prompts = make_prompts(llm.engine.config.model.vocab_size)
        outs = llm.generate(
            prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=0)
        )
        errs = [
            abs(out.prompt_logprobs[pos][prompt[pos]] - ref_logp[pos - 1, prompt[pos]].item())
            for prompt, out, (_, ref_logp) in zip(prompts, outs, refs, strict=True)
            for pos in range(1, len(prompt))
        ]
        assert sum(errs) / len(errs) < 0.02 and max(errs) < 0.1, (dtype, sum(errs) / len(errs), max(errs))


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_param_count_matches_hf(name, tiny_model_dir):
    """ModelConfig.num_params sizes the weights when the KV budget is set from free memory."""
    from mnemosyne.config import ModelConfig

    model_dir = tiny_model_dir(name)
    cfg = ModelConfig.from_pretrained(model_dir, torch.float32)
    assert cfg.num_params == sum(p.numel() for p in load_hf(model_dir).parameters())

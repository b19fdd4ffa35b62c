"""The offline Python API: `LLM(...).generate(prompts, params)` and `.chat(messages, params)`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from mnemosyne.engine.args import DEFAULT_BLOCK_SIZE, EngineArgs
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.errors import InvalidRequestError
from mnemosyne.outputs import RequestOutput
from mnemosyne.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    def __init__(
        self,
        model: str | None = None,
        dtype: str | torch.dtype = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        allow_long_max_model_len: bool = False,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
        chunk_size: int | None = None,
        kv_cache_memory_gb: float | None = None,
        kv_cache_memory_fraction: float = 0.85,
        gpu_memory_utilization: float | None = None,
        seed: int = 0,
        tp: int = 1,
        spp: int = 1,
        kvp: int = 1,
        max_tokens_per_kvp_group: int | None = None,
        pipeline_depth: int | None = None,
        driver_address: str | None = None,
        worker_timeout_s: float = 600.0,
        attention_backend: str = "auto",
        enforce_eager: bool = False,
        load_format: str = "safetensors",
        chunk_policy: str | None = None,
        scheduling_policy: str | None = None,
        tbt_slo_ms: float = 30.0,
        prefill_only_step_ms: float = 100.0,
        latency_profile: str | None = None,
        long_prefill_threshold: int = 262144,
        deadline_factor: float = 1.5,
        min_deadline_s: float = 0.5,
        chunk_granularity: int = 32,
        min_chunk_tokens: int = 32,
        online_calibration: bool = True,
        enable_prefix_caching: bool = True,
        async_scheduling: bool = True,
        generation_config: str = "auto",
        chat_template: str | None = None,
        step_log: str | None = None,
        prefill_lane_free_sms: int = 0,
        prefill_lane_min_tokens: int = 65536,
        prefill_lane_chunk_tokens: int = 4096,
        prefill_lane_max_free_sms: int | None = None,
    ) -> None:
        """See `EngineArgs` for every option. Sampling fields a SamplingParams leaves out take
        the model's generation_config.json defaults (generation_config="auto"). With tp * spp * kvp > 1, one worker process
        per device is started; call `shutdown()` (or use `with LLM(...) as llm:`) to stop them."""
        args = EngineArgs(
            model=model,
            dtype=dtype,
            device=device,
            max_model_len=max_model_len,
            allow_long_max_model_len=allow_long_max_model_len,
            block_size=block_size,
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            chunk_size=chunk_size,
            kv_cache_memory_gb=kv_cache_memory_gb,
            kv_cache_memory_fraction=kv_cache_memory_fraction,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            tp=tp,
            spp=spp,
            kvp=kvp,
            max_tokens_per_kvp_group=max_tokens_per_kvp_group,
            pipeline_depth=pipeline_depth,
            driver_address=driver_address,
            worker_timeout_s=worker_timeout_s,
            attention_backend=attention_backend,
            enforce_eager=enforce_eager,
            load_format=load_format,
            chunk_policy=chunk_policy,
            scheduling_policy=scheduling_policy,
            tbt_slo_ms=tbt_slo_ms,
            prefill_only_step_ms=prefill_only_step_ms,
            latency_profile=latency_profile,
            long_prefill_threshold=long_prefill_threshold,
            deadline_factor=deadline_factor,
            min_deadline_s=min_deadline_s,
            chunk_granularity=chunk_granularity,
            min_chunk_tokens=min_chunk_tokens,
            online_calibration=online_calibration,
            enable_prefix_caching=enable_prefix_caching,
            async_scheduling=async_scheduling,
            generation_config=generation_config,
            chat_template=chat_template,
            step_log=step_log,
            prefill_lane_free_sms=prefill_lane_free_sms,
            prefill_lane_min_tokens=prefill_lane_min_tokens,
            prefill_lane_chunk_tokens=prefill_lane_chunk_tokens,
            prefill_lane_max_free_sms=prefill_lane_max_free_sms,
        )
        self.engine = LLMEngine.from_args(args)

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run all prompts to completion; outputs come back in prompt order. Every prompt is
        validated before any is enqueued, so a bad one raises without side effects."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if params is None or isinstance(params, SamplingParams):
            params_list = [params or SamplingParams()] * len(prompts)
        else:
            params_list = list(params)
            if len(params_list) != len(prompts):
                raise InvalidRequestError(f"got {len(prompts)} prompts but {len(params_list)} SamplingParams")
        for p in params_list:
            p.validate()
        ids = [self._add(p, sp) for p, sp in zip(prompts, params_list, strict=True)]
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="requests", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    finished[out.request_id] = out
                    bar.update(1)
        bar.close()
        self.engine.check_idle_integrity()
        return [finished[i] for i in ids]

    def _add(self, prompt: Prompt, params: SamplingParams) -> str:
        return self.engine.add_request(prompt, params)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(conv) for conv in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, params)

    def apply_chat_template(self, messages: list[Message]) -> list[int]:
        tok = self.engine.tokenizer
        if tok is None or getattr(tok, "chat_template", None) is None:
            raise InvalidRequestError("this model has no chat template")
        out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)

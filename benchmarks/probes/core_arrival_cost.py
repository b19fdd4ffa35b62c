"""What a long prompt's arrival costs the engine core between two steps (CPU, in-process).

The core handles every queued message before it plans the next step, so this host work
delays that step and every co-batched stream's next token. On an H200 host a 351K-token
arrival stretched one 8B decode step from 5 to 62 ms, and a 493K-token one a 1B step from
20 to 109 ms (benchmarks/results/serving_trace_session8_h200_2026-11-29). Timed here, each
the best of `--repeats`, with the benchmarks' tiny random model (the cost does not depend on it):

    server      the API server packs the ids and signs the frame (its event loop)
    wire        the core verifies and decodes the frame (ids spread over a Llama-3 vocabulary,
                `--wire-vocab`: a msgpack list of ids costs more for larger ids)
    add_request LLMEngine.add_request of the decoded ids (checked; the Request holds the
                read-only int32 array as it is; the prefill-time table lookup of its deadline)
    add_request_list
                the same ids as a Python list, as in-process callers pass them (`LLM.generate`,
                the benchmarks): checked and converted to the array
    schedule    the first Scheduler.schedule that admits it (prefix-cache lookup included)

    python -m benchmarks.probes.core_arrival_cost --out OUT.json [--tokens 351000,500000]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from benchmarks.probes.prompt_parse_cost import best_ms
from mnemosyne.bench.long_context.run import write_model_dir
from mnemosyne.config import ModelConfig
from mnemosyne.engine.args import EngineArgs, kv_bytes_per_token_per_device
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.sampling_params import SamplingParams
from mnemosyne.wire.codec import Codec
from mnemosyne.wire.engine_core import (
    AddRequests,
    CoreRequest,
    ServerToCore,
    pack_token_ids,
    unpack_token_ids,
)


def tiny_engine(max_len: int) -> LLMEngine:
    """The benchmarks' tiny random Llama (`write_model_dir("tiny-llama")`), float32 on CPU,
    its KV cache sized to hold a max_len-token prompt."""
    model_dir = write_model_dir("tiny-llama", Path(tempfile.mkdtemp(prefix="core_arrival_")))
    cfg = ModelConfig.from_pretrained(model_dir, torch.float32)
    parallel = EngineArgs().parallel_config()
    kv_gib = 1.2 * (max_len + 4096) * kv_bytes_per_token_per_device(cfg, parallel) / 2**30
    args = EngineArgs(
        model=str(model_dir), load_format="dummy", dtype="float32", device="cpu", max_model_len=max_len + 64,
        allow_long_max_model_len=True, kv_cache_memory_gb=kv_gib,
    )  # fmt: skip
    return LLMEngine.from_args(args)


def measure(engine: LLMEngine, num_tokens: int, repeats: int, wire_vocab: int) -> dict:
    vocab = engine.config.model.vocab_size
    ids = [(i * 7919) % (vocab - 3) + 3 for i in range(num_tokens)]  # the tiny model's
    wire_ids = [(i * 7919) % wire_vocab for i in range(num_tokens)]
    params = SamplingParams(max_tokens=1)
    codec = Codec(b"k" * 32, ServerToCore, "probe")

    def frame(token_ids: list[int] = wire_ids) -> bytes:
        return codec.encode(AddRequests(0, [CoreRequest("r", pack_token_ids(token_ids), params)]))

    def decoded() -> bytes:
        msg = codec.decode(wire)
        assert isinstance(msg, AddRequests)
        return msg.requests[0].prompt_token_ids

    wire = frame()
    own = codec.encode(AddRequests(0, [CoreRequest("r", pack_token_ids(ids), params)]))
    out = {
        "tokens": num_tokens,
        "frame_mb": len(wire) / 1e6,
        "server_ms": best_ms(frame, repeats),
        "wire_ms": best_ms(decoded, repeats),
    }
    add, add_list, sched = [], [], []
    for k in range(repeats):
        t0 = time.perf_counter()
        engine.add_request(ids, params, request_id=f"list{k}")
        add_list.append(time.perf_counter() - t0)
        engine.abort(f"list{k}")
        own_msg = codec.decode(own)
        assert isinstance(own_msg, AddRequests)
        raw, rid = own_msg.requests[0].prompt_token_ids, f"r{k}"
        t0 = time.perf_counter()
        engine.add_request(unpack_token_ids(raw), params, request_id=rid)
        t1 = time.perf_counter()
        engine.scheduler.schedule()
        t2 = time.perf_counter()
        add.append(t1 - t0)
        sched.append(t2 - t1)
        engine.abort(rid)
    out["add_request_ms"] = 1e3 * min(add)
    out["add_request_list_ms"] = 1e3 * min(add_list)
    out["first_schedule_ms"] = 1e3 * min(sched)
    out["core_total_ms"] = out["wire_ms"] + out["add_request_ms"] + out["first_schedule_ms"]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", default="351000,500000")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--wire-vocab", type=int, default=128256)
    ns = ap.parse_args(argv)
    sizes = [int(x) for x in ns.tokens.split(",")]
    engine = tiny_engine(max(sizes))
    rows = [measure(engine, n, ns.repeats, ns.wire_vocab) for n in sizes]
    for r in rows:
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}))
    result = {
        "benchmark": "core_arrival_cost",
        "command": "python -m benchmarks.probes.core_arrival_cost " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": rows,
    }
    ns.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

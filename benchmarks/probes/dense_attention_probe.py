"""Probe which dense attention ops with LSE the GPU image offers, and how fast they are on
a chunk-after-prefix problem (GQA folded into the query length). Writes JSON to $OUT."""

from __future__ import annotations

import json
import os
import sys
import time

import torch

aten = torch.ops.aten


def timeit(fn, iters=10):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def main() -> None:
    res: dict = {
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "gpu": torch.cuda.get_device_name(),
    }
    dev = "cuda"
    torch.manual_seed(0)
    hkv, g, d, c, prefix = 8, 4, 128, 4096, 131072
    bs = 16
    scale = d**-0.5
    cache_k = torch.randn(prefix // bs, bs, hkv, d, device=dev, dtype=torch.bfloat16)
    cache_v = torch.randn_like(cache_k)
    q = torch.randn(c, hkv * g, d, device=dev, dtype=torch.bfloat16)
    # fold GQA: [c, hkv, g, d] -> [1, hkv, g*c, d]
    qf = q.view(c, hkv, g, d).permute(1, 2, 0, 3).reshape(1, hkv, g * c, d)
    k_view = cache_k.view(prefix, hkv, d).permute(1, 0, 2).unsqueeze(0)  # strided [1, hkv, prefix, d]
    v_view = cache_v.view(prefix, hkv, d).permute(1, 0, 2).unsqueeze(0)
    k_cont, v_cont = k_view.contiguous(), v_view.contiguous()
    flops = 4 * g * c * prefix * hkv * d

    # reference on a slice of rows (fp32)
    rows = slice(0, 64)
    qs = qf[:, :, rows].float()
    sc = (qs @ k_cont.float().transpose(-1, -2)) * scale
    ref_lse = torch.logsumexp(sc, -1)
    ref_out = torch.softmax(sc, -1) @ v_cont.float()

    def check(name, fn):
        entry: dict = {}
        try:
            o = fn()
            out, lse = o[0], o[1]
            entry["lse_shape"] = list(lse.shape)
            entry["out_stride"] = list(out.stride())
            l2 = lse.reshape(1, hkv, -1)[:, :, rows].float()
            entry["max_out_err"] = float((out[:, :, rows].float() - ref_out).abs().max())
            entry["max_lse_err"] = float((l2 - ref_lse).abs().max())
            entry["max_lse_err_log2"] = float((l2 / 1.4426950408889634 - ref_lse).abs().max())
            t = timeit(fn)
            entry["ms"] = t * 1e3
            entry["tflops"] = flops / t / 1e12
        except Exception as e:  # noqa: BLE001
            entry["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        res[name] = entry
        print(name, entry, flush=True)

    for kname, k, v in (("strided", k_view, v_view), ("contig", k_cont, v_cont)):
        check(
            f"cudnn_{kname}",
            lambda k=k, v=v: aten._scaled_dot_product_cudnn_attention(
                qf, k, v, None, True, 0.0, False, False, scale=scale
            ),
        )
        check(
            f"flash_{kname}",
            lambda k=k, v=v: aten._scaled_dot_product_flash_attention(
                qf, k, v, 0.0, False, False, scale=scale
            ),
        )
        check(
            f"efficient_{kname}",
            lambda k=k, v=v: aten._scaled_dot_product_efficient_attention(
                qf, k, v, None, True, 0.0, False, scale=scale
            ),
        )
    # unfolded GQA directly
    qh = q.permute(1, 0, 2).unsqueeze(0)  # [1, 32, c, d]
    check(
        "cudnn_gqa_unfolded",
        lambda: aten._scaled_dot_product_cudnn_attention(
            qh, k_cont, v_cont, None, True, 0.0, False, False, scale=scale
        ),
    )
    # gather cost of the prefix from the paged cache
    idx = torch.randperm(prefix // bs, device=dev)
    t = timeit(lambda: (cache_k.index_select(0, idx), cache_v.index_select(0, idx)))
    res["gather_prefix_ms"] = t * 1e3
    res["gather_prefix_TBps"] = 2 * 2 * cache_k.numel() * 2 / t / 1e12
    # square causal diagonal: cudnn causal with repeated kv
    kd = torch.randn(1, hkv * g, c, d, device=dev, dtype=torch.bfloat16)
    qd = torch.randn_like(kd)
    check_flops = 2 * c * c * hkv * g * d
    for name, fn in (
        (
            "cudnn_causal_square",
            lambda: aten._scaled_dot_product_cudnn_attention(
                qd, kd, kd, None, True, 0.0, True, False, scale=scale
            ),
        ),
        (
            "flash_causal_square",
            lambda: aten._scaled_dot_product_flash_attention(qd, kd, kd, 0.0, True, False, scale=scale),
        ),
    ):
        try:
            o = fn()
            ref = torch.nn.functional.scaled_dot_product_attention(
                qd[:, :2].float(), kd[:, :2].float(), kd[:, :2].float(), is_causal=True, scale=scale
            )
            tt = timeit(fn)
            res[name] = {
                "ms": tt * 1e3,
                "tflops": check_flops / tt / 1e12,
                "max_err": float((o[0][:, :2].float() - ref).abs().max()),
                "lse_shape": list(o[1].shape),
            }
        except Exception as e:  # noqa: BLE001
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        print(name, res[name], flush=True)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "dense_attention_probe.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())

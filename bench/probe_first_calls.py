"""GPU probe: what a process pays the first time it runs an op at a shape, with MLX's kernel cache
warm (so no NVRTC compile of MLX's own fused kernels): cuDNN's attention and convolution graphs,
cuBLAS's matmul heuristics, our dequantize kernel. A warm run's first step still took 11-16 s
(bench/NOTES.md item 35), and a first run's CLIP encoding about 60 s beside the warm-up.

    python bench/probe_first_calls.py            # prints one JSON row per op: first call, second call (s)

Run it twice, once with MLX_CUDA_USE_CUDNN_SDPA=0: MLX then attends without cuDNN.
"""
from __future__ import annotations

import json
import os
import time

import mlx.core as mx


def timed(function) -> float:
    started = time.perf_counter()
    mx.eval(function())
    return time.perf_counter() - started


def main() -> None:
    bf16 = mx.bfloat16
    rows = []

    def probe(name, make):
        arrays = make()
        mx.eval(arrays)
        first = timed(lambda: name_to_call[name](*arrays))
        second = timed(lambda: name_to_call[name](*arrays))
        rows.append({"op": name, "first_s": round(first, 3), "second_s": round(second, 3)})
        print(json.dumps(rows[-1]), flush=True)

    def sdpa(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5)

    def sdpa_causal(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask="causal")

    def sdpa_bias(q, k, v, bias):  # T5: relative position bias as an additive mask, no scaling
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=bias)

    def sdpa_backward(q, k, v, cotangent):
        return mx.vjp(sdpa, [q, k, v], [cotangent])[1]

    def matmul(x, w):
        return x @ w.T

    def conv(x, w):
        return mx.conv2d(x, w, padding=1)

    name_to_call = {"sdpa flux 1536x24x128": sdpa, "sdpa flux again, other values": sdpa,
                    "sdpa backward flux": sdpa_backward, "sdpa clip causal 77x12x64": sdpa_causal,
                    "sdpa t5 bias 512x64x64": sdpa_bias, "matmul 1536x3072x12288": matmul,
                    "conv vae 512x512x128": conv}
    normal = lambda *shape: mx.random.normal(shape).astype(bf16)  # noqa: E731
    probe("sdpa flux 1536x24x128", lambda: [normal(1, 24, 1536, 128) for _ in range(3)])
    probe("sdpa flux again, other values", lambda: [normal(1, 24, 1536, 128) for _ in range(3)])
    probe("sdpa backward flux", lambda: [normal(1, 24, 1536, 128) for _ in range(4)])
    probe("sdpa clip causal 77x12x64", lambda: [normal(1, 12, 77, 64) for _ in range(3)])
    probe("sdpa t5 bias 512x64x64", lambda: [normal(1, 64, 512, 64) for _ in range(3)] + [normal(1, 64, 512, 512)])
    probe("matmul 1536x3072x12288", lambda: [normal(1536, 3072), normal(12288, 3072)])
    probe("conv vae 512x512x128", lambda: [normal(1, 512, 512, 128), normal(128, 3, 3, 128)])
    if os.environ.get("OUT"):
        name = "first_calls_no_cudnn_sdpa.json" if os.environ.get("MLX_CUDA_USE_CUDNN_SDPA") == "0" else "first_calls.json"
        with open(os.path.join(os.environ["OUT"], name), "w") as file:
            json.dump(rows, file, indent=1)


if __name__ == "__main__":
    main()

"""GPU probe: LoRA's rank-sized GEMMs at the token counts of FLUX.1's streams, checked for
finite, correct results (style's joint-block LoRA trained to NaN on CUDA; bench/NOTES.md).

For tokens in (512, 1024, 1536) and ranks (4, 8, 16, 32): the three products of a LoRA layer's
backward as autodiff builds them (bf16 operands, transposed views as they arrive), compared
with the same products in float32. Also the gradient of a joint block's LoRA weights (rank 16
and 8) is left to bench/bisect_joint_ckpt.py. With $OUT set, writes $OUT/lora_gemm.json.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402,F401
import mlx.core as mx  # noqa: E402


def check(name, fn, *args):
    outs = []
    for dtype in (mx.float32, mx.bfloat16):
        out = fn(*(a.astype(dtype) for a in args)).astype(mx.float32)
        mx.eval(out)
        outs.append(out)
    reference, result = outs
    bad = int((~mx.isfinite(result)).sum().item())
    err = float(mx.abs(mx.nan_to_num(result) - reference).max() / (mx.abs(reference).max() + 1e-12))
    return {"case": name, "nonfinite": bad, "max_rel_err": round(err, 5), "ok": bad == 0 and err < 0.05}


def main() -> None:
    rows = []
    mx.random.seed(0)
    for tokens in (512, 1024, 1536):
        for rank in (4, 8, 16, 32):
            x = mx.random.normal((1, tokens, 3072))
            dy = mx.random.normal((1, tokens, 3072))
            z = mx.random.normal((1, tokens, rank))
            a = mx.random.normal((rank, 3072)) * 0.02
            b = mx.random.normal((3072, rank)) * 0.02
            for name, fn, args in [
                ("z = x @ A.T", lambda x, a: x @ a.T, (x, a)),
                ("dz = dy @ B", lambda dy, b: dy @ b, (dy, b)),
                ("dx = dz @ A", lambda z, a: z @ a, (z, a)),
                ("dA = dz.T @ x", lambda z, x: z.reshape(-1, z.shape[-1]).T @ x.reshape(-1, 3072), (z, x)),
                ("dB = dy.T @ z", lambda dy, z: dy.reshape(-1, 3072).T @ z.reshape(-1, z.shape[-1]), (dy, z)),
                ("y + z @ B.T (addmm)", lambda y, z, b: mx.addmm(y, z, b.T), (dy, z, b)),
            ]:
                for attempt in range(3):
                    row = {"tokens": tokens, "rank": rank, "attempt": attempt, **check(name, fn, *args)}
                    rows.append(row)
                    if not row["ok"] or attempt == 0:
                        print(json.dumps(row), flush=True)
            if os.environ.get("OUT"):
                Path(os.environ["OUT"], "lora_gemm.json").write_text(json.dumps(rows, indent=1))
    print("failed cases:", sum(not r["ok"] for r in rows), "of", len(rows))


if __name__ == "__main__":
    main()

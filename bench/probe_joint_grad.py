"""GPU probe: where the gradient through a FLUX.1 joint block turns non-finite on CUDA.

The style template (LoRA on joint blocks) trained to NaN on an H200 from its second
step, with every speed switch off too (bench/raw/run10/bisect_a.json), while pets and
people (single blocks only) trained. This takes FLUX.1-dev's widths and 512 text +
1024 image tokens, random weights, and differentiates pieces of growing size, each
in float32 and bf16, eager and compiled: whether the forward and every input's
gradient are finite, and how far the GPU's gradient is from the CPU's (float32; for whole layers, from
the GPU's eager float32).

    python bench/probe_joint_grad.py            # with $OUT set, writes $OUT/joint_grad.json
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402,F401
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

from engine.flux.latents import latent_image_ids, text_ids  # noqa: E402
from engine.flux.rope import apply_rope, rope_inverse_frequencies, rope_rotation  # noqa: E402
from engine.flux.transformer import FluxSingleTransformerBlock, FluxTransformerBlock, _join_ids  # noqa: E402

DIM, HEADS, HEAD_DIM, TEXT, IMAGE = 3072, 24, 128, 512, 1024
if os.environ.get("SMALL"):  # a CPU smoke test of the script itself
    DIM, HEADS, TEXT, IMAGE = 256, 2, 8, 16


def rotation(dtype=mx.float32):
    frequencies, axis = rope_inverse_frequencies([16, 56, 56])
    return rope_rotation(_join_ids(text_ids(TEXT), latent_image_ids(2 * int(IMAGE**0.5), 2 * int(IMAGE**0.5))), frequencies, axis)


def attention_core(q_txt, q_img, k_txt, k_img, v_txt, v_img, rope):
    """The joint part of FluxAttention: [text, image] joined along tokens, rotated, attended, split."""
    q, k, v = (mx.concatenate(pair, axis=1) for pair in ((q_txt, q_img), (k_txt, k_img), (v_txt, v_img)))
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (apply_rope(q, rope), apply_rope(k, rope), v))
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=HEAD_DIM**-0.5)
    out = out.transpose(0, 2, 1, 3).reshape(1, TEXT + IMAGE, -1)
    return out[:, TEXT:], out[:, :TEXT]


def pieces():
    mx.random.seed(0)
    joint, single = FluxTransformerBlock(DIM, HEADS, HEAD_DIM), FluxSingleTransformerBlock(DIM, HEADS, HEAD_DIM)
    heads = lambda length: mx.random.normal((1, length, HEADS, HEAD_DIM))  # noqa: E731
    temb = nn.silu(mx.random.normal((1, DIM)))
    return {
        "sdpa": (lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=HEAD_DIM**-0.5),
                 [mx.random.normal((1, HEADS, TEXT + IMAGE, HEAD_DIM)) for _ in range(3)], None),
        "concat+sdpa (no rope)": (_core_no_rope, [heads(TEXT), heads(IMAGE)] * 3, None),
        "attention core": (lambda *a: attention_core(*a, rope=ROPE), [heads(TEXT), heads(IMAGE)] * 3, None),
        "joint attention": (lambda x, c: joint.attn(x, ROPE, context=c),
                            [mx.random.normal((1, IMAGE, DIM)), mx.random.normal((1, TEXT, DIM))], joint.attn),
        "joint block": (lambda x, c: joint(x, c, temb, ROPE),
                        [mx.random.normal((1, IMAGE, DIM)), mx.random.normal((1, TEXT, DIM))], joint),
        "single block": (lambda x: single(x, temb, ROPE), [mx.random.normal((1, TEXT + IMAGE, DIM))], single),
    }


def _core_no_rope(q_txt, q_img, k_txt, k_img, v_txt, v_img):
    q, k, v = (mx.concatenate(pair, axis=1).transpose(0, 2, 1, 3)
               for pair in ((q_txt, q_img), (k_txt, k_img), (v_txt, v_img)))
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=HEAD_DIM**-0.5)
    out = out.transpose(0, 2, 1, 3).reshape(1, TEXT + IMAGE, -1)
    return out[:, TEXT:], out[:, :TEXT]


def gradients(fn, inputs, module, dtype, compiled, device):
    """Forward outputs and the gradient of sum(outputs * fixed random weights) to every input."""
    with mx.stream(device):
        if module is not None:
            module.update(tree_map(lambda p: p.astype(dtype), module.parameters()))
        args = [a.astype(dtype) for a in inputs]

        def loss(*a):
            outs = fn(*a)
            outs = outs if isinstance(outs, tuple) else (outs,)
            return sum((o.astype(mx.float32) * w).sum() for o, w in zip(outs, WEIGHTS(outs))), outs

        grad_fn = mx.value_and_grad(loss, argnums=tuple(range(len(args))))
        grad_fn = mx.compile(grad_fn) if compiled else grad_fn
        (value, outs), grads = grad_fn(*args)
        mx.eval(value, outs, grads)
        return outs, [g.astype(mx.float32) for g in grads]


_weights: dict = {}


def WEIGHTS(outs):  # noqa: N802  (fixed cotangents per output shape, made once)
    return [_weights.setdefault(o.shape, mx.random.normal(o.shape, key=mx.random.key(len(_weights))))
            for o in outs]


ROPE = None


def main() -> None:
    global ROPE
    ROPE = rotation()
    mx.eval(ROPE)
    gpu = mx.gpu if mx.metal.is_available() or mx.cuda.is_available() else mx.cpu
    rows = []
    for name, (fn, inputs, module) in pieces().items():
        params = module.parameters() if module is not None else None
        # the CPU (float32) as reference where it is quick; for whole layers the GPU's eager float32
        _, reference = gradients(fn, inputs, module, mx.float32, False, mx.cpu if module is None else gpu)
        for dtype in (mx.float32, mx.bfloat16):
            for compiled in (False, True):
                if module is not None:
                    module.update(params)
                try:
                    outs, grads = gradients(fn, inputs, module, dtype, compiled, gpu)
                    row = {"piece": name, "dtype": str(dtype), "compiled": compiled,
                           "forward_finite": all(mx.isfinite(o).all().item() for o in outs),
                           "grads_finite": [mx.isfinite(g).all().item() for g in grads],
                           "nonfinite_counts": [int((~mx.isfinite(g)).sum().item()) for g in grads],
                           "max_rel_err": [round(float(mx.abs(mx.nan_to_num(g) - r).max() / (mx.abs(r).max() + 1e-12)), 5)
                                           for g, r in zip(grads, reference)]}
                except Exception as error:
                    row = {"piece": name, "dtype": str(dtype), "compiled": compiled, "error": repr(error)[:300]}
                print(json.dumps(row), flush=True)
                rows.append(row)
                if os.environ.get("OUT"):
                    Path(os.environ["OUT"], "joint_grad.json").write_text(json.dumps(rows, indent=1))
        if module is not None:
            module.update(params)


if __name__ == "__main__":
    main()

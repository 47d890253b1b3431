"""Switches for the training step's speed work (issue 5), read at trace time.

Each names one optimisation that changes how the step is computed, never what
it computes (tests hold both settings to the same numbers). They are module
attributes so bench/profile_step.py can measure each one's effect in a single
process on the GPU; bench/NOTES.md has what each bought. Changing one after a
step was compiled has no effect on that step: build a new one.
"""
from __future__ import annotations

import os
import warnings
from functools import cache

import mlx.core as mx


# GELU's backward from its bf16 input, recomputing the float32 curve, instead
# of autodiff through the float32 round trip (which keeps a float32 copy of the
# 12288-wide MLP activation per block)
GELU_SAVES_INPUT = True
# LoRA's low-rank product added inside its second matmul (mx.addmm) rather than
# by a separate pass over the layer's output
LORA_ADDMM = True
# A LoRA layer over a plain or dequantizing linear as one function (engine/lora_fused.py:
# lora_linear) whose backward adds LoRA's input gradient inside the kernel that computes it, rather
# than autodiff of the base and LoRA apart (two products and their sum): one (tokens x in) tensor
# and one kernel fewer per layer's backward
LORA_FUSED_LINEAR = True
# Each LoRA layer of a training step reads compute copies of its adapter (A and scale * B in the
# compute dtype), made once a step by the optimizer update (engine/lora.py: ComputeCopies), instead of
# casting and scaling its float32 masters in every forward and backward: 1260 of a checkpointed people
# step's 7431 kernels fewer. Off: on an H100 (run 19, bench/NOTES.md item 42) it bought 1.4% on that step
# (0.1412-0.1422 s against 0.1430-0.1442) and nothing on bf16's, and raised both peaks (7.71 -> 7.90 GiB,
# 37.29 -> 38.12 GiB): MLX's run-ahead is counted in kernels, and fewer small ones let it hold more
LORA_COMPUTE_COPIES = False
# RoPE as our own CUDA kernel on the activation's own dtype (engine/flux/rope.py) instead of the
# elementwise kernel MLX fuses from the MLX route (bench/NOTES.md item 49; before it, a float32 copy, a
# complex multiply and a copy back). Both are one kernel a call, but MLX's reads q and k through strided
# views: 10.4 ms of a 4-bit checkpointed step on an H100 (226 calls), ours ~3 (run 22, item 50)
ROPE_KERNEL = True
# Dequantize a quantized base with our own CUDA kernel (engine/flux/quantized.py) rather
# than mx.dequantize; elsewhere this has no effect
CUDA_DEQUANTIZE = True
# LoRA's rank-sized products through engine/lora_kernels.py's CUDA kernels instead of
# cuBLAS (which runs such skinny shapes at a few percent of the card's bandwidth). Off: on H100s they
# lose to cuBLAS since run 17's fused LoRA layer. CUPTI put their kernels at ~44 ms of a people 4-bit
# checkpointed step and ~34 ms of a bf16 step (run 17), against ~19 and ~15 ms for the same products
# on cuBLAS (run 19). End to end, with RoPE's kernel, bf16 took 0.0950-0.0955 s against 0.0902-0.0912 s
# without either (run 18; bench/NOTES.md items 41-42). On an H200 (run 11) they had beaten the autodiff
# route that run 17 replaced. Their 1.1 GiB less in bf16 without checkpointing is not worth 5%.
LORA_KERNELS = False
# Attention through mx.fast.scaled_dot_product_attention (cuDNN on CUDA) rather than two
# matmuls around a float32 softmax (which keeps the (heads, L, L) probabilities for backward)
FAST_SDPA = True
# The fused attention's own backward in joint blocks off CUDA, rather than one recomputing the
# softmax with matmuls (engine/flux/layers.py: attention, _joint_backward). Single blocks always
# take the fused one: on CUDA it gave the recomputed one's gradients for them (run 11)
FUSED_ATTENTION_BACKWARD = True
# On CUDA, joint blocks' attention through the fused backward handed contiguous arrays, instead
# of the recomputed backward (the fused one on the arrays as they come gave NaN there). It trained
# full-size style to the recomputed one's losses, 0.122 s a step against 0.188 s (runs 11-12)
CONTIGUOUS_JOINT_ATTENTION = True
# Gradient checkpointing as a stage-by-stage step with a bounded queue (engine/blockwise_step.py)
# rather than nn.utils.checkpoint inside one compiled step, whose queued work held 17.8 GiB for a
# 4-bit people step uncapped, 10.5 GiB capped at 0.215 s; this one 8.67 GiB at 0.157 s (H200,
# bench/NOTES.md items 3, 6, 23)
BLOCKWISE_CHECKPOINTING = True
# In that step's backward, each quantized layer dequantized once, its dense weight kept for the
# block's backward (engine/flux/quantized.py: keeping_dense_weights), rather than dequantized again:
# 9.63 vs 10.04 GiB, but 0.160 vs 0.141 s, not understood (H200, depth 2; NOTES.md item 25)
BLOCKWISE_KEEPS_DENSE = True
# In that step's backward, queue each stage's recomputed forward (the vjp's outputs) as a piece of
# its own before its backward, so the host waits halfway through a stage instead of at its end: at
# depth 1 at most two half-stages are held, not two stages. Off until measured on a GPU (bench/NOTES.md,
# "why still missed": the people 4-bit peak at depth 1 is 8.67 GiB, 0.67 over the target)
BLOCKWISE_SPLIT_BACKWARD = False
# At depth -1, each backward stage's adapter outputs (gradients, or the updated arrays and optimizer
# state where the stage updates them) queued before the rest of its outputs. Queued together, MLX encoded
# those small kernels last, and the GPU then waited at the end of each backward stage while the host made
# the next one (run 22's profile: 32 gaps, 5.6 ms of a 4-bit checkpointed people step on an H100; run 24's:
# 37 gaps after the stage's last update kernel, 14.7 ms; bench/NOTES.md items 51, 53). Queued first, a
# stage ends with its input gradient's matmuls. The same kernels and values. On three H100s it was faster
# in most rounds: run 23 by 1-2% in its three quiet rounds; run 24 in four rounds of six, floor 0.1329
# against 0.1404 s; run 25 in two of three, the third even (item 54); peaks up to 0.15 GiB higher (7.79)
BLOCKWISE_GRADS_FIRST = True
# In that step, each backward stage updates its own trained arrays with the optimizer inside the stage's
# compiled function, as soon as their gradients exist, instead of one update of all of them at the step's
# end: there, 280 arrays' AdamW kernels of a 4-bit people step came after the last stage, with ~4.3 ms of
# the GPU's idle around them while the host made the update's graph from its 1100 inputs (run 22's
# profile, bench/NOTES.md item 53); in the stages, the host makes them while the GPU runs queued stages,
# and each gradient's float32 cast joins its array's update kernel. The same numbers, to the bit
BLOCKWISE_UPDATE_IN_BACKWARD = True
# A single block's q, k, v and MLP input (four 4-bit layers reading one input) as one dequantize and one
# product (engine/flux/fused_inputs.py), made where a training step is built: 3 dequantizes and 3 cuBLAS
# calls fewer in each forward and recompute, 3 cuBLAS calls fewer in the backward, for up to 4 copies of
# the slices; their adapters' first products (x @ A.T) as one too, 12 cuBLAS calls fewer a trained block
# and step. Off until measured on a GPU (bench/NOTES.md items 55, 57; bench/probe_fused_inputs.py)
FUSED_SINGLE_INPUTS = False
# On a machine's first run, train while the kernel warm-up's processes still compile the step's fused
# kernels (engine/kernel_warmup.py), with MLX's compile off (engine/training_step.py: make_uncompiled_step):
# unfused steps need no kernel compiled, so the first step comes once the transformer has loaded instead of
# once the warm-up's slowest part ends (run 26: loaded at 41.5 s, first step at 70.3 s, bench/NOTES.md
# item 56); the compiled step takes over from the first step after the warm-up ends. Off (also with
# DREAMBOOTH_WIZARD_TRAIN_WHILE_COMPILING=0): the run waits for the warm-up before its first step
TRAIN_WHILE_COMPILING = os.environ.get("DREAMBOOTH_WIZARD_TRAIN_WHILE_COMPILING", "1").strip() != "0"
# how many stages that step queues ahead of the GPU before the host waits (an int, not a switch;
# None: the backend's, `blockwise_depth`). 1: people 4-bit held 8.67 GiB at 0.157 s, 2: 9.63 GiB at
# 0.160 s (H200, item 24). -1 (engine/flux/bounded_queue.py: UNBOUNDED): the host never waits between
# stages; on CUDA MLX holds it back once ~10 CUDA graphs are in flight, each CUDA_OPS_PER_GRAPH_UNBOUNDED
# kernels (item 40). DREAMBOOTH_WIZARD_BLOCKWISE_DEPTH sets it for a process (benchmarks)
def _depth_from_environment(default: int) -> int:
    text = os.environ.get("DREAMBOOTH_WIZARD_BLOCKWISE_DEPTH", "").strip()
    if text.lstrip("-").isdigit() and int(text) >= -1:
        return int(text)
    if text:
        at = "its default depth" if default is None else f"depth {default}"
        warnings.warn(f"DREAMBOOTH_WIZARD_BLOCKWISE_DEPTH={text!r} is not a whole number of -1 or more; "
                      f"the checkpointed step runs at {at}", stacklevel=2)
    return default


BLOCKWISE_DEPTH = _depth_from_environment(None)
# The backends' depths. On CUDA -1: people 4-bit checkpointed at 512, the trainer's whole run (encoding
# included) 7.80 GiB against 8.87 at depth 1, the step 0.144 s against 0.137 (5% slower, kernels as a
# 750-step run takes them; one H100, run 18, item 41). Elsewhere 1: -1 was never measured off CUDA, where
# MLX has no bound on graphs in flight to hold the host back
BLOCKWISE_DEPTH_ON_CUDA = -1
BLOCKWISE_DEPTH_ELSEWHERE = 1


def blockwise_depth(cuda: bool | None = None) -> int:
    """The block-by-block step's depth: BLOCKWISE_DEPTH where set (the environment, a benchmark), else
    the backend's; `cuda` None: this process's (the estimator asks for CUDA's wherever it runs)."""
    if BLOCKWISE_DEPTH is not None:
        return BLOCKWISE_DEPTH
    return BLOCKWISE_DEPTH_ON_CUDA if (on_cuda() if cuda is None else cuda) else BLOCKWISE_DEPTH_ELSEWHERE
# Inference (previews, `generate`) queues the transformer block by block and the VAE decoder piece by
# piece, this many pieces ahead of the GPU (engine/flux/bounded_queue.py): queued whole, a 4-bit
# preview took people's whole-run peak from 8.9 to 17.8 GiB (H200, bench/NOTES.md item 30)
INFERENCE_DEPTH = 1
# MLX's CUDA backend launches its kernels as CUDA graphs of MLX_MAX_OPS_PER_BUFFER kernels (20).
# Where the block-by-block step runs one stage at a time (depth 0), 5 a graph: the GPU starts a
# stage's kernels once 5 are queued rather than 20, so it idles less while the host queues the
# rest: people 4-bit checkpointed 0.213-0.228 s a step with 20 (three processes), 0.171 with 5,
# 0.176 with 10, 0.179 launching without graphs; 7.86 -> 7.63 GiB (H200, run 15, bench/NOTES.md
# item 33). Not at depth 1, where 10 a graph cost time (0.147 -> 0.161 s) for 0.4 GiB less.
# MLX's graph cache (MLX_CUDA_GRAPH_CACHE_SIZE, 100) is left alone: raising it made no difference
# beyond the 10% that one setting varies between processes (people bf16 0.094 / 0.093 / 0.103 s
# for 100 / 4096 / 100), and MLX's own check found no thrashing. MLX reads these once per process.
CUDA_OPS_PER_GRAPH_ONE_STAGE = 5
# Where that step never waits between stages (depth -1), also small graphs: MLX holds the host back
# once ~10 graphs are in flight, so their size bounds how far it runs ahead. People 4-bit
# checkpointed on an H100: 5 a graph 0.150 s at 8.17 GiB, 10 a graph 0.158 s at 8.93, MLX's own
# size 0.125 s at 24.5 GiB (item 40); MLX's graph cache then holds 4096 graphs, not 100.
# MLX also cuts a graph once its kernels' inputs pass MLX_MAX_MB_PER_BUFFER MB: 10 kernels or 40 MB
# a graph keeps the graphs short where the arrays are large (a dequantized weight, an activation) and
# longer over runs of small kernels (LoRA's, the optimizer's), so the host builds and launches fewer.
# People 4-bit checkpointed, one H100 (run 20, item 45): 0.1525 s (median of nine processes at 40-50
# MB) against 0.170 s (seventeen at 5 kernels), the step's peak 7.48-7.75 against 7.57-7.71 GiB, the
# trainer's whole run 7.61 GiB. Run 21 (another H100, four rounds in one call, item 48): 0.170 against
# 0.181 s by medians, faster in three rounds of four, floors 0.141 against 0.149 s, the same memory
CUDA_OPS_PER_GRAPH_UNBOUNDED = 10
CUDA_MB_PER_GRAPH_UNBOUNDED = 40
CUDA_GRAPH_CACHE_UNBOUNDED = 4096

DEFAULTS = {name: value for name, value in dict(globals()).items() if name.isupper()}


@cache
def on_cuda() -> bool:
    """Whether arrays live on an NVIDIA GPU (MLX's CUDA build, GPU the default device): where our kernels run."""
    try:
        return mx.cuda.is_available() and mx.default_device() == mx.gpu
    except AttributeError:  # an MLX without the CUDA module
        return False


def configure_cuda_graphs(one_stage_at_a_time: bool = False, unbounded: bool = False) -> dict[str, str]:
    """On CUDA, for a step run one stage at a time or without a bound by stages (depth -1), MLX's
    kernels (and, at -1, MB) per CUDA graph and graph cache (above), each where the environment does
    not set it already; returns what it set. MLX reads them once, at its first kernel launch, so this
    must come before the first kernel runs (the trainer calls it before it loads the model); later
    calls change nothing. Elsewhere nothing is set: Metal reads MLX_MAX_OPS_PER_BUFFER too, for its command
    buffers, with other numbers."""
    if not ((one_stage_at_a_time or unbounded) and on_cuda()):
        return {}
    wanted = ({"MLX_MAX_OPS_PER_BUFFER": str(CUDA_OPS_PER_GRAPH_ONE_STAGE)} if one_stage_at_a_time else
              {"MLX_MAX_OPS_PER_BUFFER": str(CUDA_OPS_PER_GRAPH_UNBOUNDED),
               "MLX_MAX_MB_PER_BUFFER": str(CUDA_MB_PER_GRAPH_UNBOUNDED),
               "MLX_CUDA_GRAPH_CACHE_SIZE": str(CUDA_GRAPH_CACHE_UNBOUNDED)})
    chosen = {name: value for name, value in wanted.items() if name not in os.environ}
    os.environ.update(chosen)
    return chosen


# Our own CUDA kernels that a run switches on are compiled (NVRTC) afresh in every process: MLX keeps
# its own compiled kernels in a disk cache (/tmp/mlx), but none of mx.fast.cuda_kernel's were found
# there. On an H200 (run 11, bench/probe_first_step.py) RoPE's kernel added ~6 s to the first step
# (~2.5 s on an H100 in run 18). Against the fused MLX route (item 49) it saved 3.4-5.0 ms a step by
# floors, 3.9-7.8 by medians (people 4-bit checkpointed and bf16, four rounds on one H100, run 22,
# bench/NOTES.md item 50): MLX's fused kernel reads q and k through strided views at ~46 us a call,
# ours at ~13. A run of fewer steps than compile time / saving (1500 with these) finishes sooner
# without it. LoRA's kernels are off whatever the length (LORA_KERNELS above).
KERNEL_COMPILE_S = {"ROPE_KERNEL": 6.0}
KERNEL_SAVING_S_PER_STEP = {"ROPE_KERNEL": 0.004}


def kernels_not_worth_compiling(steps: int) -> list[str]:
    """Our CUDA kernels whose compile time a run of `steps` steps would not win back."""
    return [name for name, seconds in KERNEL_COMPILE_S.items() if steps * KERNEL_SAVING_S_PER_STEP[name] < seconds]


def configure_for_training(steps: int | None = None) -> list[str]:
    """Reset every switch to its default, then turn off, on CUDA, the kernels a run of `steps` more
    steps (None: a long run) would not win back; returns those."""
    globals().update(DEFAULTS)
    off = kernels_not_worth_compiling(steps) if steps is not None and on_cuda() else []
    for name in off:
        globals()[name] = False
    return off

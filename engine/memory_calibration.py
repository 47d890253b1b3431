"""The estimate's coefficients (engine/memory.py): every guess of its activation and workspace
model in one place, each with where its value was measured, so a refit touches only this file."""
from __future__ import annotations

GIB = 2**30

# Every coefficient of the activation and workspace model. The block, attention and transient
# values were fitted to `mx.get_peak_memory()` of the trainer's compiled LoRA step on CPU (float32,
# MLX 0.32.4, a 512-wide 2 joint + 4 single block FLUX at 256 and 512 px, 768 and 1536 tokens);
# the rest are counted by hand. Refit them from bf16 GPU runs: bf16 also keeps GELU's float32 upcast.
CALIBRATION: dict[str, float] = {
    # (tokens x hidden) tensors in the compute dtype a block keeps for the backward pass, per sample
    # (refitted after GELU's backward came to keep only its input, engine/flux/layers.py:
    # the float32 route's autodiff kept 4x-wide intermediates; earlier fit 25.5 joint, 27.9 single)
    "joint_block_saved_tensors": 21.0,
    "single_block_saved_tensors": 22.5,
    # Where attention's backward is not fused (MLX on Metal and CPU differentiate the unfused
    # fallback), each stored block also keeps its softmax probabilities, (heads x L x L) per sample
    # (fitted: 0.96 single, 1.14 joint).
    "attention_probabilities_saved": 1.0,
    # the backward pass's temporaries beyond what blocks keep: about one block's worth (fitted 30.6
    # hidden-wide tensors plus 1.9 probability-sized ones)
    "backward_transient_tensors": 30.0,
    "attention_backward_transient": 2.0,
    # with gradient checkpointing each block keeps its input (both streams together) ...
    "checkpoint_saved_tensors": 1.0,
    # ... and the compiled step recomputes about two blocks at once (measured flat from 2 to 6 blocks)
    "checkpoint_recomputed_blocks": 2.0,
    # final norm, projection and the float32 MSE loss over image tokens (hidden-wide image tensors)
    "output_layer_saved_tensors": 3.0,
    # a preview generation: one inference block's temporaries (hidden-wide tensors, batch 1)
    "preview_transformer_tensors": 8.0,
    # VAE over one image: (H x W x widest full-resolution channels) tensors alive at once
    "vae_encode_tensors": 4.0,
    "vae_decode_tensors": 4.0,
    # ... measured on the CPU (MLX 0.32.4, float32, the tiny VAE at 64-256 px): 2440 bytes a pixel,
    # 38 of those tensors (its convolutions' buffers); Metal and CUDA are not measured, so they keep 4
    "vae_decode_tensors_cpu": 38.0,
    # ... and on CUDA, queued piece by piece (engine/flux/bounded_queue.py): 0.84 and 1.06 GiB above
    # the weights at 512x512 on an H200 (bench/raw/run14/preview; queued whole: 1.35 and 2.22)
    "vae_decode_tensors_cuda": 8.0,
    # a preview's transformer call on CUDA, queued block by block: per block in flight, beyond its
    # dense copies (4-bit people at 512: 1.29-1.37 GiB above the weights for two joint blocks in
    # flight, 0.84 GiB of them dense; queued whole: 7.5-12.1 GiB, run 14)
    "preview_stage_tensors": 26.0,
    # the VAE mid-block attention over (H/8 x W/8) pixels in one 512-wide head: no fused kernel
    # takes that head size, so scores and probabilities are materialized
    "vae_attention_tensors": 2.0,
    # T5 forward of one prompt: (tokens x d_ff) tensors alive at once
    "t5_encode_tensors": 4.0,
    # allocator fragmentation and kernel scratch, a fraction of each phase, plus a floor
    "workspace_fraction": 0.10,
    "workspace_minimum_bytes": 4 * 2**20,  # tiny CPU runs: 64 MiB overstated them 2-3x
    # CUDA: how far the step may run ahead of the GPU before MLX's soft limit holds it back; the trainer
    # sets the limit to the training peak (bench run 2: peaks within 1% of it, H200)
    "cuda_run_ahead_fraction": 0.15,
    "cuda_run_ahead_bytes": GIB,
    # CUDA runs without the limit (no checkpointing) with a quantized base also hold the dense
    # copies of the weights the queued work dequantizes: this share of the dense transformer.
    # Measured 4-bit: 0.28 pets and people (bench runs 9 and 11, H200); 8-bit: 0.21 pets, 0.22
    # people (run 12, H100); each set a little above. Runs whose backward crosses the joint blocks
    # hold more: 4-bit style 0.39 (runs 9 and 12) = 1.3x; 8-bit style is not measured uncapped
    # and takes the same factor.
    "cuda_uncapped_dequantized_fraction": 0.30,
    "cuda_uncapped_dequantized_fraction_8bit": 0.23,
    "cuda_uncapped_dequantized_joint_factor": 1.3,
    # CUDA runs with gradient checkpointing take the block-by-block step (engine/blockwise_step.py),
    # uncapped. Beyond the weights, the LoRA state and the saved block inputs, each stage in flight
    # (speed.BLOCKWISE_DEPTH queued plus the one running) holds every buffer it allocated until the
    # GPU is done with it: this many (tokens x hidden) tensors, plus this share of the largest
    # block's dense weights when quantized. Fitted to run 13 (bench/raw/run13*): bf16 depth 2 (H100)
    # 0.82 GiB a stage at 512x512; 4-bit depths 1 and 2 (H200) 1.07 and 1.04 GiB, of which the
    # dense copies 0.24 (one dequantize per layer, speed.BLOCKWISE_KEEPS_DENSE).
    "blockwise_stage_tensors": 93.0,
    # the same step without a bound by stages (depth -1, CUDA's default) and small CUDA graphs:
    # what MLX's own bound on graphs in flight holds, in stages. 4-bit at 512 on an H100 (run 18):
    # people 7.64 / 7.71 GiB (our kernels / MLX's routes), pets 7.67, style 8.37, people's whole run
    # through the trainer 7.80. 1.3 over-estimates people and pets by 5-6%, the whole run by 4%, and
    # style (joint blocks: more held than the stage volume says) by -1%; 1.0 would put style at -5%.
    # With 10 kernels or 40 MB a graph (CUDA's setting since run 20) people's step held 7.48-7.75 GiB
    # and its whole run 7.61 (one H100): +5..+9% at 1.3, kept. Run 21 (H100), the steps with it: people
    # 7.53-7.81 (+4..+8%), pets 7.84 (+4.1%), style 8.10 GiB (+2.2%)
    "blockwise_unbounded_stages": 1.3,
    "blockwise_stage_dense_share": 0.56,
}

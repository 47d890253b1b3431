"""FLUX.1 in MLX: transformer, VAE, CLIP-L, T5, tokenizers, sampler, loading."""

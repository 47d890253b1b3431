"""Inference queued piece by piece (engine/flux/bounded_queue.py): the same numbers as the whole
call, with at most depth + 1 pieces queued. On a GPU a 4-bit preview queued whole held 12 GiB
of temporaries, block by block 1.3 GiB (bench/NOTES.md item 30); the CPU frees as it goes, so
these tests check the numbers and the queueing, and bench/probe_preview_memory.py the memory."""
import mlx.core as mx
import numpy as np
import pytest

from engine.flux import bounded_queue, speed
from engine.flux.latents import latent_image_ids, text_ids
from engine.flux.loading import load_model, quantize_module
from engine.generate import GenerationRequest, generate_image


class Pushes:
    """Counts BoundedQueue pushes and the most pieces queued (not yet waited for) at once."""

    def __init__(self, monkeypatch):
        self.count, self.most, self.queued = 0, 0, []
        real_async_eval, real_eval = mx.async_eval, mx.eval

        def async_eval(*arrays):
            self.count += 1
            self.queued.append(id(arrays[0]))
            self.most = max(self.most, len(self.queued))
            return real_async_eval(*arrays)

        def evaluate(*arrays):
            if arrays and id(arrays[0]) in self.queued:
                self.queued.remove(id(arrays[0]))
            else:  # the caller's wait for a call's result, which needs every piece queued before it
                self.queued.clear()
            return real_eval(*arrays)

        monkeypatch.setattr(bounded_queue.mx, "async_eval", async_eval)
        monkeypatch.setattr(bounded_queue.mx, "eval", evaluate)


@pytest.fixture(scope="module")
def model():
    return load_model("tiny")


def transformer_inputs(transformer):
    keys = mx.random.split(mx.random.key(1), 3)
    return (mx.random.normal((1, 16, 64), key=keys[0]), mx.random.normal((1, 32, 32), key=keys[1]),
            mx.random.normal((1, 32), key=keys[2]), mx.array([0.6]), latent_image_ids(8, 8), text_ids(32),
            mx.array([3.5]))


@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("bits", [None, 4])
def test_transformer_block_by_block_equals_the_whole_call(monkeypatch, model, depth, bits):
    transformer = model.transformer
    if bits:
        transformer = load_model("tiny", text_encoders=False).transformer
        quantize_module(transformer, bits)
    inputs = transformer_inputs(transformer)
    whole = transformer(*inputs)
    mx.eval(whole)
    pushes = Pushes(monkeypatch)
    staged = transformer(*inputs, depth=depth)
    mx.eval(staged)
    np.testing.assert_allclose(np.array(staged), np.array(whole), rtol=1e-5, atol=1e-6)
    assert pushes.count == len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    assert pushes.most == depth + 1


@pytest.mark.parametrize("depth", [0, 1])
def test_vae_decode_piece_by_piece_equals_the_whole_decode(monkeypatch, model, depth):
    latents = mx.random.normal((1, 8, 8, model.vae.config.latent_channels), key=mx.random.key(2))
    whole = model.vae.decode(latents)
    mx.eval(whole)
    pushes = Pushes(monkeypatch)
    staged = model.vae.decode(latents, depth=depth)
    mx.eval(staged)
    np.testing.assert_allclose(np.array(staged), np.array(whole), rtol=1e-5, atol=1e-6)
    decoder = model.vae.decoder
    pieces = 2 + sum(len(b.resnets) + len(b.get("upsamplers", [])) for b in decoder.up_blocks)
    assert pushes.count == pieces and pushes.most == depth + 1


def test_generation_queues_the_transformer_and_the_decoder_in_pieces(monkeypatch, model):
    # a preview and `generate` both go through generate_image: neither may queue a call whole
    pushes = Pushes(monkeypatch)
    image = generate_image(model, GenerationRequest(prompt="a photo of sks dog", steps=2, width=64, height=64))
    transformer, decoder = model.transformer, model.vae.decoder
    per_call = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    pieces = 2 + sum(len(b.resnets) + len(b.get("upsamplers", [])) for b in decoder.up_blocks)
    assert image.shape == (64, 64, 3)
    assert pushes.count == 2 * per_call + pieces
    assert pushes.most <= speed.INFERENCE_DEPTH + 1

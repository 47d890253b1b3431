"""Queueing a computation piece by piece, with a bound on how far the host runs ahead.

On a GPU, MLX keeps every buffer of a queued op until the GPU has run it, so a
graph queued whole (one `mx.eval` of a 57-block transformer call) holds every
temporary it allocates at once: the dense copy of each dequantized 4-bit layer
among them. A 4-bit preview of people at 512x512 took the whole run's peak from
8.9 to 17.8 GiB that way on an H200 (bench/NOTES.md item 30). Queued a piece at
a time with at most `depth` pieces ahead, only depth + 1 pieces' buffers are
ever held, and the GPU still never waits while the host builds the next piece
(with depth >= 1).
"""
from __future__ import annotations

from collections import deque

import mlx.core as mx


# a depth for "no bound by pieces": the host never waits between pieces. On CUDA, MLX then holds it
# back by itself once ~10 CUDA graphs are in flight, so with small graphs (engine/flux/speed.py:
# CUDA_OPS_PER_GRAPH_UNBOUNDED, CUDA_MB_PER_GRAPH_UNBOUNDED) only the buffers of a few dozen kernels
# are held (bench/NOTES.md items 40, 45)
UNBOUNDED = -1


class BoundedQueue:
    """Queues pieces of a computation (lazy graphs, which hold no buffers until queued), waiting
    for the oldest whenever more than `depth` are queued, so at most depth + 1 hold their buffers.

    With depth >= 1 the host waits right after queueing a piece, then traces the next while the
    GPU runs what is queued. Depth 0 waits for the previous piece just before queueing the next
    (traced while it ran): one piece's buffers at a time, the GPU idle while the host queues each
    piece's kernels. (Waiting before queueing at depth 1 too held 0.4-0.9 GiB more in a 4-bit
    people step, 9.09-9.58 GiB in run 14 against 8.67 in run 13.) Not for use inside `mx.compile`
    or a gradient transform."""

    def __init__(self, depth: int):
        self.depth, self.pending = max(UNBOUNDED, depth), deque()

    def drain(self) -> None:
        while self.pending:
            mx.eval(self.pending.popleft())

    def push(self, arrays) -> None:
        if self.depth == 0:
            self.drain()
        mx.async_eval(arrays)
        self.pending.append(arrays)
        if self.depth == UNBOUNDED:
            # only the last piece is kept, for `drain` (one stream runs its work in order): holding every
            # piece's outputs would keep their buffers, 0.5 GiB of block outputs in a people step
            while len(self.pending) > 1:
                self.pending.popleft()
            return
        while len(self.pending) > max(self.depth, 1):
            mx.eval(self.pending.popleft())

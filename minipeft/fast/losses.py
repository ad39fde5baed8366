"""The LM loss without the (tokens × vocabulary) logits: the fast twin of core/model.py's `lm_loss`
(minipeft.fast.enable() swaps it in), the same cross-entropy computed through the head in tiles.

    loss = 1/N · Σ_i [ logsumexp_v z_iv − z_i,t_i ]      over the N tokens i whose target t_i ≠ −100
    z_i = h_i W^T                                       (V,) the head's logits of token i (no bias)
    z_i ← c · tanh(z_i / c)                             Gemma 2's final soft-cap c (cfg.final_softcap)

A plain `F.cross_entropy(head(h), t)` keeps the logits' log-softmax (N·V floats) for backward, and
backward adds the gradients of the log-probabilities and of the logits (3·N·V at once: 590 MiB for
GPT-2-small at batch 4 × 256). Here the N labelled tokens go through the head in tiles of C tokens
(`chunk_size`) × K rows of W (`vocab_block`, a slice of the vocabulary):

    forward   per tile: z (C, K) -> logsumexp over the block, folded into the token's running one
              (logaddexp); the target's logit is h_i · W[t_i]; z is dropped
    stores    the labelled hidden states h (N, d), their rows in the batch (N,), targets (N,) and the
              logsumexps (N,): N·(d + 5) floats (the two int64 vectors count two floats per element)
    backward  per tile again: z = h W^T, dL/dz = (softmax(z) − onehot(t)) · dL/N (× (1 − tanh²) under
              a soft-cap), dL/dh += dL/dz · W_block, and dL/dW_block += dL/dz^T · h if the head trains
              (full fine-tuning; a tied head is tok_emb's weight, and autograd adds the two gradients)
    memory    ≈ 2·C·K floats at a time (one tile's logits and a temporary of logsumexp or the softmax;
              3·C·K with a soft-cap, whose backward needs the tanh) instead of 3·N·V. The default tile,
              1024 × 4096, is 16 MiB of fp32 logits (`tile_elements`)

Why tiles and not whole-vocabulary chunks of a few tokens: a (C, d) @ (d, V) product with small C reads
all of W (154 MiB for GPT-2) to do little arithmetic. The loss's forward + backward for GPT-2-small at
4 × 256 tokens took 16 CPU s in 8 MiB chunks of 41 tokens, 6 s in 1024 × 4096 tiles, and 4.5 s as one
F.cross_entropy over the whole logits (which skips the recomputation). Rows whose target is −100 never
reach the head. The head runs in the dtype the forward pass computes in (autocast's, else the hidden
states'); the log-sum-exp, the softmax, the loss and a trained head's gradient are summed in fp32
(fp64 for an fp64 model).

    loss = model(idx, labels=idx)             # transformers' convention: labels = inputs, shifted inside
    loss = model(idx, shift_labels=targets)   # targets already aligned with idx (minipeft's datasets)
"""
import torch

from minipeft.core.model import IGNORE_INDEX, at_least_fp32, loss_targets
from minipeft.fast.autocast import autocast_off, matmul_dtype

CHUNK_SIZE = 1024  # tokens per tile
VOCAB_BLOCK = 4096  # rows of the head's weight (vocabulary entries) per tile


def tile_elements(vocab_size: int, tokens: int, chunk_size: int = CHUNK_SIZE, vocab_block: int = VOCAB_BLOCK) -> int:
    """Logits of one tile (the ledger's unit): at most chunk_size × vocab_block."""
    return min(chunk_size, tokens) * min(vocab_block, vocab_size)


def _capped_logits(h, weight, softcap):
    """(C, d) @ (K, d)^T -> logits (C, K) in fp32 (fp64 for an fp64 model) and, under a soft-cap,
    tanh(z / c) (backward needs it)."""
    z = at_least_fp32(h @ weight.T)  # (C, K)
    if not softcap:
        return z, None
    tanh = torch.tanh(z.div_(softcap))
    return tanh * softcap, tanh


def _tiles(n_tokens: int, vocab_size: int, chunk_size: int, vocab_block: int):
    """(token slice, vocabulary slice) of every tile, tokens outermost."""
    for start in range(0, n_tokens, chunk_size):
        for first in range(0, vocab_size, vocab_block):
            yield slice(start, start + chunk_size), slice(first, first + vocab_block)


class ChunkedCrossEntropy(torch.autograd.Function):
    """hidden (M, d), weight (V, d), targets (M,) -> the summed cross-entropy of the labelled rows, or with
    per_token each row's own (M,), 0 where unlabelled."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_size, vocab_block, dtype, per_token=False):
        with autocast_off(hidden.device.type):
            rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (N,)
            h, t = hidden[rows].to(dtype), targets[rows]  # (N, d), (N,)
            w = weight.to(dtype)  # (V, d); no copy when it is already in that dtype
            wide = torch.promote_types(dtype, torch.float32)  # what sums run in: fp32, or fp64 for fp64
            lse = torch.full((len(rows),), -torch.inf, dtype=wide, device=hidden.device)  # (N,)
            for part, block in _tiles(len(rows), len(w), chunk_size, vocab_block):
                z, _ = _capped_logits(h[part], w[block], softcap)  # (C, K)
                lse[part] = torch.logaddexp(lse[part], torch.logsumexp(z, dim=1))
            target_logits = (h * w[t]).sum(1, dtype=wide)  # (N,) h_i · W[t_i]
            if softcap:
                target_logits = torch.tanh(target_logits / softcap) * softcap
            losses = lse - target_logits  # (N,)
            total = losses.new_zeros(len(targets)).index_copy_(0, rows, losses) if per_token else losses.sum()
        ctx.save_for_backward(h, rows, t, lse, weight)
        ctx.softcap, ctx.chunk_size, ctx.vocab_block, ctx.dtype = softcap, chunk_size, vocab_block, dtype
        ctx.hidden_shape, ctx.hidden_dtype, ctx.per_token = hidden.shape, hidden.dtype, per_token
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h, rows, t, lse, weight = ctx.saved_tensors
        softcap, dtype = ctx.softcap, ctx.dtype
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        if ctx.per_token:  # (M,) -> the labelled rows' (N, 1), one factor per row of a tile
            grad_total = grad_total[rows, None]
        wide = lse.dtype  # fp32, or fp64 for an fp64 model
        grad_h = torch.zeros(h.shape, dtype=wide, device=h.device) if want_hidden else None  # (N, d)
        grad_weight = torch.zeros_like(weight, dtype=wide) if want_weight else None  # (V, d)
        with autocast_off(h.device.type):
            w = weight.to(dtype)
            for part, block in _tiles(len(rows), len(w), ctx.chunk_size, ctx.vocab_block):
                z, tanh = _capped_logits(h[part], w[block], softcap)  # (C, K)
                grad_z = z.sub_(lse[part, None]).exp_()  # softmax, in z's memory
                local = t[part] - block.start  # (C,) the target's column in this block, if it is there
                hit = (local >= 0) & (local < grad_z.shape[1])
                grad_z[hit.nonzero().squeeze(1), local[hit]] -= 1
                grad_z.mul_(grad_total[part] if ctx.per_token else grad_total)
                if softcap:  # d(c · tanh(z / c))/dz = 1 − tanh²
                    grad_z.mul_(tanh.square_().neg_().add_(1))
                if want_hidden:
                    grad_h[part] += (grad_z.to(dtype) @ w[block]).to(wide)  # (C, d)
                if want_weight:
                    grad_weight[block].addmm_(grad_z.T, h[part].to(wide))  # (K, d)
        grad_hidden = None
        if want_hidden:
            grad_hidden = h.new_zeros(ctx.hidden_shape, dtype=ctx.hidden_dtype)  # (M, d)
            grad_hidden[rows] = grad_h.to(ctx.hidden_dtype)
        return grad_hidden, grad_weight.to(weight.dtype) if want_weight else None, None, None, None, None, None, None


def lm_loss(hidden, weight, labels=None, shift_labels=None, softcap=None, causal=True, reduction="mean",
            chunk_size=None, vocab_block=None):
    """core/model.py's lm_loss (same arguments, same result within float rounding), never holding more
    than chunk_size × vocab_block logits (None: CHUNK_SIZE, VOCAB_BLOCK)."""
    targets = loss_targets(labels, shift_labels, causal, reduction)  # (B, T)
    total = ChunkedCrossEntropy.apply(hidden.flatten(0, 1), weight, targets.flatten(), softcap,
                                      chunk_size or CHUNK_SIZE, vocab_block or VOCAB_BLOCK, matmul_dtype(hidden),
                                      reduction == "none")
    if reduction == "none":
        return total.view(targets.shape)  # (B, T)
    if reduction == "sum":
        return total
    return total / (targets != IGNORE_INDEX).sum()  # 0 / 0 = nan when nothing is labelled, as transformers

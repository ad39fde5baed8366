"""The LM loss without the (tokens × vocabulary) logits: chunked cross-entropy through the head.

    loss = 1/N · Σ_i [ logsumexp_v z_iv − z_i,t_i ]      over the N tokens i whose target t_i ≠ −100
    z_i = h_i W^T                                       (V,) the head's logits of token i (no bias)
    z_i ← c · tanh(z_i / c)                             Gemma 2's final soft-cap c (cfg.final_softcap)

A plain `F.cross_entropy(head(h), t)` keeps the logits' log-softmax (N·V floats) for backward, and
backward adds the gradients of the log-probabilities and of the logits (3·N·V at once: 590 MiB for
GPT-2-small at batch 4 × 256). Here the N labelled tokens go through the head `chunk_size` at a time:

    forward   per chunk: z (C, V) → logsumexp and the target's logit; z is dropped
    stores    the labelled hidden states h (N, d), their rows in the batch (N,), targets (N,) and the
              logsumexps (N,): N·(d + 5) floats (the two int64 vectors count two floats per element)
    backward  per chunk again: z = h W^T, dL/dz = (softmax(z) − onehot(t)) · dL/N (× (1 − tanh²) under
              a soft-cap), dL/dh = dL/dz · W, and dL/dW += dL/dz^T · h if the head trains (full
              fine-tuning; a tied head is tok_emb's weight, and autograd adds the two gradients)
    memory    ≈ 2·C·V floats at a time (one chunk's logits and a temporary of logsumexp or the
              softmax; 3·C·V with a soft-cap, whose backward needs the tanh) instead of 3·N·V; the
              default C makes C·V ≈ CHUNK_ELEMENTS (8 MiB of fp32 logits)

Rows whose target is −100 never reach the head. The head runs in the dtype the forward pass computes in
(autocast's, else the hidden states'); the log-sum-exp, the softmax and the loss are fp32.

    loss = model(idx, labels=idx)             # transformers' convention: labels = inputs, shifted inside
    loss = model(idx, shift_labels=targets)   # targets already aligned with idx (minipeft's datasets)
"""
import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2 ** 21  # logits per chunk (chunk_size × vocab): 8 MiB in fp32


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that chunk × vocab ≈ CHUNK_ELEMENTS (GPT-2: 41; Gemma 3's 262k: 8)."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


def shift(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels as transformers takes them (the inputs, −100 where no loss) -> next-token targets
    aligned with the inputs: targets[:, t] = labels[:, t + 1], the last position has none (−100)."""
    return torch.cat([labels[:, 1:], labels.new_full((len(labels), 1), IGNORE_INDEX)], dim=1)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: autocast's when autocast is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _capped_logits(h, weight, softcap):
    """(C, d) -> fp32 logits (C, V) and, under a soft-cap, tanh(z / c) (needed by backward)."""
    z = (h @ weight.T).float()  # (C, V)
    if not softcap:
        return z, None
    tanh = torch.tanh(z.div_(softcap))
    return tanh * softcap, tanh


class ChunkedCrossEntropy(torch.autograd.Function):
    """hidden (M, d), weight (V, d), targets (M,) -> the summed cross-entropy of the labelled rows."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_size, dtype):
        with torch.autocast(hidden.device.type, enabled=False):
            rows = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (N,)
            h, t = hidden[rows].to(dtype), targets[rows]  # (N, d), (N,)
            w = weight.to(dtype)  # (V, d); no copy when it is already in that dtype
            lse = torch.empty(len(rows), dtype=torch.float32, device=hidden.device)  # (N,)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, len(rows), chunk_size):
                part = slice(start, start + chunk_size)
                z, _ = _capped_logits(h[part], w, softcap)  # (C, V)
                lse[part] = torch.logsumexp(z, dim=1)
                total += (lse[part] - z.gather(1, t[part, None]).squeeze(1)).sum()
        ctx.save_for_backward(h, rows, t, lse, weight)
        ctx.softcap, ctx.chunk_size, ctx.dtype = softcap, chunk_size, dtype
        ctx.hidden_shape, ctx.hidden_dtype = hidden.shape, hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h, rows, t, lse, weight = ctx.saved_tensors
        softcap, chunk_size, dtype = ctx.softcap, ctx.chunk_size, ctx.dtype
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        grad_hidden = h.new_zeros(ctx.hidden_shape, dtype=ctx.hidden_dtype) if want_hidden else None  # (M, d)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None  # (V, d), summed in fp32
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            for start in range(0, len(rows), chunk_size):
                part = slice(start, start + chunk_size)
                z, tanh = _capped_logits(h[part], w, softcap)  # (C, V)
                grad_z = z.sub_(lse[part, None]).exp_()  # softmax, in z's memory
                grad_z[torch.arange(len(grad_z)), t[part]] -= 1
                grad_z.mul_(grad_total)
                if softcap:  # d(c · tanh(z / c))/dz = 1 − tanh²
                    grad_z.mul_(tanh.square_().neg_().add_(1))
                if want_hidden:
                    grad_hidden[rows[part]] = (grad_z.to(dtype) @ w).to(ctx.hidden_dtype)  # (C, d)
                if want_weight:
                    grad_weight.addmm_(grad_z.T, h[part].float())  # (V, d)
        return grad_hidden, grad_weight.to(weight.dtype) if want_weight else None, None, None, None, None


def lm_loss(hidden, weight, labels=None, shift_labels=None, softcap=None, chunk_size=None, causal=True):
    """Mean cross-entropy over the labelled tokens, never holding more than chunk × vocab logits.

    hidden (B, T, d) final hidden states; weight (V, d) the LM head's; labels (B, T) as transformers takes
    them (shifted inside for a causal model; a masked LM's labels are its targets), or shift_labels (B, T)
    already aligned with the inputs. −100 = no loss. chunk_size: tokens per chunk (default_chunk_size)."""
    if (labels is None) == (shift_labels is None):
        raise ValueError("give labels (the inputs, shifted inside) or shift_labels (already shifted), not both")
    targets = shift_labels if labels is None else shift(labels) if causal else labels  # (B, T)
    chunk_size = chunk_size or default_chunk_size(len(weight))
    total = ChunkedCrossEntropy.apply(hidden.flatten(0, 1), weight, targets.flatten(), softcap, chunk_size,
                                      compute_dtype(hidden))
    return total / (targets != IGNORE_INDEX).sum()  # 0 / 0 = nan when nothing is labelled, as transformers

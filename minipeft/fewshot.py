"""Few-shot in-context classification: the baseline that trains nothing (Brown et al. 2020, "Language
Models are Few-Shot Learners", https://arxiv.org/abs/2005.14165).

K labelled training examples (the demonstrations) go into the prompt before each test example, and
the prediction is the class whose label word the causal LM finds most likely to come next:

    Review: <train text 1>\\nSentiment: positive\\n\\n  …  Review: <test text>\\nSentiment:▢

    ŷ = argmax_c  Σ_j log p(w_c,j | demonstrations, query, w_c,<j)       w_c = tokens of " " + name of c

The demonstrations are drawn from the training split with the classes as balanced as K allows, in an
order fixed by the seed, and they are the same for every test example: their keys and values are
computed once and every batch of queries continues from that KV cache. Nothing here trains, so the
accuracy is what the base model knows before any PEFT method touches it.
"""
import math

import numpy as np
import torch

from .data import Dataset, TaskData
from .model import KVCache

TEMPLATE = "Review: {text}\nSentiment:"


def pick_demonstrations(train: Dataset, k: int, n_classes: int, seed: int) -> list[int]:
    """Indices of k training examples, at most ceil(k / n_classes) from any class, in a seeded order."""
    cap = math.ceil(k / n_classes)
    taken, per_class = [], [0] * n_classes
    for i in np.random.default_rng(seed).permutation(len(train)).tolist():
        if len(taken) == k:
            break
        if per_class[train.labels[i]] < cap:
            taken.append(i)
            per_class[train.labels[i]] += 1
    if len(taken) < k:
        raise ValueError(f"the training split has too few examples per class for {k} balanced demonstrations")
    return taken


def _batch_cache(prefix: KVCache, batch_size: int) -> KVCache:
    """A cache for batch_size rows that all start from the one-row prefix (no copy: expand)."""
    cache = KVCache(len(prefix.layers))
    if prefix.length:
        cache.layers = [(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1))
                        for k, v in prefix.layers]
    return cache


def _continuation_log_probs(model, prefix: KVCache, queries: list[list[int]], label: list[int]) -> torch.Tensor:
    """(B,): log p(label tokens | prefix, query) for each query, in one right-padded forward pass."""
    rows = [query + label for query in queries]
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T)
    mask = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
        mask[b, :len(row)] = 1
    log_probs = model(ids, attention_mask=mask, cache=_batch_cache(prefix, len(rows))).log_softmax(-1)
    label_ids = torch.tensor(label)  # (L,)
    scores = []
    for b, query in enumerate(queries):
        positions = torch.arange(len(query) - 1, len(query) - 1 + len(label))  # each predicts label[j]
        scores.append(log_probs[b, positions, label_ids].sum())
    return torch.stack(scores)


@torch.no_grad()
def few_shot_scores(model, tokenizer, task: TaskData, k: int = 4, seed: int = 0, split: str = "test",
                    limit: int | None = None, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Label-word log-probabilities (N, n_classes) and true labels (N,) for the first `limit` examples."""
    if task.kind != "classification":
        raise ValueError("few-shot evaluation needs a classification task (text with labels)")
    if not model.cfg.causal or model.cfg.n_classes:
        raise ValueError("few-shot evaluation needs a causal language model (gpt2 or llama flavour) "
                         "without a classifier head")
    if k < 0:
        raise ValueError(f"the number of demonstrations must be >= 0, got {k}")
    model.eval()
    tokenizer.no_truncation()  # the loader truncated each text already; prompts are longer

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    def text_of(dataset: Dataset, i: int) -> str:
        return tokenizer.decode(dataset.input_ids[i], skip_special_tokens=True)

    train, evaluated = task.splits["train"], task.splits[split]
    demonstrations = "".join(
        TEMPLATE.format(text=text_of(train, i)) + f" {task.label_names[train.labels[i]]}\n\n"
        for i in pick_demonstrations(train, k, task.n_classes, seed))
    prefix = KVCache(model.cfg.n_layer)
    if demonstrations:
        model(torch.tensor([encode(demonstrations)]), cache=prefix)  # fills the cache: (1, Hkv, P, hd)
    labels = [encode(" " + name) for name in task.label_names]
    n = len(evaluated) if limit is None else min(limit, len(evaluated))
    scores = []
    for start in range(0, n, batch_size):
        batch = range(start, min(n, start + batch_size))
        queries = [encode(TEMPLATE.format(text=text_of(evaluated, i))) for i in batch]
        scores.append(torch.stack([_continuation_log_probs(model, prefix, queries, label) for label in labels],
                                  dim=1))  # (B, C)
    return torch.cat(scores), torch.tensor(evaluated.labels[:n])


def few_shot_accuracy(model, tokenizer, task: TaskData, k: int = 4, **options) -> dict:
    """{"accuracy", "examples", "shots"} of the k-shot in-context classifier; options as few_shot_scores."""
    scores, labels = few_shot_scores(model, tokenizer, task, k=k, **options)
    return {"accuracy": (scores.argmax(1) == labels).float().mean().item(), "examples": len(labels), "shots": k}

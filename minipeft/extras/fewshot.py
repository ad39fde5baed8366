"""Few-shot in-context classification: the baseline that trains nothing (Brown et al. 2020, "Language
Models are Few-Shot Learners", https://arxiv.org/abs/2005.14165).

K labelled training examples (the demonstrations) go into the prompt before each test example, and
the prediction is the class whose label word the causal LM finds most likely to come next:

    Review: <train text 1>\\nSentiment: positive\\n\\n  …  Review: <test text>\\nSentiment:▢

    ŷ = argmax_c  Σ_j log p(w_c,j | demonstrations, query, w_c,<j)       w_c = tokens of " " + name of c

The demonstrations are drawn from the training split with the classes as balanced as K allows, in an
order fixed by the seed, and they are the same for every test example: their keys and values are
computed once and every batch of queries continues from that KV cache. The cached tokens are exactly
the whole prompt's: the separator "\\n\\n" after the last demonstration belongs to each query, because
a byte-level BPE reads "\\n\\nReview" as Ċ Ċ Review while "\\n\\n" alone at the end of a text becomes the
one token ĊĊ (which the model rarely saw before a word).

Contextual calibration (Zhao et al. 2021, "Calibrate Before Use", https://arxiv.org/abs/2102.09690):
a prompt biases the model towards some label words (the majority or the last label of the
demonstrations, common words). Its bias is measured on content-free inputs ("N/A", "", "[MASK]") in
place of the test text: p_cf = the mean of their label distributions. Every prediction is then divided
by it, ŷ = argmax_c p(c | x) / p_cf(c), so a content-free input would get a uniform distribution.

Nothing here trains, so the accuracy is what the base model knows before any PEFT method touches it.
"""
import math

import numpy as np
import torch

from minipeft.core.data import Dataset, TaskData
from minipeft.core.generate import shared_cache
from minipeft.core.kv_cache import KVCache

TEMPLATE = "Review: {text}\nSentiment:"
SEPARATOR = "\n\n"  # between demonstrations, and between the last one and the query
CONTENT_FREE = ("N/A", "", "[MASK]")  # Zhao et al.'s content-free inputs


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


def demonstrations_text(task: TaskData, indices: list[int], text_of) -> str:
    """The demonstrations, joined by SEPARATOR, without the separator that follows the last one."""
    train = task.splits["train"]
    return SEPARATOR.join(TEMPLATE.format(text=text_of(train, i)) + f" {task.label_names[train.labels[i]]}"
                          for i in indices)


def _forward(model, prefix: KVCache, rows: list[list[int]]) -> torch.Tensor:
    """Log-probabilities (B, T, V) of the next token after each position of right-padded rows that
    continue the cached prefix."""
    width = max(len(row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T)
    mask = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
        mask[b, :len(row)] = 1
    device = model.tok_emb.weight.device
    logits = model(ids.to(device), attention_mask=mask.to(device), cache=shared_cache(prefix, len(rows)))
    return logits.float().log_softmax(-1)  # in fp32 whatever the model's precision


def _continuation_log_probs(model, prefix: KVCache, queries: list[list[int]], label: list[int]) -> torch.Tensor:
    """(B,): log p(label tokens | prefix, query) for each query, in one right-padded forward pass."""
    log_probs = _forward(model, prefix, [query + label for query in queries])  # (B, T, V)
    label_ids = torch.tensor(label, device=log_probs.device)  # (L,)
    scores = []
    for b, query in enumerate(queries):
        # each position predicts label[j]
        positions = torch.arange(len(query) - 1, len(query) - 1 + len(label), device=log_probs.device)
        scores.append(log_probs[b, positions, label_ids].sum())
    return torch.stack(scores)


class InContext:
    """A k-shot prompt for a task: the demonstrations' KV cache, and the label words' scores after it."""

    def __init__(self, model, tokenizer, task: TaskData, k: int, seed: int):
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.demonstrations = demonstrations_text(task, pick_demonstrations(task.splits["train"], k, task.n_classes,
                                                                            seed), self.text_of)
        self.prefix = KVCache(model.cfg.n_layer)
        if self.demonstrations:
            model(torch.tensor([self.encode(self.demonstrations)], device=model.tok_emb.weight.device),
                  cache=self.prefix)  # (1, Hkv, P, hd) per layer
        self.labels = [self.encode(" " + name) for name in task.label_names]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def text_of(self, dataset: Dataset, i: int) -> str:
        return self.tokenizer.decode(dataset.input_ids[i], skip_special_tokens=True)

    def query(self, text: str) -> list[int]:
        """The tokens after the cached demonstrations: separator (if any), the test text, the cue."""
        return self.encode((SEPARATOR if self.demonstrations else "") + TEMPLATE.format(text=text))

    def scores(self, texts: list[str]) -> torch.Tensor:
        """(B, n_classes): log p(label word | demonstrations, query) for each text. When every label
        word is one token, one forward pass of the queries gives them all (at each query's last token).
        On the CPU, whatever device the model is on."""
        queries = [self.query(text) for text in texts]
        if all(len(label) == 1 for label in self.labels):
            log_probs = _forward(self.model, self.prefix, queries)  # (B, T, V)
            rows = torch.arange(len(queries), device=log_probs.device)
            last = log_probs[rows, torch.tensor([len(q) - 1 for q in queries], device=log_probs.device)]  # (B, V)
            return last[:, [label[0] for label in self.labels]].cpu()  # (B, C)
        return torch.stack([_continuation_log_probs(self.model, self.prefix, queries, label)
                            for label in self.labels], dim=1).cpu()


def _check(model, task: TaskData, k: int):
    if task.kind != "classification":
        raise ValueError("few-shot evaluation needs a classification task (text with labels)")
    if not model.cfg.causal or model.cfg.n_classes:
        raise ValueError("few-shot evaluation needs a causal language model (gpt2 or llama flavour) "
                         "without a classifier head")
    if k < 0:
        raise ValueError(f"the number of demonstrations must be >= 0, got {k}")


@torch.no_grad()
def few_shot_scores(model, tokenizer, task: TaskData, k: int = 4, seed: int = 0, split: str = "test",
                    limit: int | None = None, batch_size: int = 16,
                    calibrate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Label-word log-probabilities (N, n_classes) and true labels (N,) for the first `limit` examples;
    with calibrate, log p(c | x) - log p_cf(c) over the label words (see the module docstring)."""
    _check(model, task, k)
    model.eval()
    tokenizer.no_truncation()  # the loader truncated each text already; prompts are longer
    prompt = InContext(model, tokenizer, task, k, seed)
    evaluated = task.splits[split]
    n = len(evaluated) if limit is None else min(limit, len(evaluated))
    scores = torch.cat([prompt.scores([prompt.text_of(evaluated, i) for i in range(start, min(n, start + batch_size))])
                        for start in range(0, n, batch_size)])  # (N, C)
    if calibrate:
        content_free = prompt.scores(list(CONTENT_FREE)).log_softmax(-1).exp().mean(0)  # p_cf (C,)
        scores = scores.log_softmax(-1) - content_free.log()
    return scores, torch.tensor(evaluated.labels[:n])


def few_shot_accuracy(model, tokenizer, task: TaskData, k: int = 4, **options) -> dict:
    """{"accuracy", "examples", "shots", "predicted"} of the k-shot in-context classifier ("predicted":
    how often each class was predicted); options as few_shot_scores."""
    scores, labels = few_shot_scores(model, tokenizer, task, k=k, **options)
    predicted = scores.argmax(1)
    return {"accuracy": (predicted == labels).float().mean().item(), "examples": len(labels), "shots": k,
            "predicted": torch.bincount(predicted, minlength=scores.shape[1]).tolist()}

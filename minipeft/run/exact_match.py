"""Exact match: greedy answers to an instruction split's prompts, compared with the reference answers.

    normalize(text) = lower case, spaces collapsed, surrounding punctuation and quotes stripped
    exact match     = 1/n · Σ_i [normalize(prediction_i) = normalize(answer_i)]

A split with few distinct answers (a label set such as "positive" / "negative") is also scored as a choice:
the label the prediction names first, as a whole word, against the right one, so that a chatty "This review
is positive." counts.
"""
import re

import torch

from minipeft.core.generate import complete


def normalize_answer(text: str) -> str:
    """What exact match compares: lower case, spaces collapsed, no surrounding punctuation or quotes."""
    return " ".join(text.lower().split()).strip(" .,;:!?\"'`")


MAX_CHOICES = 20  # a split with at most this many distinct answers is also scored as a choice among them


def first_choice(prediction: str, choices: list[str]) -> str | None:
    """The normalized choice the prediction names first, as a whole word ("This review is positive." ->
    "positive"); None if it names none."""
    text = normalize_answer(prediction)
    found = [(m.start(), c) for c in choices if (m := re.search(rf"\b{re.escape(c)}\b", text))]
    return min(found)[1] if found else None


@torch.no_grad()
def exact_match(model, tokenizer, dataset, eos_id: int | None, batch_size: int = 32, limit: int | None = None,
                max_new_tokens: int | None = None) -> dict:
    """Greedy answers to the prompts of an sft split (the first `limit`), compared with the reference
    answers after normalize_answer: {"exact_match", "examples", "predictions"}, and "choice_accuracy"
    when the split has few distinct answers (a label set): how often the answer the prediction names
    first is the right one (a chatty "This review is positive." counts). Prompts go in batches of
    similar length (less padding); each answer may run a few tokens past the longest reference."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer.encode(a, add_special_tokens=False).ids) for a in dataset.answers[:n]) + 3
    order = sorted(range(n), key=lambda i: len(dataset.prompts[i]))
    predictions = [""] * n
    for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        texts = complete(model, tokenizer, [dataset.prompts[i] for i in rows], max_new_tokens, eos_id=eos_id,
                         pad_id=dataset.pad_id)
        for i, text in zip(rows, texts):
            predictions[i] = text
    answers = [normalize_answer(a) for a in dataset.answers[:n]]
    correct = sum(normalize_answer(p) == a for p, a in zip(predictions, answers))
    result = {"exact_match": correct / max(n, 1), "examples": n, "predictions": predictions}
    choices = sorted(set(answers))
    if len(choices) <= MAX_CHOICES:
        result["choice_accuracy"] = sum(first_choice(p, choices) == a for p, a in zip(predictions, answers)) / max(n, 1)
    return result

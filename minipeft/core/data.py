"""Data sets as the loop sees them: tokenized examples, batched on demand (padded, shuffled, grouped by length or
packed). formats/tasks.py reads files and built-in data sets into them.

`Dataset.batches()` yields dicts of long tensors, padded on the right to the batch's longest example with `pad_id`:

    input_ids       (B, T)
    attention_mask  (B, T)  1 = real token, 0 = padding
    labels          (B,)    class ids                         (classification)
                    (B, T)  next-token ids, -100 at padding   (lm, sft; -100 is ignored by cross_entropy;
                            sft also -100 on the prompt)

Shuffling is a permutation fixed by (seed, epoch). With world_size > 1 every step consumes one global batch of
batch_size * world_size examples, and rank r takes the interleaved shard global_batch[r::world_size]: together
the ranks' batches of a step are exactly the single-process global batch.

Length grouping (`grouped_by_length()`): padding a random batch to its longest example wastes compute (Rotten
Tomatoes, MiniLM's tokenizer, batch size 16: 1.79 tokens computed per real token). A grouped split sorts each run
of LENGTH_GROUP shuffled global batches by length, cuts it into batches again and shuffles those (same generator):
each batch holds examples of about one length yet is a random draw, and an epoch still sees every example once.
Evaluation sorts the whole split by length (`batches(sort_by_length=True)`), which changes nothing but the padding.
"""
import math
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np
import torch

from .model import IGNORE_INDEX  # the label value the loss skips

LENGTH_GROUP = 32  # global batches per group of a length-grouped epoch
COLUMNS = ("input_ids", "labels", "prompts", "answers")  # a Dataset's lists of one entry per example


@dataclass
class Dataset:
    """One split. labels[i] is a class id (kind "classification") or a list of target ids as long as
    input_ids[i] (kinds "lm", "sft")."""
    kind: str
    input_ids: list[list[int]]  # token ids of each example
    labels: list
    pad_id: int
    # kind "sft" only: each example's prompt for generation (the conversation up to its last answer, ending
    # with the template's generation prompt) and that answer's text, for exact-match scoring
    prompts: list[list[int]] | None = None
    answers: list[str] | None = None
    pack_len: int | None = None  # set by packed()
    group_by_length: bool = False  # set by grouped_by_length()

    def __len__(self) -> int:
        return len(self.input_ids)

    def _with_columns(self, column) -> "Dataset":
        """A copy whose every column of COLUMNS is column(name) (a column that is None stays None)."""
        return replace(self, **{name: column(name) for name in COLUMNS if getattr(self, name) is not None})

    def head(self, n: int | None) -> "Dataset":
        """The first n examples (all of them when n is None)."""
        return self if n is None else self._with_columns(lambda name: getattr(self, name)[:n])

    def select(self, indices: list[int]) -> "Dataset":
        """The examples at `indices`, in that order (an index may repeat)."""
        return self._with_columns(lambda name: [getattr(self, name)[i] for i in indices])

    @staticmethod
    def concat(parts: list["Dataset"]) -> "Dataset":
        """The examples of every part, one part after the other (with the first part's settings)."""
        return parts[0]._with_columns(lambda name: [x for part in parts for x in getattr(part, name)])

    def packed(self, max_len: int) -> "Dataset":
        """The same examples, each batch packed into rows of max_len tokens instead of padded (pack_examples)."""
        if self.kind == "classification":
            raise ValueError("--pack needs a task with a label per token (instruction data or text); a "
                             "classification task has one label per example, so its examples cannot share a row")
        return replace(self, pack_len=max_len)

    def grouped_by_length(self) -> "Dataset":
        """The same examples, shuffled into batches of about one length."""
        return replace(self, group_by_length=True)

    def num_batches(self, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
        """Number of steps `batches` yields (the same on every rank)."""
        global_batch_size = batch_size * world_size
        return len(self) // global_batch_size if drop_last else math.ceil(len(self) / global_batch_size)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0, rank: int = 0,
                world_size: int = 1, drop_last: bool = False, sort_by_length: bool = False) -> Iterator[dict]:
        """Yield this rank's batches, one per step, from global batches in file order, longest first
        (sort_by_length) or shuffled. With drop_last=False the last global batch may be short, and a rank
        whose shard of it is empty gets a batch with zero rows (input_ids (0, 0)) so that every rank takes
        the same number of steps; train with drop_last=True when world_size > 1."""
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1, world_size >= 1 and 0 <= rank < world_size; "
                             f"got batch_size={batch_size}, rank={rank}, world_size={world_size}")
        global_batch_size = batch_size * world_size
        if shuffle:
            rng = np.random.default_rng((seed, epoch))
            order = rng.permutation(len(self)).tolist()
        elif sort_by_length:
            order = sorted(range(len(self)), key=lambda i: -len(self.input_ids[i]))
        else:
            order = list(range(len(self)))
        global_batches = [order[start:start + global_batch_size] for start in range(0, len(order), global_batch_size)]
        global_batches = global_batches[:self.num_batches(batch_size, world_size, drop_last)]
        if shuffle and self.group_by_length:
            global_batches = self._length_grouped(global_batches, rng)
        for global_batch in global_batches:
            yield self.collate(global_batch[rank::world_size])

    def _length_grouped(self, global_batches: list[list[int]], rng: np.random.Generator) -> list[list[int]]:
        """The same examples in batches of the same sizes, each of about one length (see the module docstring)."""
        regrouped = []
        for start in range(0, len(global_batches), LENGTH_GROUP):
            group = global_batches[start:start + LENGTH_GROUP]
            pooled = sorted((i for batch in group for i in batch), key=lambda i: len(self.input_ids[i]))
            for batch in group:  # cut the sorted pool into batches of the group's sizes
                regrouped.append(pooled[:len(batch)])
                pooled = pooled[len(batch):]
        return [regrouped[i] for i in rng.permutation(len(regrouped))]

    def collate(self, indices: list[int]) -> dict:
        """One batch of the examples at `indices`, padded (or packed); see the module docstring."""
        if self.pack_len is not None:
            return pack_examples([self.input_ids[i] for i in indices], [self.labels[i] for i in indices],
                                 self.pack_len, self.pad_id)
        shape = (len(indices), max((len(self.input_ids[i]) for i in indices), default=0))  # (B, T)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        if self.kind != "classification":
            labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)  # (B, T)
        else:
            labels = torch.tensor([self.labels[i] for i in indices], dtype=torch.long)  # (B,)
        for row, i in enumerate(indices):
            length = len(self.input_ids[i])
            input_ids[row, :length] = torch.tensor(self.input_ids[i], dtype=torch.long)
            attention_mask[row, :length] = 1
            if self.kind != "classification":
                labels[row, :length] = torch.tensor(self.labels[i], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class TaskData:
    """A loaded task: its kind, three splits, and what a model head needs to know."""
    kind: str  # "classification" | "lm" | "sft"
    splits: dict[str, Dataset]  # keys "train", "validation", "test"
    n_classes: int | None  # None for lm and sft
    label_names: list[str] | None  # label_names[class_id]; None for lm and sft
    pad_id: int
    # sft only: how the rows were read and cut, and what generation needs to score them
    info: dict = field(default_factory=dict)  # shape, template, truncated (rows cut from the left), eos_id
    tokenizer: object | None = None  # a tokenizers.Tokenizer, to read generated answers (sft)


def pack_examples(input_ids: list[list[int]], labels: list[list[int]], max_len: int, pad_id: int) -> dict:
    """Examples packed whole into as few rows of at most max_len tokens as first-fit-decreasing finds. Besides
    input_ids, attention_mask and labels (B, T) as for padding, a packed batch carries

        position_ids  (B, T)  0, 1, 2, ... restarting at every example (padding: 0)
        document_ids  (B, T)  which example of the row a token is (1, 2, ...; padding 0): attention
                              stays inside an example, a block-diagonal causal mask
        examples      ()      how many examples the batch holds

    so the model computes for every example exactly what it would alone in a padded batch."""
    rows: list[list[int]] = []  # indices of the examples in each row
    room: list[int] = []  # free tokens left in each row
    for i in sorted(range(len(input_ids)), key=lambda i: -len(input_ids[i])):
        length = len(input_ids[i])
        if length > max_len:
            raise ValueError(f"an example of {length} tokens does not fit a packed row of {max_len}")
        row = next((r for r, free in enumerate(room) if free >= length), len(rows))
        if row == len(rows):
            rows.append([])
            room.append(max_len)
        rows[row].append(i)
        room[row] -= length
    width = max((max_len - free for free in room), default=0)
    batch = {name: torch.full((len(rows), width), fill, dtype=torch.long) for name, fill in
             (("input_ids", pad_id), ("attention_mask", 0), ("labels", IGNORE_INDEX), ("position_ids", 0),
              ("document_ids", 0))}
    for r, members in enumerate(rows):
        start = 0
        for document, i in enumerate(members, start=1):
            span = slice(start, start + len(input_ids[i]))
            batch["input_ids"][r, span] = torch.tensor(input_ids[i])
            batch["labels"][r, span] = torch.tensor(labels[i])
            batch["position_ids"][r, span] = torch.arange(len(input_ids[i]))
            batch["document_ids"][r, span] = document
            batch["attention_mask"][r, span] = 1
            start = span.stop
    batch["examples"] = torch.tensor(len(input_ids))
    return batch

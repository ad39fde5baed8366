"""Tokenized data sets for fine-tuning: text classification and causal language modelling.

Two kinds of task, each loaded into a `TaskData` holding three splits (train / validation / test):

Classification -- `load_classification(source, tokenizer)`
    source is the built-in "rotten_tomatoes", a .csv or .jsonl file, or a directory holding
    train / validation / test files (each .csv or .jsonl).

    .csv   a header line naming a `text` and a `label` column (other columns are ignored):
               text,label
               "A gorgeous, witty film.",positive
    .jsonl one JSON object per line with `text` and `label` fields (blank lines are skipped):
               {"text": "A gorgeous, witty film.", "label": 1}

    Labels: if every label is a non-negative whole number, the labels are the class ids themselves
    (n_classes = largest + 1, label_names "0", "1", ...); otherwise every label is a class name and
    names are numbered in sorted order (so "neg"/"pos" -> 0/1, and "-1"/"1" -> 0/1).
    A row with empty text or no label is an error (not silently skipped): a blank row is almost
    always a bug in the export, and dropping it would quietly change the data set.

    Splits: a single file is split 80/10/10 *within each label* (stratified), in a shuffle fixed by
    `seed`, so every class of the file is in the training split; a class with fewer than 5 examples
    stays entirely in train. A directory's own train/validation/test files are used as they are,
    and a label in validation or test that never occurs in train is an error.

    rotten_tomatoes: review sentences labelled fresh (1, "positive") or rotten (0, "negative"); the
    movies' plot summaries are dropped, leaving 12,808 sentences from 508 movies. They are split
    80/10/10 *by movie* -- every sentence of a movie lands in the same split, so the test set asks
    about unseen movies -- in a movie order shuffled by `seed`.

    Each text is tokenized with the tokenizer's own special tokens (BERT: [CLS] ... [SEP]) and
    truncated to max_len tokens, special tokens included.

Causal LM -- `load_lm(source, tokenizer)`
    source is the built-in "hamlet" or a .txt file. The whole text is tokenized once (no special
    tokens) and cut into consecutive, non-overlapping windows of max_len + 1 tokens:

        tokens   t0 t1 t2 ... t128 | t129 ... t257 | ...      (max_len = 128)
        inputs   t0 ... t127         window[:-1]
        targets  t1 ... t128         window[1:]   (next-token prediction)

    The leftover tokens after the last whole window are dropped. The first 90% of windows are
    train, the next 5% validation, the last 5% test, so no token of validation or test is in train.

The tokenizer you pass is reconfigured in place: padding is switched off (batches are padded here,
per batch) and truncation is set to max_len for classification or switched off for LM.

Batches: `Dataset.batches()` yields dicts of long tensors, padded on the right to the longest
example of the batch with `pad_id`:

    input_ids       (B, T)
    attention_mask  (B, T)  1 = real token, 0 = padding
    labels          (B,)    class ids                         (classification)
                    (B, T)  next-token ids, -100 at padding   (lm; -100 is ignored by cross_entropy)

Shuffling is a permutation fixed by (seed, epoch). With world_size > 1 every step consumes one global
batch of batch_size * world_size examples, and rank r takes the interleaved shard
global_batch[r::world_size]; together the ranks' batches of a step are exactly the single-process
global batch for the same seed and epoch.
"""
import bz2
import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
from tokenizers import Tokenizer

from minipeft.assets import asset_path

SPLITS = ("train", "validation", "test")
IGNORE_INDEX = -100  # label value that torch.nn.functional.cross_entropy skips
PAD_TOKENS = ("[PAD]", "<pad>", "<|endoftext|>")  # looked up in this order by default_pad_id
CLASSIFICATION_SUFFIXES = (".csv", ".jsonl")
LM_EVAL_FRACTION = 0.05  # of windows, for validation and again for test
CLASSIFICATION_EVAL_FRACTION = 0.1  # of examples (of each label, or of sentences for rotten_tomatoes)
SOURCES_HELP = ("'rotten_tomatoes', a .csv or .jsonl file, or a directory with train/validation/test "
                "files (classification); 'hamlet' or a .txt file (causal LM)")


@dataclass
class Dataset:
    """One split: tokenized examples, batched on demand with dynamic padding.

    input_ids[i] is a list of token ids. labels[i] is a class id (kind "classification") or a list of
    target ids as long as input_ids[i] (kind "lm").
    """

    kind: str
    input_ids: list[list[int]]
    labels: list
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def head(self, n: int | None) -> "Dataset":
        """The first n examples (all of them when n is None)."""
        if n is None:
            return self
        return Dataset(self.kind, self.input_ids[:n], self.labels[:n], self.pad_id)

    def num_batches(self, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
        """Number of steps `batches` yields (the same on every rank)."""
        global_batch_size = batch_size * world_size
        if drop_last:
            return len(self) // global_batch_size
        return math.ceil(len(self) / global_batch_size)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                rank: int = 0, world_size: int = 1, drop_last: bool = False) -> Iterator[dict]:
        """Yield this rank's padded batches, one per step.

        Each step takes the next global batch of batch_size * world_size examples (in file order, or
        in a permutation fixed by (seed, epoch) when shuffle is set) and returns its rank-th
        interleaved shard. With drop_last=False the last global batch may be short, and a rank whose
        shard of it is empty gets a batch with zero rows (input_ids of shape (0, 0)) so every rank takes the
        same number of steps; use drop_last=True for training with world_size > 1 to avoid this.
        """
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size >= 1, world_size >= 1 and 0 <= rank < world_size; "
                             f"got batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if shuffle:
            order = np.random.default_rng((seed, epoch)).permutation(len(self)).tolist()
        else:
            order = list(range(len(self)))
        global_batch_size = batch_size * world_size
        for step in range(self.num_batches(batch_size, world_size, drop_last)):
            global_batch = order[step * global_batch_size:(step + 1) * global_batch_size]
            yield self.collate(global_batch[rank::world_size])

    def collate(self, indices: list[int]) -> dict:
        """Pad the examples at `indices` on the right to the longest one; see the module docstring."""
        seq_len = max((len(self.input_ids[i]) for i in indices), default=0)
        batch_size = len(indices)
        input_ids = torch.full((batch_size, seq_len), self.pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((batch_size, seq_len), dtype=torch.long)  # (B, T)
        if self.kind == "lm":
            labels = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        else:
            labels = torch.tensor([self.labels[i] for i in indices], dtype=torch.long)  # (B,)
        for row, i in enumerate(indices):
            length = len(self.input_ids[i])
            input_ids[row, :length] = torch.tensor(self.input_ids[i], dtype=torch.long)
            attention_mask[row, :length] = 1
            if self.kind == "lm":
                labels[row, :length] = torch.tensor(self.labels[i], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class TaskData:
    """A loaded task: its kind, three splits, and what a model head needs to know."""

    kind: str  # "classification" | "lm"
    splits: dict[str, Dataset]  # keys "train", "validation", "test"
    n_classes: int | None  # None for lm
    label_names: list[str] | None  # label_names[class_id]; None for lm
    pad_id: int


def default_pad_id(tokenizer: Tokenizer) -> int:
    """The id of the tokenizer's first token among PAD_TOKENS, else 0.

    Which id pads does not change any result: padded positions are masked out by attention_mask and
    ignored in LM labels (-100). It only has to be a valid token id.
    """
    for token in PAD_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return 0


def load_task(source: str | Path, tokenizer: Tokenizer, max_len: int = 128, seed: int = 0,
              pad_id: int | None = None) -> TaskData:
    """Load a classification or causal-LM task, chosen by the source's name or suffix."""
    path = Path(source)
    if str(source) == "hamlet" or path.suffix == ".txt":
        return load_lm(source, tokenizer, max_len, seed, pad_id)
    if str(source) == "rotten_tomatoes" or path.suffix in CLASSIFICATION_SUFFIXES or path.is_dir():
        return load_classification(source, tokenizer, max_len, seed, pad_id)
    raise ValueError(f"unknown data source {str(source)!r}; use {SOURCES_HELP}")


# ----------------------------------------------------------------------------------------------------
# classification


class _Row(NamedTuple):
    """One example as read from a file; `line` is where it is, for error messages."""

    line: int
    text: str
    label: str


def load_classification(source: str | Path, tokenizer: Tokenizer, max_len: int = 128, seed: int = 0,
                        pad_id: int | None = None) -> TaskData:
    """Load "rotten_tomatoes", a .csv/.jsonl file, or a directory of split files (see module docstring).

    `seed` fixes the split of rotten_tomatoes and of a single file; `pad_id` defaults to
    default_pad_id(tokenizer). The tokenizer is set to truncate at max_len and not to pad.
    """
    if str(source) == "rotten_tomatoes":
        split_texts, split_labels, label_names = _rotten_tomatoes(seed)
    else:
        split_rows, split_files = _read_classification_source(Path(source), seed)
        split_texts, split_labels, label_names = _encode_labels(split_rows, split_files)

    if max_len <= tokenizer.num_special_tokens_to_add(is_pair=False):
        raise ValueError(f"max_len={max_len} leaves no room for text next to the tokenizer's "
                         "special tokens; use a larger max_len")
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_len)
    if pad_id is None:
        pad_id = default_pad_id(tokenizer)
    splits = {}
    for split in SPLITS:
        input_ids = [encoding.ids for encoding in tokenizer.encode_batch(split_texts[split])]
        splits[split] = Dataset("classification", input_ids, split_labels[split], pad_id)
    return TaskData("classification", splits, len(label_names), label_names, pad_id)


def _rotten_tomatoes(seed: int) -> tuple[dict, dict, list[str]]:
    """Texts and label ids per split of the built-in review sentences, split by movie."""
    path = asset_path("rotten_tomatoes")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        records = [r for r in csv.DictReader(f) if r["category"] != "plot"]  # fresh / rotten only
    sentences_per_movie: dict[str, int] = {}
    for r in records:
        sentences_per_movie[r["movie_name"]] = sentences_per_movie.get(r["movie_name"], 0) + 1

    # Walk the movies in a seeded order and fill train, then validation, then test, until each split
    # holds its share of the sentences. Sorting first makes the order independent of hashing.
    movies = sorted(sentences_per_movie)
    movies = [movies[i] for i in np.random.default_rng(seed).permutation(len(movies))]
    split_of_movie, sentences_so_far = {}, 0
    for movie in movies:
        share_so_far = sentences_so_far / len(records)
        if share_so_far < 1 - 2 * CLASSIFICATION_EVAL_FRACTION:
            split_of_movie[movie] = "train"
        elif share_so_far < 1 - CLASSIFICATION_EVAL_FRACTION:
            split_of_movie[movie] = "validation"
        else:
            split_of_movie[movie] = "test"
        sentences_so_far += sentences_per_movie[movie]

    split_texts = {split: [] for split in SPLITS}
    split_labels = {split: [] for split in SPLITS}
    for r in records:
        split = split_of_movie[r["movie_name"]]
        split_texts[split].append(r["text"])
        split_labels[split].append(1 if r["category"] == "fresh" else 0)
    return split_texts, split_labels, ["negative", "positive"]


def _read_classification_source(path: Path, seed: int) -> tuple[dict, dict]:
    """Rows per split, and the file each split came from (for error messages)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give 'rotten_tomatoes', a .csv or .jsonl "
                                "file, or a directory with train/validation/test files")
    if path.is_dir():
        split_files = {split: _find_split_file(path, split) for split in SPLITS}
        return {split: _read_rows(file) for split, file in split_files.items()}, split_files
    if path.suffix not in CLASSIFICATION_SUFFIXES:
        raise ValueError(f"{path} is not a .csv or .jsonl file; classification data must be one of "
                         "those, or a directory with train/validation/test files")
    return _split_rows(path, _read_rows(path), seed), {split: path for split in SPLITS}


def _find_split_file(directory: Path, split: str) -> Path:
    candidates = [directory / f"{split}{suffix}" for suffix in CLASSIFICATION_SUFFIXES]
    found = [file for file in candidates if file.is_file()]
    if len(found) == 2:
        raise ValueError(f"{directory} has both {split}.csv and {split}.jsonl; keep only one of them")
    if not found:
        raise ValueError(f"{directory} has no {split}.csv or {split}.jsonl; a data directory needs a "
                         "train, a validation and a test file")
    return found[0]


def _read_rows(path: Path) -> list[_Row]:
    """All examples of a .csv or .jsonl file, checked: non-empty text and a label on every row."""
    text = _read_utf8(path)
    if not text.strip():
        raise ValueError(f"{path} is empty; it needs one example per row with a text and a label")
    rows = _parse_csv(path, text) if path.suffix == ".csv" else _parse_jsonl(path, text)
    if not rows:
        raise ValueError(f"{path} has a header but no rows; add one example per row")
    for row in rows:  # a short CSV row reads its missing fields as None
        if row.text is not None and not isinstance(row.text, str):
            raise ValueError(f"{path} line {row.line} has a text of type {type(row.text).__name__}; "
                             "make every text a string")
        if row.text is None or not row.text.strip():
            raise ValueError(f"{path} line {row.line} has an empty text; remove the row or fill in "
                             "its text")
        if row.label is not None and not isinstance(row.label, (int, str)):
            raise ValueError(f"{path} line {row.line} has a label of type {type(row.label).__name__}; "
                             "make every label an integer or a string")
        if row.label is None or not str(row.label).strip():
            raise ValueError(f"{path} line {row.line} has no label; give every row a label")
    return [row._replace(label=str(row.label).strip()) for row in rows]


def _read_utf8(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; check the path")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 text (line {line} has an invalid byte); re-save the file "
                         "with UTF-8 encoding") from None
    return text.removeprefix("\ufeff")  # a byte-order mark, as spreadsheet programs write


def _parse_csv(path: Path, text: str) -> list[_Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    for column in ("text", "label"):
        if column not in header:
            raise ValueError(f"{path} has no '{column}' column (its header is {','.join(header)!r}); "
                             "name the columns 'text' and 'label' in the first line")
    try:
        # line_num is the line where the row ends (a quoted text may span lines)
        return [_Row(reader.line_num, record["text"], record["label"]) for record in reader]
    except csv.Error as err:
        raise ValueError(f"{path} line {reader.line_num} is not valid CSV ({err}); fix the quoting "
                         "on that line") from None


def _parse_jsonl(path: Path, text: str) -> list[_Row]:
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON may hold U+2028
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number} is not valid JSON ({err.msg}); make each line one "
                             'object like {"text": "...", "label": 1}') from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number} is not a JSON object; make each line one object "
                             'like {"text": "...", "label": 1}')
        for field in ("text", "label"):
            if field not in record:
                raise ValueError(f"{path} line {number} has no '{field}' field; give every line a "
                                 "'text' and a 'label'")
        rows.append(_Row(number, record["text"], record["label"]))
    return rows


def _split_rows(path: Path, rows: list[_Row], seed: int) -> dict[str, list[_Row]]:
    """Split one file's rows 80/10/10 within each label, in a shuffle fixed by seed; keep file order."""
    rng = np.random.default_rng(seed)
    split_rows = {split: [] for split in SPLITS}
    for label in sorted({row.label for row in rows}):
        group = [row for row in rows if row.label == label]
        group = [group[i] for i in rng.permutation(len(group))]
        n_eval = int(CLASSIFICATION_EVAL_FRACTION * len(group) + 0.5)  # rounded half up
        split_rows["validation"] += group[:n_eval]
        split_rows["test"] += group[n_eval:2 * n_eval]
        split_rows["train"] += group[2 * n_eval:]
    if not split_rows["validation"]:
        raise ValueError(f"{path} has too few rows ({len(rows)}) to split 80/10/10 per label; give "
                         "some label at least 5 examples, or use a directory with train, validation "
                         "and test files")
    return {split: sorted(split_rows[split]) for split in SPLITS}


def _encode_labels(split_rows: dict, split_files: dict) -> tuple[dict, dict, list[str]]:
    """Texts and class ids per split, and label_names, from the label strings of the rows."""
    train_labels = {row.label for row in split_rows["train"]}
    if len(train_labels) < 2:
        raise ValueError(f"{split_files['train']} has only one label ({next(iter(train_labels))!r}); "
                         "classification needs examples of at least 2 classes")
    for split in ("validation", "test"):
        for row in split_rows[split]:
            if row.label not in train_labels:
                raise ValueError(f"{split_files[split]} line {row.line} has label {row.label!r}, which "
                                 f"never occurs in the training data {split_files['train']}; remove "
                                 "those rows or add training examples with that label")

    if all(re.fullmatch(r"\d+", label) for label in train_labels):  # class ids already
        label_names = [str(i) for i in range(max(int(label) for label in train_labels) + 1)]
        class_id = {label: int(label) for label in train_labels}
    else:  # class names, numbered in sorted order
        label_names = sorted(train_labels)
        class_id = {label: i for i, label in enumerate(label_names)}
    split_texts = {split: [row.text for row in split_rows[split]] for split in SPLITS}
    split_labels = {split: [class_id[row.label] for row in split_rows[split]] for split in SPLITS}
    return split_texts, split_labels, label_names


# ----------------------------------------------------------------------------------------------------
# causal LM


def load_lm(source: str | Path, tokenizer: Tokenizer, max_len: int = 128, seed: int = 0,
            pad_id: int | None = None) -> TaskData:
    """Load "hamlet" or a .txt file as next-token windows of max_len tokens (see module docstring).

    The split is contiguous and does not depend on `seed` (accepted so every loader has the same
    signature). The tokenizer is set not to pad or truncate.
    """
    path = asset_path("hamlet") if str(source) == "hamlet" else Path(source)
    if path.suffix != ".txt":
        raise ValueError(f"{path} is not a .txt file; causal-LM data must be 'hamlet' or plain text "
                         "in a .txt file")
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    tokenizer.no_padding()
    tokenizer.no_truncation()
    tokens = tokenizer.encode(_read_utf8(path), add_special_tokens=False).ids

    window = max_len + 1
    windows = [tokens[start:start + window] for start in range(0, len(tokens) - window + 1, window)]
    if len(windows) < len(SPLITS):
        raise ValueError(f"{path} has {len(tokens)} tokens, but at least {len(SPLITS) * window} are "
                         f"needed (one window of max_len + 1 = {window} tokens for each of train, "
                         "validation and test); use a longer text or a smaller max_len")
    n_eval = max(1, int(LM_EVAL_FRACTION * len(windows) + 0.5))
    n_train = len(windows) - 2 * n_eval
    split_windows = {
        "train": windows[:n_train],
        "validation": windows[n_train:n_train + n_eval],
        "test": windows[n_train + n_eval:],
    }
    if pad_id is None:
        pad_id = default_pad_id(tokenizer)
    splits = {split: Dataset("lm", [w[:-1] for w in ws], [w[1:] for w in ws], pad_id)
              for split, ws in split_windows.items()}
    return TaskData("lm", splits, None, None, pad_id)

"""Tokenized data sets for fine-tuning: text classification, instruction tuning and causal language modelling.

`load_task(sources, tokenizer)` loads a task: three splits (train / validation / test) in a `TaskData`.
A source is a built-in data set, a .txt file, or any file or folder readers.py reads (.jsonl, .json,
.csv, .tsv, .parquet, a folder of split files, a folder written by datasets' save_to_disk); the shape of its
rows says the kind of task:

    kind             sources                                      rows (readers.py)
    classification   rotten_tomatoes, files of text/label rows     {"text": ..., "label": ...}
    sft              rotten_tomatoes_instruct, files of            {"prompt": ..., "completion": ...},
                     instruction rows                              {"messages": [...]}, ShareGPT
                                                                   {"conversations": [...]}, Alpaca
    lm               hamlet, a .txt file                           plain text

A single file is split 80/10/10 in a shuffle fixed by `seed` (classification: within each label); a
folder's (or a saved DatasetDict's) own train/validation/test splits are used as they are.
`columns={"prompt": "question"}` reads a column under another name (readers.py).

Several sources, one task -- `load_task(["a.jsonl:2", "b.parquet"], ...)`, or (source, weight) pairs.
All must be of one kind. A source of weight w (default 1) gives the training split round(w × n) of
its n training examples: each one ⌊w⌋ times, and a random share of them (fixed by `seed`) once more,
so weight 2 draws a source twice as often per epoch as weight 1, and weight 0.5 draws half of its
rows. Validation and test are the union of the sources' own, unweighted. Classification labels are
numbered over the union of the sources' label names (by the rule below).

Classification -- `load_classification(source, tokenizer)`
    Labels: if every label is a non-negative whole number, the labels are the class ids themselves
    (n_classes = largest + 1, label_names "0", "1", ...); otherwise every label is a class name and
    names are numbered in sorted order (so "neg"/"pos" -> 0/1, and "-1"/"1" -> 0/1). A label column
    that datasets describes as a ClassLabel (a saved data set, a parquet file datasets wrote) holds the
    class ids of its names: label_names and n_classes are the ClassLabel's.
    A row with empty text or no label is an error (not silently skipped): a blank row is almost
    always a bug in the export, and dropping it would quietly change the data set.

    Splits: a class with fewer than 5 examples of a single file stays entirely in train, so every
    class of the file is in the training split. A folder's label in validation or test that never
    occurs in train is an error.

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

Instruction tuning (SFT) -- `load_instruct(source, tokenizer)`, kind "sft"
    rotten_tomatoes_instruct is each rotten_tomatoes sentence as a question, REVIEW_INSTRUCTION,
    answered "positive" or "negative" (split by movie, as rotten_tomatoes). Every row becomes a
    conversation (readers.conversation) and is written in the chat template (chat.py: the model's
    own, a --chat-template file, or the plain fallback for base models). Labels are -100 except on
    the assistant turns' tokens (their closing token, e.g. <|im_end|>, included), so the loss is on
    the answers only (a prompt/completion row's: on its completion only, as trl's completion_only_loss;
    train_on_prompt: on every token, and turns after the last answer are refused); the end-of-text
    token closes each answer (added after the last one if the template does not write it). A
    conversation longer than max_len tokens loses tokens from its left, never from its last answer, and is counted in
    `TaskData.info["truncated"]`. Each example also keeps its prompt (the conversation up to its last
    answer, ending with the generation prompt) and that answer's text, for exact-match evaluation.

The tokenizer you pass is reconfigured in place: padding is switched off (batches are padded here,
per batch) and truncation is set to max_len for classification or switched off for LM.
"""
import bz2
import csv
import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tokenizers import Tokenizer

from . import readers
from .assets import asset_path
from .readers import SPLITS, did_you_mean

from minipeft.core.data import IGNORE_INDEX, Dataset, TaskData

PAD_TOKENS = ("[PAD]", "<pad>", "<|endoftext|>")  # looked up in this order by default_pad_id
LM_EVAL_FRACTION = 0.05  # of windows, for validation and again for test
CLASSIFICATION_EVAL_FRACTION = 0.1  # of examples (of each label, or of sentences for rotten_tomatoes)
REVIEW_INSTRUCTION = "Is this movie review positive or negative? Answer with one word.\n\nReview: {text}"
BUILT_IN = {"rotten_tomatoes": "classification", "rotten_tomatoes_instruct": "sft", "hamlet": "lm"}
PREFERENCE_TASK = "rotten_tomatoes_preference"  # preference pairs, which preference.py reads
PREFERENCE_ROW = ('{"prompt": "...", "chosen": "...", "rejected": "..."}, or the same with "prompt" a list of '
                  'messages and "chosen", "rejected" each a list of one assistant message')
KIND_NAMES = {"classification": "classification data (text/label rows)", "lm": "plain text (causal LM)",
              "sft": "instruction data (prompt/completion, messages, ShareGPT or Alpaca rows)"}
SOURCES_HELP = ("'rotten_tomatoes', 'rotten_tomatoes_instruct', 'hamlet', a .txt file, a .jsonl, .json, .csv, .tsv or "
                ".parquet file, a folder of train/validation/test files, or a folder written by datasets' "
                "save_to_disk")


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


def load_task(sources, tokenizer: Tokenizer, max_len: int = 128, seed: int = 0, pad_id: int | None = None,
              chat_template: str | Path | None = None, train_on_prompt: bool = False,
              columns: dict | None = None) -> TaskData:
    """Load a classification, instruction or causal-LM task from one source or several mixed (see the
    module docstring): `sources` is a source, "SOURCE:WEIGHT", a (source, weight) pair, or a list of
    them. The kind of each source follows from its name or suffix, or from the shape of its rows;
    chat_template and train_on_prompt are instruction data's options, columns renames files' columns."""
    parsed = parse_sources(sources)
    read = [_read(source, columns, if_present=len(parsed) > 1) for source, _ in parsed]  # [(rows, kind)]
    (first, _), (_, kind) = parsed[0], read[0]
    for (source, _), (_, its_kind) in zip(parsed, read):
        if its_kind != kind:
            raise ValueError(f"--task {first} is {KIND_NAMES[kind]} but --task {source} is {KIND_NAMES[its_kind]}; "
                             "the sources of one run must all be of one kind")
    if columns and not any(isinstance(rows, dict) and any(t.renamed for t in rows.values()) for rows, _ in read):
        raise ValueError(f"no --task source has the columns --columns names ({', '.join(columns.values())}); "
                         "check their names, or drop --columns")
    if kind == "lm":
        loaded = [load_lm(rows, tokenizer, max_len, seed, pad_id) for rows, _ in read]
    elif kind == "classification":
        loaded = [load_classification(rows, tokenizer, max_len, seed, pad_id) for rows, _ in read]
    else:
        loaded = [load_instruct(rows, tokenizer, max_len, seed, pad_id, chat_template, train_on_prompt)
                  for rows, _ in read]
    if parsed == [(first, 1.0)]:
        return loaded[0]
    return mix(loaded, [weight for _, weight in parsed], seed)


def _read(source: str, columns: dict | None, if_present: bool) -> tuple:
    """(what the loader of its kind takes, kind): a built-in data set or .txt file by its name (they have
    no columns), or the rows of a file or folder (readers.read_source), whose shape says the kind."""
    if source in BUILT_IN or source.endswith(".txt"):
        return source, BUILT_IN.get(source, "lm")
    path = Path(source)
    if not path.exists() and not path.suffix and path.parent == Path("."):  # a name, not a path
        raise ValueError(f"unknown data source {source!r}{did_you_mean(source, BUILT_IN)}; use {SOURCES_HELP}")
    tables = readers.read_source(path, columns, if_present)
    return tables, readers.ROW_SHAPES[next(iter(tables.values())).shape][0]


def is_preference_source(source) -> bool:
    """Whether `source` is preference data: the built-in task, or a .jsonl file (a folder's train.jsonl)
    whose first row has "chosen" and "rejected"."""
    if str(source) == PREFERENCE_TASK:
        return True
    path = Path(source)
    file = path / "train.jsonl" if path.is_dir() else path
    if file.suffix != ".jsonl" or not file.is_file():
        return False
    with open(file, encoding="utf-8-sig", errors="replace") as f:  # -sig: a byte-order mark dropped, as read_utf8 does
        first = next((line for line in f if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and "chosen" in record and "rejected" in record


def parse_sources(sources) -> list[tuple[str, float]]:
    """[(source, weight)] of a source, "SOURCE:WEIGHT" (an existing file of that name is a source), a
    (source, weight) pair, or a list of these; a weight must be a number > 0."""
    items = [sources] if isinstance(sources, (str, Path, tuple)) else list(sources)
    if not items:
        raise ValueError(f"no data source given; use {SOURCES_HELP}")
    parsed = []
    for item in items:
        source, weight = item if isinstance(item, tuple) else (str(item), 1.0)
        head, colon, tail = str(source).rpartition(":")
        if not isinstance(item, tuple) and colon and _is_number(tail) and not Path(source).exists():
            source, weight = head, float(tail)
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"--task {source}:{weight:g}: a mixing weight must be a number > 0 "
                             "(the times a source's training rows are drawn relative to the other sources')")
        parsed.append((str(source), float(weight)))
    return parsed


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def sources_text(sources) -> str:
    """The sources as typed: "a.jsonl", or "a.jsonl:2 b.parquet:1" when mixed or weighted."""
    parsed = parse_sources(sources)
    if len(parsed) == 1 and parsed[0][1] == 1:
        return parsed[0][0]
    return " ".join(f"{source}:{weight:g}" for source, weight in parsed)


def mix(tasks: list[TaskData], weights: list[float], seed: int) -> TaskData:
    """One task of several of one kind: each training split weighted (weighted_indices), the
    validation and test splits joined as they are; classification labels numbered over all sources."""
    kind = tasks[0].kind
    label_names, relabel = shared_labels(tasks) if kind == "classification" else (None, None)
    rng = np.random.default_rng(seed)
    splits = {}
    for split in SPLITS:
        parts = []
        for i, task in enumerate(tasks):
            part = task.splits[split]
            if relabel:
                part = replace(part, labels=[relabel[i][label] for label in part.labels])
            parts.append(part.select(weighted_indices(len(part), weights[i], rng)) if split == "train" else part)
        splits[split] = Dataset.concat(parts)
    info = {}
    if kind == "sft":
        shapes = dict.fromkeys(task.info["shape"] for task in tasks)  # in order, once each
        info = {**tasks[0].info, "shape": " + ".join(shapes), "truncated": sum(t.info["truncated"] for t in tasks)}
    return replace(tasks[0], splits=splits, n_classes=label_names and len(label_names), label_names=label_names,
                   info=info)


def weighted_indices(n: int, weight: float, rng: np.random.Generator) -> list[int]:
    """round(weight × n) indices of n examples (at least 1): every index ⌊weight⌋ times, and a random
    share of them once more."""
    whole, rest = divmod(max(1, round(weight * n)), n)
    return sorted(list(range(n)) * whole + rng.choice(n, rest, replace=False).tolist())


def shared_labels(tasks: list[TaskData]) -> tuple[list[str], list[list[int]]]:
    """The label names of several classification tasks together, numbered as one file's would be, and
    for each task its class ids' new ids."""
    names = {name for task in tasks for name in task.label_names}
    if all(re.fullmatch(r"\d+", name) for name in names):
        label_names = [str(i) for i in range(max(int(name) for name in names) + 1)]
    else:
        label_names = sorted(names)
    new_id = {name: i for i, name in enumerate(label_names)}
    return label_names, [[new_id[name] for name in task.label_names] for task in tasks]


# ----------------------------------------------------------------------------------------------------
# classification


class _Row(NamedTuple):
    """One example as read: its position in its file, where it is (for error messages), text and label."""

    index: int
    where: str
    text: str
    label: str


def load_classification(source, tokenizer: Tokenizer, max_len: int = 128, seed: int = 0,
                        pad_id: int | None = None) -> TaskData:
    """Load "rotten_tomatoes", or a file or folder of text/label rows (see the module docstring; `source`
    may also be the tables readers.read_source returned).

    `seed` fixes the split of rotten_tomatoes and of a single file; `pad_id` defaults to
    default_pad_id(tokenizer). The tokenizer is set to truncate at max_len and not to pad.
    """
    if str(source) == "rotten_tomatoes":
        split_texts, split_labels, label_names = _rotten_tomatoes(seed)
    else:
        tables = source if isinstance(source, dict) else readers.read_source(Path(source))
        split_rows, split_names = _classification_rows(tables, seed)
        class_names = next(iter(tables.values())).class_names
        split_texts, split_labels, label_names = _encode_labels(split_rows, split_names, class_names)

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


def _classification_rows(tables: dict, seed: int) -> tuple[dict, dict]:
    """Rows per split, and the name of the file each split came from (for error messages)."""
    table = next(iter(tables.values()))
    if table.shape != "text/label":
        raise ValueError(f"{table.name} holds {table.shape} rows, which are instruction data, not text/label "
                         "rows; load it with load_task or load_instruct")
    rows = {split: [_Row(r.index, r.where, *readers.labelled_text(r)) for r in t.records]
            for split, t in tables.items()}
    if "all" in rows:
        return _split_rows(table.name, rows["all"], seed), {split: table.name for split in SPLITS}
    return rows, {split: tables[split].name for split in SPLITS}


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




def _split_rows(name: str, rows: list[_Row], seed: int) -> dict[str, list[_Row]]:
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
        raise ValueError(f"{name} has too few rows ({len(rows)}) to split 80/10/10 per label; give "
                         "some label at least 5 examples, or use a folder with train, validation "
                         "and test files")
    return {split: sorted(split_rows[split]) for split in SPLITS}


def _encode_labels(split_rows: dict, split_names: dict, class_names: list[str] | None = None
                   ) -> tuple[dict, dict, list[str]]:
    """Texts and class ids per split, and label_names, from the label strings of the rows (`class_names`: a
    datasets ClassLabel's, whose integers the labels are)."""
    train_labels = {row.label for row in split_rows["train"]}
    if len(train_labels) < 2:
        raise ValueError(f"{split_names['train']} has only one label ({next(iter(train_labels))!r}); "
                         "classification needs examples of at least 2 classes")
    for split in ("validation", "test"):
        for row in split_rows[split]:
            if row.label not in train_labels:
                raise ValueError(f"{row.where} has label {row.label!r}, which never occurs in the training "
                                 f"data {split_names['train']}; remove those rows or add training examples "
                                 "with that label")

    if class_names:  # a datasets ClassLabel column: its integers and its names
        wrong = next((label for label in sorted(train_labels) if not re.fullmatch(r"\d+", label)
                      or int(label) >= len(class_names)), None)
        if wrong is not None:
            raise ValueError(f"{split_names['train']} has label {wrong}, which is not a class of its ClassLabel "
                             f"column (0 to {len(class_names) - 1}: {', '.join(class_names)}); remove its rows "
                             "(datasets writes -1 for a row without a label)")
        label_names = list(class_names)
        class_id = {label: int(label) for label in train_labels}
    elif all(re.fullmatch(r"\d+", label) for label in train_labels):  # class ids already
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
    tokens = tokenizer.encode(readers.read_utf8(path), add_special_tokens=False).ids

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


# ----------------------------------------------------------------------------------------------------
# instruction tuning (SFT): prompt/completion, chat, ShareGPT and Alpaca rows


class Conversation(NamedTuple):
    """One instruction example as read: its position in its file, where it is, and its messages (the
    last answer last)."""

    index: int
    where: str
    messages: list[dict]


def _instruct_rows(source, seed: int) -> tuple[str, dict[str, list[Conversation]], dict]:
    """(shape, rows per split, name per split) of rotten_tomatoes_instruct, or of a file or folder of
    instruction rows (or the tables readers.read_source returned for it)."""
    if str(source) == "rotten_tomatoes_instruct":
        split_texts, split_labels, names = _rotten_tomatoes(seed)
        rows = {split: [Conversation(i, f"{source} {split} example {i + 1}",
                                     [{"role": "user", "content": REVIEW_INSTRUCTION.format(text=text)},
                                      {"role": "assistant", "content": names[label]}])
                        for i, (text, label) in enumerate(zip(split_texts[split], split_labels[split]))]
                for split in SPLITS}
        return "messages", rows, {split: str(source) for split in SPLITS}
    tables = source if isinstance(source, dict) else readers.read_source(Path(source))
    table = next(iter(tables.values()))
    if readers.ROW_SHAPES[table.shape][0] != "sft":
        raise ValueError(f"{table.name} holds {table.shape} rows, which are classification data, not instruction "
                         "rows; load it with load_task or load_classification")
    rows = {split: [Conversation(r.index, r.where, readers.conversation(r, t.shape)) for r in t.records]
            for split, t in tables.items()}
    if "all" not in rows:
        return table.shape, rows, {split: tables[split].name for split in SPLITS}
    return table.shape, split_80_10_10(rows["all"], seed, table.name, "rows"), {split: table.name for split in SPLITS}


def split_80_10_10(rows: list, seed: int, name, what: str) -> dict[str, list]:
    """A single file's rows as train / validation / test (80 / 10 / 10 %, a permutation fixed by seed, each
    split in file order); `name` and `what` ("rows", "pairs") for the message when there are too few."""
    order = np.random.default_rng(seed).permutation(len(rows)).tolist()
    n_eval = int(CLASSIFICATION_EVAL_FRACTION * len(rows) + 0.5)
    if n_eval == 0:
        raise ValueError(f"{name} has too few {what} ({len(rows)}) to split 80/10/10; give it at least 5, or "
                         "use a folder with train, validation and test files")
    parts = {"validation": order[:n_eval], "test": order[n_eval:2 * n_eval], "train": order[2 * n_eval:]}
    return {split: [rows[i] for i in sorted(parts[split])] for split in SPLITS}


def _sft_example(tokenizer, fmt, conversation: Conversation, max_len: int, eos_id, train_on_prompt: bool,
                 last_only: bool):
    """(input_ids, labels, prompt ids, answer text, cut?) of one conversation: the whole rendering
    shifted by one, -100 where a token is not an answer's (last_only: not the last answer's) unless
    train_on_prompt, cut from the left to max_len tokens; the prompt is the rendering up to the last
    answer with the generation prompt. Turns after the last answer are left out (they are not trained on,
    so train_on_prompt refuses them)."""
    from .chat import encode_last_answer  # here: chat.py (and jinja2) load only for instruction data
    messages = conversation.messages
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    if train_on_prompt and last < len(messages) - 1:
        raise ValueError(f"{conversation.where}: the conversation goes on after its last answer (a "
                         f"{messages[-1]['role']} turn), which --train-on-prompt would leave out of training; end "
                         "it with the assistant's answer")
    ids, is_answer, start, cut = encode_last_answer(tokenizer, fmt, messages[:last + 1], max_len, eos_id,
                                                    f"{conversation.where}: its last answer")
    learned = [train_on_prompt or (answer and (i >= start or not last_only)) for i, answer in enumerate(is_answer)]
    labels = [t if learn else IGNORE_INDEX for t, learn in zip(ids[1:], learned[1:])]
    prompt = tokenizer.encode(fmt.render(messages[:last], add_generation_prompt=True), add_special_tokens=False).ids
    prompt = prompt[-(max_len - (len(ids) - start)):]
    return ids[:-1], labels, prompt, messages[last]["content"], cut > 0


def chat_setup(tokenizer: Tokenizer, chat_template, pad_id: int | None):
    """(chat format, end-of-text id or None, pad id) for tokenizing conversations to train on; the tokenizer
    set to neither pad nor truncate (the loaders cut and pad themselves)."""
    from .chat import chat_format  # here: chat.py (and jinja2) load only for conversations
    fmt = chat_format(tokenizer, chat_template)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    eos_id = tokenizer.token_to_id(fmt.eos_token) if fmt.eos_token else None
    return fmt, eos_id, default_pad_id(tokenizer) if pad_id is None else pad_id


def load_instruct(source, tokenizer: Tokenizer, max_len: int = 256, seed: int = 0, pad_id: int | None = None,
                  chat_template: str | Path | None = None, train_on_prompt: bool = False) -> TaskData:
    """Load "rotten_tomatoes_instruct", or a file or folder of instruction rows (see the module
    docstring; `source` may also be the tables readers.read_source returned) as kind "sft": each
    example is its conversation rendered in the chat template (the model's own, `chat_template` FILE,
    or the plain fallback), labels only on the answers."""
    shape, split_rows, names = _instruct_rows(source, seed)
    fmt, eos_id, pad_id = chat_setup(tokenizer, chat_template, pad_id)
    last_only = shape == "prompt/completion"  # as trl: a conversational prompt's own answers are context
    splits, truncated = {}, 0
    for split in SPLITS:
        if not split_rows[split]:
            raise ValueError(f"{names[split]} gives the {split} split no rows; add some")
        examples = [_sft_example(tokenizer, fmt, row, max_len, eos_id, train_on_prompt, last_only)
                    for row in split_rows[split]]
        truncated += sum(example[4] for example in examples)
        input_ids, labels, prompts, answers, _ = (list(column) for column in zip(*examples))
        splits[split] = Dataset("sft", input_ids, labels, pad_id, prompts=prompts, answers=answers)
    info = {"shape": shape, "template": fmt.name, "truncated": truncated, "eos_id": eos_id,
            "train_on_prompt": train_on_prompt}
    return TaskData("sft", splits, None, None, pad_id, info=info, tokenizer=tokenizer)


# ----------------------------------------------------------------------------------------------------
# packing



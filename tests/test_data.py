"""Tests for minipeft/core/data.py and minipeft/formats/tasks.py: built-in data sets, user files, batching, sharding, and every error."""
import bz2
import csv
import hashlib
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from minipeft.core import data

from minipeft.formats import tasks
from minipeft.formats import readers
from minipeft.formats.assets import asset_path

REPO = Path(__file__).resolve().parent.parent
CLS, SEP = 101, 102  # MiniLM's [CLS] and [SEP]


def minilm_tokenizer() -> Tokenizer:
    """A fresh copy each time: the loaders reconfigure the tokenizer they are given."""
    return Tokenizer.from_file(str(asset_path("minilm") / "tokenizer.json"))


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges: one token per byte (ids 0..255) plus <|endoftext|> = 256."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return tokenizer


def fingerprint(task: data.TaskData) -> str:
    digest = hashlib.sha256()
    for split in tasks.SPLITS:
        digest.update(repr((task.splits[split].input_ids, task.splits[split].labels)).encode())
    return digest.hexdigest()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[tuple]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    return write(path, "".join(json.dumps(record) + "\n" for record in records))


def toy_rows(labels: list, per_label: int = 10) -> list[tuple]:
    return [(f"example {i} of class {label}", label) for label in labels for i in range(per_label)]


# ----------------------------------------------------------------------------------------------------
# rotten_tomatoes


@pytest.fixture(scope="module")
def rotten():
    return tasks.load_classification("rotten_tomatoes", minilm_tokenizer(), max_len=128, seed=0)


def test_rotten_tomatoes_counts_and_labels(rotten):
    sizes = {split: len(rotten.splits[split]) for split in tasks.SPLITS}
    assert sum(sizes.values()) == 12808  # 7403 fresh + 5405 rotten; the 1097 plot rows are dropped
    assert 0.78 < sizes["train"] / 12808 < 0.82
    assert 0.08 < sizes["validation"] / 12808 < 0.12 and 0.08 < sizes["test"] / 12808 < 0.12
    assert rotten.kind == "classification" and rotten.n_classes == 2
    assert rotten.label_names == ["negative", "positive"] and rotten.pad_id == 0
    for split in tasks.SPLITS:
        labels = rotten.splits[split].labels
        assert set(labels) == {0, 1}
        assert 0.45 < sum(labels) / len(labels) < 0.70  # 58% fresh overall


def test_rotten_tomatoes_no_movie_in_two_splits():
    split_texts, _, _ = tasks._rotten_tomatoes(seed=0)
    with bz2.open(asset_path("rotten_tomatoes"), "rt", encoding="utf-8", newline="") as f:
        records = [r for r in csv.DictReader(f) if r["category"] != "plot"]
    movies_of_text = defaultdict(set)
    for r in records:
        movies_of_text[r["text"]].add(r["movie_name"])
    movies_of_split = {
        split: {movie for text in texts if len(movies_of_text[text]) == 1 for movie in movies_of_text[text]}
        for split, texts in split_texts.items()
    }
    assert all(len(movies) > 30 for movies in movies_of_split.values())
    assert not movies_of_split["train"] & movies_of_split["validation"]
    assert not movies_of_split["train"] & movies_of_split["test"]
    assert not movies_of_split["validation"] & movies_of_split["test"]


def test_rotten_tomatoes_split_is_fixed_by_seed(rotten):
    again = tasks.load_classification("rotten_tomatoes", minilm_tokenizer(), seed=0)
    assert fingerprint(again) == fingerprint(rotten)
    other = tasks.load_classification("rotten_tomatoes", minilm_tokenizer(), seed=1)
    assert other.splits["test"].input_ids != rotten.splits["test"].input_ids


def test_rotten_tomatoes_split_ignores_hash_randomization(rotten):
    script = ("from minipeft.formats import tasks; import tests.test_data as t; "
              "print(t.fingerprint(tasks.load_classification('rotten_tomatoes', t.minilm_tokenizer())))")
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == fingerprint(rotten)


def test_truncation_keeps_cls_and_sep():
    task = tasks.load_classification("rotten_tomatoes", minilm_tokenizer(), max_len=16)
    sequences = task.splits["train"].input_ids
    assert max(len(ids) for ids in sequences) == 16
    assert all(ids[0] == CLS and ids[-1] == SEP for ids in sequences)


def test_classification_batches_pad_dynamically(rotten):
    dataset = rotten.splits["validation"]
    batch = next(dataset.batches(8))
    lengths = [len(ids) for ids in dataset.input_ids[:8]]
    assert batch["input_ids"].shape == (8, max(lengths)) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.long and batch["labels"].shape == (8,)
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, length in enumerate(lengths):
        assert batch["input_ids"][row, :length].tolist() == dataset.input_ids[row]
        assert (batch["input_ids"][row, length:] == rotten.pad_id).all()
    assert batch["labels"].tolist() == dataset.labels[:8]


# ----------------------------------------------------------------------------------------------------
# batching and sharding, on a toy data set whose label is the example's index


def toy_dataset(n: int) -> data.Dataset:
    return data.Dataset("classification", [[i + 1] * (i % 3 + 1) for i in range(n)], list(range(n)), pad_id=0)


def order_of(dataset: data.Dataset, **kwargs) -> list[int]:
    return [i for batch in dataset.batches(**kwargs) for i in batch["labels"].tolist()]


def test_batches_cover_every_example_once():
    dataset = toy_dataset(10)
    assert order_of(dataset, batch_size=4) == list(range(10))
    assert sorted(order_of(dataset, batch_size=4, shuffle=True)) == list(range(10))
    assert dataset.num_batches(4) == len(list(dataset.batches(4))) == 3
    assert dataset.num_batches(4, drop_last=True) == len(list(dataset.batches(4, drop_last=True))) == 2


def test_shuffle_is_fixed_by_seed_and_epoch():
    dataset = toy_dataset(50)
    first = order_of(dataset, batch_size=8, shuffle=True, seed=3, epoch=0)
    assert first == order_of(dataset, batch_size=8, shuffle=True, seed=3, epoch=0)
    assert first != list(range(50))
    assert first != order_of(dataset, batch_size=8, shuffle=True, seed=3, epoch=1)
    assert first != order_of(dataset, batch_size=8, shuffle=True, seed=4, epoch=0)


def test_ranks_shard_each_global_batch():
    dataset = toy_dataset(21)
    settings = dict(shuffle=True, seed=7, epoch=2)
    global_batches = list(dataset.batches(batch_size=8, **settings))
    rank_batches = [list(dataset.batches(batch_size=4, rank=r, world_size=2, **settings)) for r in range(2)]
    assert len(rank_batches[0]) == len(rank_batches[1]) == len(global_batches) == dataset.num_batches(4, 2)
    for step, global_batch in enumerate(global_batches):
        expected = global_batch["labels"].tolist()
        shards = [rank_batches[r][step]["labels"].tolist() for r in range(2)]
        assert shards == [expected[0::2], expected[1::2]]  # interleaved, disjoint, union = global
    assert dataset.num_batches(4, world_size=2, drop_last=True) == 2


def varied_lengths(n: int, seed: int = 0) -> data.Dataset:
    """n examples of random lengths 1..40; the label is the example's index."""
    lengths = np.random.default_rng(seed).integers(1, 41, n)
    return data.Dataset("classification", [[i + 1] * int(k) for i, k in enumerate(lengths)], list(range(n)), pad_id=0)


def padded_tokens(dataset: data.Dataset, **kwargs) -> int:
    return sum(batch["input_ids"].numel() for batch in dataset.batches(**kwargs))


@pytest.mark.parametrize("drop_last", [False, True])
def test_length_grouped_batches(drop_last):
    dataset = varied_lengths(1000)  # 62 batches of 16 and one of 8: groups of 32 and 31 batches (the 8 in the second)
    grouped = dataset.grouped_by_length()
    settings = dict(batch_size=16, shuffle=True, seed=5, drop_last=drop_last)
    plain, by_length = list(dataset.batches(**settings)), list(grouped.batches(**settings))
    # the same examples in the same number of batches of the same sizes, each a random draw
    assert len(by_length) == len(plain) == dataset.num_batches(16, drop_last=drop_last)
    assert sorted(len(b["labels"]) for b in by_length) == sorted(len(b["labels"]) for b in plain)
    assert sorted(order_of(grouped, **settings)) == sorted(order_of(dataset, **settings))
    # each batch holds about one length: far less padding than random batches
    assert padded_tokens(grouped, **settings) < 0.6 * padded_tokens(dataset, **settings)
    first_batch = by_length[0]["input_ids"]
    assert first_batch.shape[1] - (first_batch != 0).sum(1).min() <= 3
    # fixed by (seed, epoch), different across epochs, and the grouping order is not the length order
    assert order_of(grouped, **settings) == order_of(grouped, **settings)
    assert order_of(grouped, **settings) != order_of(grouped, **settings, epoch=1)
    widths = [b["input_ids"].shape[1] for b in by_length]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)
    # and sharded across ranks as any global batch
    shards = [list(grouped.batches(batch_size=8, rank=r, world_size=2, shuffle=True, seed=5)) for r in range(2)]
    for step, batch in enumerate(grouped.batches(batch_size=16, shuffle=True, seed=5)):
        assert [shards[r][step]["labels"].tolist() for r in range(2)] == \
            [batch["labels"].tolist()[0::2], batch["labels"].tolist()[1::2]]


def test_evaluation_order_sorted_by_length():
    dataset = varied_lengths(300)
    ordered = list(dataset.batches(64, sort_by_length=True))
    assert sorted(i for b in ordered for i in b["labels"].tolist()) == list(range(300))
    widths = [b["input_ids"].shape[1] for b in ordered]
    assert widths == sorted(widths, reverse=True)  # longest first: a batch too large fails at once
    assert padded_tokens(dataset, batch_size=64, sort_by_length=True) < 0.7 * padded_tokens(dataset, batch_size=64)
    assert not dataset.group_by_length and dataset.grouped_by_length().input_ids is dataset.input_ids


def test_rank_with_nothing_left_gets_an_empty_batch():
    dataset = toy_dataset(9)  # global batches of 4: 4, 4, 1
    last = list(dataset.batches(batch_size=2, rank=1, world_size=2))[-1]
    assert last["input_ids"].shape == (0, 0) and last["labels"].shape == (0,)


def test_lm_labels_are_ignored_at_padding():
    dataset = data.Dataset("lm", [[5, 6, 7], [8]], [[6, 7, 9], [4]], pad_id=0)
    batch = next(dataset.batches(2))
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[6, 7, 9], [4, -100, -100]]


def test_bad_batch_arguments():
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        next(toy_dataset(4).batches(2, rank=2, world_size=2))


# ----------------------------------------------------------------------------------------------------
# causal LM


def test_hamlet_windows_shift_by_one_and_tile_the_text():
    max_len = 64
    tokenizer = minilm_tokenizer()
    task = tasks.load_lm("hamlet", tokenizer, max_len=max_len)
    assert task.kind == "lm" and task.n_classes is None and task.label_names is None
    windows = []
    for split in tasks.SPLITS:
        dataset = task.splits[split]
        for inputs, targets in zip(dataset.input_ids, dataset.labels):
            assert len(inputs) == len(targets) == max_len
            assert targets[:-1] == inputs[1:]
            windows.append(inputs + targets[-1:])
    # the splits are consecutive, non-overlapping windows of the text, in order: train, validation, test
    tokens = tokenizer.encode(asset_path("hamlet").read_text(encoding="utf-8"), add_special_tokens=False).ids
    assert sum(windows, []) == tokens[:len(windows) * (max_len + 1)]
    assert len(tokens) - len(windows) * (max_len + 1) < max_len + 1
    sizes = [len(task.splits[split]) for split in tasks.SPLITS]
    assert sizes[1] == sizes[2] == round(0.05 * len(windows)) and CLS not in windows[0]

    batch = next(task.splits["test"].batches(4))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, max_len)
    assert batch["attention_mask"].all() and (batch["labels"][:, :-1] == batch["input_ids"][:, 1:]).all()


def test_txt_file_with_byte_tokenizer(tmp_path):
    text = "To be, or not to be, that is the question. " * 20  # 860 bytes
    tokenizer = byte_tokenizer()
    task = tasks.load_lm(write(tmp_path / "q.txt", text), tokenizer, max_len=32)
    assert task.pad_id == 256  # <|endoftext|>
    assert sum(len(task.splits[split]) for split in tasks.SPLITS) == 860 // 33
    assert len(task.splits["validation"]) == len(task.splits["test"]) == 1
    assert tokenizer.decode(task.splits["train"].input_ids[0]) == text[:32]


def test_lm_text_too_short(tmp_path):
    with pytest.raises(ValueError, match=r"short\.txt has 5 tokens, but at least 33 are needed"):
        tasks.load_lm(write(tmp_path / "short.txt", "hello"), byte_tokenizer(), max_len=10)
    with pytest.raises(ValueError, match=r"empty\.txt has 0 tokens"):
        tasks.load_lm(write(tmp_path / "empty.txt", ""), byte_tokenizer())
    shortest = tasks.load_lm(write(tmp_path / "33.txt", "x" * 33), byte_tokenizer(), max_len=10)  # 3 windows of 11
    assert [len(shortest.splits[split]) for split in tasks.SPLITS] == [1, 1, 1]


def test_lm_rejects_other_sources(tmp_path):
    with pytest.raises(ValueError, match=r"not a \.txt file"):
        tasks.load_lm(tmp_path / "x.csv", byte_tokenizer())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tasks.load_lm(tmp_path / "missing.txt", byte_tokenizer())


def test_lm_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("line one\nline two\nna\u00efve\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8 text \(line 3"):
        tasks.load_lm(path, byte_tokenizer())


# ----------------------------------------------------------------------------------------------------
# user classification files


def test_csv_with_string_labels(tmp_path):
    path = write_csv(tmp_path / "reviews.csv", toy_rows(["pos", "neg", "neutral"]))
    task = tasks.load_classification(path, minilm_tokenizer(), seed=0)
    assert task.label_names == ["neg", "neutral", "pos"] and task.n_classes == 3
    sizes = {split: len(task.splits[split]) for split in tasks.SPLITS}
    assert sizes == {"train": 24, "validation": 3, "test": 3}
    for split in tasks.SPLITS:  # stratified: every class in every split here
        assert set(task.splits[split].labels) == {0, 1, 2}
    first = task.splits["train"].input_ids[0]
    assert first[0] == CLS and first[-1] == SEP


def test_single_file_split_is_fixed_by_seed(tmp_path):
    path = write_csv(tmp_path / "reviews.csv", toy_rows([0, 1], per_label=30))
    same = [fingerprint(tasks.load_classification(path, minilm_tokenizer(), seed=0)) for _ in range(2)]
    other = fingerprint(tasks.load_classification(path, minilm_tokenizer(), seed=1))
    assert same[0] == same[1] != other


def test_jsonl_with_int_labels_and_byte_tokenizer(tmp_path):
    records = [{"text": text, "label": label, "id": i} for i, (text, label) in enumerate(toy_rows([0, 1, 2]))]
    lines = [json.dumps(record) for record in records]
    write(tmp_path / "toy.jsonl", "\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n")  # blank line ok
    tokenizer = byte_tokenizer()
    task = tasks.load_task(tmp_path / "toy.jsonl", tokenizer, max_len=8)
    assert task.kind == "classification" and task.label_names == ["0", "1", "2"] and task.pad_id == 256
    assert sum(len(task.splits[split]) for split in tasks.SPLITS) == 30
    assert max(len(ids) for ids in task.splits["train"].input_ids) == 8  # no special tokens, truncated
    assert tokenizer.decode(task.splits["train"].input_ids[0]) == "example "


def test_signed_labels_are_names(tmp_path):
    path = write_jsonl(tmp_path / "signed.jsonl", [{"text": t, "label": l} for t, l in toy_rows([-1, 1])])
    task = tasks.load_classification(path, byte_tokenizer())
    assert task.label_names == ["-1", "1"] and set(task.splits["train"].labels) == {0, 1}


def test_directory_of_split_files(tmp_path):
    write_csv(tmp_path / "train.csv", toy_rows(["b", "a"], per_label=4))
    write_jsonl(tmp_path / "validation.jsonl", [{"text": "fine", "label": "a"}])
    write_csv(tmp_path / "test.csv", [("good", "b"), ("bad", "a")])
    task = tasks.load_task(tmp_path, minilm_tokenizer())
    assert task.label_names == ["a", "b"]
    assert [len(task.splits[split]) for split in tasks.SPLITS] == [8, 1, 2]
    assert task.splits["test"].labels == [1, 0]


def test_load_task_dispatch(tmp_path):
    assert tasks.load_task("hamlet", byte_tokenizer(), max_len=512).kind == "lm"
    with pytest.raises(ValueError, match=r"unknown data source 'imdb'; use 'rotten_tomatoes'"):
        tasks.load_task("imdb", byte_tokenizer())
    with pytest.raises(ValueError, match=r"unknown data source 'rotten_tomatos' \(did you mean 'rotten_tomatoes'\?\)"):
        tasks.load_task("rotten_tomatos", byte_tokenizer())
    with pytest.raises(FileNotFoundError, match=r"data\.parquet does not exist"):
        tasks.load_task(tmp_path / "data.parquet", byte_tokenizer())
    write(tmp_path / "data.xml", "<rows/>")
    with pytest.raises(ValueError, match=r"data\.xml is not a \.jsonl, \.json, \.csv, \.tsv, \.parquet file"):
        tasks.load_task(tmp_path / "data.xml", byte_tokenizer())


# ----------------------------------------------------------------------------------------------------
# classification errors: each names the file (and line) and the fix


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.csv does not exist"):
        tasks.load_classification(tmp_path / "missing.csv", byte_tokenizer())


@pytest.mark.parametrize("name", ["empty.csv", "empty.jsonl"])
def test_empty_file(tmp_path, name):
    with pytest.raises(ValueError, match=rf"{name} is empty"):
        tasks.load_classification(write(tmp_path / name, "\n"), byte_tokenizer())


def test_header_without_rows(tmp_path):
    with pytest.raises(ValueError, match=r"h\.csv has a header but no rows"):
        tasks.load_classification(write(tmp_path / "h.csv", "text,label\n"), byte_tokenizer())


@pytest.mark.parametrize("header, missing", [("sentence,label", "text"), ("text,target", "label")])
def test_csv_missing_column(tmp_path, header, missing):
    path = write(tmp_path / "cols.csv", f"{header}\nhello,1\n")
    with pytest.raises(ValueError, match=rf"cols\.csv has no '{missing}' column, which a text/label row needs \(its "
                                         rf"columns are: {header.replace(',', ', ')}\); .* --columns {missing}=NAME"):
        tasks.load_classification(path, byte_tokenizer())


def test_jsonl_missing_field(tmp_path):
    path = write(tmp_path / "f.jsonl", '{"text": "a", "label": 0}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"f\.jsonl line 2 has no 'label' field"):
        tasks.load_classification(path, byte_tokenizer())


def test_jsonl_malformed_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"text": "a", "label": 0}\n\n{"text": "b", "label": 1\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 3 is not valid JSON"):
        tasks.load_classification(path, byte_tokenizer())
    write(tmp_path / "list.jsonl", '["a", 0]\n')
    with pytest.raises(ValueError, match=r"list\.jsonl line 1 is not a JSON object"):
        tasks.load_classification(tmp_path / "list.jsonl", byte_tokenizer())


def test_non_utf8_csv(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ngood,1\nna\u00efve,0\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.csv is not UTF-8 text \(line 3 .*re-save"):
        tasks.load_classification(path, byte_tokenizer())


def test_fewer_than_two_classes(tmp_path):
    path = write_csv(tmp_path / "one.csv", toy_rows(["pos"]))
    with pytest.raises(ValueError, match=r"one\.csv has only one label \('pos'\).*at least 2 classes"):
        tasks.load_classification(path, byte_tokenizer())


def test_empty_text_row(tmp_path):
    path = write(tmp_path / "blank.csv", 'text,label\ngood,1\n"  ",0\n')
    with pytest.raises(ValueError, match=r"blank\.csv line 3 has an empty text; remove the row"):
        tasks.load_classification(path, byte_tokenizer())
    write(tmp_path / "short.csv", "text,label\ngood,1\nbad\n")
    with pytest.raises(ValueError, match=r"short\.csv line 3 has no label"):
        tasks.load_classification(tmp_path / "short.csv", byte_tokenizer())
    write_jsonl(tmp_path / "float.jsonl", [{"text": "a", "label": 0.5}])
    with pytest.raises(ValueError, match=r"float\.jsonl line 1 has a label of type float"):
        tasks.load_classification(tmp_path / "float.jsonl", byte_tokenizer())


def test_unknown_label_in_eval_split(tmp_path):
    write_csv(tmp_path / "train.csv", toy_rows(["a", "b"], per_label=3))
    write_csv(tmp_path / "validation.csv", [("x", "a")])
    write_csv(tmp_path / "test.csv", [("x", "a"), ("y", "c")])
    with pytest.raises(ValueError, match=r"test\.csv line 3 has label 'c', which never occurs in the "
                                         r"training data .*train\.csv"):
        tasks.load_classification(tmp_path, byte_tokenizer())


def test_directory_missing_a_split(tmp_path):
    write_csv(tmp_path / "train.csv", toy_rows(["a", "b"]))
    write_csv(tmp_path / "test.csv", toy_rows(["a", "b"]))
    with pytest.raises(ValueError, match=r"has no validation\.jsonl or validation\.json or validation\.csv or "
                                         r"validation\.tsv or validation\.parquet; a data folder needs"):
        tasks.load_classification(tmp_path, byte_tokenizer())


def test_too_few_rows_to_split(tmp_path):
    path = write_csv(tmp_path / "tiny.csv", toy_rows(["a", "b"], per_label=2))
    with pytest.raises(ValueError, match=r"tiny\.csv has too few rows \(4\) to split"):
        tasks.load_classification(path, byte_tokenizer())


def test_max_len_too_small_for_special_tokens(tmp_path):
    path = write_csv(tmp_path / "ok.csv", toy_rows(["a", "b"]))
    with pytest.raises(ValueError, match="max_len=2 leaves no room"):
        tasks.load_classification(path, minilm_tokenizer(), max_len=2)


def test_head_keeps_the_first_examples():
    dataset = data.Dataset("classification", [[1], [2, 3], [4]], [0, 1, 0], pad_id=0)
    first_two = dataset.head(2)
    assert first_two.input_ids == [[1], [2, 3]] and first_two.labels == [0, 1] and first_two.pad_id == 0
    assert dataset.head(None) is dataset and len(dataset.head(10)) == 3


# ----------------------------------------------------------------------------------------------------
# the shapes people have: ShareGPT, CSV, parquet, JSON arrays, datasets' save_to_disk, --columns


def qa_rows(n: int = 20) -> list[dict]:
    return [{"question": f"What is {i} plus {i % 3}?", "answer": str(i + i % 3)} for i in range(n)]


def as_fields(rows: list[dict], **names) -> list[dict]:
    """The rows with their fields renamed: as_fields(rows, prompt="question") -> {"prompt": ...}."""
    return [{new: row[old] for new, old in names.items()} for row in rows]


def same_examples(a: data.TaskData, b: data.TaskData) -> bool:
    return all(a.splits[s].input_ids == b.splits[s].input_ids and a.splits[s].labels == b.splits[s].labels
               for s in tasks.SPLITS)


def test_sharegpt_rows_are_read_as_their_messages(tmp_path):
    """human/gpt/system (and user/assistant) turns give exactly the conversation written as messages."""
    roles = {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}
    chats = [[("system", "Be brief."), ("human", f"hi {i}"), ("gpt", "hello"), ("user", "name?"), ("assistant", f"bot {i}")]
             for i in range(12)]
    sharegpt = write_jsonl(tmp_path / "share.jsonl",
                           [{"conversations": [{"from": who, "value": text} for who, text in chat]} for chat in chats])
    messages = write_jsonl(tmp_path / "messages.jsonl",
                           [{"messages": [{"role": roles[who], "content": text} for who, text in chat]} for chat in chats])
    read = tasks.load_task(sharegpt, byte_tokenizer(), max_len=128)
    assert read.kind == "sft" and read.info["shape"] == "sharegpt"
    assert same_examples(read, tasks.load_task(messages, byte_tokenizer(), max_len=128))
    assert read.splits["test"].answers[0].startswith("bot ")


def test_instruction_rows_in_every_file_kind_read_alike(tmp_path):
    """One set of rows as JSONL, a JSON array, CSV, parquet (written by pyarrow), and a data set saved
    (and written as JSON) by datasets, with the prompt/completion or messages columns, or other columns read via --columns."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    rows = qa_rows()
    pairs = as_fields(rows, prompt="question", completion="answer")
    chats = [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
             for r in rows]
    expected = tasks.load_task(write_jsonl(tmp_path / "pairs.jsonl", pairs), byte_tokenizer(), max_len=64)
    write(tmp_path / "pairs.json", json.dumps(pairs))
    with open(tmp_path / "pairs.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["prompt", "completion"]] + [[r["prompt"], r["completion"]] for r in pairs])
    with open(tmp_path / "pairs.tsv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([["prompt", "completion"]] + [list(r.values()) for r in pairs])
    pq.write_table(pa.Table.from_pylist(pairs), tmp_path / "pairs.parquet")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet")
    pq.write_table(pa.Table.from_pylist(chats), tmp_path / "chats.parquet")  # a list of structs
    with open(tmp_path / "chats.csv", "w", encoding="utf-8", newline="") as f:  # messages as JSON text
        csv.writer(f).writerows([["messages"]] + [[json.dumps(c["messages"])] for c in chats])
    datasets.Dataset.from_list(pairs).save_to_disk(str(tmp_path / "saved"))
    datasets.Dataset.from_list(pairs).to_json(tmp_path / "lines.json")  # JSON lines, under a .json name
    for name, columns in [("pairs.json", None), ("lines.json", None), ("pairs.csv", None), ("pairs.tsv", None),
                          ("pairs.parquet", None), ("saved", None),
                          ("qa.parquet", {"prompt": "question", "completion": "answer"}),
                          ("chats.parquet", None), ("chats.csv", None)]:
        task = tasks.load_task(tmp_path / name, byte_tokenizer(), max_len=64, columns=columns)
        assert same_examples(task, expected), name


def test_tsv_rows_are_datasets_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = write(tmp_path / "rows.tsv", 'text\tlabel\r\n"a\ttab, a comma"\tpos\r\n"two\nlines"\tneg\r\n\r\n')
    theirs = datasets.load_dataset("csv", data_files=str(path), sep="\t", split="train", cache_dir=str(tmp_path / "c"))
    assert [r.fields for r in readers.read_source(path)["all"].records] == theirs.to_list()


def test_folders_of_split_files_and_saved_dataset_dicts(tmp_path):
    datasets = pytest.importorskip("datasets")
    pairs = as_fields(qa_rows(12), prompt="question", completion="answer")
    parts = {"train": pairs[:8], "validation": pairs[8:10], "test": pairs[10:]}
    (tmp_path / "files").mkdir()
    for split, part in parts.items():
        write_jsonl(tmp_path / "files" / f"{split}.jsonl", part)
    datasets.DatasetDict({s: datasets.Dataset.from_list(p) for s, p in parts.items()}).save_to_disk(
        str(tmp_path / "dict"))
    files, saved = (tasks.load_task(tmp_path / name, byte_tokenizer(), max_len=64) for name in ("files", "dict"))
    assert same_examples(files, saved) and [len(saved.splits[s]) for s in tasks.SPLITS] == [8, 2, 2]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(pairs)}).save_to_disk(str(tmp_path / "train_only"))
    whole = tasks.load_task(tmp_path / "train_only", byte_tokenizer(), max_len=64)  # split as one file
    assert sum(len(whole.splits[s]) for s in tasks.SPLITS) == 12
    datasets.DatasetDict({"train": datasets.Dataset.from_list(pairs), "test": datasets.Dataset.from_list(pairs)}
                         ).save_to_disk(str(tmp_path / "no_validation"))
    with pytest.raises(ValueError, match=r"no_validation has the splits train, test; a saved DatasetDict needs train, "
                                         r"validation and test \(or train alone"):
        tasks.load_task(tmp_path / "no_validation", byte_tokenizer())


def test_class_label_columns_keep_their_names_and_ids(tmp_path):
    """A datasets ClassLabel label column (saved to disk, or written to parquet by datasets) gives the task its
    class names and number, its integers the class ids, as datasets reads them back (names were "0", "1", and
    2 classes for 3: the few-shot prompts and the reports spoke of "0" and "1")."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"review": datasets.Value("string"),
                                  "stars": datasets.ClassLabel(names=["pos", "neg", "neutral"])})
    rows = {"review": [f"review {i}" for i in range(20)], "stars": [i % 2 for i in range(20)]}
    saved = datasets.Dataset.from_dict(rows, features=features)
    saved.save_to_disk(str(tmp_path / "saved"))
    saved.to_parquet(str(tmp_path / "saved.parquet"))
    columns = {"text": "review", "label": "stars"}
    for source in ("saved", "saved.parquet"):
        task = tasks.load_task(tmp_path / source, byte_tokenizer(), max_len=32, columns=columns)
        theirs = (datasets.load_from_disk(str(tmp_path / source)) if source == "saved" else
                  datasets.load_dataset("parquet", data_files=str(tmp_path / source), split="train",
                                        cache_dir=str(tmp_path / "cache")))
        assert task.label_names == theirs.features["stars"].names and task.n_classes == 3, source
        label_of = dict(zip(theirs["review"], theirs["stars"]))
        for split in tasks.SPLITS:
            texts = [byte_tokenizer().decode(ids) for ids in task.splits[split].input_ids]
            assert task.splits[split].labels == [label_of[text] for text in texts]
    unlabelled = datasets.Dataset.from_dict({"review": rows["review"], "stars": [-1] * 10 + [0, 1] * 5},
                                            features=features)
    unlabelled.save_to_disk(str(tmp_path / "unlabelled"))
    with pytest.raises(ValueError, match=r"has label -1, which is not a class of its ClassLabel column \(0 to 2: "
                                         r"pos, neg, neutral\)"):
        tasks.load_task(tmp_path / "unlabelled", byte_tokenizer(), columns=columns)


def test_classification_columns_from_csv_and_parquet(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = toy_rows(["neg", "pos"])
    expected = tasks.load_task(write_csv(tmp_path / "plain.csv", rows), byte_tokenizer(), max_len=16)
    pq.write_table(pa.Table.from_pylist([{"review": t, "stars": l, "id": i} for i, (t, l) in enumerate(rows)]),
                   tmp_path / "reviews.parquet")
    task = tasks.load_task(tmp_path / "reviews.parquet", byte_tokenizer(), max_len=16,
                          columns={"text": "review", "label": "stars"})
    assert task.label_names == ["neg", "pos"] and same_examples(task, expected)


def test_several_sources_with_mixing_weights(tmp_path):
    """Weight w: round(w × n) of a source's n training rows (each ⌊w⌋ times, and a seeded share once more);
    validation and test: every source's own, once."""
    a = write_jsonl(tmp_path / "a.jsonl", as_fields(qa_rows(20), prompt="question", completion="answer"))
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": f"b{i}"},
                                                         {"role": "assistant", "content": "yes"}]} for i in range(20)])
    alone = {name: tasks.load_task(path, byte_tokenizer(), max_len=64) for name, path in (("a", a), ("b", b))}
    mixed = tasks.load_task([f"{a}:2", (str(b), 0.5)], byte_tokenizer(), max_len=64)
    assert mixed.info["shape"] == "prompt/completion + messages"
    train = [tuple(ids) for ids in mixed.splits["train"].input_ids]
    a_train = [tuple(ids) for ids in alone["a"].splits["train"].input_ids]
    b_train = {tuple(ids) for ids in alone["b"].splits["train"].input_ids}
    assert len(train) == 2 * 16 + 8 and all(train.count(ids) == 2 for ids in a_train)
    drawn = [ids for ids in train if ids in b_train]
    assert len(drawn) == len(set(drawn)) == 8
    for split in ("validation", "test"):
        assert mixed.splits[split].input_ids == alone["a"].splits[split].input_ids + alone["b"].splits[split].input_ids
    again = tasks.load_task([f"{a}:2", (str(b), 0.5)], byte_tokenizer(), max_len=64)
    assert same_examples(again, mixed)  # the share drawn is fixed by the seed
    assert tasks.sources_text([f"{a}:2", str(b)]) == f"{a}:2 {b}:1" and tasks.sources_text(str(a)) == str(a)


def test_mixed_classification_sources_share_their_label_names(tmp_path):
    first = write_csv(tmp_path / "first.csv", toy_rows(["neg", "pos"]))
    second = write_jsonl(tmp_path / "second.jsonl", [{"text": t, "label": l} for t, l in toy_rows(["mixed", "pos"])])
    mixed = tasks.load_task([first, second], byte_tokenizer(), max_len=16)
    assert mixed.label_names == ["mixed", "neg", "pos"] and mixed.n_classes == 3
    for part, source in zip((slice(0, 16), slice(16, 32)), (first, second)):
        alone = tasks.load_task(source, byte_tokenizer(), max_len=16)
        assert [mixed.label_names[i] for i in mixed.splits["train"].labels[part]] == \
            [alone.label_names[i] for i in alone.splits["train"].labels]


def test_mixed_sources_are_read_through_columns_only_where_they_have_them(tmp_path):
    """--columns renames the columns of the sources that have them; a source with none of them is read as it
    is (so differently named files mix), and one with some but not all is still an error."""
    columns = {"prompt": "question", "completion": "answer"}
    named = write_jsonl(tmp_path / "named.jsonl", qa_rows(20))
    plain = write_jsonl(tmp_path / "plain.jsonl", as_fields(qa_rows(20)[::-1], prompt="question", completion="answer"))
    mixed = tasks.load_task([named, plain], byte_tokenizer(), max_len=64, columns=columns)
    alone = [tasks.load_task(named, byte_tokenizer(), max_len=64, columns=columns),
             tasks.load_task(plain, byte_tokenizer(), max_len=64)]
    for split in ("validation", "test"):
        assert mixed.splits[split].input_ids == alone[0].splits[split].input_ids + alone[1].splits[split].input_ids
    assert sorted(mixed.splits["train"].input_ids) == sorted(alone[0].splits["train"].input_ids +
                                                             alone[1].splits["train"].input_ids)
    half = write_jsonl(tmp_path / "half.jsonl", [{"question": r["question"], "reply": r["answer"]} for r in qa_rows()])
    with pytest.raises(ValueError, match=r"half\.jsonl line 1 has no field 'answer' \(--columns completion=answer\)"):
        tasks.load_task([named, half], byte_tokenizer(), max_len=64, columns=columns)


def test_mixed_sources_with_numbered_labels_number_them_as_one_file_would(tmp_path):
    first = write_csv(tmp_path / "first.csv", toy_rows([0, 1]))
    second = write_jsonl(tmp_path / "second.jsonl", [{"text": t, "label": l} for t, l in toy_rows([1, 3])])
    mixed = tasks.load_task([first, second], byte_tokenizer(), max_len=16)
    one_file = tasks.load_task(write_csv(tmp_path / "one.csv", toy_rows([0, 1, 3])), byte_tokenizer(), max_len=16)
    assert mixed.label_names == one_file.label_names == ["0", "1", "2", "3"] and mixed.n_classes == 4
    assert sorted(mixed.splits["train"].labels) == sorted(one_file.splits["train"].labels + [1] * 8)


# bad input: one sentence naming the file, the line or row, and the fix


@pytest.mark.parametrize("sources, message", [
    (["a.jsonl:0"], r"--task a\.jsonl:0: a mixing weight must be a number > 0"),
    (["a.jsonl:-1.5"], r"--task a\.jsonl:-1\.5: a mixing weight must be a number > 0"),
    ([("a.jsonl", float("nan"))], r"--task a\.jsonl:nan: a mixing weight"),
    ([], r"no data source given"),
])
def test_bad_mixing_weights(sources, message):
    with pytest.raises(ValueError, match=message):
        tasks.parse_sources(sources)


def test_bad_columns_flag():
    assert readers.parse_columns("prompt=question, completion = answer") == {"prompt": "question",
                                                                               "completion": "answer"}
    with pytest.raises(ValueError, match=r"'promt' is not a field minipeft reads \(did you mean 'prompt'\?\); "
                                         r"the fields are: text, label, prompt"):
        readers.parse_columns("promt=question")
    with pytest.raises(ValueError, match=r"'prompt' is not FIELD=COLUMN"):
        readers.parse_columns("prompt")


def test_a_named_column_that_is_not_there(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(qa_rows()), tmp_path / "qa.parquet")
    with pytest.raises(ValueError, match=r"qa\.parquet has no column 'questions' \(--columns prompt=questions\) "
                                         r"\(did you mean 'question'\?\); its columns are: question, answer"):
        tasks.load_task(tmp_path / "qa.parquet", byte_tokenizer(), columns={"prompt": "questions", "completion": "answer"})
    with pytest.raises(ValueError, match=r"qa\.parquet has no 'prompt' column, which a prompt/completion row needs "
                                         r"\(its columns are: question, answer\); name the column that holds it with "
                                         r"--columns prompt=NAME"):
        tasks.load_task(tmp_path / "qa.parquet", byte_tokenizer(), columns={"completion": "answer"})
    write_jsonl(tmp_path / "qa.jsonl", qa_rows(3) + [{"query": "x", "answer": "y"}])
    with pytest.raises(ValueError, match=r"qa\.jsonl line 4 has no field 'question' \(--columns prompt=question\); "
                                         r"its fields are: query, answer"):
        tasks.load_task(tmp_path / "qa.jsonl", byte_tokenizer(), columns={"prompt": "question", "completion": "answer"})
    with pytest.raises(ValueError, match=r"no --task source has the columns --columns names \(q\)"):
        tasks.load_task("rotten_tomatoes", byte_tokenizer(), columns={"text": "q"})


def test_every_reader_names_its_bad_rows(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    pairs = as_fields(qa_rows(), prompt="question", completion="answer")
    pairs[2]["completion"] = " "
    pq.write_table(pa.Table.from_pylist(pairs), tmp_path / "pairs.parquet")
    with pytest.raises(ValueError, match=r"pairs\.parquet row 3: an empty completion"):
        tasks.load_task(tmp_path / "pairs.parquet", byte_tokenizer())
    datasets.DatasetDict({s: datasets.Dataset.from_list(pairs) for s in tasks.SPLITS}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ValueError, match=r"d train row 3: an empty completion"):
        tasks.load_task(tmp_path / "d", byte_tokenizer())
    write(tmp_path / "pairs.json", json.dumps(pairs))
    with pytest.raises(ValueError, match=r"pairs\.json row 3: an empty completion"):
        tasks.load_task(tmp_path / "pairs.json", byte_tokenizer())
    write(tmp_path / "listed.json", json.dumps([pairs[0], ["a", "b"]]))
    with pytest.raises(ValueError, match=r"listed\.json row 2 is not a JSON object"):
        tasks.load_task(tmp_path / "listed.json", byte_tokenizer())
    write(tmp_path / "chats.csv", 'messages\n"[{""role"": ""assistant"", ""content"": ""a""}]"\n"[{""role"": ""user""\n')
    with pytest.raises(ValueError, match=r"chats\.csv line 3: 'messages' is text but not valid JSON"):
        tasks.load_task(tmp_path / "chats.csv", byte_tokenizer())
    pq.write_table(pa.Table.from_pylist([{"text": "good", "label": None}] * 10), tmp_path / "labels.parquet")
    with pytest.raises(ValueError, match=r"labels\.parquet row 1 has no label"):
        tasks.load_task(tmp_path / "labels.parquet", byte_tokenizer())
    write(tmp_path / "bad.parquet", "not parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet is not a readable parquet file"):
        tasks.load_task(tmp_path / "bad.parquet", byte_tokenizer())


@pytest.mark.parametrize("rows, message", [
    ([{"question": "a", "answer": "b"}], r"line 1 fits no row shape \(its fields are: question, answer\); give each row "
                                         r"text and label \(classification\), prompt and completion, messages, "
                                         r"conversations \(ShareGPT\), or instruction and output \(Alpaca\)"),
    ([{"text": "a", "label": 1}, {"prompt": "a", "completion": "b"}],
     r"line 2 is a prompt/completion row but line 1 is a text/label row; use one shape per file"),
    # trl's language-modelling rows and preference pairs: said so, not "name the completion column"
    ([{"text": "Once upon a time"}], r"line 1 has a 'text' field and no 'label' \(its fields are: text\); text rows "
                                     r"are read as classification, .* give the text as a \.txt file"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}], r"line 1 is a preference pair \(its fields are: prompt, "
                                                       r"chosen, rejected\); DPO reads pairs from a \.jsonl file"),
])
def test_unknown_row_shapes_list_the_shapes_read(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        tasks.load_task(write_jsonl(tmp_path / "rows.jsonl", rows), byte_tokenizer())


@pytest.mark.parametrize("name, text, message", [
    # datasets reads the first as "text" and the second as "text.1"; csv.DictReader kept the last one
    ("twice.csv", "text,label,text\nfirst,1,second\n", r"twice\.csv names the column 'text' twice in its header"),
    # pandas makes the first field an index and shifts the rest; csv.DictReader dropped the extra field
    ("extra.csv", "text,label\nhi,1\nwell, yes,0\n",
     r"extra\.csv line 3 has 3 fields but the header names 2 columns; quote the fields that hold commas"),
    # datasets refuses ("specified twice"); json.loads kept the last value
    ("twice.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0, "text": "c"}\n',
     r"twice\.jsonl line 2 names the key 'text' twice in one object; keep one"),
    ("twice.json", '[{"prompt": "a", "completion": "b", "completion": "c"}]',
     r"twice\.json names the key 'completion' twice in one object"),
    ("twice.csv", 'messages\n"[{""role"": ""user"", ""content"": ""a"", ""role"": ""assistant""}]"\n',
     r"twice\.csv line 2: 'messages' names the key 'role' twice in one object"),
])
def test_ambiguous_files_are_refused_not_read_one_way(tmp_path, name, text, message):
    with pytest.raises(ValueError, match=message):
        tasks.load_task(write(tmp_path / name, text), byte_tokenizer())


def test_preference_rows_naming_a_key_twice_are_refused(tmp_path):
    from minipeft.formats import preference
    path = write(tmp_path / "pairs.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c", "chosen": "c"}\n')
    with pytest.raises(ValueError, match=r"pairs\.jsonl line 1 names the key 'chosen' twice in one object"):
        preference.read_pairs(path)


def test_a_preference_file_with_a_byte_order_mark_is_preference_data(tmp_path):
    path = write(tmp_path / "pairs.jsonl", '\ufeff{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    assert tasks.is_preference_source(path)  # it was sent to instruction tuning, which refused it


def test_sources_of_different_kinds_do_not_mix(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", as_fields(qa_rows(), prompt="question", completion="answer"))
    classes = write_csv(tmp_path / "classes.csv", toy_rows(["a", "b"]))
    with pytest.raises(ValueError, match=r"pairs\.jsonl is instruction data .* but --task .*classes\.csv is "
                                         r"classification data \(text/label rows\); the sources of one run must all "
                                         r"be of one kind"):
        tasks.load_task([pairs, classes], byte_tokenizer())


def test_a_missing_optional_package_is_named(tmp_path, monkeypatch):
    """Without pyarrow (or datasets) installed, reading a parquet file (or a saved data set) says what to install."""
    write(tmp_path / "x.parquet", "")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # what Python does when it is not installed
    with pytest.raises(ValueError, match=r"to read .*x\.parquet, install pyarrow: pip install pyarrow"):
        tasks.load_task(tmp_path / "x.parquet", byte_tokenizer())

"""Preference pairs for DPO (dpo.py): a prompt, the answer people preferred (chosen) and one they did not
(rejected), as trl's preference rows, one shape per file:

    {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}                                  plain text
    {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],                                   messages
     "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}
    {"chosen": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
     "rejected": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "5"}]}

The last is trl's implicit prompt: two whole conversations, whose shared first turns are the prompt.

The source is a .jsonl file (split 80/10/10 in a shuffle fixed by the seed), a folder with train /
validation / test .jsonl files, or "rotten_tomatoes_preference": each shipped review sentence asked as
rotten_tomatoes_instruct asks it, the right label chosen and the wrong one rejected, split by movie (the
held-out pairs are about movies training never saw).

Each answer follows its prompt in the model's chat template (chat.py; plain text becomes one user turn
and one assistant turn, as instruction data does) and only the answer's tokens are labelled, its closing
tokens included (<|im_end|>); the end-of-text token is added when the template does not write it. A
sequence longer than max_len loses prompt tokens from its left (counted in info["truncated"]), as trl's
truncation_mode="keep_end" cuts it (trl's default, "keep_start", cuts the answer's end instead).

Two things differ from trl's DPOTrainer, so that pairs are written as the instruction data of an SFT run
before them is: trl joins a plain-text prompt and answer as they are (no template, the end-of-text token
after the answer), and it adds no end-of-text token to a conversation, so under a template that closes a
turn with a token of its own (Gemma's <end_of_turn>) each answer here scores one token more than trl's.

These stop with the file and line: a row of another shape or a file mixing shapes, an empty answer, a
chosen answer equal to the rejected one, an answer that leaves no room for its prompt at max_len.

A batch of B pairs is 2B rows, the chosen answers first, so a pair's two answers run in one forward pass:

    input_ids, attention_mask, labels  (2B, T)  rows 0..B-1 prompt ⊕ chosen, rows B..2B-1 prompt ⊕ rejected
    examples                           ()       B: the pairs (the trainer counts examples by it)
    reference                          (2B,)    the reference model's answer log-probabilities, once
                                                precomputed (dpo.precompute_reference)
"""
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .chat import check_messages, encode_last_answer
from minipeft.core.data import IGNORE_INDEX, Dataset, TaskData
from minipeft.formats.tasks import (PREFERENCE_ROW as ROW_HELP, PREFERENCE_TASK as BUILT_IN, REVIEW_INSTRUCTION, SPLITS,
                                    _rotten_tomatoes, chat_setup, split_80_10_10)
from .readers import DuplicateKey, json_loads, read_utf8


@dataclass
class PreferenceDataset(Dataset):
    """One split of pairs: input_ids / labels are the chosen sequences, rejected_* the rejected ones, and
    reference (N, 2) the reference log-probabilities (chosen, rejected) once precomputed."""

    rejected_ids: list[list[int]] = field(default_factory=list)
    rejected_labels: list[list[int]] = field(default_factory=list)
    reference: torch.Tensor | None = None

    def head(self, n: int | None) -> "PreferenceDataset":
        if n is None:
            return self
        return replace(self, input_ids=self.input_ids[:n], labels=self.labels[:n], rejected_ids=self.rejected_ids[:n],
                       rejected_labels=self.rejected_labels[:n],
                       reference=None if self.reference is None else self.reference[:n])

    def packed(self, max_len: int):
        raise ValueError("--pack cannot be used with preference pairs: DPO scores each answer by the summed "
                         "log-probability of its own row, so a pair's two sequences must stay whole rows "
                         "(batches are grouped by length instead)")

    def collate(self, indices: list[int]) -> dict:
        """B pairs -> 2B rows padded on the right (chosen rows first) and `examples` = B (module docstring)."""
        ids = [self.input_ids[i] for i in indices] + [self.rejected_ids[i] for i in indices]
        labels = [self.labels[i] for i in indices] + [self.rejected_labels[i] for i in indices]
        T = max(map(len, ids), default=0)
        batch = {"input_ids": torch.full((len(ids), T), self.pad_id, dtype=torch.long),  # (2B, T)
                 "attention_mask": torch.zeros((len(ids), T), dtype=torch.long),
                 "labels": torch.full((len(ids), T), IGNORE_INDEX, dtype=torch.long)}
        for row, (sequence, targets) in enumerate(zip(ids, labels)):
            batch["input_ids"][row, :len(sequence)] = torch.tensor(sequence)
            batch["attention_mask"][row, :len(sequence)] = 1
            batch["labels"][row, :len(sequence)] = torch.tensor(targets)
        batch["examples"] = torch.tensor(len(indices))
        if self.reference is not None:
            batch["reference"] = self.reference[indices].T.reshape(-1)  # (2B,): every chosen, then every rejected
        return batch


def load_preferences(source, tokenizer, max_len: int = 256, seed: int = 0, pad_id: int | None = None,
                     chat_template=None) -> TaskData:
    """Pairs of `source` (module docstring) as kind "dpo", each answer in the chat template after its prompt."""
    shape, split_rows, files = _preference_rows(source, seed)
    fmt, eos_id, pad_id = chat_setup(tokenizer, chat_template, pad_id)
    splits, truncated = {}, 0
    for split in SPLITS:
        if not split_rows[split]:
            raise ValueError(f"{files[split]} gives the {split} split no pairs; add some")
        columns = {"chosen": ([], []), "rejected": ([], [])}
        for where, prompt, answers in split_rows[split]:
            for which, answer in answers.items():
                ids, labels, cut = encode_answer(tokenizer, fmt, prompt, answer, f"{where}: its {which} answer",
                                                 max_len, eos_id)
                columns[which][0].append(ids)
                columns[which][1].append(labels)
                truncated += cut
        (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = columns["chosen"], columns["rejected"]
        splits[split] = PreferenceDataset("dpo", chosen_ids, chosen_labels, pad_id, rejected_ids=rejected_ids,
                                          rejected_labels=rejected_labels)
    info = {"shape": f"preference ({shape})", "template": fmt.name, "truncated": truncated, "eos_id": eos_id,
            "train_on_prompt": False}
    return TaskData("dpo", splits, None, None, pad_id, info=info, tokenizer=tokenizer)


def encode_answer(tokenizer, fmt, prompt: list[dict], answer: str, where: str, max_len: int, eos_id):
    """(input_ids, labels, cut?) of the prompt's messages followed by the assistant's answer: labels on the
    answer's tokens only (the targets already shifted: labels[i] is the token after input_ids[i]), cut from
    the left to max_len tokens."""
    ids, _, start, cut = encode_last_answer(tokenizer, fmt, prompt + [{"role": "assistant", "content": answer}],
                                            max_len, eos_id, where)
    labels = [token if i + 1 >= start else IGNORE_INDEX for i, token in enumerate(ids[1:])]
    return ids[:-1], labels, cut > 0


# ----------------------------------------------------------------------------------------------------
# reading rows


def _preference_rows(source, seed: int) -> tuple[str, dict, dict]:
    """(shape, {split: [(where, prompt messages, {"chosen": text, "rejected": text})]}, {split: file})."""
    if str(source) == BUILT_IN:
        return "messages", rotten_tomatoes_pairs(seed), {split: BUILT_IN for split in SPLITS}
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; check the path")
    if path.is_dir():
        files = {split: path / f"{split}.jsonl" for split in SPLITS}
        for split, file in files.items():
            if not file.is_file():
                raise ValueError(f"{path} has no {split}.jsonl; a preference folder needs train, validation and "
                                 "test .jsonl files")
        read = {split: read_pairs(file) for split, file in files.items()}
        shapes = {shape for shape, _ in read.values()}
        if len(shapes) > 1:
            raise ValueError(f"{path}: its files have different row shapes ({', '.join(sorted(shapes))}); use one "
                             "shape for all three")
        return shapes.pop(), {split: rows for split, (_, rows) in read.items()}, files
    shape, rows = read_pairs(path)
    return shape, split_80_10_10(rows, seed, path, "pairs"), {split: path for split in SPLITS}


def read_pairs(path: Path) -> tuple[str, list]:
    """The shape ("text" or "messages") of a .jsonl preference file and its rows, checked."""
    text = read_utf8(path)
    if not text.strip():
        raise ValueError(f"{path} is empty; it needs one JSON object per line, {ROW_HELP}")
    shape, first_line, rows = None, 0, []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON may hold U+2028
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json_loads(line)
        except DuplicateKey as err:
            raise ValueError(f"{where} {err}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not valid JSON ({err.msg}); make each line one object") from None
        this, prompt, answers = _pair(record, where)
        if shape is None:
            shape, first_line = this, number
        elif this != shape:
            raise ValueError(f"{where} is a {this} row but line {first_line} is a {shape} row; use one shape per file")
        rows.append((where, prompt, answers))
    return shape, rows


def _pair(record, where: str) -> tuple[str, list[dict], dict]:
    """(shape, prompt messages, {"chosen": text, "rejected": text}) of one row, or ValueError naming `where`."""
    if isinstance(record, dict) and "prompt" not in record and "chosen" in record and "rejected" in record:
        record = _implicit_prompt(record, where)
    if not isinstance(record, dict) or not all(key in record for key in ("prompt", "chosen", "rejected")):
        raise ValueError(f"{where} is not a preference row; give each line {ROW_HELP}")
    prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
    if all(isinstance(value, str) for value in (prompt, chosen, rejected)):
        shape, prompt = "text", [{"role": "user", "content": prompt}]
    elif all(isinstance(value, list) for value in (prompt, chosen, rejected)):
        shape = "messages"
        try:
            prompt = check_messages(prompt)
        except ValueError as error:
            raise ValueError(f"{where}: the prompt: {error}") from None
        if prompt[-1]["role"] == "assistant":
            raise ValueError(f"{where}: the prompt ends with an assistant turn; end it with the turn the answers "
                             "reply to")
        chosen, rejected = _one_answer(chosen, "chosen", where), _one_answer(rejected, "rejected", where)
    else:
        raise ValueError(f"{where} mixes text and messages; give each line {ROW_HELP}")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer.strip():
            raise ValueError(f"{where}: the {name} answer is empty; fill it in or remove the row")
    if chosen == rejected:
        raise ValueError(f"{where}: the chosen and the rejected answer are the same, so there is no preference "
                         "to learn; fix or remove the row")
    return shape, prompt, {"chosen": chosen, "rejected": rejected}


def _implicit_prompt(record: dict, where: str) -> dict:
    """A row without "prompt" whose chosen and rejected are whole conversations, split as trl's
    extract_prompt splits it: the prompt is the turns both share from the start, each answer what follows."""
    chosen, rejected = record["chosen"], record["rejected"]
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise ValueError(f"{where} has no 'prompt'; give the prompt its own field (a shared prompt is read from "
                         "'chosen' and 'rejected' only when both are lists of messages)")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if not shared:
        raise ValueError(f"{where} has no 'prompt', and 'chosen' and 'rejected' do not start with the same turn to "
                         "take as one; give the prompt its own field")
    return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def _one_answer(messages, name: str, where: str) -> str:
    """The text of a list of one assistant message."""
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "assistant" \
            or not isinstance(messages[0].get("content"), str):
        raise ValueError(f"{where}: '{name}' must be a list of one message "
                         '{"role": "assistant", "content": "..."}')
    return messages[0]["content"]


def rotten_tomatoes_pairs(seed: int) -> dict:
    """rotten_tomatoes_instruct's questions, the right label chosen and the wrong one rejected, split by movie."""
    split_texts, split_labels, names = _rotten_tomatoes(seed)
    return {split: [(f"{BUILT_IN} {split} example {i + 1}",
                     [{"role": "user", "content": REVIEW_INSTRUCTION.format(text=text)}],
                     {"chosen": names[label], "rejected": names[1 - label]})
                    for i, (text, label) in enumerate(zip(split_texts[split], split_labels[split]))]
            for split in SPLITS}

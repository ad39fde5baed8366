"""The rows of the files people bring, read as records: a row's fields, and where it is for messages.
data.py turns records into tokenized examples; this file only reads and checks them.

Sources (`read_source`):

    .jsonl    one JSON object per line (blank lines skipped)              rows named "FILE line N"
    .json     a JSON array of objects (Alpaca's own file, for one)         "FILE row N"
              or JSON lines, as datasets' to_json writes them              "FILE line N"
    .csv      a header line naming the columns; every value is text        "FILE line N" (the row's last)
    .tsv      the same, the fields separated by tabs                       "FILE line N"
    .parquet  columns of any type, read with pyarrow (pip install pyarrow) "FILE row N"
    a folder written by Hugging Face datasets' `save_to_disk` (pip install datasets): one data set
              (read as one file), or a DatasetDict whose train, validation and test splits are used
              as they are (one with a train split only is read as one file)   "FOLDER SPLIT row N"
    a folder holding one train, one validation and one test file of the kinds above

Row shapes (ROW_SHAPES), one per source; the shape says what kind of task the data is:

    text/label          {"text": "A gorgeous, witty film.", "label": "positive"}      classification
    prompt/completion   {"prompt": "What is 2 + 2?", "completion": "4"}              instruction tuning
                        or trl's conversational one: "prompt" a list of messages, "completion" a list of
                        one assistant message
    messages            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", ...}]}
    sharegpt            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", ...}]}
    alpaca              {"instruction": "Add one.", "input": "41", "output": "42"}    (input optional)

ShareGPT's speakers are human, gpt and system (user and assistant are read too). In CSV and parquet a
`messages` or `conversations` column may hold the conversation as JSON text. Columns named otherwise
are read through `columns`, {field: column} (--columns prompt=question,completion=answer): the column
"question" is read as the field "prompt". A source without a named column is an error naming the
columns it has -- unless it is one of several (`if_present`) and has none of them: it is read as it
is, so one run can mix files whose columns are named differently.
"""
import csv
import difflib
import importlib
import io
import json
from pathlib import Path
from typing import NamedTuple


SPLITS = ("train", "validation", "test")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
# shape -> (kind of task, the fields that identify it); looked up in this order
ROW_SHAPES = {"messages": ("sft", ("messages",)), "sharegpt": ("sft", ("conversations",)),
              "prompt/completion": ("sft", ("prompt", "completion")), "alpaca": ("sft", ("instruction", "output")),
              "text/label": ("classification", ("text", "label"))}
FIELDS = ("text", "label", "prompt", "completion", "messages", "conversations", "instruction", "input", "output")
SHAPES_HELP = ("text and label (classification), prompt and completion, messages, conversations (ShareGPT), or "
               "instruction and output (Alpaca); or read your columns as these with --columns, e.g. "
               "--columns prompt=question,completion=answer")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class Record(NamedTuple):
    """One row as read: its position in its file (file order), where it is (for messages), its fields."""

    index: int
    where: str
    fields: dict


class Table(NamedTuple):
    """The rows of one file (or split of a saved data set), all of one shape."""

    name: str  # the file, for messages
    shape: str  # a key of ROW_SHAPES
    records: list[Record]
    renamed: bool  # its columns were read under the names `columns` gives
    class_names: list[str] | None = None  # a datasets ClassLabel label column's names, by class id


def read_source(path: Path, columns: dict | None = None, if_present: bool = False) -> dict[str, Table]:
    """{"all": table} for one file or data set, or a table per split of SPLITS for a folder of split
    files or a DatasetDict; every row checked for its shape, one shape per source. `if_present`: a file
    with none of the columns `columns` names is read without them."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; check the path")
    renaming = (columns or {}, if_present)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        tables = _read_saved_dataset(path, renaming)
    elif path.is_dir():
        tables = {split: _read_file(_split_file(path, split), renaming) for split in SPLITS}
    else:
        tables = {"all": _read_file(path, renaming)}
    shapes = {table.shape for table in tables.values()}
    if len(shapes) > 1:
        raise ValueError(f"{path}: its splits have different row shapes ({', '.join(sorted(shapes))}); "
                         "use one shape for all three")
    return tables


def parse_columns(text: str | None) -> dict:
    """"prompt=question,completion=answer" -> {"prompt": "question", "completion": "answer"}."""
    if not text:
        return {}
    columns = {}
    for part in text.split(","):
        field, _, column = part.partition("=")
        field, column = field.strip(), column.strip()
        if not field or not column:
            raise ValueError(f"--columns {text}: {part.strip()!r} is not FIELD=COLUMN; write e.g. "
                             "--columns prompt=question,completion=answer")
        if field not in FIELDS:
            raise ValueError(f"--columns {text}: {field!r} is not a field minipeft reads{did_you_mean(field, FIELDS)}; "
                             f"the fields are: {', '.join(FIELDS)}")
        columns[field] = column
    return columns


def did_you_mean(word: str, choices) -> str:
    """" (did you mean 'lora'?)" when `word` is close to one of `choices`, else ""."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_utf8(path: Path) -> str:
    """The file's text (a leading byte-order mark dropped); an error naming the line of a bad byte."""
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


# ----------------------------------------------------------------------------------------------------
# files and folders


def _split_file(folder: Path, split: str) -> Path:
    found = [folder / f"{split}{suffix}" for suffix in FILE_SUFFIXES if (folder / f"{split}{suffix}").is_file()]
    names = " or ".join(f"{split}{suffix}" for suffix in FILE_SUFFIXES)
    if len(found) > 1:
        raise ValueError(f"{folder} has {' and '.join(f.name for f in found)}; keep only one {split} file")
    if not found:
        raise ValueError(f"{folder} has no {names}; a data folder needs a train, a validation and a test file")
    return found[0]


def _read_file(path: Path, renaming: tuple[dict, bool]) -> Table:
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".tsv": _tsv_rows,
               ".parquet": _parquet_rows}
    if path.suffix not in readers:
        raise ValueError(f"{path} is not a {', '.join(FILE_SUFFIXES)} file or a folder; give data in one of "
                         "those, or a folder written by datasets' save_to_disk")
    header, rows = readers[path.suffix](path)
    if not rows:
        raise ValueError(f"{path} has a header but no rows; add one example per row")
    return _table(str(path), header, rows, renaming, _parquet_features(path) if path.suffix == ".parquet" else None)


class DuplicateKey(ValueError):
    """A JSON object that names a key twice: json.loads would keep the last value silently, datasets refuses."""


def _unique_keys(pairs: list[tuple]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) < len(keys):
        raise DuplicateKey(f"names the key {next(k for k in keys if keys.count(k) > 1)!r} twice in one object; "
                           "keep one")
    return dict(pairs)


def json_loads(text: str):
    """json.loads, refusing an object that names a key twice (DuplicateKey, its message to follow the place)."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def _jsonl_rows(path: Path) -> tuple[None, list[tuple[str, dict]]]:
    text = read_utf8(path)
    if not text.strip():
        raise ValueError(f"{path} is empty; it needs one JSON object per line")
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON may hold U+2028
        if not line.strip():
            continue
        try:
            record = json_loads(line)
        except DuplicateKey as err:
            raise ValueError(f"{path} line {number} {err}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number} is not valid JSON ({err.msg}); make each line one "
                             'object like {"text": "...", "label": 1}') from None
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {number} is not a JSON object; make each line one object "
                             'like {"text": "...", "label": 1}')
        rows.append((f"{path} line {number}", record))
    return None, rows


def _json_rows(path: Path) -> tuple[None, list[tuple[str, dict]]]:
    text = read_utf8(path)
    if not text.strip():
        raise ValueError(f"{path} is empty; it needs a JSON array of objects")
    if not text.lstrip().startswith("["):  # JSON lines under a .json name
        return _jsonl_rows(path)
    try:
        records = json_loads(text)
    except DuplicateKey as err:
        raise ValueError(f"{path} {err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); a .json file holds one "
                         "array of objects, or one object per line") from None
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise ValueError(f"{path} row {number} is not a JSON object; make every row an object")
    return None, [(f"{path} row {number}", record) for number, record in enumerate(records, start=1)]


def _tsv_rows(path: Path) -> tuple[list[str], list[tuple[str, dict]]]:
    return _csv_rows(path, delimiter="\t")


def _csv_rows(path: Path, delimiter: str = ",") -> tuple[list[str], list[tuple[str, dict]]]:
    text = read_utf8(path)
    if not text.strip():
        raise ValueError(f"{path} is empty; it needs a header line naming the columns, then one example per row")
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = []
    try:
        header = list(reader.fieldnames or [])
        twice = [column for i, column in enumerate(header) if column in header[:i]]
        if twice:
            raise ValueError(f"{path} names the column {twice[0]!r} twice in its header; rename one of them")
        for record in reader:
            where = f"{path} line {reader.line_num}"  # the line where the row ends (a quoted text may span lines)
            if None in record:  # DictReader's place for the fields past the header's
                raise ValueError(f"{where} has {len(header) + len(record[None])} fields but the header names "
                                 f"{len(header)} columns; quote the fields that hold "
                                 f"{'commas' if delimiter == ',' else 'tabs'}")
            rows.append((where, record))
    except csv.Error as err:
        raise ValueError(f"{path} line {reader.line_num} is not valid CSV ({err}); fix the quoting "
                         "on that line") from None
    return header, rows


def _parquet_rows(path: Path) -> tuple[list[str], list[tuple[str, dict]]]:
    parquet = _optional("pyarrow.parquet", "pyarrow", f"read {path}")
    try:
        table = parquet.read_table(path)
    except Exception as err:  # pyarrow's own errors (ArrowInvalid, OSError, ...): not a parquet file
        raise ValueError(f"{path} is not a readable parquet file ({err}); write it again") from None
    return table.column_names, [(f"{path} row {i}", row) for i, row in enumerate(table.to_pylist(), start=1)]


def _parquet_features(path: Path) -> dict | None:
    """The columns' datasets features ({"label": {"_type": "ClassLabel", "names": [...]}, ...}) that datasets
    writes into a parquet file's metadata and reads back, if it wrote them."""
    metadata = _optional("pyarrow.parquet", "pyarrow", f"read {path}").read_schema(path).metadata or {}
    try:
        return json.loads(metadata[b"huggingface"])["info"]["features"]
    except (KeyError, TypeError, ValueError):  # not written by datasets, or not as it writes them
        return None


def _read_saved_dataset(path: Path, renaming: tuple[dict, bool]) -> dict[str, Table]:
    datasets = _optional("datasets", "datasets", f"read {path}, a folder written by datasets' save_to_disk")
    saved = datasets.load_from_disk(str(path))
    if not isinstance(saved, datasets.DatasetDict):
        return {"all": _dataset_table(f"{path}", saved, renaming)}
    if set(saved) == {"train"}:
        return {"all": _dataset_table(f"{path} train", saved["train"], renaming)}
    if not set(SPLITS) <= set(saved):
        raise ValueError(f"{path} has the splits {', '.join(saved)}; a saved DatasetDict needs train, validation "
                         "and test (or train alone, split 80/10/10)")
    return {split: _dataset_table(f"{path} {split}", saved[split], renaming) for split in SPLITS}


def _dataset_table(name: str, dataset, renaming: tuple[dict, bool]) -> Table:
    rows = [(f"{name} row {i}", row) for i, row in enumerate(dataset.to_list(), start=1)]
    if not rows:
        raise ValueError(f"{name} has no rows; add some")
    return _table(name, dataset.column_names, rows, renaming, dataset.features.to_dict())


def _optional(module: str, package: str, purpose: str):
    """An optional package's module, or a ValueError saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"to {purpose}, install {package}: pip install {package}") from None


# ----------------------------------------------------------------------------------------------------
# columns and shapes


def _table(name: str, header: list[str] | None, rows: list[tuple[str, dict]], renaming: tuple[dict, bool],
           features: dict | None = None) -> Table:
    """The rows with the columns of `renaming` = ({field: column}, if_present) read as those fields, every
    row checked to have the first row's shape. `header`: the columns of a CSV, parquet file or data set
    (None for JSON, whose rows each name theirs; the first row's decide if_present). `features`: datasets'
    description of the columns, whose ClassLabel label column names the classes its integers number."""
    columns, if_present = renaming
    if if_present and not set(columns.values()) & set(rows[0][1] if header is None else header):
        columns = {}
    if header is not None:
        _check_columns(name, header, columns)
    records, shape, first = [], None, None
    for index, (where, raw) in enumerate(rows):
        if header is None:
            _check_columns(where, list(raw), columns, word="field")
        fields = {**{k: v for k, v in raw.items() if k not in columns.values()},
                  **{field: raw[column] for field, column in columns.items()}}
        this = row_shape(fields)
        if shape is None:
            shape = _first_shape(where if header is None else name, fields, list(raw), header is not None)
            first = where.removeprefix(f"{name} ")  # "line 1"
        elif this != shape:
            raise _not_of_shape(where, fields, this, shape, first)
        records.append(Record(index, where, fields))
    label = (features or {}).get(columns.get("label", "label"), {})
    class_names = label.get("names") if isinstance(label, dict) and label.get("_type") == "ClassLabel" else None
    return Table(name, shape, records, bool(columns), class_names)


def _check_columns(where: str, present: list[str], columns: dict, word: str = "column"):
    for field, column in columns.items():
        if column not in present:
            raise ValueError(f"{where} has no {word} {column!r} (--columns {field}={column})"
                             f"{did_you_mean(column, present)}; its {word}s are: {', '.join(present) or 'none'}")


def row_shape(fields: dict) -> str | None:
    """Which of ROW_SHAPES a row's fields have (None: none of them)."""
    return next((shape for shape, (_, needed) in ROW_SHAPES.items() if all(f in fields for f in needed)), None)


def _first_shape(where: str, fields: dict, own_names: list[str], tabular: bool) -> str:
    """The shape of a source's first row (tabular: its columns), or an error naming what is missing.
    `own_names`: the row's fields (columns) as the file names them, before --columns."""
    shape = row_shape(fields)
    if shape is not None:
        return shape
    word = "column" if tabular else "field"
    listed = f"its {word}s are: {', '.join(own_names) or 'none'}"
    if "chosen" in fields and "rejected" in fields:  # trl's preference rows, which preference.py reads
        raise ValueError(f"{where} is a preference pair ({listed}); DPO reads pairs from a .jsonl file of "
                         '{"prompt", "chosen", "rejected"} rows, or a folder of train, validation and test .jsonl '
                         "files: write the pairs as JSON lines")
    if set(fields) == {"text"}:  # trl's language-modelling rows
        raise ValueError(f"{where} has a 'text' {word} and no 'label' ({listed}); text rows are read as "
                         f"classification, so name the label {word} with --columns label=NAME, or, to train a "
                         "language model on plain text, give the text as a .txt file")
    # a shape of which some fields are there: name the ones missing
    partial = max(ROW_SHAPES, key=lambda s: sum(f in fields for f in ROW_SHAPES[s][1]))
    needed = ROW_SHAPES[partial][1]
    if any(f in fields for f in needed):
        missing = next(f for f in needed if f not in fields)
        raise ValueError(f"{where} has no {missing!r} {word}, which a {partial} row needs ({listed}); name the "
                         f"{word} that holds it with --columns {missing}=NAME, or rename it")
    raise ValueError(f"{where} fits no row shape ({listed}); give each row {SHAPES_HELP}")


def _not_of_shape(where: str, fields: dict, this: str | None, shape: str, first: str) -> ValueError:
    if this is None:
        missing = next(f for f in ROW_SHAPES[shape][1] if f not in fields)
        return ValueError(f"{where} has no {missing!r} field, which every {shape} row of this file needs "
                          f"(this row's fields are: {', '.join(fields) or 'none'})")
    return ValueError(f"{where} is a {this} row but {first} is a {shape} row; use one shape per file")


# ----------------------------------------------------------------------------------------------------
# what a row says


def labelled_text(record: Record) -> tuple[str, str]:
    """(text, label) of a text/label row: a non-empty text, and a label (int or text) as text."""
    text, label = record.fields["text"], record.fields["label"]
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{record.where} has a text of type {type(text).__name__}; make every text a string")
    if text is None or not text.strip():
        raise ValueError(f"{record.where} has an empty text; remove the row or fill in its text")
    if label is not None and (not isinstance(label, (int, str)) or isinstance(label, bool)):
        raise ValueError(f"{record.where} has a label of type {type(label).__name__}; make every label an "
                         "integer or a string")
    if label is None or not str(label).strip():
        raise ValueError(f"{record.where} has no label; give every row a label")
    return text, str(label).strip()


def conversation(record: Record, shape: str) -> list[dict]:
    """An instruction row as messages [{"role", "content"}, ...], the last answer last. Prompt/completion
    and Alpaca rows are one user turn and one assistant turn (Alpaca's input follows the instruction
    after a blank line); a conversational prompt/completion row (trl's) is its prompt's messages and its
    completion's one assistant message. An empty answer, no answer, or a malformed field is an error
    naming the row."""
    fields, where = record.fields, record.where
    if shape in ("messages", "sharegpt"):
        key = "messages" if shape == "messages" else "conversations"
        turns = _json_column(fields[key], key, where)
        messages = _checked(_sharegpt_messages(turns, where) if shape == "sharegpt" else turns, where)
    elif shape == "prompt/completion" and isinstance(fields["prompt"], list):
        messages = _conversational_pair(fields["prompt"], fields["completion"], where)
    else:
        prompt_key, answer_key = ("prompt", "completion") if shape == "prompt/completion" else ("instruction", "output")
        extra = fields.get("input") if shape == "alpaca" else None
        for key in (prompt_key, answer_key) + (("input",) if extra is not None else ()):
            if not isinstance(fields[key], str):
                raise ValueError(f"{where}: '{key}' is {type(fields[key]).__name__}, not a string; make it a string")
        prompt = fields[prompt_key] + (f"\n\n{extra}" if extra and extra.strip() else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": fields[answer_key]}]
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers:
        raise ValueError(f"{where}: the conversation has no assistant turn, so there is nothing to learn; "
                         "add the answer as a message with role 'assistant'")
    if any(not m["content"].strip() for m in answers):
        raise ValueError(f"{where}: an empty completion (assistant answer); fill it in or remove the row")
    return messages


def _checked(messages, where: str) -> list[dict]:
    """chat.check_messages, its error naming the row."""
    from .chat import check_messages  # here: chat.py (and jinja2) load only for conversations
    try:
        return check_messages(messages)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _conversational_pair(prompt: list, completion, where: str) -> list[dict]:
    """trl's conversational prompt/completion: the prompt's messages (ending with the turn the answer
    replies to) and a completion of one assistant message, as one conversation."""
    prompt = _checked(prompt, f"{where}: the prompt")
    if prompt[-1]["role"] == "assistant":
        raise ValueError(f"{where}: the prompt ends with an assistant turn; end it with the turn the completion "
                         "replies to")
    if not (isinstance(completion, list) and len(completion) == 1 and isinstance(completion[0], dict)
            and completion[0].get("role") == "assistant" and isinstance(completion[0].get("content"), str)):
        raise ValueError(f"{where}: the prompt is a list of messages, so 'completion' must be a list of one "
                         'message {"role": "assistant", "content": "..."}')
    return prompt + completion


def _json_column(value, key: str, where: str):
    """A conversation as stored: a list, or (CSV, parquet) JSON text holding one."""
    if not isinstance(value, str):
        return value
    try:
        return json_loads(value)
    except DuplicateKey as err:
        raise ValueError(f"{where}: '{key}' {err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: '{key}' is text but not valid JSON ({err.msg}); write the conversation "
                         'as a JSON list like [{"role": "user", "content": "..."}, ...]') from None


def _sharegpt_messages(turns, where: str) -> list[dict]:
    """ShareGPT's [{"from": "human", "value": ...}, {"from": "gpt", ...}] as messages."""
    if not isinstance(turns, list):
        raise ValueError(f"{where}: 'conversations' is {type(turns).__name__}, not a list of {{\"from\", \"value\"}} "
                         "turns")
    messages = []
    for i, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: turn {i} is not {{\"from\": one of {', '.join(SHAREGPT_ROLES)}, \"value\": a "
                             "string}")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"]})
    return messages

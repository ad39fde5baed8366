"""Take a fine-tuned model out of minipeft, into the programs that serve models:

    mp.export(model, "out/hf", format="hf", tokenizer=tok)                 # transformers: the merged model
    mp.export(model, "out/gguf", format="gguf", dtype="q8_0", tokenizer=tok)   # llama.cpp / Ollama: merged
    mp.export(model, "out/lora", format="gguf-lora")                      # llama.cpp --lora on the base GGUF
    mp.export(model, "out/peft", format="peft")                           # peft (and vLLM) on the base model

    format      what is written                                           dtypes
    hf          the family's own HF folder, method merged (hf.py)         fp32 bf16 fp16
    gguf        one GGUF file llama.cpp runs, method merged (gguf.py)     fp32 bf16 fp16 q8_0
    gguf-lora   the LoRA alone as a llama.cpp adapter GGUF (gguf_lora.py) fp32 bf16 fp16 q8_0
    peft        peft's adapter folder, base named by its hub id           fp32

How: the export is written into a temporary folder beside `path`, read back and run (check.py: logits
on a few sentences against the model in memory, and against its base), and only then renamed to
`path`: a failed check, a refused model or a full disk leave nothing behind, and `path` must not exist.
Merging never touches the model in memory (merged.py folds one copied layer at a time).
"""
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError
from tokenizers import Tokenizer

from minipeft.formats.adapter_io import load_adapter, save_adapter
from minipeft.extras import multi
from minipeft.core.registry import get_method
from minipeft.peft_format import PEFT_CONFIG
from minipeft.formats.pretrained import from_pretrained
from . import check, gguf, gguf_lora, hf
from .merged import base_weights, merged_weights

FORMATS = {"hf": ("fp32", "bf16", "fp16"), "gguf": ("fp32", "bf16", "fp16", "q8_0"),
           "gguf-lora": ("fp32", "bf16", "fp16", "q8_0"), "peft": ("fp32",)}
GGUF_FILE, GGUF_LORA_FILE = "model.gguf", "adapter.gguf"
# what the named models are called where their users find them (peft's base_model_name_or_path)
HUB_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct", "minilm": "sentence-transformers/all-MiniLM-L6-v2",
           "gemma3-270m": "google/gemma-3-270m"}


@dataclass
class ExportReport:
    path: Path
    format: str
    dtype: str
    check: check.Check
    seconds: float
    files: dict[str, int] = field(default_factory=dict)  # file (relative to path) -> bytes

    def __str__(self):
        size = sum(self.files.values())
        return (f"exported {self.format} ({self.dtype}) to {self.path}: {len(self.files)} file(s), "
                f"{size / 2**20:.1f} MiB, in {self.seconds:.1f} s\nchecked: {self.check}")


def check_request(path: Path, fmt: str, dtype: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype not in FORMATS[fmt]:
        takers = [f for f, dtypes in FORMATS.items() if dtype in dtypes]
        raise ValueError(f"format {fmt!r} takes dtype {', '.join(FORMATS[fmt])}, not {dtype!r}"
                         + (f" (formats that take {dtype}: {', '.join(takers)})" if takers else ""))
    if path.exists():
        raise ValueError(f"{path} exists; give a new folder (an export never overwrites)")


@dataclass
class Request:
    """What an export is asked for besides the model and the format (export's arguments)."""
    dtype: str
    tokenizer: object
    chat_template: str | Path | None
    max_shard_bytes: int


def check_options(model, fmt: str, request: Request, name: str | None) -> None:
    """ValueError for an argument export cannot use as given, before anything is written."""
    size = request.max_shard_bytes
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"max_shard_bytes must be a whole number of bytes >= 1, not {size!r}")
    if request.tokenizer and not isinstance(request.tokenizer, Tokenizer):
        raise ValueError(f"tokenizer must be the tokenizers.Tokenizer that mp.from_pretrained returned with the "
                         f"model, not a {type(request.tokenizer).__name__}")
    if request.chat_template is not None:
        if fmt not in ("hf", "gguf") or not request.tokenizer:
            raise ValueError("a chat_template is written with the tokenizer, and this export writes none (formats "
                             "hf and gguf do, given the tokenizer mp.from_pretrained returned); leave it out")
        if not Path(request.chat_template).is_file():
            raise ValueError(f"chat_template {request.chat_template}: no such file; give a jinja2 template file")
    if name is not None and model.adapters is None:
        raise ValueError(f"this model has no adapters loaded by name, so none is called {name!r}; leave name out "
                         "to export its method")


def export(model, path, format: str = "hf", dtype: str = "fp32", tokenizer=None, chat_template=None,
           name: str | None = None, max_shard_bytes: int = hf.MAX_SHARD_BYTES) -> ExportReport:
    """Write `model` (its method merged, or its adapter alone) to the new folder `path` in `format`,
    check it (check.py) and return the report. `tokenizer`: the one from_pretrained returned (its files
    go with hf and gguf exports; gguf needs it). `chat_template`: a jinja2 file to ship instead of the
    model's own template (the one it was tuned with). `name`: which of several adapters side by side
    (default: the active one). `max_shard_bytes`: hf's largest safetensors file."""
    path = Path(path)
    check_request(path, format, dtype)
    request = Request(dtype, tokenizer, chat_template, max_shard_bytes)
    check_options(model, format, request, name)
    if model.adapters is not None:
        with multi.single_view(model, model.adapters.active if name is None else name):
            return export(model, path, format, dtype, tokenizer, chat_template, None, max_shard_bytes)
    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.export-{os.getpid()}"
    try:
        tmp.mkdir()
        result = WRITERS[format](model, tmp, request)
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        tmp.rename(path)
    except (OSError, SafetensorError) as error:  # a full disk, a folder we may not write: nothing is kept
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ValueError(f"writing {path} failed ({reason}); nothing was kept: free the space (or pick another "
                         "folder) and export again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportReport(path, format, dtype, result, time.perf_counter() - start, files)


def _probe(model, tokenizer) -> tuple[check.Probes, list]:
    """The probe batch and the model's own logits on it."""
    batch = check.probes(model, tokenizer)
    return batch, check.logits_on(model, batch)


def _write_merged_hf(model, folder: Path, request: Request) -> check.Check:
    weights = merged_weights(model, "hf")
    hf.write_hf(model, weights, folder, request.dtype, request.tokenizer, request.max_shard_bytes,
                request.chat_template)
    batch, memory = _probe(model, request.tokenizer)
    merged = check.logits_on(check.plain_model(model.cfg, weights), batch)
    for name, tensor in weights.items():  # as the files hold them, one tensor at a time (no second model)
        weights[name] = tensor.to(hf.DTYPES[request.dtype]).float()
    written = check.logits_on(check.plain_model(model.cfg, weights), batch)
    del weights
    reloaded = check.logits_on(from_pretrained(folder)[0], batch)
    result = _compare_with_memory(model, reloaded, batch, memory, request.dtype)
    check.check_steps(batch.names, merged, written, reloaded, memory, check.precision(model))
    return result


def _compare_with_memory(model, reloaded: list, batch: check.Probes, memory: list, dtype: str) -> check.Check:
    """Check a merged export (`reloaded`: the logits of the files read back) against the model and its base."""
    base = base_weights(model)
    base_logits = None if base is None else check.logits_on(check.plain_model(model.cfg, base), batch)
    return check.compare(batch.names, reloaded, memory, base_logits, dtype, check.precision(model))


def _write_peft(model, folder: Path, request: Request) -> check.Check:
    base = base_weights(model)
    if base is None and model.peft_config:
        raise ValueError(f"{model.peft_config['method']} trains the base model's own parameters, which a peft "
                         "adapter does not hold; export the merged model (format 'hf' or 'gguf')")
    if model.peft_config and get_method(model.peft_config["method"]).changes_base(**model.peft_config["options"]):
        raise ValueError(f"this {model.peft_config['options']['init']} LoRA rewrote the base weights it sits on, and "
                         "loading its adapter computes that residual again from the original base, which this model "
                         "no longer holds to check the file on; save it unchecked with mp.save_adapter(model, path, "
                         "format='peft'), or export the merged model (format 'hf')")
    save_adapter(model, folder, format="peft")
    config_file = folder / PEFT_CONFIG
    config = json.loads(config_file.read_text())
    source = model.cfg.extra.get("source")
    if source in HUB_IDS:  # as its users name it, not the local cache path
        config["base_model_name_or_path"] = HUB_IDS[source]
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    batch, memory = _probe(model, request.tokenizer)
    reloaded = check.plain_model(model.cfg, base)
    base_logits = check.logits_on(reloaded, batch)
    load_adapter(reloaded, folder)
    return check.compare(batch.names, check.logits_on(reloaded, batch), memory, base_logits, request.dtype,
                         check.precision(model))


def _write_merged_gguf(model, folder: Path, request: Request) -> check.Check:
    weights = merged_weights(model, "gguf")
    gguf.write_gguf(model, weights, folder / GGUF_FILE, request.dtype, request.tokenizer, request.chat_template)
    del weights
    (folder / "Modelfile").write_text(f"FROM ./{GGUF_FILE}\n")  # Ollama: ollama create NAME -f Modelfile
    batch, memory = _probe(model, request.tokenizer)
    reloaded = check.logits_on(from_pretrained(folder / GGUF_FILE)[0], batch)
    return _compare_with_memory(model, reloaded, batch, memory, request.dtype)


def _write_gguf_lora(model, folder: Path, request: Request) -> check.Check:
    gguf_lora.write_gguf_lora(model, folder / GGUF_LORA_FILE, request.dtype)
    base_file = gguf.source_gguf(model.cfg)
    base_line = f"FROM {base_file.resolve()}" if base_file else "FROM ./base.gguf  # the base model's GGUF file"
    (folder / "Modelfile").write_text(f"{base_line}\nADAPTER ./{GGUF_LORA_FILE}\n")
    batch, memory = _probe(model, request.tokenizer)
    reloaded = check.plain_model(model.cfg, base_weights(model))
    base_logits = check.logits_on(reloaded, batch)
    gguf_lora.read_gguf_lora(reloaded, folder / GGUF_LORA_FILE)
    return check.compare(batch.names, check.logits_on(reloaded, batch), memory, base_logits, request.dtype,
                         check.precision(model))


WRITERS = {"hf": _write_merged_hf, "gguf": _write_merged_gguf, "gguf-lora": _write_gguf_lora, "peft": _write_peft}

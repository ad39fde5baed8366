"""Tokenizers for the models pretrained.py loads, built with the `tokenizers` library:

    folder_tokenizer(folder, family)   an HF folder's tokenizer.json; without one, a tokenizer rebuilt
                                       from vocab.txt (WordPiece: BERT, DistilBERT) or vocab.json +
                                       merges.txt (byte-level BPE: GPT-2, RoBERTa, Qwen2/3); else
                                       NoTokenizer, which says what is missing when a command needs it;
                                       tokenizer_config.json's tokens and switches applied as transformers
                                       applies them
    gguf_tokenizer(metadata, path)     rebuilt from a GGUF file's vocabulary: byte-level BPE
                                       (tokenizer.ggml.model "gpt2", with its merges) or SentencePiece-
                                       style BPE ("llama": tokens with scores, merges recovered from them)
    byte_tokenizer()                   ids 0-255 are the bytes, 256 is <|endoftext|> (the tiny models)

Every tokenizer comes back with padding and truncation off (data.py pads batches itself). Those of HF folders and
GGUF files carry their named special tokens as transformers names them (tokenizer.bos_token, .eos_token,
.unk_token, ...: None where there is none), which chat templates see and exports write.

SentencePiece BPE without merges. A SentencePiece BPE model keeps only its pieces and a score per
piece; encoding repeatedly joins the adjacent pair whose joined piece scores highest. A BPE tokenizer
with merges does the same when its merges are every split of a piece into two pieces of the vocabulary,
ranked by the joined piece's score. Ties go to the longer left part, then the longer right part, and
then to vocabulary order (the ranking transformers' GGUF converter uses, which is the reference our
tests compare with). Gemma's files need two readings of their own: its scores are not its merge order
but its piece order is (a piece listed earlier merges first), and its runs of spaces are stored as
spaces where every other piece spells a space "▁".
"""
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

END_OF_TEXT = "<|endoftext|>"
SPIECE_SPACE = "\u2581"  # ▁, SentencePiece's spelling of a space
GGUF_NORMAL, GGUF_CONTROL, GGUF_USER_DEFINED = 1, 3, 4  # tokenizer.ggml.token_type values

# Qwen2's split before byte-level BPE: like GPT-2's, but case-insensitive contractions, one digit at a
# time, and letters may take one leading non-letter (its tokenizer.json's Split pre-tokenizer)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Llama 3's (llama.cpp: "llama-bpe"): the same, but up to three digits at a time
LLAMA3_SPLIT = QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


class NoTokenizer:
    """Stands in for the tokenizer of a model folder that has none: the model loads and runs on token
    ids, and anything that must turn text into ids stops with a ValueError naming the missing files."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __bool__(self):
        return False

    def __getattr__(self, name):
        if name.startswith("__"):  # copy, pickle and friends probe for these: not a tokenizing command
            raise AttributeError(name)
        raise ValueError(f"{self.folder} has no tokenizer (tokenizer.json, vocab.txt, or vocab.json + "
                         "merges.txt); save the model's tokenizer there (transformers: "
                         "tokenizer.save_pretrained(folder))")


def _finish(tokenizer: Tokenizer) -> Tokenizer:
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def _corrupt(path: Path, error: Exception) -> str:
    return f"{path} is corrupt or truncated ({error}); delete it and download again"


# ---------------------------------------------------------------------------------------------
# byte-level BPE (GPT-2's alphabet)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: each byte 0-255 as one printable character (byte-level BPE spells
    tokens with these). Printable Latin-1 bytes stand for themselves; the others (control codes,
    space, ...) get the characters from U+0100 on, in byte order, so 0x20 (space) is 'Ġ'."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + extra)
            extra += 1
    return spelling


def byte_tokenizer() -> Tokenizer:
    """Byte-level tokenizer without merges: id b is byte b (0-255), id 256 is <|endoftext|>."""
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(END_OF_TEXT, special=True, normalized=False)])
    return tokenizer


def byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], split: str | None = None,
                   add_prefix_space: bool = False) -> Tokenizer:
    """Byte-level BPE: text is cut by GPT-2's regex (or the regex `split`), each piece spelled in the
    byte alphabet and merged; add_prefix_space puts a space before a text that does not start with one."""
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


# ---------------------------------------------------------------------------------------------
# HF folders


# The special tokens tokenizer_config.json may name, and those transformers' tokenizer classes name when it
# does not (BertTokenizer for vocab.txt; GPT2Tokenizer, RobertaTokenizer, Qwen2Tokenizer for vocab.json;
# GemmaTokenizer's own five).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
CLASS_SPECIAL_TOKENS = {
    "wordpiece": dict(unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]"),
    "gpt2": dict(bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT),
    "roberta": dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", sep_token="</s>", pad_token="<pad>",
                    cls_token="<s>", mask_token="<mask>"),
    "qwen2": dict(eos_token=END_OF_TEXT, unk_token=END_OF_TEXT, pad_token=END_OF_TEXT),
    "gemma": dict(bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>"),
}
BPE_CLASSES = {"roberta": "roberta", "qwen2": "qwen2", "qwen3": "qwen2"}  # family -> its vocab.json tokenizer's
# The class transformers picks for a folder: tokenizer_config.json's tokenizer_class (without "Fast"), else the one
# of config.json's model_type; those of CLASS_SPECIAL_TOKENS name their tokens where the folder does not
CLASS_KINDS = {"GPT2Tokenizer": "gpt2", "BertTokenizer": "wordpiece", "DistilBertTokenizer": "wordpiece",
               "RobertaTokenizer": "roberta", "Qwen2Tokenizer": "qwen2", "GemmaTokenizer": "gemma"}
MODEL_TYPE_CLASSES = {"gpt2": "GPT2Tokenizer", "bert": "BertTokenizer", "distilbert": "BertTokenizer",
                      "roberta": "RobertaTokenizer", "qwen2": "Qwen2Tokenizer", "qwen3": "Qwen2Tokenizer",
                      **{gemma: "GemmaTokenizer" for gemma in ("gemma", "gemma2", "gemma3", "gemma3_text")}}


def folder_tokenizer(folder: Path, family: str):
    """The folder's tokenizer: tokenizer.json, else one rebuilt from vocab.txt or vocab.json +
    merges.txt as `family` uses them, else a NoTokenizer. tokenizer_config.json's tokens are added
    as transformers adds them: its `added_tokens_decoder`, then its named special tokens (bos_token, ...)
    and `additional_special_tokens` that are not added tokens yet."""
    settings = tokenizer_settings(folder)
    tokenizer_file = folder / "tokenizer.json"
    if tokenizer_file.exists():
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # tokenizers raises a bare Exception for a file it cannot parse
            raise ValueError(_corrupt(tokenizer_file, error)) from None
        specials = _special_tokens(settings, class_special_tokens(folder, settings))
        _add_special_tokens(tokenizer, specials)
        return _finish(_named(tokenizer, specials))
    if (folder / "vocab.txt").exists():
        kind, vocab = "wordpiece", _wordpiece_vocab(folder / "vocab.txt")
    elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        kind, vocab = BPE_CLASSES.get(family, "gpt2"), _json(folder / "vocab.json")
    else:
        return NoTokenizer(folder)
    specials = _special_tokens(settings, CLASS_SPECIAL_TOKENS[kind])
    if kind == "wordpiece":
        tokenizer = _wordpiece(vocab, settings, specials)
    else:
        tokenizer = _bpe_files(folder, vocab, kind, settings)
    _add_configured_tokens(tokenizer, settings)
    _add_special_tokens(tokenizer, specials)
    tokenizer.post_processor = _post_processor(tokenizer, kind, settings, specials)
    return _finish(_named(tokenizer, specials))


def _json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(_corrupt(path, error)) from None


def class_special_tokens(folder: Path, settings: dict) -> dict:
    """The special tokens of the tokenizer class transformers picks for the folder (CLASS_KINDS), which stand
    where tokenizer_config.json names none (GPT-2's <|endoftext|> as bos, eos and unk, ...); {} for the classes
    CLASS_KINDS does not hold."""
    name = settings.get("tokenizer_class") or MODEL_TYPE_CLASSES.get(_json(folder / "config.json").get("model_type"))
    return CLASS_SPECIAL_TOKENS.get(CLASS_KINDS.get(str(name).removesuffix("Fast")), {})


def tokenizer_settings(folder: Path) -> dict:
    """tokenizer_config.json, its tokens overridden by special_tokens_map.json's when it has no added_tokens_decoder
    (a folder saved before transformers 4.34, whose special tokens may be named only there), as transformers reads
    them."""
    settings = _json(folder / "tokenizer_config.json")
    if "added_tokens_decoder" not in settings:
        settings.update(_json(folder / "special_tokens_map.json"))
    return settings


def _added_token(value, special: bool = True) -> AddedToken:
    """A token of tokenizer_config.json, a string or an AddedToken written as {"content": ..., "lstrip": ...}."""
    if not isinstance(value, dict):
        return AddedToken(str(value), special=special)
    return AddedToken(value["content"], special=value.get("special", special),
                      normalized=value.get("normalized", not value.get("special", special)),
                      lstrip=value.get("lstrip", False), rstrip=value.get("rstrip", False),
                      single_word=value.get("single_word", False))


def _special_tokens(settings: dict, defaults: dict) -> dict[str, AddedToken]:
    """name -> special token: the named ones (tokenizer_config.json's, else the class's `defaults`; a null
    setting removes the default), then `additional_special_tokens` / `extra_special_tokens`: a list as extra_0, ...,
    a dict under its own names (transformers 5 names them so: {"image_token": "<image>"})."""
    named = {name: settings.get(name, defaults.get(name)) for name in SPECIAL_TOKEN_NAMES}
    extra = settings.get("additional_special_tokens") or settings.get("extra_special_tokens") or []
    if not isinstance(extra, dict):
        extra = {f"extra_{i}": token for i, token in enumerate(extra)}
    tokens = {**named, **extra}
    return {name: _added_token(token) for name, token in tokens.items() if token is not None}


def _add_special_tokens(tokenizer: Tokenizer, specials: dict[str, AddedToken]) -> None:
    """Adds the special tokens that are not added tokens yet (one missing from the vocabulary gets the next id)."""
    added = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    new = {}
    for token in specials.values():
        if token.content not in added:
            new.setdefault(token.content, token)
    tokenizer.add_special_tokens(list(new.values()))


def _named(tokenizer: Tokenizer, specials: dict[str, AddedToken]) -> Tokenizer:
    """The tokenizer with its named special tokens recorded as transformers' tokenizer names them
    (tokenizer.unk_token = "[UNK]", ...; None where it has none), and in tokenizer.extra_named_tokens those named
    beyond SPECIAL_TOKEN_NAMES ({"image_token": "<image>"}): chat templates see them, exports write them."""
    for name in SPECIAL_TOKEN_NAMES:
        setattr(tokenizer, name, specials[name].content if name in specials else None)
    tokenizer.extra_named_tokens = {name: token.content for name, token in specials.items()
                                    if name not in SPECIAL_TOKEN_NAMES and not name.startswith("extra_")}
    return tokenizer


def _wordpiece_vocab(vocab_file: Path) -> dict[str, int]:
    """vocab.txt: one token per line, the id is the line number."""
    return {line: i for i, line in enumerate(vocab_file.read_text(encoding="utf-8").splitlines())}


def _wordpiece(vocab: dict[str, int], settings: dict, specials: dict[str, AddedToken]) -> Tokenizer:
    """BERT's tokenizer (its [CLS] ... [SEP] comes from _post_processor)."""
    unk = specials.get("unk_token")
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token=unk.content if unk else "[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=settings.get("tokenize_chinese_chars", True),
        strip_accents=settings.get("strip_accents"), lowercase=settings.get("do_lower_case", True))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def _bpe_files(folder: Path, vocab: dict[str, int], kind: str, settings: dict) -> Tokenizer:
    """Byte-level BPE from vocab.json and merges.txt (its first line may be a "#version" comment), with
    tokenizer_config.json's `add_prefix_space` (a space put before the text, as GPT-2 sees most words)."""
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    tokenizer = byte_level_bpe(vocab, merges, QWEN2_SPLIT if kind == "qwen2" else None,
                               bool(settings.get("add_prefix_space")))
    if kind == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    return tokenizer


def _post_processor(tokenizer: Tokenizer, kind: str, settings: dict, specials: dict[str, AddedToken]):
    """What encoding puts around a text, as transformers' classes do: BERT's [CLS] text [SEP], RoBERTa's
    <s> text </s>; else bos and eos where tokenizer_config.json's add_bos_token / add_eos_token ask."""
    def token(name):
        if name not in specials:
            raise ValueError(f"tokenizer_config.json sets {name} to null, but a {kind} tokenizer puts it around "
                             "every text; name the token there")
        return specials[name].content, tokenizer.token_to_id(specials[name].content)
    if kind == "wordpiece":
        (cls, cls_id), (sep, sep_id) = token("cls_token"), token("sep_token")
        return processors.TemplateProcessing(single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
                                             special_tokens=[(cls, cls_id), (sep, sep_id)])
    if kind == "roberta":
        return processors.RobertaProcessing(token("sep_token"), token("cls_token"),
                                            trim_offsets=settings.get("trim_offsets", True),
                                            add_prefix_space=bool(settings.get("add_prefix_space")))

    def end(name):  # bos or eos, where add_bos_token / add_eos_token asks for it
        return token(f"{name}_token") if settings.get(f"add_{name}_token") and f"{name}_token" in specials else None
    return _ends_template(end("bos"), end("eos"))


def _ends_template(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> processors.TemplateProcessing:
    """Puts the (token, id) bos before and eos after a text, each where given (a pair: bos A eos bos B eos)."""
    bos, eos = [bos] if bos else [], [eos] if eos else []
    single = " ".join([*(t for t, _ in bos), "$A", *(t for t, _ in eos)])
    pair = " ".join([single, *(f"{t}:1" for t, _ in bos), "$B:1", *(f"{t}:1" for t, _ in eos)])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(dict.fromkeys(bos + eos)))


def _add_configured_tokens(tokenizer: Tokenizer, settings: dict) -> None:
    """Tokens tokenizer_config.json adds (`added_tokens_decoder`: id -> token), e.g. Qwen's <|im_start|>."""
    added = sorted((int(i), t) for i, t in settings.get("added_tokens_decoder", {}).items())
    for token_id, token in added:
        if tokenizer.token_to_id(token["content"]) is None and tokenizer.get_vocab_size() != token_id:
            raise ValueError(f"tokenizer_config.json adds {token['content']!r} as id {token_id}, but the "
                             f"vocabulary has {tokenizer.get_vocab_size()} tokens; save the tokenizer again")
        new = _added_token(token, special=False)
        (tokenizer.add_special_tokens if new.special else tokenizer.add_tokens)([new])


# ---------------------------------------------------------------------------------------------
# GGUF files

# tokenizer.ggml.pre -> how byte-level BPE splits text (a file without the key is taken as "gpt2").
# llama.cpp's "smollm" (like its "starcoder") first isolates every digit, then applies GPT-2's regex to
# the rest; SmolLM2's own tokenizer.json says the same with Digits(individual_digits=True) + ByteLevel.
# It differs from plain GPT-2 splitting only on whitespace runs before a digit: "x  1" -> x|ĠĠ|1, not
# x|Ġ|Ġ1 (which BPE then spells x|Ġ|Ġ|1, as transformers 5.23's GGUF tokenizer does).
GGUF_PRE_TOKENIZERS = {
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),  # llama.cpp's own name for it
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    "qwen2": lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
    "llama-bpe": lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
}
GGUF_TOKENIZER_MODELS = ("gpt2", "llama")
# the named special tokens transformers reads from a GGUF file's metadata: name -> tokenizer.ggml.{key}_token_id
GGUF_SPECIAL_TOKENS = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}


def gguf_tokenizer(meta: dict, path: Path) -> Tokenizer:
    """The tokenizer a GGUF file's metadata describes (see the module docstring). Control tokens
    (<bos>, <|im_start|>, ...) become special tokens, matched whole and skipped when decoding; user-defined
    ones (Gemma's "\\n\\n", "\\t", ...) are matched whole too."""
    kind, tokens = meta.get("tokenizer.ggml.model"), meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [GGUF_NORMAL] * len(tokens)
    if kind == "gpt2":
        tokenizer = _gguf_byte_level(meta, tokens, path)
    elif kind == "llama":
        tokenizer, tokens = _gguf_sentencepiece(meta, tokens, types)
    else:
        raise ValueError(f"{path}: tokenizer {kind!r} is not supported; supported: {', '.join(GGUF_TOKENIZER_MODELS)}")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == GGUF_CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(meta["tokenizer.ggml.tokens"], types)
                          if kind == GGUF_USER_DEFINED and tokenizer.token_to_id(t) is not None])
    tokenizer.post_processor = _ends_template(_gguf_end(meta, tokens, "bos", kind == "llama"),
                                             _gguf_end(meta, tokens, "eos", False))
    return _finish(_named(tokenizer, _gguf_special_tokens(meta)))


def _gguf_special_tokens(meta: dict) -> dict[str, AddedToken]:
    """name -> special token, for the GGUF_SPECIAL_TOKENS whose id the metadata records (an id beyond the
    vocabulary names none: llama.cpp ignores it)."""
    tokens, specials = meta["tokenizer.ggml.tokens"], {}
    for name, key in GGUF_SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            specials[name] = AddedToken(tokens[token_id], special=True)
    return specials


def _gguf_end(meta: dict, tokens: list[str], end: str, default: bool) -> tuple[str, int] | None:
    """(token, id) of the bos or eos token if tokenizer.ggml.add_{end}_token (else `default`) asks llama.cpp to
    add it to every text, else None."""
    token_id = meta.get(f"tokenizer.ggml.{end}_token_id")
    if meta.get(f"tokenizer.ggml.add_{end}_token", default) and token_id is not None:
        return tokens[token_id], token_id
    return None


def _gguf_byte_level(meta: dict, tokens: list[str], path: Path) -> Tokenizer:
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported; "
                         f"supported: {', '.join(GGUF_PRE_TOKENIZERS)}")
    merges = [tuple(merge.split(" ")) for merge in meta.get("tokenizer.ggml.merges", [])]
    # Llama 3 takes a piece of text that is a token as that token, whether or not its merges reach it
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges,
                                     ignore_merges=pre == "llama-bpe"))
    tokenizer.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _gguf_sentencepiece(meta: dict, tokens: list[str], types: list[int]) -> tuple[Tokenizer, list[str]]:
    """SentencePiece-style BPE with byte fallback (<0x0A> for a byte no piece covers). Returns the
    tokenizer and the tokens as it spells them."""
    gemma = meta["general.architecture"].startswith("gemma")
    if gemma:  # runs of spaces: "  " -> "▁▁", as the other pieces spell spaces
        tokens = [t.replace(" ", SPIECE_SPACE) if t and not t.strip(" ") else t for t in tokens]
    scores = list(range(0, -len(tokens), -1)) if gemma else meta["tokenizer.ggml.scores"]
    vocab = {token: i for i, token in enumerate(tokens)}
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if gemma and unk_id is not None else None
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges_from_scores(tokens, scores), fuse_unk=True,
                                     byte_fallback=True, unk_token=unk))
    space_prefix = meta.get("tokenizer.ggml.add_space_prefix", not gemma)
    spaces = normalizers.Replace(" ", SPIECE_SPACE)
    # add_space_prefix (Llama 2 style): as in llama.cpp and SentencePiece, a ▁ starts each run of text, the first
    # and each after a token matched whole (<s>, ...), even one that starts with a space (" x" -> "▁▁x")
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE_SPACE), spaces]) if space_prefix else spaces
    strip = [decoders.Strip(" ", 1, 0)] if space_prefix else []
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(),
                                           decoders.Fuse(), *strip])
    return tokenizer, tokens


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens of the vocabulary, best first: by the whole token's score,
    then the longer left part, then the longer right part, then vocabulary order. (Walking the tokens
    best first and each token's cuts right to left lists them in that order without a sort.)"""
    vocab = set(tokens)
    best_first = sorted(range(len(tokens)), key=lambda i: (-scores[i], i))
    merges = []
    for i in best_first:
        token = tokens[i]
        for cut in range(len(token) - 1, 0, -1):
            if token[:cut] in vocab and token[cut:] in vocab:
                merges.append((token[:cut], token[cut:]))
    return merges


def read_hf_chat_settings(folder: Path) -> dict:
    """{"chat_template", "bos_token", "eos_token"} from an HF folder's tokenizer_config.json (and
    chat_template.jinja, which newer transformers write instead; bos and eos as tokenizer_settings reads them, else
    the tokenizer class's); missing ones are None."""
    config = tokenizer_settings(folder)
    specials = _special_tokens(config, class_special_tokens(folder, config))
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates [{"name", "template"}]: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return {"chat_template": template, **{name: specials[name].content if name in specials else None
                                          for name in ("bos_token", "eos_token")}}

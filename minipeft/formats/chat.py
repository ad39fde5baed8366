"""Chat templates: a conversation -> the exact text (and tokens) a chat model was trained on.

An instruct model learns one way of writing a conversation down, e.g. SmolLM2's ChatML:

    <|im_start|>system\\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\\n
    <|im_start|>user\\nIs this review positive or negative? ...<|im_end|>\\n
    <|im_start|>assistant\\npositive<|im_end|>\\n

and ships that recipe as a jinja2 template: `chat_template` in an HF folder's tokenizer_config.json (or a
chat_template.jinja file beside it), `tokenizer.chat_template` in a GGUF file's metadata. The loader
(pretrained.py) leaves it on the tokenizer as `tokenizer.chat_template`, with the special tokens the template
sees (`tokenizer.bos_token`, `.eos_token`, `.pad_token`, `.unk_token`, ...). Prompting or fine-tuning the
model in any other format wastes what it learned.

    text = render(template, messages, add_generation_prompt=True, bos_token=..., eos_token=...)
    ids  = apply_chat_template(tokenizer, messages, add_generation_prompt=True)   # mp.apply_chat_template

Templates are rendered as transformers renders them (so the tokens are the same): jinja2's immutable
sandbox (a template is code from a download: it may not touch Python objects' internals or change
what it is given), trim_blocks and lstrip_blocks, loop controls, {% generation %} blocks, the functions
`raise_exception(message)` and `strftime_now(format)` and a `tojson` filter, the variables `tools` and
`documents` (None unless given), each message without its keys set to None; the text is then tokenized
without adding special tokens (the template wrote them). A base model without a template gets PLAIN_TEMPLATE
("User: ...\\nAssistant: ...<eos>").

For training, `encode_conversation` also says which tokens are the assistant's. A template with
{% generation %} blocks says it itself (the blocks' text, as transformers' assistant-token mask reads it).
Otherwise each assistant turn is rendered up to it with the generation prompt (P_i) and through it (F_i);
the characters F_i adds to P_i are that answer, closing tokens included (<|im_end|>: what teaches the
model to stop). A template for which the full rendering does not start with each P_i and F_i cannot be
split this way and is refused by name. `encode_last_answer` then readies a conversation for training, SFT rows
and preference pairs alike: the end-of-text token added where the template leaves it out, the start cut off
to fit max_len.
"""
import datetime
import functools
import json
import re
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from .tokenization import SPECIAL_TOKEN_NAMES

ROLES = ("system", "user", "assistant")
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' mark for where a message to continue ends
ANSWER_MARKS = ("\ue000<generation>", "\ue000</generation>")  # around a {% generation %} block's text (U+E000: private)
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # transformers' test for a template that has such blocks
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # a message's reasoning, in transformers' order

# The fallback for base models: one line per turn, the answer ended by the end-of-text token.
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + eos_token + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
PLAIN_NAME = "the plain fallback template (User: / Assistant:)"
# the tokens a tokenizer without a recorded end-of-text token is asked for, in this order
EOS_CANDIDATES = ("<|im_end|>", "<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


class TemplateError(ValueError):
    """A chat template that fails to render, or cannot mark the assistant's tokens."""


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """`x | tojson(...)`: plain json.dumps with transformers' options (jinja2's own escapes HTML)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    """`strftime_now("%d %b %Y")`: today's date, which Llama 3's templates write into the system turn."""
    return datetime.datetime.now().strftime(fmt)


class GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, which marks the assistant's text for transformers'
    assistant-token mask (trl's assistant_only_loss): rendered as its body between ANSWER_MARKS, in a scope
    of its own as in transformers; render() takes the marks out (answer_spans reads them first)."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return ANSWER_MARKS[0] + caller() + ANSWER_MARKS[1]


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _environment()


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> jinja2.Template:
    return _ENV.from_string(template)  # compiling costs far more than rendering: once per template


def as_transformers_passes(message: dict) -> dict:
    """The message as transformers hands it to a template: keys set to None left out (templates test
    whether a key is there: `tool_calls: None` would render as a call), and a reasoning given under any of
    REASONING_KEYS also under "reasoning_content" (the standard name) and "thinking" (gpt-oss's)."""
    message = {key: value for key, value in message.items() if value is not None}
    reasoning = next((message[key] for key in REASONING_KEYS if key in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def render(template: str, messages: list[dict], add_generation_prompt: bool = False, name: str = "template",
           tools: list[dict] | None = None, documents: list[dict] | None = None, marked: bool = False,
           **special_tokens) -> str:
    """The template's text for `messages` ([{"role", "content"}, ...]); tools, documents and special_tokens
    (bos_token, eos_token) are visible to the template, tools and documents as None when not given (as
    transformers passes them: `tools is not none` is then false). `marked` keeps the ANSWER_MARKS around
    {% generation %} blocks. Any failure is a TemplateError naming the template."""
    messages = [as_transformers_passes(message) for message in messages]
    try:
        text = _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          tools=tools, documents=documents, **special_tokens)
        return text if marked else unmarked(text)[0]
    except TemplateError as error:
        raise TemplateError(f"chat template {name} refused the conversation: {error}") from None
    except jinja2.TemplateError as error:
        raise TemplateError(f"chat template {name} failed to render: {error}") from None
    except Exception as error:  # the template's own code failed: 1 / 0, a filter given a wrong argument, ...
        raise TemplateError(f"chat template {name} failed to render: {type(error).__name__}: {error}") from None


def unmarked(marked: str) -> tuple[str, list[tuple[int, int]]]:
    """The text without its ANSWER_MARKS, and the character span (start, end) of each marked block in it."""
    text, spans, start = "", [], 0
    for piece in re.split("(" + "|".join(map(re.escape, ANSWER_MARKS)) + ")", marked):
        if piece == ANSWER_MARKS[0]:
            start = len(text)
        elif piece == ANSWER_MARKS[1]:
            spans.append((start, len(text)))
        else:
            text += piece
    return text, spans


# ----------------------------------------------------------------------------------------------------
# which template, which special tokens


class ChatFormat:
    """A template with its name (for messages) and the special tokens it may write: {"bos_token": ..., ...}."""

    def __init__(self, template: str, name: str, special: dict[str, str]):
        self.template, self.name, self.special = template, name, special
        self.eos_token = special.get("eos_token") or None

    def render(self, messages: list[dict], add_generation_prompt: bool = False, **variables) -> str:
        """render() with this template; variables: tools=, documents=, marked=."""
        return render(self.template, messages, add_generation_prompt, self.name, **variables, **self.special)


def tokenizer_of(tokenizer_or_model) -> Tokenizer:
    """The tokenizers.Tokenizer given, or the one an object (a model, a pipeline) carries as `.tokenizer`."""
    for candidate in (tokenizer_or_model, getattr(tokenizer_or_model, "tokenizer", None)):
        if isinstance(candidate, Tokenizer):
            return candidate
    raise ValueError("apply_chat_template needs the tokenizer (the second value from_pretrained returns)")


def eos_token(tokenizer) -> str | None:
    """The end-of-text token: the one the loader recorded, else the first of EOS_CANDIDATES it has."""
    recorded = getattr(tokenizer, "eos_token", None)
    if recorded:
        return recorded
    return next((t for t in EOS_CANDIDATES if tokenizer.token_to_id(t) is not None), None)


def special_tokens(tokenizer) -> dict[str, str]:
    """The named special tokens a template sees, as transformers hands them over: each the tokenizer has
    (SPECIAL_TOKEN_NAMES and its extra_named_tokens; one it lacks stays undefined), and eos_token always
    (eos_token(); "" if none: the plain fallback ends each answer with it)."""
    named = {name: getattr(tokenizer, name, None) for name in SPECIAL_TOKEN_NAMES}
    named.update(getattr(tokenizer, "extra_named_tokens", {}))
    return {**{name: token for name, token in named.items() if token}, "eos_token": eos_token(tokenizer) or ""}


def given_template(given: str | Path) -> tuple[str, str]:
    """(template, name) of a template given instead of the model's: a str with jinja2 tags ("{{", "{%") is the
    template itself, as transformers' apply_chat_template(chat_template=...) takes it; anything else, a file."""
    if isinstance(given, str) and ("{{" in given or "{%" in given):
        return given, "given as text"
    path = Path(given)
    try:
        found = path.is_file()
    except OSError:  # a name too long for a file's
        found = False
    if not found:
        raise FileNotFoundError(f"--chat-template {path}: no such file")
    return path.read_text(encoding="utf-8"), str(path)


def chat_format(tokenizer, template_file: str | Path | None = None) -> ChatFormat:
    """--chat-template FILE (or the template's text) if given, else the model's own template, else the
    plain fallback."""
    if template_file is not None:
        template, name = given_template(template_file)
    elif getattr(tokenizer, "chat_template", None):
        template, name = tokenizer.chat_template, "of the model"
    else:
        template, name = PLAIN_TEMPLATE, PLAIN_NAME
    try:
        _compiled(template)
    except jinja2.TemplateSyntaxError as error:
        raise TemplateError(f"chat template {name} is not valid jinja2 (line {error.lineno}: {error.message})") \
            from None
    return ChatFormat(template, name, special_tokens(tokenizer))


# ----------------------------------------------------------------------------------------------------
# conversations -> tokens


def apply_chat_template(tokenizer_or_model, messages: list[dict], add_generation_prompt: bool = False,
                        tokenize: bool = True, chat_template: str | Path | None = None,
                        tools: list[dict] | None = None, documents: list[dict] | None = None,
                        continue_final_message: bool = False):
    """Token ids (or the text, tokenize=False) of `messages` in the model's chat template (or
    `chat_template`: a template file, or the template's text); with add_generation_prompt the text ends
    where the model's answer begins (SmolLM2: "<|im_start|>assistant\\n"), with continue_final_message
    where the final message's text does (see continued). tools (JSON schemas of functions) and documents
    (for retrieval) are shown to templates that write them, as in transformers."""
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt exclude each other: either the model "
                         "continues the final message or it starts a new one; set one of them")
    tokenizer = tokenizer_of(tokenizer_or_model)
    fmt, messages = chat_format(tokenizer, chat_template), check_messages(messages)
    variables = {name: check_dicts(name, value) for name, value in (("tools", tools), ("documents", documents))}
    if continue_final_message:
        text = continued(fmt, messages, **variables)
    else:
        text = fmt.render(messages, add_generation_prompt, **variables)
    return tokenizer.encode(text, add_special_tokens=False).ids if tokenize else text


def continued(fmt: ChatFormat, messages: list[dict], **variables) -> str:
    """The conversation's text up to the end of its final message's content, without what the template
    writes after it (the end of the turn), for the model to go on with that message (a prefilled answer).
    As transformers finds that end: the content is rendered with CONTINUE_TAG after it, and the text is
    cut at the tag (before the spaces in front of it too, if the template trimmed the tag's own)."""
    final = messages[-1]["content"]
    text = fmt.render(messages[:-1] + [{**messages[-1], "content": final + CONTINUE_TAG}], **variables)
    if final.strip() not in text or CONTINUE_TAG.strip() not in text:
        raise TemplateError(f"chat template {fmt.name} does not write the final message as given, so it cannot "
                            "be continued; leave out continue_final_message")
    end = text.rindex(CONTINUE_TAG.strip())
    return text[:end] if text[end:].startswith(CONTINUE_TAG) else text[:end].rstrip()


def check_dicts(name: str, value: list[dict] | None) -> list[dict] | None:
    """tools= or documents=, checked: None, or a list of dicts (a function's JSON schema, a document)."""
    if value is not None and not (isinstance(value, list) and all(isinstance(item, dict) for item in value)):
        raise ValueError(f"{name}= takes a list of dicts (a tool's JSON schema, a document's {{\"title\", \"text\"}}); "
                         "give a function as its JSON schema")
    return value


def check_messages(messages) -> list[dict]:
    """The conversation, checked: a non-empty list of {"role": system|user|assistant, "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation is a non-empty list of {\"role\", \"content\"} messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} is not {{\"role\": one of {', '.join(ROLES)}, \"content\": a string}}")
    return messages


def answer_spans(fmt: ChatFormat, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span (start, end) of every assistant turn in it: the
    template's {% generation %} blocks where it has them (as transformers' assistant mask, and so trl's
    assistant_only_loss, reads them), else what each answer adds to the rendering of the turns before it."""
    if GENERATION_TAG.search(fmt.template):
        text, spans = unmarked(fmt.render(messages, marked=True))
        if not spans:
            raise TemplateError(f"chat template {fmt.name} has {{% generation %}} blocks but marks no answer of "
                                "this conversation; give a template that marks the assistant's turns")
        return text, spans
    text = fmt.render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = fmt.render(messages[:i], add_generation_prompt=True) if i else ""
        through = fmt.render(messages[:i + 1])
        if not through.startswith(before) or not text.startswith(through):
            raise TemplateError(f"chat template {fmt.name} does not render a conversation as the rendering "
                                f"of its first turns plus the rest, so the answer of turn {i} cannot be "
                                "located; give a template that does (--chat-template FILE)")
        spans.append((len(before), len(through)))
    return text, spans


def encode_conversation(tokenizer, fmt: ChatFormat, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """(ids, is_answer): the conversation's tokens, and for each whether it belongs to an assistant
    turn (a token that straddles an answer's first character counts as answer)."""
    ids, is_answer, _ = _encoded(tokenizer, fmt, messages)
    return ids, is_answer


def _encoded(tokenizer, fmt: ChatFormat, messages: list[dict]) -> tuple[list[int], list[bool], int]:
    """encode_conversation's (ids, is_answer), and the index of the last answer's first token."""
    text, spans = answer_spans(fmt, messages)
    encoding = tokenizer.encode(text, add_special_tokens=False)
    is_answer = [any(tok_start < end and tok_end > start for start, end in spans)  # overlaps an answer
                 for tok_start, tok_end in encoding.offsets]
    last = spans[-1][0] if spans else len(text)
    start = next((t for t, (_, tok_end) in enumerate(encoding.offsets) if tok_end > last), len(encoding.ids))
    return encoding.ids, is_answer, start


def encode_last_answer(tokenizer, fmt: ChatFormat, messages: list[dict], max_len: int, eos_id: int | None,
                       where: str) -> tuple[list[int], list[bool], int, int]:
    """(ids, is_answer, start, cut) of a conversation that ends with an assistant turn, for training: the
    end-of-text token added when the template does not close the last answer with it, then `cut` tokens
    taken from the left so that at most max_len remain; ids[start:] is the last answer (and what the
    template writes after a {% generation %} block). An answer that leaves no room for its prompt is a
    ValueError naming `where`."""
    ids, is_answer, start = _encoded(tokenizer, fmt, messages)
    if eos_id is not None and eos_id not in ids[start:]:  # the template did not end the answer
        ids, is_answer = ids + [eos_id], is_answer + [True]
    cut = max(0, len(ids) - max_len)
    if cut >= start:
        raise ValueError(f"{where} takes {len(ids) - start} tokens, which leaves no room for the prompt in "
                         f"--max-len {max_len}; raise --max-len")
    return ids[cut:], is_answer[cut:], start - cut, cut

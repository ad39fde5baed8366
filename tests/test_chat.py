"""Tests for minipeft/formats/chat.py: the model's own chat template, token for token as transformers renders it
(and a template using what SmolLM2's does not, on SmolLM2's and Gemma 3's tokenizers), the sandbox, template
errors, the plain fallback and the answer spans that SFT labels come from."""
import json

import pytest

import minipeft as mp
from minipeft.formats import chat, tokenization
from minipeft.formats.assets import asset_path
from minipeft.formats.pretrained import byte_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Is this review positive or negative? A gorgeous, witty film."},
     {"role": "assistant", "content": "positive"}],
    [{"role": "user", "content": "Write a haiku about rain."},
     {"role": "assistant", "content": "Soft rain on the roof\nthe garden drinks it slowly\nnight smells of wet stone"},
     {"role": "user", "content": "Now one about snow — with an émoji ❄️, please."},
     {"role": "assistant", "content": "White hush on the field ❄️"}],
    [{"role": "user", "content": "def f(x):\n    return x * 2\n\nWhat does f(21) return?"},
     {"role": "assistant", "content": "It returns 42."}],
]


def tokenizers(asset: str):
    """Ours (from our GGUF loader) and transformers' own tokenizer read from the same GGUF file."""
    transformers = pytest.importorskip("transformers")
    _, ours = mp.from_pretrained(asset)
    path = asset_path(asset)
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return ours, theirs


@pytest.fixture(scope="module")
def smollm2_tokenizers():
    return tokenizers("smollm2")


@pytest.fixture(scope="module")
def gemma3_tokenizers():  # a tokenizer that adds <bos> to what it encodes, unlike SmolLM2's
    return tokenizers("gemma3-270m")


@pytest.mark.parametrize("generation_prompt", [False, True])
def test_smollm2_template_matches_transformers_token_for_token(smollm2_tokenizers, generation_prompt):
    ours, theirs = smollm2_tokenizers
    assert ours.chat_template == theirs.chat_template and ours.eos_token == theirs.eos_token == "<|im_end|>"
    for messages in CONVERSATIONS:
        if generation_prompt and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        expected = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert mp.apply_chat_template(ours, messages, add_generation_prompt=generation_prompt, tokenize=False) == text
        assert mp.apply_chat_template(ours, messages, add_generation_prompt=generation_prompt) == list(expected)


# What a template may use beyond SmolLM2's own: block tags on lines of their own (trim_blocks drops the newline
# after a tag, lstrip_blocks the spaces before one), tojson and its options, bos_token, loop controls, strftime_now,
# {% generation %} (the assistant's text for transformers' assistant mask; a scope of its own)
FEATURES_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message.role == 'system' %}
        {% continue %}
    {% endif %}
[{{ message.role }}] {{ message | tojson }}
    {{ message | tojson(indent=2, sort_keys=True) }} {{ message.content | tojson(ensure_ascii=True) }}
    {% if message.role == 'assistant' %}
        {% generation %}{% set inside = 1 %}{{ message.content | trim }}{% endgeneration %}
{{ inside is defined }}
    {% endif %}
{% endfor %}
{% if strftime_now is defined %}{{ strftime_now("%Y") | length }} digits{% endif %}
{% if add_generation_prompt %}[assistant]{% endif %}"""


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("pair, bos", [("smollm2_tokenizers", "<|im_start|>"), ("gemma3_tokenizers", "<bos>")])
def test_what_templates_use_renders_as_in_transformers(pair, bos, generation_prompt, request, tmp_path):
    ours, theirs = request.getfixturevalue(pair)
    path = tmp_path / "features.jinja"
    path.write_text(FEATURES_TEMPLATE)
    texts = []
    for messages in CONVERSATIONS:
        text, ids = (theirs.apply_chat_template(messages, chat_template=FEATURES_TEMPLATE, tokenize=tokenize,
                                                add_generation_prompt=generation_prompt) for tokenize in (False, True))
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        for tokenize, expected in ((False, text), (True, list(ids))):
            assert mp.apply_chat_template(ours, messages, add_generation_prompt=generation_prompt, tokenize=tokenize,
                                          chat_template=path) == expected
        texts.append(text)
    assert all(t.startswith(f"{bos}\n[user] {{") and "4 digits" in t for t in texts)
    assert "system" not in texts[1] and "❄️" in texts[2] and "\\u2744" in texts[2]
    assert "\nWhite hush on the field ❄️False\n" in texts[2]


# What transformers hands a template besides the conversation: tools and documents (None unless given), each
# message without its keys set to None, and a reasoning given under any name also as reasoning_content
HANDED_TEMPLATE = """{% if tools is not none %}[tools] {{ tools | tojson }}
{% endif %}
{% if documents is not none %}[documents] {{ documents | map(attribute='title') | join(', ') }}
{% endif %}
{% for m in messages %}
[{{ m.role }}] {% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}{{ m.content }}
{% if 'tool_calls' in m %}[calls] {{ m.tool_calls | tojson }}{% endif %}
{% endfor %}"""
ASKED = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.mark.parametrize("messages, variables", [
    (ASKED, {}),
    (ASKED, {"tools": [{"type": "function", "function": {"name": "weather", "parameters": {}}}],
             "documents": [{"title": "Paris", "text": "Rain."}]}),
    (ASKED + [{"role": "assistant", "content": "Rain.", "tool_calls": None, "thinking": "It says rain."}], {}),
    (ASKED + [{"role": "assistant", "content": "Rain.", "reasoning": "It says rain."}], {}),
])
def test_what_transformers_hands_a_template(smollm2_tokenizers, tmp_path, messages, variables):
    ours, theirs = smollm2_tokenizers
    path = tmp_path / "handed.jinja"
    path.write_text(HANDED_TEMPLATE)
    expected = theirs.apply_chat_template(messages, chat_template=HANDED_TEMPLATE, tokenize=False, **variables)
    assert mp.apply_chat_template(ours, messages, tokenize=False, chat_template=path, **variables) == expected
    assert ("[tools]" in expected) == bool(variables) and "[calls]" not in expected
    assert ("<think>It says rain.</think>" in expected) == (len(messages) > 1)


@pytest.fixture(scope="module")
def minilm_tokenizers():  # an HF folder's WordPiece tokenizer: [CLS], [SEP], [MASK], ..., but no bos or eos
    transformers = pytest.importorskip("transformers")
    return mp.from_pretrained("minilm")[1], transformers.AutoTokenizer.from_pretrained(asset_path("minilm"))


@pytest.fixture(scope="module")
def named_extra_tokenizers(tmp_path_factory):  # special tokens named beyond bos, eos, ... (Gemma 3's image_token)
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("named_extra")
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "extra_special_tokens": {"image_token": "<|endoftext|>"}}))
    return tokenization.folder_tokenizer(folder, "llama"), transformers.AutoTokenizer.from_pretrained(folder)


# The named special tokens transformers hands a template: each its tokenizer has; one it lacks stays undefined
SPECIALS_TEMPLATE = ("{% for token in [bos_token, unk_token, sep_token, pad_token, cls_token, mask_token, "
                     "image_token] %}{{ token is defined }}:{{ token }} {% endfor %}{{ eos_token }}")


@pytest.mark.parametrize("pair, defined", [("smollm2_tokenizers", 3),  # from a GGUF file: bos, unk, pad
                                           ("minilm_tokenizers", 5),  # an HF folder's: all but bos
                                           ("named_extra_tokenizers", 1)])
def test_templates_see_the_special_tokens_transformers_hands_them(pair, defined, request):
    ours, theirs = request.getfixturevalue(pair)
    expected = theirs.apply_chat_template(CONVERSATIONS[0], chat_template=SPECIALS_TEMPLATE, tokenize=False)
    assert mp.apply_chat_template(ours, CONVERSATIONS[0], chat_template=SPECIALS_TEMPLATE, tokenize=False) == expected
    assert expected.count("True:") == defined


PREFILLED = [{"role": "user", "content": "Is it good?"}, {"role": "assistant", "content": "Yes, because  "}]


@pytest.mark.parametrize("template", [
    None,  # SmolLM2's own: the text stops before <|im_end|>
    "{% for m in messages %}[{{ m.role }}] {{ m.content | trim }}\n{% endfor %}",  # trims the answer's spaces
])
def test_continue_final_message_as_in_transformers(smollm2_tokenizers, template):
    ours, theirs = smollm2_tokenizers
    for tokenize in (False, True):
        expected = theirs.apply_chat_template(PREFILLED, chat_template=template, continue_final_message=True,
                                              tokenize=tokenize, return_dict=False)
        assert mp.apply_chat_template(ours, PREFILLED, chat_template=template, continue_final_message=True,
                                      tokenize=tokenize) == expected
    assert expected[-1] != ours.token_to_id("<|im_end|>")


@pytest.mark.parametrize("template, options, message", [
    ("{% for m in messages %}[{{ m.role }}]{% endfor %}", {}, "does not write the final message as given"),
    (None, {"add_generation_prompt": True}, "continue_final_message and add_generation_prompt exclude each other"),
])
def test_continue_final_message_refused(template, options, message):
    with pytest.raises(ValueError, match=message):
        mp.apply_chat_template(byte_tokenizer(), PREFILLED, chat_template=template, continue_final_message=True,
                               **options)


def test_training_tokens_of_a_tokenizer_that_adds_bos_are_the_templates_own(gemma3_tokenizers):
    """Gemma's tokenizer adds <bos> to what it encodes; a template writes its own, so training adds none."""
    ours, theirs = gemma3_tokenizers
    fmt = chat.chat_format(ours)
    assert fmt.name == chat.PLAIN_NAME  # Gemma 3 270M is a base model: the plain fallback
    assert ours.encode("x").ids[0] == ours.token_to_id("<bos>")
    for messages in CONVERSATIONS[1:]:
        expected = theirs.apply_chat_template(messages, chat_template=chat.PLAIN_TEMPLATE, tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert chat.encode_conversation(ours, fmt, messages)[0] == list(expected)
        assert ours.token_to_id("<bos>") not in expected


def test_answer_tokens_are_the_assistant_turns(smollm2_tokenizers):
    tokenizer, _ = smollm2_tokenizers
    fmt = chat.chat_format(tokenizer)
    ids, is_answer = chat.encode_conversation(tokenizer, fmt, CONVERSATIONS[2])
    assert ids == mp.apply_chat_template(tokenizer, CONVERSATIONS[2])
    answers = tokenizer.decode([t for t, a in zip(ids, is_answer) if a], skip_special_tokens=False)
    assert answers == ("Soft rain on the roof\nthe garden drinks it slowly\nnight smells of wet stone<|im_end|>\n"
                       "White hush on the field ❄️<|im_end|>\n")


# Templates that mark the assistant's text with {% generation %} (trl's *_training.jinja): the answer tokens are the
# marked ones, as transformers' assistant mask (trl's assistant_only_loss) has them
GENERATION_TEMPLATES = [
    # ChatML with the newline after <|im_end|> left out of the answer and an empty thinking block put in it
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}{% if m.role == 'assistant' %}{% generation %}"
    "{{ '<think>\n\n</think>\n\n' + m.content + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ m.content + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    # Phi-3's: ends with <|endoftext|> only when no generation prompt follows (no rendering is a prefix of the next)
    "{% for m in messages %}{{ '<|' + m.role + '|>\n' }}{% if m.role == 'assistant' %}{% generation %}"
    "{{ m.content + '<|end|>\n' }}{% endgeneration %}{% else %}{{ m.content + '<|end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}",
]


@pytest.mark.parametrize("template", GENERATION_TEMPLATES)
def test_answer_tokens_of_generation_blocks_are_transformers_assistant_mask(smollm2_tokenizers, template):
    ours, theirs = smollm2_tokenizers
    fmt = chat.chat_format(ours, template)
    for messages in CONVERSATIONS[1:]:
        expected = theirs.apply_chat_template(messages, chat_template=template, return_assistant_tokens_mask=True,
                                              return_dict=True)
        ids, is_answer = chat.encode_conversation(ours, fmt, messages)
        assert (ids, [int(a) for a in is_answer]) == (list(expected["input_ids"]), list(expected["assistant_masks"]))
        ids, is_answer, start, _ = chat.encode_last_answer(ours, fmt, messages, 512, None, "row 1")
        assert is_answer[start] and not is_answer[start - 1]  # where the last answer starts (the template may go on)


def test_plain_fallback_for_a_model_without_a_template():
    tokenizer = byte_tokenizer()  # no chat_template attribute: a base model
    messages = CONVERSATIONS[1]
    assert mp.apply_chat_template(tokenizer, messages, tokenize=False) == (
        "You answer in one word.\n\nUser: Is this review positive or negative? A gorgeous, witty film.\n"
        "Assistant: positive<|endoftext|>\n")
    assert mp.apply_chat_template(tokenizer, messages[:2], add_generation_prompt=True, tokenize=False).endswith(
        "witty film.\nAssistant:")
    assert chat.chat_format(tokenizer).name == chat.PLAIN_NAME


def test_template_file_overrides_and_sees_special_tokens(tmp_path):
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = "{{ 'model template' }}"
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}\n{% endfor %}")
    text = mp.apply_chat_template(tokenizer, CONVERSATIONS[0], tokenize=False, chat_template=template)
    assert text == "[user] What is the capital of France?<|endoftext|>\n"
    assert mp.apply_chat_template(tokenizer, CONVERSATIONS[0], tokenize=False) == "model template"
    # the template's text itself, as transformers takes chat_template=; a string without tags names a file
    assert mp.apply_chat_template(tokenizer, CONVERSATIONS[0], tokenize=False,
                                  chat_template=template.read_text()) == text
    for missing in (tmp_path / "none.jinja", "x" * 5000):  # the long one is no file's name (an OSError before)
        with pytest.raises(FileNotFoundError, match="--chat-template .*: no such file"):
            mp.apply_chat_template(tokenizer, CONVERSATIONS[0], chat_template=missing)


@pytest.mark.parametrize("template, message", [
    ("{{ messages.__class__.__mro__ }}", "failed to render"),  # sandbox: no Python internals
    ("{% set _ = messages.append(1) %}", "failed to render"),  # immutable: the input cannot change
    ("{{ raise_exception('only user turns') }}", "only user turns"),
    ("{{ messages | length / 0 }}", "failed to render: ZeroDivisionError"),  # the template's own arithmetic
    ("{{ messages | tojson(colour=1) }}", "failed to render: TypeError"),
    ("{% for m in messages %}{{ m.content | upper }", "not valid jinja2"),
])
def test_a_template_that_fails_names_itself(tmp_path, template, message):
    path = tmp_path / "bad.jinja"
    path.write_text(template)
    with pytest.raises(chat.TemplateError, match=message) as error:
        mp.apply_chat_template(byte_tokenizer(), CONVERSATIONS[0], chat_template=path)
    assert str(path) in str(error.value)


def test_a_template_that_is_not_prefix_consistent_is_refused(tmp_path):
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = "{{ messages | length }} turns: {% for m in messages %}{{ m.content }};{% endfor %}"
    with pytest.raises(chat.TemplateError, match="answer of turn 1 cannot be located"):
        chat.encode_conversation(tokenizer, chat.chat_format(tokenizer), CONVERSATIONS[1][1:])


def test_training_tokens_end_the_last_answer_once_and_lose_their_left(tmp_path):
    """encode_last_answer: the end-of-text token is added only when the template does not write it after
    the last answer; a cut takes tokens from the left (the answer keeps its place at the end); an answer
    with no room left for its prompt names the row."""
    tokenizer, eos = byte_tokenizer(), 256
    messages = [{"role": "user", "content": "Is it good?"}, {"role": "assistant", "content": "yes"}]
    without_eos = tmp_path / "no_eos.jinja"
    without_eos.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                           "{% if add_generation_prompt %}assistant:{% endif %}")
    cases = {  # template -> the last answer's tokens, decoded
        None: " yes<|endoftext|>\n",  # the plain fallback writes it
        without_eos: " yes\n<|endoftext|>",  # added after what the template wrote
    }
    for template, answer in cases.items():
        fmt = chat.chat_format(tokenizer, template)
        ids, is_answer, start, cut = chat.encode_last_answer(tokenizer, fmt, messages, 64, eos, "row 1")
        assert cut == 0 and len(ids) == len(is_answer) and ids.count(eos) == 1
        assert tokenizer.decode(ids[start:], skip_special_tokens=False) == answer
        assert all(is_answer[start:]) and not is_answer[start - 1]
        shorter = chat.encode_last_answer(tokenizer, fmt, messages, len(ids) - 1, eos, "row 1")
        assert shorter == (ids[1:], is_answer[1:], start - 1, 1)
        no_eos = chat.encode_last_answer(tokenizer, fmt, messages, 64, None, "row 1")[0]
        assert no_eos == (ids if template is None else ids[:-1])
        with pytest.raises(ValueError, match=f"row 1 takes {len(ids) - start} tokens, which leaves no room"):
            chat.encode_last_answer(tokenizer, fmt, messages, len(ids) - start, eos, "row 1")


def test_hf_folder_settings(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ bos_token }}x", "bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    assert tokenization.read_hf_chat_settings(tmp_path) == {"chat_template": "{{ bos_token }}x", "bos_token": "<s>",
                                                    "eos_token": "</s>"}
    (tmp_path / "chat_template.jinja").write_text("from the file")
    assert tokenization.read_hf_chat_settings(tmp_path)["chat_template"] == "from the file"


@pytest.mark.parametrize("config", [
    {"eos_token": "</s>"},  # special_tokens_map.json's tokens override these (a folder from before transformers 4.34)
    {"eos_token": "</s>", "added_tokens_decoder": {}},  # but not a newer folder's
    {"tokenizer_class": "GPT2Tokenizer", "added_tokens_decoder": {}},  # the class names <|endoftext|> bos and eos
])
def test_hf_folder_bos_and_eos_are_the_ones_transformers_reads(config, tmp_path):
    transformers = pytest.importorskip("transformers")
    byte_tokenizer().save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **config}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": {
        "content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}}))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    settings = tokenization.read_hf_chat_settings(tmp_path)
    assert (settings["bos_token"], settings["eos_token"]) == (theirs.bos_token, theirs.eos_token)
    assert tokenization.folder_tokenizer(tmp_path, "llama").unk_token == theirs.unk_token


def test_bad_messages():
    for messages in ([], [{"role": "robot", "content": "hi"}], [{"role": "user", "content": 3}], "hello"):
        with pytest.raises(ValueError, match="conversation|message 0"):
            mp.apply_chat_template(byte_tokenizer(), messages)
    for tools in ([len], {"name": "f"}):  # a function, where transformers would read its docstring; a lone schema
        with pytest.raises(ValueError, match="tools= takes a list of dicts"):
            mp.apply_chat_template(byte_tokenizer(), CONVERSATIONS[0], tools=tools)

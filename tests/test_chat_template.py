"""Chat templates: transformers' ids for Llama-3 and ChatML (Qwen2.5) templates, the byte
tokenizer's template, prefix consistency and one-line errors."""

import json
import os
import pickle

import pytest

from lcx.data import ByteTokenizer, HFTokenizer
from lcx.data.chat_template import BYTE_TEMPLATE, ChatTemplate, check_messages
from lcx.errors import UserError

# meta-llama/Meta-Llama-3-8B-Instruct's tokenizer_config.json "chat_template".
LLAMA3_TEMPLATE = r"""{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"""  # noqa: E501

# Qwen/Qwen2.5-7B-Instruct's tokenizer_config.json "chat_template" (ChatML).
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501

# The pre-tokenizer splits of Llama 3's and Qwen2's tokenizer.json.
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


CONVERSATIONS = {
    "user_only": [_user("What is the capital of France?")],
    "system_user_assistant": [
        {"role": "system", "content": "You answer in one word."},
        _user("Capital of Italy?"),
        _assistant("Rome."),
    ],
    "multi_turn": [
        _user("Count to three."),
        _assistant("One, two, three."),
        _user("  And back, with spaces around?  \n"),
        _assistant("\nThree, two, one.\n\n"),
    ],
    "unicode": [
        {"role": "system", "content": "Réponds en français — 日本語も 🤖"},
        _user("Ünïcödé: naïve café, 東京, emoji 👩‍💻, tab\tend"),
        _assistant("D'accord ! ✓ 你好"),
    ],
}
SPELLS_SPECIALS = {
    "llama3": [_user("say <|eot_id|> then <|start_header_id|>x"), _assistant("ok<|eot_id|>")],
    "qwen25": [_user("say <|im_end|>\n<|im_start|>system"), _assistant("<|im_end|>ok")],
}


def _corpus() -> list[str]:
    texts = [m["content"] for c in CONVERSATIONS.values() for m in c]
    texts += ["system user assistant You are Qwen, created by Alibaba Cloud."]
    texts += ["The quick brown fox jumps over the lazy dog.\n\n  def f(x): return x + 1\n"]
    return texts * 20


def _bpe_dir(directory, split, specials, settings, bos=None):
    """A byte-level BPE tokenizer.json trained here with `specials`, and its settings."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(_corpus(), trainer)
    if bos:  # Llama 3's own post-processor adds BOS; a chat template must not get two
        bos_id = tokenizer.token_to_id(bos)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **settings}, f)
    return str(directory)


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
    settings = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "chat_template": LLAMA3_TEMPLATE,
    }
    directory = tmp_path_factory.mktemp("llama3")
    return _bpe_dir(
        directory, LLAMA3_SPLIT, [*specials, "<|eot_id|>"], settings, "<|begin_of_text|>"
    )


@pytest.fixture(scope="module")
def qwen25_dir(tmp_path_factory):
    settings = {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": QWEN25_TEMPLATE,
    }
    directory = tmp_path_factory.mktemp("qwen25")
    return _bpe_dir(
        directory, QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], settings
    )


@pytest.fixture(scope="module")
def directories(llama3_dir, qwen25_dir):
    return {"llama3": llama3_dir, "qwen25": qwen25_dir}


def _lcx(directory):
    return HFTokenizer(directory, add_bos=False, add_eos=False)


@pytest.mark.torch
@pytest.mark.parametrize("template", ["llama3", "qwen25"])
def test_ids_equal_transformers_apply_chat_template(directories, template):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(directories[template])
    tokenizer = _lcx(directories[template])
    for name, messages in CONVERSATIONS.items():
        for prompt in (False, True):
            expected = reference.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=prompt, return_dict=False
            )
            text = reference.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt
            )
            assert tokenizer.render_chat(messages, add_generation_prompt=prompt) == text, name
            assert tokenizer.apply_chat_template(messages, prompt) == list(expected), (name, prompt)


@pytest.mark.torch
@pytest.mark.parametrize("template", ["llama3", "qwen25"])
def test_special_tokens_spelled_in_content_stay_text_as_transformers_sanitized(
    directories, template
):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(directories[template])
    tokenizer = _lcx(directories[template])
    messages = SPELLS_SPECIALS[template]
    for prompt in (False, True):
        sanitized = reference.apply_chat_template(
            messages, add_generation_prompt=prompt, sanitize_control_tokens=True, return_dict=False
        )
        parsed = reference.apply_chat_template(
            messages, add_generation_prompt=prompt, return_dict=False
        )
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=prompt)
        assert ids == list(sanitized)
        assert ids != list(parsed)  # transformers' default makes them special ids


def test_special_tokens_in_content_are_text_and_the_templates_are_special(llama3_dir):
    tokenizer = _lcx(llama3_dir)
    eot = tokenizer._tokenizer.token_to_id("<|eot_id|>")
    messages = SPELLS_SPECIALS["llama3"]
    ids = tokenizer.apply_chat_template(messages)
    # Two turns close with <|eot_id|>; the three in the content are text.
    assert ids.count(eot) == 2
    assert ids[0] == tokenizer._tokenizer.token_to_id("<|begin_of_text|>")
    assert ids[1] != ids[0]  # one BOS, from the template alone
    # Decoding drops special ids only: the content's spellings come back as text.
    expected = "user\n\nsay <|eot_id|> then <|start_header_id|>xassistant\n\nok<|eot_id|>"
    assert tokenizer.decode(ids) == expected.encode()


def test_a_tokenizer_that_rendered_a_chat_still_pickles(llama3_dir):
    tokenizer = _lcx(llama3_dir)
    ids = tokenizer.apply_chat_template(CONVERSATIONS["multi_turn"])
    copy = pickle.loads(pickle.dumps(tokenizer))  # data-loading workers get copies
    assert copy.apply_chat_template(CONVERSATIONS["multi_turn"]) == ids


@pytest.mark.parametrize("which", ["bytes", "llama3", "qwen25"])
def test_growing_prefixes_render_as_prefixes(directories, which):
    tokenizer = ByteTokenizer() if which == "bytes" else _lcx(directories[which])
    for name, messages in CONVERSATIONS.items():
        whole = tokenizer.apply_chat_template(messages)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
            through = tokenizer.apply_chat_template(messages[: i + 1])
            assert through[: len(before)] == before, (name, i)
            assert whole[: len(through)] == through, (name, i)
            assert len(through) > len(before)


def test_byte_template_brackets_turns_with_bos_and_eos():
    tokenizer = ByteTokenizer()
    messages = CONVERSATIONS["system_user_assistant"]
    text = tokenizer.render_chat(messages)
    assert text == (
        "<s><|system|>\nYou answer in one word.</s><|user|>\nCapital of Italy?</s>"
        "<|assistant|>\nRome.</s>"
    )
    ids = tokenizer.apply_chat_template(messages)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert ids.count(tokenizer.eos_id) == len(messages) and ids.count(tokenizer.bos_id) == 1
    assert tokenizer.decode(ids) == text.replace("<s>", "").replace("</s>", "").encode()
    prompt = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True)
    assert bytes(prompt[-len(b"<|assistant|>\n") :]) == b"<|assistant|>\n"
    # An assistant turn's tokens are its content's bytes and the EOS that stops generation.
    assert ids[len(prompt) :] == [*b"Rome.", tokenizer.eos_id]
    # Only the template makes special ids, whatever the flags for documents say.
    assert ByteTokenizer(add_bos=False, add_eos=False).apply_chat_template(messages) == ids


def test_byte_template_keeps_content_that_spells_specials_as_bytes():
    tokenizer = ByteTokenizer()
    content = "a </s> b <s> <pad> \ufdd0\ufdd1 é"
    ids = tokenizer.apply_chat_template([_user(content), _assistant("ok")])
    assert ids.count(tokenizer.eos_id) == 2 and ids.count(tokenizer.bos_id) == 1
    assert tokenizer.pad_id not in ids
    assert bytes(ids[1 : 1 + len(b"<|user|>\n") + len(content.encode())]) == (
        b"<|user|>\n" + content.encode()
    )
    assert tokenizer.apply_chat_template([]) == [tokenizer.bos_id]


def test_tojson_strftime_and_named_templates(tmp_path):
    source = "{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|{{ bos_token }}"
    template = ChatTemplate(source, "test", {"bos_token": "<s>"})
    text = template.render([_user('<b>é</b> & "q"')])
    assert text == '[{"role": "user", "content": "<b>é</b> & \\"q\\""}]|4|<s>'
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    directory = _settings_dir(tmp_path / "named", {"chat_template": named})
    assert HFTokenizer(directory, add_bos=False, add_eos=False).render_chat([]) == "plain"
    # chat_template.jinja comes first, as transformers reads them.
    (tmp_path / "named" / "chat_template.jinja").write_text("from {{ 'file' }}\n")
    assert HFTokenizer(directory, add_bos=False, add_eos=False).render_chat([]) == "from file"


def _settings_dir(directory, settings):
    """A tokenizer directory with a word-level tokenizer.json and `settings`."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(settings, f)
    return str(directory)


def _one_line_error(call) -> str:
    with pytest.raises(UserError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_directory_without_a_template_names_both_places(tmp_path):
    directory = _settings_dir(tmp_path / "plain", {"eos_token": "a"})
    tokenizer = HFTokenizer(directory, add_bos=False, add_eos=False)  # fine for documents
    message = _one_line_error(lambda: tokenizer.apply_chat_template([_user("hi")]))
    assert directory in message
    assert (
        "chat_template.jinja" in message and "'chat_template' in tokenizer_config.json" in message
    )
    named = _settings_dir(tmp_path / "named", {"chat_template": [{"name": "x", "template": "y"}]})
    message = _one_line_error(
        lambda: HFTokenizer(named, add_bos=False, add_eos=False).render_chat([])
    )
    assert "no 'default'" in message and "['x']" in message


@pytest.mark.parametrize(
    "messages, where",
    [
        ({"role": "user", "content": "hi"}, "messages: expected a list"),
        ("hello", "messages: expected a list"),
        ([_user("a"), "b"], "messages[1]: expected a dict"),
        ([{"content": "a"}], "messages[0]: expected a dict with 'role' (str)"),
        ([{"role": "user", "content": None}], "messages[0]"),
        ([_user("a"), {"role": "user", "content": [{"type": "text", "text": "a"}]}], "messages[1]"),
        ([{"role": 1, "content": "a"}], "messages[0]"),
    ],
)
def test_bad_messages_fail_in_one_line_naming_the_index(messages, where):
    message = _one_line_error(lambda: ByteTokenizer().apply_chat_template(messages))
    assert message.startswith(where)
    assert (
        "'role' (str) and 'content' (str)" in message or "{'role': str, 'content': str}" in message
    )
    _one_line_error(lambda: check_messages(messages))


def test_template_errors_are_one_line_user_errors(tmp_path):
    gemma_like = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate\nuser/assistant') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    directory = _settings_dir(tmp_path / "gemma", {"chat_template": gemma_like})
    tokenizer = HFTokenizer(directory, add_bos=False, add_eos=False)
    assert tokenizer.render_chat([_user("a"), _assistant("b")]) == "ab"
    message = _one_line_error(lambda: tokenizer.apply_chat_template([_assistant("b")]))
    assert "Conversation roles must alternate user/assistant" in message
    assert os.path.join(directory, "tokenizer_config.json") in message
    qwen_like = ChatTemplate("{{ messages[0]['role'] }}", "qwen.jinja", {})
    message = _one_line_error(lambda: qwen_like.render([]))  # Qwen 2.5 with no message
    assert message.startswith("qwen.jinja: the chat template failed:") and "element 0" in message
    with pytest.raises(UserError, match="broken.jinja: the chat template does not compile"):
        ChatTemplate("{% if %}", "broken.jinja", {})


def test_the_sandbox_refuses_python_internals():
    for source in (
        "{{ messages.__class__.__mro__ }}",
        "{% set ns = namespace(_x=1) %}",
        "{% set ns = namespace() %}{% set ns._x = 1 %}",
        "{{ messages.append(1) }}",
    ):
        with pytest.raises(UserError, match="evil.jinja: the chat template failed"):
            ChatTemplate(source, "evil.jinja", {}).render([_user("a")])
    assert "{% generation %}" not in BYTE_TEMPLATE
    tracked = (
        "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    )
    assert ChatTemplate(tracked, "tracked", {}).render([_assistant("x")]) == "x"


@pytest.mark.parametrize("which", ["llama3", "qwen25"])
def test_sft_weights_cover_the_replies_and_stops_end_the_turn(directories, which):
    """lcx.posttrain.sft on real templates: the weighted tokens decode to the replies
    (and the end of turn), even a reply starting with a newline, which BPE may merge
    with the header's; generation stops at the template's end of turn."""
    from lcx.posttrain.sft import encode, turn_stop_ids

    tokenizer = _lcx(directories[which])
    for reply in ("Paris is the capital.", "\nA reply after a newline."):
        messages = [
            _user("Capital of France?"),
            _assistant(reply),
            _user("Sure?"),
            _assistant("Yes."),
        ]
        ids, weights = encode(tokenizer, messages)
        trained = tokenizer.decode(ids[weights == 1]).decode()
        assert reply.strip() in trained and "Yes." in trained
        assert "Capital" not in trained and "Sure" not in trained
    stops = turn_stop_ids(tokenizer)
    end = {"llama3": "<|eot_id|>", "qwen25": "<|im_end|>"}[which]
    assert tokenizer._tokenizer.token_to_id(end) in stops

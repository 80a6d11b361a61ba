"""Chat templates: a conversation rendered by a jinja template, ready to encode.

A template renders the way Hugging Face transformers' `apply_chat_template` does: a
sandboxed jinja2 environment (`ImmutableSandboxedEnvironment`, `trim_blocks`,
`lstrip_blocks`, the loop-control extension) with transformers' globals and filters
(`raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, a `namespace`
and `dict` that refuse underscore attributes) and its variables: `messages`,
`add_generation_prompt`, `tools=None`, `documents=None` and the special-token strings
(`bos_token`, `eos_token`, `unk_token`, `sep_token`, `pad_token`, `cls_token`,
`mask_token`). A Hugging Face directory's template comes from `chat_template.jinja`, else
from `tokenizer_config.json`'s `chat_template` (a string, or named templates of which
"default" is used), the order transformers reads them in.

Message content is text. `ChatTemplate.pieces` brackets every control token (special
token) that a message spells with private marker characters before rendering, so the
encoder can tell the template's own control tokens (scaffolding, encoded as special ids)
from the same strings inside content (encoded as text, as a document's are). Transformers
by default parses them in content too; `apply_chat_template(...,
sanitize_control_tokens=True)` is its equivalent of what lcx does.
"""

from __future__ import annotations

import functools
import json
import os
import re
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.sandbox
import jinja2.utils

from lcx.errors import UserError, one_line

TEMPLATE_FILE = "chat_template.jinja"
SETTINGS_FILE = "tokenizer_config.json"
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

# lcx's byte tokenizer's template: BOS, then each turn as a plain-text role header, its
# content and EOS, so a model trained on it stops at EOS; the generation prompt is the
# assistant header. Nothing depends on later turns, so growing prefixes render as prefixes.
BYTE_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|' + message.role + '|>\\n' + message.content + eos_token }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

# Unicode noncharacters (for a program's internal use) that bracket a control token or a
# marker character spelled inside a message: `START token END` is text, never special.
_START, _END = "\ufdd0", "\ufdd1"


class ChatTemplate:
    """A compiled chat template with its special-token variables and control tokens.

    Args:
      source: the jinja text.
      where: where it comes from, for error messages (a file, or "the byte tokenizer").
      variables: template variables beside `messages`, e.g. {"bos_token": "<s>"}.
      control_tokens: the strings the encoder turns into special ids; inside messages
        they stay text.
    """

    def __init__(self, source: str, where: str, variables: dict, control_tokens=()):
        self.source, self.where, self.variables = source, where, dict(variables)
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise UserError(f"{where}: the chat template does not compile: {one_line(e)}") from None
        # Longest first, so a token wins over the tokens it contains; marker characters
        # spelled in content are escaped the same way.
        spelled = sorted(set(control_tokens) - {""}, key=len, reverse=True) + [_START, _END]
        self._control = re.compile("|".join(map(re.escape, spelled)))
        self._marked = re.compile(f"{_START}({self._control.pattern}){_END}|[{_START}{_END}]")

    def render(self, messages, add_generation_prompt: bool = False) -> str:
        """The rendered text of `messages`: a list, possibly empty, of {"role": str,
        "content": str} dicts (other keys reach the template as given)."""
        check_messages(messages)
        return self._render([dict(m) for m in messages], add_generation_prompt)

    def pieces(self, messages, add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
        """The rendering as (text, is_text) pieces: is_text marks a control token that a
        message spelled (encode it as text); the other pieces are the template's text,
        whose control tokens are special ids."""
        check_messages(messages)
        marked = [self._mark(m) for m in messages]
        parts = self._marked.split(self._render(marked, add_generation_prompt))
        # split() alternates text and captured tokens; a lone marker (a template cut the
        # brackets apart) captures None and is dropped, still separating the text around it.
        out = [(parts[0], False)] if parts[0] else []
        for i in range(1, len(parts), 2):
            if parts[i]:
                out.append((parts[i], True))
            if parts[i + 1]:
                out.append((parts[i + 1], False))
        return out

    def _mark(self, value):
        """`value` with every control token in its strings bracketed by the markers."""
        if isinstance(value, str):
            return self._control.sub(lambda m: _START + m.group(0) + _END, value)
        if isinstance(value, dict):
            return {key: self._mark(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._mark(item) for item in value]
        return value

    def _render(self, messages: list, add_generation_prompt: bool) -> str:
        variables = {"tools": None, "documents": None, **self.variables}
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=bool(add_generation_prompt), **variables
            )
        except Exception as e:  # only the template's code runs here: its failure, not lcx's
            kind = "" if isinstance(e, jinja2.TemplateError) else f"{type(e).__name__}: "
            raise UserError(
                f"{self.where}: the chat template failed: {kind}{one_line(e)}"
            ) from None


def check_messages(messages) -> None:
    """A one-line UserError unless `messages` is a list of {"role": str, "content": str}."""
    valid = "a list of {'role': str, 'content': str} dicts"
    if not isinstance(messages, (list, tuple)):
        raise UserError(f"messages: expected {valid}, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            shown = repr(message)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise UserError(
                f"messages[{i}]: expected a dict with 'role' (str) and 'content' (str), got {shown}"
            )


def load_chat_template(directory: str, control_tokens=()) -> ChatTemplate:
    """The chat template of a Hugging Face tokenizer directory: `chat_template.jinja`, else
    `tokenizer_config.json`'s `chat_template`; a UserError when it has neither."""
    settings_path = os.path.join(directory, SETTINGS_FILE)
    tokenizer_json = {}  # tokenizer_config.json: a Hugging Face file, not an lcx config
    if os.path.isfile(settings_path):
        with open(settings_path, encoding="utf-8") as f:
            tokenizer_json = json.load(f)
    variables = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = tokenizer_json.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            variables[name] = value
    template_path = os.path.join(directory, TEMPLATE_FILE)
    if os.path.isfile(template_path):
        with open(template_path, encoding="utf-8") as f:
            return ChatTemplate(f.read(), template_path, variables, control_tokens)
    source = _default_template(tokenizer_json.get("chat_template"), settings_path)
    if source is None:
        raise UserError(
            f"{directory}: no chat template (neither {TEMPLATE_FILE} nor a 'chat_template' "
            f"in {SETTINGS_FILE}); add one, or use a tokenizer that has one"
        )
    return ChatTemplate(source, settings_path, variables, control_tokens)


def _default_template(value, where: str) -> str | None:
    """tokenizer_config.json's chat_template: a string, or named templates' "default"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": ..., "template": ...}], as transformers saves
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if isinstance(value, dict) and isinstance(value.get("default"), str):
        return value["default"]
    names = sorted(map(str, value)) if isinstance(value, dict) else type(value).__name__
    raise UserError(f"{where}: chat_template has no 'default' template (found: {names})")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' tojson: plain json.dumps, no HTML escaping, non-ASCII kept."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format):
    return datetime.now().strftime(format)


def _check_attribute(name):
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"a chat template cannot set the underscore attribute {name!r} on a namespace"
        )


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace() without underscore attributes, which lead to Python's internals."""

    def __init__(*args, **kwargs):  # jinja's signature: namespace(self=...) stays legal
        self, attributes = args[0], dict(*args[1:], **kwargs)
        for name in attributes:
            _check_attribute(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name, value):
        _check_attribute(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


class _Dict:
    """dict() for templates without the type itself (no attribute path to its class)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, transformers' assistant-mask marks: lcx
    finds assistant tokens by rendering prefixes, so the block renders as its body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.cache
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The one sandboxed environment every chat template compiles in."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        namespace=_Namespace,
        dict=_Dict(),
    )
    return env

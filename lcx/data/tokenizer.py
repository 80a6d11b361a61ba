"""Tokenizers: the byte tokenizer (default) and Hugging Face `tokenizer.json` files.

Every document is encoded as [BOS] + its tokens + [EOS], the special tokens added here
explicitly (`add_bos`, `add_eos`), never by a tokenizer's own post-processor, so the
rows lcx packs look the same whatever the tokenizer file says. Bytes are bytes: the
byte tokenizer takes any file without loss; a byte-level BPE `tokenizer.json` (GPT-2,
Llama 3, Qwen) does too, invalid UTF-8 included, through its 256 byte tokens.
Conversations are the exception: `apply_chat_template` renders them with a chat template
(`lcx.data.chat_template`), which writes its own BOS and end-of-turn tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re

import numpy as np

from lcx.data.chat_template import BYTE_TEMPLATE, ChatTemplate, load_chat_template
from lcx.errors import UserError

# config.data.tokenizer: "bytes", "checkpoint" (init.hf_checkpoint's tokenizer.json) or
# a directory holding tokenizer.json.
TOKENIZERS = ("bytes", "checkpoint", "<directory with tokenizer.json>")


_INVALID_BYTES = re.compile("([\udc80-\udcff])")


def token_dtype(vocab_size: int):
    """The smallest unsigned dtype that holds every id: uint16 up to 65,536 ids, else uint32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """Token id = byte value; BOS, EOS, PAD follow; vocabulary padded to a multiple of 128."""

    name: str = "bytes-v1"
    bos_id: int = 256
    eos_id: int = 257
    pad_id: int = 258
    add_bos: bool = True
    add_eos: bool = True

    @property
    def vocab_size(self) -> int:
        return 384  # 259 ids rounded up to a multiple of 128

    @property
    def cache_key(self) -> str:
        """What the token cache's fingerprint needs to know of this tokenizer."""
        flags = "" if self.add_bos and self.add_eos else f"/bos={self.add_bos},eos={self.add_eos}"
        return self.name + flags

    def encode(self, data: bytes) -> np.ndarray:
        """[BOS] + bytes + [EOS] as uint16 ids."""
        body = np.frombuffer(data, dtype=np.uint8).astype(np.uint16)
        head = [self.bos_id] if self.add_bos else []
        tail = [self.eos_id] if self.add_eos else []
        return np.concatenate([head, body, tail]).astype(np.uint16)

    def decode(self, ids) -> bytes:
        """Bytes of the ids below 256; special ids are dropped."""
        ids = np.asarray(ids)
        return ids[ids < 256].astype(np.uint8).tobytes()

    @property
    def chat_template_key(self) -> str:
        """What a cache of rendered conversations must know of the template: its source."""
        return BYTE_TEMPLATE

    def token_name(self, token: int) -> str:
        """A token's name: "<s>", "</s>", "<pad>" for the special ids, a byte as the character
        of that code point, "<unusedN>" for the ids that pad the vocabulary."""
        names = {self.bos_id: "<s>", self.eos_id: "</s>", self.pad_id: "<pad>"}
        if token in names:
            return names[token]
        return bytes([token]).decode("latin-1") if token < 256 else f"<unused{token}>"

    def render_chat(self, messages, add_generation_prompt: bool = False) -> str:
        """`messages` in lcx's byte chat template (`lcx.data.chat_template.BYTE_TEMPLATE`):
        "<s>", then per turn "<|role|>\\n" + content + "</s>"; the generation prompt is
        "<|assistant|>\\n". "<s>" and "</s>" stand for the BOS and EOS ids.

        Args:
          messages: a list of {"role": str, "content": str} dicts.
          add_generation_prompt: end with the assistant header, for a model to answer.
        """
        return _byte_chat_template().render(messages, add_generation_prompt)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> list[int]:
        """The ids of `render_chat(messages, add_generation_prompt)`: the template's "<s>" and
        "</s>" are BOS and EOS (whatever `add_bos` / `add_eos` say), every other character
        its UTF-8 bytes, content included, even where it spells "</s>"."""
        specials = {"<s>": self.bos_id, "</s>": self.eos_id, "<pad>": self.pad_id}
        ids = []
        for text, is_text in _byte_chat_template().pieces(messages, add_generation_prompt):
            parts = [text] if is_text else _BYTE_SPECIALS.split(text)
            for i, part in enumerate(parts):  # odd parts are the template's special tokens
                ids += [specials[part]] if i % 2 else list(part.encode("utf-8"))
        return ids


_BYTE_SPECIALS = re.compile("(<s>|</s>|<pad>)")


@functools.cache
def _byte_chat_template() -> ChatTemplate:
    tokens = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    return ChatTemplate(BYTE_TEMPLATE, "the byte tokenizer", tokens, tokens.values())


def _gpt2_byte_chars() -> list[str]:
    """The character byte-level BPE uses for each byte value (GPT-2's table).

    `tokenizers` applies this map inside its ByteLevel pre-tokenizer and decoder but does
    not expose it; lcx needs it to encode invalid UTF-8 and decode to exact bytes.
    """
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _token_name(value):
    """A special token's text from tokenizer_config.json (a string or {"content": ...})."""
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
    """A Hugging Face `tokenizer.json` in a local directory, through the tokenizers library.

    BOS, EOS and PAD come from `tokenizer_config.json` (bos_token, eos_token, pad_token),
    else from `config.json`'s ids; PAD falls back to EOS (padding is masked anyway). The chat
    template (`apply_chat_template`) comes from `chat_template.jinja` or
    `tokenizer_config.json`, read on first use.
    """

    def __init__(self, directory: str, *, add_bos: bool = True, add_eos: bool = True):
        import tokenizers

        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise UserError(f"data.tokenizer: {directory!r} holds no tokenizer.json")
        with open(path, "rb") as f:
            raw = f.read()
        self.path, self.add_bos, self.add_eos = path, add_bos, add_eos
        self.directory = directory
        self._chat, self._scaffold = None, None
        try:
            self._tokenizer = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # the Rust library raises its own exception types
            raise UserError(f"{path}: not a tokenizer the tokenizers library reads ({e})") from None
        # Document text is data: a literal "<s>" in a file is text, not a special token.
        self._tokenizer.encode_special_tokens = True
        self.name = "hf-" + hashlib.sha256(raw).hexdigest()[:16]
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        ids = self._special_ids(directory)
        self.bos_id, self.eos_id = ids.get("bos"), ids.get("eos")
        self.pad_id = ids.get("pad", self.eos_id if self.eos_id is not None else 0)
        for flag, kind in ((add_bos, "bos"), (add_eos, "eos")):
            if flag and ids.get(kind) is None:
                raise UserError(
                    f"data.add_{kind}=True but {directory} names no {kind}_token (in "
                    f"tokenizer_config.json or config.json); set data.add_{kind}=False"
                )
        decoder = json.loads(raw).get("decoder") or {}
        self._byte_level = decoder.get("type") == "ByteLevel"
        self._special = {
            t.content for t in self._tokenizer.get_added_tokens_decoder().values() if t.special
        }
        self._bytes_of_id = None
        if self._byte_level:
            self._byte_ids = [self._tokenizer.token_to_id(c) for c in _gpt2_byte_chars()]
            self._char_byte = {c: b for b, c in enumerate(_gpt2_byte_chars())}

    def _special_ids(self, directory) -> dict[str, int]:
        """bos / eos / pad ids named by the directory's tokenizer_config.json or config.json."""
        ids = {}
        settings = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(settings):
            with open(settings) as f:
                named = json.load(f)
            for kind in ("bos", "eos", "pad"):
                token = _token_name(named.get(f"{kind}_token"))
                if token is not None and self._tokenizer.token_to_id(token) is not None:
                    ids[kind] = self._tokenizer.token_to_id(token)
        model_config = os.path.join(directory, "config.json")
        if os.path.isfile(model_config):
            with open(model_config) as f:
                numbered = json.load(f)
            for kind in ("bos", "eos", "pad"):
                value = numbered.get(f"{kind}_token_id")
                value = value[0] if isinstance(value, list) and value else value
                if kind not in ids and isinstance(value, int):
                    ids[kind] = value
        return ids

    @property
    def cache_key(self) -> str:
        """What the token cache's fingerprint needs to know of this tokenizer."""
        return f"{self.name}/bos={self.add_bos},eos={self.add_eos}"

    def _text_ids(self, data: bytes) -> list[int]:
        """The tokens of `data` without special tokens; invalid UTF-8 bytes as byte tokens."""
        try:
            return self._tokenizer.encode(data.decode("utf-8"), add_special_tokens=False).ids
        except UnicodeDecodeError:
            if not self._byte_level:  # no byte tokens to spell them: replaced, lossy
                text = data.decode("utf-8", errors="replace")
                return self._tokenizer.encode(text, add_special_tokens=False).ids
        ids = []
        # surrogateescape turns each invalid byte b into U+DC00 + b: split the text there.
        for piece in _INVALID_BYTES.split(data.decode("utf-8", errors="surrogateescape")):
            if len(piece) == 1 and "\udc80" <= piece <= "\udcff":
                byte_id = self._byte_ids[ord(piece) - 0xDC00]
                if byte_id is not None:
                    ids.append(byte_id)
                    continue
                piece = "\ufffd"  # a vocabulary without that byte token: replaced
            if piece:
                ids += self._tokenizer.encode(piece, add_special_tokens=False).ids
        return ids

    def encode(self, data: bytes) -> np.ndarray:
        """[BOS] + tokens + [EOS] in the smallest dtype that holds the vocabulary."""
        head = [self.bos_id] if self.add_bos else []
        tail = [self.eos_id] if self.add_eos else []
        return np.asarray(head + self._text_ids(data) + tail, token_dtype(self.vocab_size))

    def decode(self, ids) -> bytes:
        """The bytes of `ids`, special tokens dropped (exact for byte-level tokenizers)."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if not self._byte_level:
            return self._tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8")
        table = self._id_bytes()
        return b"".join(table[i] for i in ids if 0 <= i < len(table))

    def token_name(self, token: int) -> str:
        """The token's string in the vocabulary ("<|eot_id|>", "Ġthe", ...)."""
        return self._tokenizer.id_to_token(token)

    def render_chat(self, messages, add_generation_prompt: bool = False) -> str:
        """The text of `messages` rendered by the directory's chat template, as
        transformers' `apply_chat_template(messages, tokenize=False)` renders it.

        Args:
          messages: a list of {"role": str, "content": str} dicts.
          add_generation_prompt: end with the template's assistant header.
        """
        return self._chat_template().render(messages, add_generation_prompt)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> list[int]:
        """The token ids of `messages` in the directory's chat template.

        The same ids as transformers' `apply_chat_template(messages, tokenize=True,
        add_generation_prompt=...)`: the rendering is encoded without the tokenizer's own
        BOS/EOS (the template writes them) and the special tokens the template writes are
        special ids. One difference: a special token spelled inside a message (content or
        role) is text, encoded as a document's text is, where transformers makes it the
        special id unless given `sanitize_control_tokens=True` (lcx's ids equal those).
        Tested for byte-level BPE (Llama 3, Qwen); a transformers tokenizer class that adds
        its own Python-side encoding rules may differ.

        Args:
          messages: a list of {"role": str, "content": str} dicts.
          add_generation_prompt: end with the template's assistant header.
        """
        pieces = self._chat_template().pieces(messages, add_generation_prompt)
        ids = []
        for i, (text, is_text) in enumerate(pieces):
            encode = self._content_ids if is_text else self._template_ids
            ids += encode(text) if i == 0 else self._continued(encode, text)
        return ids

    def _template_ids(self, text: str) -> list[int]:
        """The ids of a template's own text, its special tokens as special ids."""
        if self._scaffold is None:  # a twin of the tokenizer that parses special tokens
            self._scaffold = type(self._tokenizer).from_str(self._tokenizer.to_str())
            self._scaffold.encode_special_tokens = False
        return self._scaffold.encode(text, add_special_tokens=False).ids

    def _content_ids(self, text: str) -> list[int]:
        """The ids of text from a message: special tokens spelled in it stay text."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def _continued(self, encode, text: str) -> list[int]:
        """`encode(text)` for text that continues a rendering: encoded after a newline that
        is then cut, so a SentencePiece-style tokenizer adds no word-start space there
        (transformers encodes the pieces of a sanitized chat the same way)."""
        newline = self._template_ids("\n")
        ids = encode("\n" + text)
        return ids[len(newline) :] if ids[: len(newline)] == newline else encode(text)

    def __getstate__(self):
        """Picklable, for data-loading workers: the compiled chat template (jinja code
        objects) and the special-token twin are rebuilt on first use."""
        return {**self.__dict__, "_chat": None, "_scaffold": None}

    @property
    def chat_template_key(self) -> str:
        """What a cache of rendered conversations must know of the template: its source
        and variables (no rendering, so a template refusing some turns still has one)."""
        template = self._chat_template()
        return template.source + "\0" + repr(sorted(template.variables.items()))

    def _chat_template(self) -> ChatTemplate:
        """The directory's chat template, loaded on first use."""
        if self._chat is None:
            self._chat = load_chat_template(self.directory, self._special)
        return self._chat

    def _id_bytes(self) -> list[bytes]:
        """Each id's bytes (special tokens: none), built on the first decode."""
        if self._bytes_of_id is None:
            table = []
            for i in range(self.vocab_size):
                token = self._tokenizer.id_to_token(i)
                if token is None or token in self._special:
                    table.append(b"")
                elif all(c in self._char_byte for c in token):
                    table.append(bytes(self._char_byte[c] for c in token))
                else:  # an added, non-special token stored as plain text
                    table.append(token.encode("utf-8"))
            self._bytes_of_id = table
        return self._bytes_of_id


def text_ids(tokenizer, text: str) -> list[int]:
    """The tokens of `text` alone (no BOS, no EOS)."""
    ids = tokenizer.encode(text.encode("utf-8")).tolist()
    ids = ids[1:] if tokenizer.add_bos else ids
    return ids[:-1] if tokenizer.add_eos else ids


def prompt_ids(tokenizer, text: str) -> list[int]:
    """[BOS] + the tokens of `text` (no EOS: a model is to continue it)."""
    ids = tokenizer.encode(text.encode("utf-8")).tolist()
    return ids[:-1] if tokenizer.add_eos else ids


def make_tokenizer(data_cfg, hf_checkpoint: str = ""):
    """The tokenizer `config.data` (lcx.settings.DataSettings) names: `tokenizer`,
    `add_bos`, `add_eos`."""
    choice = data_cfg.tokenizer
    flags = dict(add_bos=data_cfg.add_bos, add_eos=data_cfg.add_eos)
    if choice == "bytes":
        return ByteTokenizer(**flags)
    if choice == "checkpoint":
        if not hf_checkpoint:
            raise UserError("data.tokenizer='checkpoint' needs init.hf_checkpoint=DIR")
        choice = hf_checkpoint
    if not os.path.isdir(choice):
        raise UserError(f"data.tokenizer={choice!r}; valid: {TOKENIZERS}")
    return HFTokenizer(choice, **flags)


def check_vocabulary(tokenizer, vocab_size: int) -> None:
    """One-line error when the tokenizer's ids do not fit the model's embedding."""
    if tokenizer.vocab_size > vocab_size:
        where = getattr(tokenizer, "path", tokenizer.name)
        raise UserError(
            f"{where}: the tokenizer's vocabulary of {tokenizer.vocab_size} tokens exceeds "
            f"the model's vocab_size={vocab_size}"
        )

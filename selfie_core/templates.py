"""Interpretation prompts: text parts and placeholders -> prompt text, token ids and insert positions.

A template is a sequence of text parts and placeholders, as in the original SelfIE code, e.g.
``("[INST]", 0, 0, 0, 0, 0, "[/INST] Sure, I will summarize the message:")``. Every placeholder (any ``int``)
becomes the text ``"_ "``; the tokens it adds, found by tokenizing the prompt prefix before and after it with the
tokenizer's default special tokens (exactly as the original ``InterpretationPrompt`` does), are the insert
positions where the extracted hidden state is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import SelfieInputError

PLACEHOLDER_TEXT = "_ "
#: ``preset``'s chat formats: built-in renderings, the tokenizer's own chat template, or the original raw text
CHAT_FORMATS = ("chatml", "llama2", "llama3", "tokenizer", "raw")

_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")

# name -> (user parts, assistant prefix). The raw form (no chat template) of "summarize" is the original's default.
PRESETS: dict[str, tuple[tuple[str | int, ...], str]] = {
    "summarize": ((0, 0, 0, 0, 0), "Sure, I will summarize the message:"),
    "describe": ((0, 0, 0, 0, 0), "Sure, I will describe what this is about:"),
    "entity": ((0, 0, 0, 0, 0), "Sure, the entity this refers to is"),
    "meaning": (("What is the meaning of ", 0, 0, 0, 0, 0, "?"), "Sure, it means"),
    "materials": ((0, 0, 0, 0, 0, " What is it made of?"), "Sure, it is made of"),
    "repeat": (("Repeat the following: ", 0, 0, 0, 0, 0), "Sure, here it is:"),
}


@dataclass(frozen=True)
class PreparedPrompt:
    """A template rendered for one tokenizer."""

    text: str
    input_ids: tuple[int, ...]
    insert_positions: tuple[int, ...]

    @property
    def first_insert(self) -> int:
        return self.insert_positions[0]


def _is_placeholder(part: Any) -> bool:
    return isinstance(part, int) and not isinstance(part, bool)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text).input_ids)


@dataclass(frozen=True)
class InterpretationTemplate:
    """Text parts and placeholders (any ``int``, conventionally 0)."""

    parts: tuple[str | int, ...] = ("[INST]", 0, 0, 0, 0, 0, "[/INST] Sure, I will summarize the message:")
    name: str | None = None

    def __post_init__(self) -> None:
        parts = tuple(self.parts)
        for part in parts:
            if not isinstance(part, str) and not _is_placeholder(part):
                raise SelfieInputError(f"template parts must be strings or int placeholders, got {part!r}")
        object.__setattr__(self, "parts", parts)

    @property
    def num_placeholders(self) -> int:
        return sum(1 for p in self.parts if _is_placeholder(p))

    @property
    def text_with_placeholders(self) -> str:
        return "".join(PLACEHOLDER_TEXT if _is_placeholder(p) else p for p in self.parts)

    def prepare(self, tokenizer) -> PreparedPrompt:
        """Render for ``tokenizer``: the prompt text, its ids and the positions the placeholders occupy."""
        if self.num_placeholders == 0:
            raise SelfieInputError("the interpretation template has no placeholders: add at least one (e.g. 0)")
        prompt = ""
        positions: list[int] = []
        for part in self.parts:
            if _is_placeholder(part):
                start = len(_encode(tokenizer, prompt))
                prompt += PLACEHOLDER_TEXT
                end = len(_encode(tokenizer, prompt))
                positions.extend(range(start, end))
            else:
                prompt += part
        ids = tuple(_encode(tokenizer, prompt))
        if not positions:
            raise SelfieInputError("the placeholders of the interpretation template map to no tokens")
        if max(positions) >= len(ids):
            raise SelfieInputError(
                "the placeholder positions fall outside the tokenized interpretation prompt; "
                "put some text after the last placeholder"
            )
        return PreparedPrompt(text=prompt, input_ids=ids, insert_positions=tuple(positions))

    # -- serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"parts": list(self.parts), "name": self.name}

    @classmethod
    def from_dict(cls, data: dict) -> "InterpretationTemplate":
        if not isinstance(data, dict) or "parts" not in data:
            raise SelfieInputError("a template dict needs a 'parts' list")
        return cls(parts=tuple(data["parts"]), name=data.get("name"))

    # -- builders ------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, tokenizer=None, chat_format: str | None = None) -> "InterpretationTemplate":
        """A named preset. Without a tokenizer (or with ``chat_format="raw"``) it is the original
        ``[INST] ... [/INST]`` text form; with a tokenizer it uses the tokenizer's own chat template when it has one.
        """
        if name not in PRESETS:
            raise SelfieInputError(f"unknown template preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        user_parts, prefix = PRESETS[name]
        fmt = chat_format or ("tokenizer" if tokenizer is not None and getattr(tokenizer, "chat_template", None) else "raw")
        if fmt not in CHAT_FORMATS:
            raise SelfieInputError(f"unknown chat format {fmt!r}; use one of {', '.join(CHAT_FORMATS)}")
        if fmt == "tokenizer" and tokenizer is None:
            raise SelfieInputError("chat format 'tokenizer' needs a tokenizer")
        if fmt == "raw":
            return cls(parts=("[INST]", *user_parts, "[/INST] " + prefix), name=name)
        return cls.chat(tokenizer if fmt == "tokenizer" else fmt, user_parts, prefix, name=name)

    @classmethod
    def chat(
        cls,
        tokenizer_or_format,
        user_parts: Sequence[str | int],
        assistant_prefix: str = "",
        system: str | None = None,
        name: str | None = None,
    ) -> "InterpretationTemplate":
        """A template built from one user turn and the start of the assistant's answer.

        ``tokenizer_or_format`` is a tokenizer (its own chat template is used) or one of ``"chatml"`` (SmolLM2,
        Qwen2), ``"llama2"`` (``[INST]``) or ``"llama3"`` (header tokens).
        """
        user_parts = tuple(user_parts)
        marked_user = "".join(_SENTINEL.format(i) if _is_placeholder(p) else p for i, p in enumerate(user_parts))
        if isinstance(tokenizer_or_format, str):
            text = _render_builtin(tokenizer_or_format, marked_user, assistant_prefix, system)
        else:
            text = _render_with_tokenizer(tokenizer_or_format, marked_user, assistant_prefix, system)
        parts: list[str | int] = []
        pos = 0
        for match in _SENTINEL_RE.finditer(text):
            if match.start() > pos:
                parts.append(text[pos : match.start()])
            parts.append(user_parts[int(match.group(1))])
            pos = match.end()
        if pos < len(text):
            parts.append(text[pos:])
        return cls(parts=tuple(parts), name=name)


def _render_builtin(fmt: str, user: str, prefix: str, system: str | None) -> str:
    if fmt == "chatml":
        sys_block = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        return f"{sys_block}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{prefix}"
    if fmt == "llama2":
        sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
        return f"[INST] {sys_block}{user} [/INST] {prefix}"
    if fmt == "llama3":
        sys_block = f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>" if system else ""
        return (
            f"{sys_block}<|start_header_id|>user<|end_header_id|>\n\n{user}<|eot_id|>"
            f"<|start_header_id|>assistant<|end_header_id|>\n\n{prefix}"
        )
    raise SelfieInputError(f"unknown chat format {fmt!r}; use one of chatml, llama2, llama3 or a tokenizer")


def _render_with_tokenizer(tokenizer, user: str, prefix: str, system: str | None) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise SelfieInputError("this tokenizer has no chat template; pass chat format 'chatml', 'llama2' or 'llama3'")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        adds_bos = tokenizer.bos_token_id is not None and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]
        if adds_bos:  # the tokenizer adds it again when the prompt is tokenized
            text = text[len(bos) :]
    return text + prefix

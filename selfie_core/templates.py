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
# stands for a system message when a chat template is probed for a default system prompt of its own
_SYSTEM_SENTINEL = "\ue002"
#: longest system prompt a template takes (characters)
MAX_SYSTEM_CHARS = 4000

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
    def preset(cls, name: str, tokenizer=None, chat_format: str | None = None, system: str | None = None,
               tokenizer_default_system: bool = False) -> "InterpretationTemplate":
        """A named preset. Without a tokenizer (or with ``chat_format="raw"``) it is the original
        ``[INST] ... [/INST]`` text form; with a tokenizer it uses the tokenizer's own chat template when it has one.

        No system turn unless ``system`` is given: a chat template that writes a default system prompt of its own
        when the conversation has none (SmolLM2's "You are a helpful AI assistant named SmolLM...") has that turn
        cut out, since its words leak into the interpretations. ``tokenizer_default_system`` keeps it, as presets
        rendered before (jobs stored then keep their prompt).
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
            if system:
                raise SelfieInputError("the raw [INST] format has no system turn: use a chat format for a system prompt")
            return cls(parts=("[INST]", *user_parts, "[/INST] " + prefix), name=name)
        return cls.chat(tokenizer if fmt == "tokenizer" else fmt, user_parts, prefix, system=system, name=name,
                        tokenizer_default_system=tokenizer_default_system)

    @classmethod
    def chat(
        cls,
        tokenizer_or_format,
        user_parts: Sequence[str | int],
        assistant_prefix: str = "",
        system: str | None = None,
        name: str | None = None,
        tokenizer_default_system: bool = False,
    ) -> "InterpretationTemplate":
        """A template built from one user turn and the start of the assistant's answer.

        ``tokenizer_or_format`` is a tokenizer (its own chat template is used) or one of ``"chatml"`` (SmolLM2,
        Qwen2), ``"llama2"`` (``[INST]``) or ``"llama3"`` (header tokens). ``system``: a system turn (none when
        empty; see ``preset`` for the tokenizer's default one and ``tokenizer_default_system``).
        """
        if system is not None and not isinstance(system, str):
            raise SelfieInputError(f"system must be text, not {type(system).__name__}")
        if system and len(system) > MAX_SYSTEM_CHARS:
            raise SelfieInputError(f"the system prompt has {len(system)} characters; at most {MAX_SYSTEM_CHARS}")
        if system and (_SYSTEM_SENTINEL in system or _SENTINEL_RE.search(system) or "\ue000" in system):
            raise SelfieInputError("the system prompt contains private-use characters U+E000..U+E002")
        user_parts = tuple(user_parts)
        marked_user = "".join(_SENTINEL.format(i) if _is_placeholder(p) else p for i, p in enumerate(user_parts))
        if isinstance(tokenizer_or_format, str):
            text = _render_builtin(tokenizer_or_format, marked_user, assistant_prefix, system)
        else:
            text = _render_with_tokenizer(tokenizer_or_format, marked_user, assistant_prefix, system,
                                          tokenizer_default_system)
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


def chat_prompt(tokenizer, user: str, system: str | None = None, default_system: bool = False) -> str:
    """``user`` as one user turn in the tokenizer's chat template, with the generation prompt (the assistant's turn
    opened): the text a chat model answers. No system turn unless ``system`` (a template's default system prompt is
    cut out, as for presets) or ``default_system`` (keep the template's default). The text is taken as it is: no
    placeholder is read in it."""
    if system is not None and (not isinstance(system, str) or not system.strip()):
        raise SelfieInputError("the system prompt must be non-blank text")
    if system and len(system) > MAX_SYSTEM_CHARS:
        raise SelfieInputError(f"the system prompt has {len(system)} characters; at most {MAX_SYSTEM_CHARS}")
    if system and _SYSTEM_SENTINEL in system:
        raise SelfieInputError("the system prompt contains the private-use character U+E002")
    return _render_with_tokenizer(tokenizer, user, "", system, default_system)


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


def _apply(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _render_with_tokenizer(tokenizer, user: str, prefix: str, system: str | None, keep_default: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise SelfieInputError("this tokenizer has no chat template; pass chat format 'chatml', 'llama2' or 'llama3'")
    user_turn = {"role": "user", "content": user}
    if system:
        try:
            text = _apply(tokenizer, [{"role": "system", "content": system}, user_turn])
        except Exception as exc:  # jinja's TemplateError or a template's own raise_exception: no system role
            raise SelfieInputError(f"this tokenizer's chat template does not take a system message: {exc}") from exc
        if system not in text:
            raise SelfieInputError("this tokenizer's chat template leaves the system message out of the prompt")
    elif keep_default:
        text = _apply(tokenizer, [user_turn])
    else:
        text = _without_default_system(tokenizer, user)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        adds_bos = tokenizer.bos_token_id is not None and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]
        if adds_bos:  # the tokenizer adds it again when the prompt is tokenized
            text = text[len(bos) :]
    return text + prefix


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _without_default_system(tokenizer, user: str) -> str:
    """The chat template's rendering of one user turn, without a system turn the template adds by itself.

    The conversation is rendered twice: without a system message (``plain``) and with a sentinel one
    (``marked``). Where they differ is the system slot. If ``marked`` holds only the sentinel there, ``plain``
    fills the same slot with a default of its own (SmolLM2, Qwen2; possibly empty text): the whole turn is cut.
    The turn's bounds are where its role-twin starts: the system turn with "system" read as "user" and the
    sentinel as the user's text must be exactly the user turn that follows it (as in ChatML and Llama 3). A
    template whose default turn has another shape (e.g. dates written into it) is refused rather than guessed at.
    """
    user_turn = {"role": "user", "content": user}
    plain = _apply(tokenizer, [user_turn])
    try:
        marked = _apply(tokenizer, [{"role": "system", "content": _SYSTEM_SENTINEL}, user_turn])
    except Exception:  # noqa: BLE001 - a template that refuses system messages has no system slot to fill
        return plain
    if _SYSTEM_SENTINEL not in marked:
        return plain  # system messages are dropped: there is no slot either
    head = _common_prefix(plain, marked)
    tail = _common_prefix(plain[head:][::-1], marked[head:][::-1])
    default = plain[head : len(plain) - tail]
    slot = marked[head : len(marked) - tail]
    if slot != _SYSTEM_SENTINEL:
        if not default:
            return plain  # the system message brings a turn of its own: without one there is none
        raise SelfieInputError(
            "this tokenizer's chat template writes a default system prompt that could not be told apart from the "
            "conversation; use chat format 'chatml', 'llama2' or 'llama3', or give a system prompt")
    rest = plain[len(plain) - tail :]  # after the default text: the turn's end, then the user's turn
    for start in range(head + 1):
        for end in range(len(rest) + 1):
            turn = plain[start:head] + _SYSTEM_SENTINEL + rest[:end]
            twin = turn.replace(_SYSTEM_SENTINEL, user).replace("system", "user")
            if twin != turn.replace(_SYSTEM_SENTINEL, user) and rest[end:].startswith(twin):
                return plain[:start] + rest[end:]
    raise SelfieInputError(
        f"this tokenizer's chat template writes a system turn of its own ({default[:60]!r}...) that cannot be cut "
        "out safely; use chat format 'chatml', 'llama2' or 'llama3', or give a system prompt")

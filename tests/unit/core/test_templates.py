import json

import pytest

from selfie_core import PRESETS, InterpretationTemplate, SelfieInputError
from selfie_core.templates import PLACEHOLDER_TEXT


def original_insert_locations(tokenizer, parts):
    """The original SelfIE ``InterpretationPrompt`` algorithm, verbatim in spirit."""
    prompt, locations = "", []
    for part in parts:
        if isinstance(part, str):
            prompt += part
        else:
            start = len(tokenizer.encode(prompt))
            prompt += "_ "
            end = len(tokenizer.encode(prompt))
            locations.extend(range(start, end))
    return prompt, locations


def test_default_is_the_original_prompt(tokenizer):
    t = InterpretationTemplate()
    assert t.parts == ("[INST]", 0, 0, 0, 0, 0, "[/INST] Sure, I will summarize the message:")
    prepared = t.prepare(tokenizer)
    prompt, locations = original_insert_locations(tokenizer, t.parts)
    assert prepared.text == prompt
    assert list(prepared.insert_positions) == locations
    assert list(prepared.input_ids) == tokenizer(prompt).input_ids
    assert all("_" in tokenizer.decode([prepared.input_ids[p]]) for p in prepared.insert_positions[:5])


def test_positions_for_various_templates(tokenizer):
    for parts in [("x", 0, "y"), ("[INST] ", 0, " [/INST] Sure"), ("Hello", 0, 0, " world"), (0, " then")]:
        prepared = InterpretationTemplate(parts).prepare(tokenizer)
        assert list(prepared.insert_positions) == original_insert_locations(tokenizer, parts)[1]
        assert prepared.text.count(PLACEHOLDER_TEXT) >= InterpretationTemplate(parts).num_placeholders


def test_template_without_placeholder_is_rejected(tokenizer):
    with pytest.raises(SelfieInputError, match="no placeholders"):
        InterpretationTemplate(("just text",)).prepare(tokenizer)
    with pytest.raises(SelfieInputError):
        InterpretationTemplate(("text", 1.5))


def test_dict_round_trip_is_json():
    t = InterpretationTemplate.preset("materials")
    data = json.loads(json.dumps(t.to_dict()))
    assert InterpretationTemplate.from_dict(data) == t
    with pytest.raises(SelfieInputError):
        InterpretationTemplate.from_dict({"nope": 1})


def test_chat_builders():
    chatml = InterpretationTemplate.chat("chatml", (0, 0), "Sure:")
    assert chatml.parts == ("<|im_start|>user\n", 0, 0, "<|im_end|>\n<|im_start|>assistant\nSure:")
    llama2 = InterpretationTemplate.chat("llama2", ("About ", 0), "Sure:", system="Be brief.")
    assert llama2.parts == ("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nAbout ", 0, " [/INST] Sure:")
    llama3 = InterpretationTemplate.chat("llama3", (0,), "Sure:")
    assert llama3.parts[0] == "<|start_header_id|>user<|end_header_id|>\n\n" and llama3.parts[1] == 0
    assert llama3.parts[2].endswith("<|start_header_id|>assistant<|end_header_id|>\n\nSure:")
    with pytest.raises(SelfieInputError):
        InterpretationTemplate.chat("nonsense", (0,), "")


def test_tokenizer_chat_template_and_presets(tokenizer):
    t = InterpretationTemplate.chat(tokenizer, (0, 0, 0), "Sure,")
    assert t.parts == ("<|im_start|>user\n", 0, 0, 0, "<|im_end|>\n<|im_start|>assistant\nSure,")
    for name in PRESETS:
        raw = InterpretationTemplate.preset(name)
        assert raw.parts[0] == "[INST]" and raw.num_placeholders == 5
        chat = InterpretationTemplate.preset(name, tokenizer)
        assert chat.parts[0].startswith("<|im_start|>") and chat.num_placeholders == 5
        assert len(chat.prepare(tokenizer).insert_positions) >= 5
    with pytest.raises(SelfieInputError, match="unknown template preset"):
        InterpretationTemplate.preset("nope")


def test_preset_chat_formats(tokenizer):
    assert InterpretationTemplate.preset("summarize", chat_format="llama2").parts[0] == "[INST] "
    assert InterpretationTemplate.preset("summarize", tokenizer, chat_format="raw").parts[0] == "[INST]"
    with pytest.raises(SelfieInputError, match="unknown chat format 'vicuna'; use one of chatml, llama2"):
        InterpretationTemplate.preset("summarize", tokenizer, chat_format="vicuna")
    with pytest.raises(SelfieInputError, match="chat format 'tokenizer' needs a tokenizer"):
        InterpretationTemplate.preset("summarize", chat_format="tokenizer")

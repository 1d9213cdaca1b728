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


# -- presets without a system turn the chat template adds by itself -------------------------------------------------

SMOL_LIKE = (  # SmolLM2's template: a default system prompt when the conversation has none
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2_LIKE = (  # Qwen2's: the default system turn in an else branch, whitespace control included
    "{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
LLAMA3_LIKE = (  # Llama 3: BOS written by the template, header tokens, no default system turn
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_DEFAULT = (  # the same with an empty system turn always written
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\n<|eot_id|>' }}{% endif %}" + LLAMA3_LIKE[len("{{ bos_token }}"):]
)
DATED = (  # Llama 3.1's shape: dates written into the system turn, whatever the conversation
    "{{ bos_token }}{{ '<|start_header_id|>system<|end_header_id|>\n\nToday Date: 26 Jul 2024\n\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% set messages = messages[1:] %}{% endif %}"
    "{{ '<|eot_id|>' }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
NO_SYSTEM_ROLE = (  # Gemma's shape: a system message is an error
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def with_template(_, chat_template):
    from tests.unit.core.conftest import build_tokenizer

    tokenizer = build_tokenizer()  # a fresh one: the fixture's is shared by the session
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.mark.parametrize("chat_template", [SMOL_LIKE, QWEN2_LIKE])
def test_a_default_system_turn_is_cut_from_presets(tokenizer, chat_template):
    tok = with_template(tokenizer, chat_template)
    t = InterpretationTemplate.preset("summarize", tok)
    assert t.parts == ("<|im_start|>user\n", 0, 0, 0, 0, 0,
                       "<|im_end|>\n<|im_start|>assistant\nSure, I will summarize the message:")
    assert t == InterpretationTemplate.preset("summarize", tok, chat_format="chatml")  # as the built-in ChatML
    kept = InterpretationTemplate.preset("summarize", tok, tokenizer_default_system=True)
    assert kept.parts[0].startswith("<|im_start|>system\nYou are a helpful")
    own = InterpretationTemplate.preset("describe", tok, system="Answer in one word.")
    assert own.parts[0] == "<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\n"


def test_llama3_like_templates_render_no_system_turn(tokenizer):
    for chat_template in (LLAMA3_LIKE, LLAMA3_DEFAULT):
        t = InterpretationTemplate.preset("entity", with_template(tokenizer, chat_template))
        # the tokenizer adds <s> itself, so the template's own is dropped from the text
        assert t.parts[0] == "<|start_header_id|>user<|end_header_id|>\n\n", chat_template
        assert "system" not in "".join(p for p in t.parts if isinstance(p, str))
        assert t == InterpretationTemplate.preset("entity", tokenizer, chat_format="llama3")
    own = InterpretationTemplate.preset("entity", with_template(tokenizer, LLAMA3_DEFAULT), system="Be brief.")
    assert own.parts[0] == "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"


def test_a_system_turn_that_cannot_be_cut_is_refused_clearly(tokenizer):
    tok = with_template(tokenizer, DATED)
    with pytest.raises(SelfieInputError, match="cannot be cut out safely.*chat format 'chatml'"):
        InterpretationTemplate.preset("summarize", tok)
    assert "Today Date" in InterpretationTemplate.preset("summarize", tok, system="Hi.").parts[0]


def test_templates_without_a_system_role(tokenizer):
    tok = with_template(tokenizer, NO_SYSTEM_ROLE)
    t = InterpretationTemplate.preset("summarize", tok)
    assert t.parts[0] == "<start_of_turn>user\n"
    with pytest.raises(SelfieInputError, match="does not take a system message"):
        InterpretationTemplate.preset("summarize", tok, system="Be brief.")
    with pytest.raises(SelfieInputError, match="raw .* has no system turn"):
        InterpretationTemplate.preset("summarize", system="Be brief.")


def test_system_prompts_are_bounded(tokenizer):
    with pytest.raises(SelfieInputError, match="at most 4000"):
        InterpretationTemplate.preset("summarize", tokenizer, system="x" * 4001)


@pytest.mark.smollm2
@pytest.mark.slow
def test_smollm2_presets_carry_no_default_system_prompt(smollm2):
    tok = smollm2.tokenizer
    assert "SmolLM" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    for name in PRESETS:
        t = InterpretationTemplate.preset(name, tok)
        text = "".join(p for p in t.parts if isinstance(p, str))
        assert "SmolLM" not in text and "system" not in text, name
        assert t == InterpretationTemplate.preset(name, tok, chat_format="chatml")
    assert "SmolLM" in InterpretationTemplate.preset("summarize", tok, tokenizer_default_system=True).parts[0]

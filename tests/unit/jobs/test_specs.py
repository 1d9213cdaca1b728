"""Job request schemas and target expansion, without any service."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from selfie_jobs.specs import IndexRange, JobCreate, Targets, engine_spec, resolve_selector, spec_batch_key


def test_one_prompt_or_many_and_preset_shorthand():
    one = JobCreate(prompts="hello", template="describe")
    assert one.prompts == ["hello"]
    assert one.template.preset == "describe"
    many = JobCreate(prompts=["a", "b"])
    assert many.prompts == ["a", "b"] and many.targets == "all" and many.template is None


@pytest.mark.parametrize(
    "body, where",
    [
        ({"prompts": []}, "prompts"),
        ({"prompts": ["  "]}, "prompts"),
        ({"prompts": ["a\x00b"]}, "prompts"),
        ({"prompts": ["a"], "priority": 10}, "priority"),
        ({"prompts": ["a"], "k": -1}, "k"),
        ({"prompts": ["a"], "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompts": ["a"], "decoding": {"temperature": 0}}, "decoding"),
        ({"prompts": ["a"], "decoding": {"top_p": 1.5}}, "decoding"),
        ({"prompts": ["a"], "decoding": {"seed": -3}}, "decoding"),
        ({"prompts": ["a"], "injection_strength": float("nan")}, "injection_strength"),
        ({"prompts": ["a"], "injection_mode": "multiply"}, "injection_mode"),
        ({"prompts": ["a"], "template": {"parts": ["no placeholder"]}}, "template"),
        ({"prompts": ["a"], "template": {"parts": ["x", 1]}}, "template"),
        ({"prompts": ["a"], "template": {"preset": "summarize", "parts": [0]}}, "template"),
        ({"prompts": ["a"], "targets": {"pairs": [[1, 2]], "layers": [1]}}, "targets"),
        ({"prompts": ["a"], "targets": {"layers": {"start": 0, "step": 0}}}, "targets"),
        ({"prompts": ["a"], "targets": "some"}, "targets"),
        ({"prompts": ["a"], "unknown_field": 1}, "unknown_field"),
        ({"prompts": ["a"], "idempotency_key": ""}, "idempotency_key"),
    ],
)
def test_shape_errors_are_refused(body, where):
    with pytest.raises(ValidationError) as info:
        JobCreate.model_validate(body)
    assert where in str(info.value)


def test_resolve_selectors():
    assert resolve_selector("all", 3, "token") == [0, 1, 2]
    assert resolve_selector([-1, 0], 5, "token") == [4, 0]
    assert resolve_selector(IndexRange(start=0, stop=None, step=2), 5, "layer") == [0, 2, 4]
    assert resolve_selector(IndexRange(start=-2), 5, "token") == [3, 4]
    with pytest.raises(ValueError, match="token 5 is out of range"):
        resolve_selector([5], 5, "token")
    with pytest.raises(ValueError, match="stop=9"):
        resolve_selector(IndexRange(stop=9), 5, "layer")


def test_batch_key_depends_on_engine_settings_only():
    a = JobCreate(prompts=["x"], k=2, max_new_tokens=10, priority=1, idempotency_key="a")
    b = JobCreate(prompts=["y", "z"], k=2, max_new_tokens=10, priority=9, targets=Targets(layers=[1]))
    c = JobCreate(prompts=["x"], k=3, max_new_tokens=10)
    template = {"preset": "summarize", "system": None}
    assert spec_batch_key(engine_spec(a, template)) == spec_batch_key(engine_spec(b, template))
    assert spec_batch_key(engine_spec(a, template)) != spec_batch_key(engine_spec(c, template))
    assert spec_batch_key(engine_spec(a, template)) != spec_batch_key(engine_spec(a, {"preset": "describe",
                                                                                      "system": None}))
    # a system prompt, and a spec stored before presets dropped the default one, are other engine settings
    assert spec_batch_key(engine_spec(a, template)) != spec_batch_key(engine_spec(a, {"preset": "summarize",
                                                                                      "system": "Be brief."}))
    assert spec_batch_key(engine_spec(a, template)) != spec_batch_key(engine_spec(a, {"preset": "summarize"}))
    strict = JobCreate(prompts=["x"], k=2, max_new_tokens=10, grounding={"min_mean_relevancy": 0.2})
    assert spec_batch_key(engine_spec(a, template)) != spec_batch_key(engine_spec(strict, template))
    spec = engine_spec(a, template)
    assert spec == {
        "template": {"preset": "summarize", "system": None},
        "injection": {"k": 2, "mode": "replace", "strength": 1.0},
        "generation": {"max_new_tokens": 10, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "seed": None},
        "grounding": {"min_mean_relevancy": 0.05},
    }


def test_openapi_schema_of_request_is_complete():
    schema = JobCreate.model_json_schema()
    for name in ("model", "prompts", "targets", "template", "k", "injection_mode", "injection_strength",
                 "max_new_tokens", "decoding", "grounding", "priority", "idempotency_key"):
        assert name in schema["properties"]


@pytest.mark.parametrize("text, expected", [
    ("0:30:5", {"start": 0, "stop": 30, "step": 5}),
    ("-3:", {"start": -3, "stop": None, "step": 1}),
    (":4", {"start": 0, "stop": 4, "step": 1}),
    ("0,4,-1", [0, 4, -1]),
    ("all", "all"),
])
def test_text_selections_mean_what_the_client_and_cli_send(text, expected):
    """The API takes the "0:30:5" text the CLI and client take, and it means the same as their JSON form."""
    from selfie_client.client import selector

    as_text = JobCreate(prompts=["a"], targets={"layers": text, "tokens": text})
    as_json = JobCreate(prompts=["a"], targets={"layers": selector(text), "tokens": expected})
    assert as_text.targets == as_json.targets
    chosen = resolve_selector(as_text.targets.layers, 31, "layer")
    picked = list(range(31))[slice(*expected.values())] if isinstance(expected, dict) else (
        list(range(31)) if expected == "all" else [i % 31 for i in expected])
    assert chosen == picked


# non-ASCII digits, as everywhere in this API (int() read "１:３" as 1:3 and "٣" as 3), and int()'s other spellings
@pytest.mark.parametrize("text", ["last3", "abc", "1:2:3:4", ",", "0:x", "0:30:0", "0:30:-1", "１:３", "٣", "0,²", "1_0",
                                  "0:1_0"])
def test_bad_text_selections_are_refused_with_the_forms(text):
    with pytest.raises(ValidationError, match="0:31:5"):
        JobCreate(prompts=["a"], targets={"layers": text})


def test_template_system_prompts():
    from pydantic import ValidationError

    from selfie_jobs.specs import JobCreate

    ok = JobCreate.model_validate({"prompts": ["a"], "template": {"preset": "describe", "system": "Be brief."}})
    assert ok.template.system == "Be brief."
    assert JobCreate.model_validate({"prompts": ["a"], "template": {"system": "Hi."}}).template.preset is None
    for bad, why in [({"parts": ["x", 0, "y"], "system": "Hi."}, "goes with a preset"),
                     ({"preset": "describe", "system": "x" * 4001}, "at most 4000"),
                     ({"preset": "describe", "system": "   "}, "blank"),
                     ({"preset": "describe", "system": "a\ue000b"}, "private-use"),
                     ({"preset": "describe", "system": 3}, "string")]:
        with pytest.raises(ValidationError, match=why):
            JobCreate.model_validate({"prompts": ["a"], "template": bad})

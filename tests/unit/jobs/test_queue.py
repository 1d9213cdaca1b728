"""Queue names: one per model, never shared."""

from selfie_jobs.queue import model_queue


def test_safe_names_are_kept_and_others_never_collide():
    assert model_queue("smollm2-135m-instruct") == "selfie.model.smollm2-135m-instruct"
    assert model_queue("Qwen2.5_0.5B") == "selfie.model.Qwen2.5_0.5B"
    names = ["org/m", "org_m", "org m", "org:m", "org\\m", "/srv/models/llama", "_srv_models_llama"]
    queues = [model_queue(n) for n in names]
    assert len(set(queues)) == len(names)
    assert queues[0].startswith("selfie.model.org_m~") and queues[0] == model_queue("org/m")
    assert all(q.isascii() and ":" not in q and " " not in q for q in queues)  # ":" separates kombu's priority lists

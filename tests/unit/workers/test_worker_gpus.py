"""A worker over several GPUs: `--gpus` parsing, which devices it makes visible, how much memory the weights may
take, and how many rows a batch gets from the devices' free memory (figures passed in; no GPU needed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from selfie_core.memory import row_bytes, rows_that_fit
from workers import launch
from workers.gpus import check_devices_seen, check_placement, parse_gpus, pin_gpus, visible_devices, weights_max_memory
from workers.runtime import WorkerOptions

GiB = 1 << 30


def test_gpus_parse_from_a_comma_list():
    assert parse_gpus("0,1,2,3") == (0, 1, 2, 3)
    assert parse_gpus(" 2, 5 ") == (2, 5)
    assert parse_gpus("7") == (7,)


@pytest.mark.parametrize("text, reason", [("", "separated by commas"), ("0,,1", "separated by commas"),
                                          ("0,1,", "separated by commas"), ("a", "'a' is not a device number"),
                                          ("-1", "'-1' is not a device number"), ("1.5", "not a device number"),
                                          ("0,1,0", "device 0 is named twice"),
                                          # other scripts' digits are digits to str.isdigit, not device numbers
                                          ("\u0663", "'\u0663' is not a device number"),
                                          ("0,\uff11", "'\uff11' is not a device number"),
                                          ("\u00b2", "'\u00b2' is not a device number")])
def test_bad_gpu_lists_say_why(text, reason):
    with pytest.raises(ValueError, match=reason):
        parse_gpus(text)


def test_visible_devices_index_what_the_process_already_sees():
    assert visible_devices((0, 1, 2, 3), None) == "0,1,2,3"
    assert visible_devices((1, 3), "") == "1,3"
    # a scheduler already narrowed the devices: the numbers index that list, as CUDA's would
    assert visible_devices((0, 2), "4,5,6") == "4,6"
    assert visible_devices((1,), "GPU-aaaa, GPU-bbbb") == "GPU-bbbb"
    with pytest.raises(ValueError, match="device 3 does not exist here: CUDA_VISIBLE_DEVICES=4,5,6 shows 3"):
        visible_devices((0, 3), "4,5,6")


@pytest.mark.parametrize("args, inherited, message", [
    (["--gpus", "0,1"], "4", "Invalid value for --gpus: device 1 does not exist here: CUDA_VISIBLE_DEVICES=4 shows 1"),
    (["--gpu", "3"], "4,5", "Invalid value for --gpu: device 3 does not exist here: CUDA_VISIBLE_DEVICES=4,5 shows 2"),
])
def test_devices_beyond_the_inherited_visible_ones_are_a_usage_error(args, inherited, message, tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": inherited, "SELFIE_DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "selfie_cli", "worker", "--model", "m", *args], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_pinning_sets_exactly_those_devices_for_the_process_and_its_children():
    environ = {"CUDA_VISIBLE_DEVICES": "2,3,5,7"}
    pin_gpus((1, 3), environ)
    assert environ["CUDA_VISIBLE_DEVICES"] == "3,7"
    untouched = {"CUDA_VISIBLE_DEVICES": "1"}
    pin_gpus(None, untouched)
    assert untouched == {"CUDA_VISIBLE_DEVICES": "1"}
    # a child started afterwards sees the pinned list (run_worker pins in the parent; pool children inherit it)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    code = "from workers.gpus import pin_gpus; import os; pin_gpus((2, 3)); print(os.environ['CUDA_VISIBLE_DEVICES'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "2,3"


def test_worker_options_name_every_device():
    opts = WorkerOptions(model="m", device="cuda:0", gpus=[4, 5, 6, 7])
    assert opts.devices == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert opts.device_label == "cuda:0,cuda:1,cuda:2,cuda:3"
    assert WorkerOptions.from_env(opts.to_env()) == opts
    assert WorkerOptions(model="m", device="cuda:0", gpus=list(range(16))).device_label == "cuda:0..15"
    assert WorkerOptions(model="m", device="cuda:0", gpu=2).devices == ["cuda:0"]
    assert launch.default_node_name("org/m", (0, 1, 2, 3)).startswith("selfie-org_m-gpu0-1-2-3@")


def test_weights_leave_a_quarter_of_each_device_for_batches():
    assert weights_max_memory([80 * GiB, 40 * GiB]) == {0: 60 * GiB, 1: 30 * GiB}


def test_a_model_that_spills_off_its_gpus_is_refused():
    check_placement({"model.embed_tokens": 0, "model.layers.0": 1, "lm_head": "cuda:1"}, 2)
    # what accelerate does with what does not fit the max_memory limits: the disk
    with pytest.raises(RuntimeError, match=r"does not fit in 75% of the free memory of its 2 GPU\(s\): 2 module\(s\) "
                                           r"\(e.g. lm_head\) would go to cpu, disk"):
        check_placement({"model.embed_tokens": 0, "model.layers": 1, "model.norm": "disk", "lm_head": "cpu"}, 2)
    with pytest.raises(RuntimeError, match="would go to 2"):
        check_placement({"model.embed_tokens": 0, "model.layers": 2}, 2)


def test_a_worker_that_sees_fewer_gpus_than_it_names_is_refused():
    check_devices_seen((0, 1), 2)
    check_devices_seen((3,), 4)
    # CUDA stops at the first CUDA_VISIBLE_DEVICES entry naming no device: on a one-GPU machine --gpus 0,1 sees one
    with pytest.raises(RuntimeError, match=r"--gpus 0,1 names 2 CUDA device\(s\) but this process sees 1 "):
        check_devices_seen((0, 1), 1)
    with pytest.raises(RuntimeError, match="sees 0 .*without a GPU, serve on the CPU"):
        check_devices_seen((0,), 0)
    # accelerate's map of a model with no GPU to go to: the root module, named ''
    with pytest.raises(RuntimeError, match=r"1 module\(s\) \(e.g. the whole model\) would go to disk"):
        check_placement({"": "disk"}, 2)


def _llama70b_rows(layers_per_device, output_device, tokens=100):
    # Llama-2-70B: 80 layers, 8 KV heads of 128, hidden 8192, vocab 32000, bfloat16
    return row_bytes(layers_per_device, output_device, kv_heads=8, head_dim=128, hidden_size=8192,
                     vocab_size=32000, tokens=tokens, elem_bytes=2)


def test_a_row_needs_kv_cache_where_its_layers_are_and_logits_where_the_output_is():
    per_row = _llama70b_rows({"cuda:0": 40, "cuda:1": 40}, "cuda:1")
    kv_per_layer = 2 * 8 * 128 * 100 * 2
    activations = 16 * 8192 * 100 * 2
    assert per_row["cuda:0"] == 3 * 40 * kv_per_layer + activations
    assert per_row["cuda:1"] == 3 * 40 * kv_per_layer + activations + 4 * 32000 * 4
    one = _llama70b_rows({"cuda:0": 80}, "cuda:0")
    assert one["cuda:0"] == 3 * 80 * kv_per_layer + activations + 4 * 32000 * 4


def test_the_device_that_fills_first_sizes_the_batch():
    per_row = _llama70b_rows({"cuda:0": 20, "cuda:1": 20, "cuda:2": 20, "cuda:3": 20}, "cuda:3")
    free = {"cuda:0": 40 * GiB, "cuda:1": 40 * GiB, "cuda:2": 40 * GiB, "cuda:3": 40 * GiB}
    even = rows_that_fit(free, per_row)
    assert even == int(40 * GiB * 0.6) // per_row["cuda:3"]
    tight = rows_that_fit({**free, "cuda:1": 10 * GiB}, per_row)
    assert tight == int(10 * GiB * 0.6) // per_row["cuda:1"] and tight < even
    assert rows_that_fit({d: 1 << 50 for d in free}, per_row) == 2048  # capped
    assert rows_that_fit({d: 1000 for d in free}, per_row) == 1  # never zero: a batch of one still runs
    with pytest.raises(ValueError, match="no free-memory figure for cuda:3"):
        rows_that_fit({"cuda:0": GiB}, {"cuda:0": 1, "cuda:3": 1})


def _selfie(*args):
    return subprocess.run([sys.executable, "-m", "selfie_cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, message", [(["--gpus", "0,,1"], "separated by commas"),
                                           (["--gpus", "0,0"], "device 0 is named twice"),
                                           (["--gpu", "0", "--gpus", "1,2"], "not both"),
                                           (["--gpus", "0,1", "--device", "cuda:1"], "has several")])
def test_the_worker_command_refuses_bad_device_options_as_usage_errors(args, message):
    done = _selfie("worker", "--model", "tiny", *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr

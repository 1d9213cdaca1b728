"""Which GPUs a worker uses, how it makes only those visible, and how much of each its model's weights may take.

``--gpu N`` and ``--gpus 0,1,2,3`` name devices as CUDA numbers them for the process that starts the worker: when
that process already sees a subset (CUDA_VISIBLE_DEVICES set, e.g. by a scheduler), the numbers index that subset,
as CUDA's own device numbers would. The worker then sets CUDA_VISIBLE_DEVICES to exactly those devices before
anything initialises CUDA, so inside the worker they are cuda:0 .. cuda:n-1 and its pool children inherit them.

Memory rule for a model spread over several GPUs (``weights_max_memory``): the weights may take at most
``WEIGHTS_SHARE`` (75%) of the memory free on each device when the worker starts; accelerate's balanced
``device_map`` spreads the blocks within those limits, so at least a quarter of every device stays for the
engine's batches, whose size is then computed from what is really free on all devices (``selfie_core.memory``).
accelerate puts what does not fit in those limits on the disk (offloaded, loaded at every forward): a worker
refuses such a placement (``check_placement``) and says how much did not fit, instead of serving at disk speed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping, Sequence

#: Most of each device's free memory the weights may take (the rest is kept for batches).
WEIGHTS_SHARE = 0.75


def parse_gpus(text: str) -> tuple[int, ...]:
    """``"0,1,2,3"`` -> (0, 1, 2, 3); ValueError with a one-line reason for anything else."""
    parts = [p.strip() for p in str(text).split(",")]
    if not text or not str(text).strip() or any(p == "" for p in parts):
        raise ValueError(f"expected device numbers separated by commas, like 0,1,2,3; got {text!r}")
    gpus = []
    for p in parts:
        if not (p.isascii() and p.isdigit()):  # str.isdigit takes other scripts' digits ("٣", "²") too
            raise ValueError(f"{p!r} is not a device number (0, 1, ...)")
        gpus.append(int(p))
    repeated = sorted({g for g in gpus if gpus.count(g) > 1})
    if repeated:
        raise ValueError(f"device {repeated[0]} is named twice")
    return tuple(gpus)


def visible_devices(gpus: Sequence[int], inherited: str | None) -> str:
    """The CUDA_VISIBLE_DEVICES value that makes exactly ``gpus`` visible, given the one the process inherited
    (None or empty: all devices, numbered as the driver does)."""
    if not gpus:
        raise ValueError("no device given")
    entries = [e.strip() for e in inherited.split(",")] if inherited and inherited.strip() else None
    if entries is None:
        return ",".join(str(g) for g in gpus)
    beyond = [g for g in gpus if g >= len(entries)]
    if beyond:
        raise ValueError(f"device {beyond[0]} does not exist here: CUDA_VISIBLE_DEVICES={inherited} shows "
                         f"{len(entries)} device(s), numbered 0..{len(entries) - 1}")
    return ",".join(entries[g] for g in gpus)


def pin_gpus(gpus: Sequence[int] | None, environ: MutableMapping[str, str] | None = None) -> None:
    """Make exactly ``gpus`` visible (as cuda:0 ..) to this process and its children; before CUDA starts."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError("CUDA is already initialised in this process: pin the GPUs before anything uses torch")
    if gpus:
        environ = os.environ if environ is None else environ
        environ["CUDA_VISIBLE_DEVICES"] = visible_devices(gpus, environ.get("CUDA_VISIBLE_DEVICES"))


def weights_max_memory(free_bytes: Sequence[int], share: float = WEIGHTS_SHARE) -> dict[int, int]:
    """accelerate's ``max_memory`` for visible devices 0..n-1 with ``free_bytes`` free on each."""
    return {i: int(free * share) for i, free in enumerate(free_bytes)}


def check_devices_seen(gpus: Sequence[int], seen: int) -> None:
    """Raise unless the process sees as many CUDA devices as ``--gpus`` named.

    CUDA stops reading CUDA_VISIBLE_DEVICES at its first entry that names no device, so ``--gpus 0,1`` on a one-GPU
    machine sees one device (the model would load on it alone) and on a machine without a GPU none (accelerate would
    put the whole model on the disk): both are refused here, before any weights are read.
    """
    if seen < len(gpus):
        named = ",".join(str(g) for g in gpus)
        raise RuntimeError(
            f"--gpus {named} names {len(gpus)} CUDA device(s) but this process sees {seen} "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}): name only devices this machine "
            "has (nvidia-smi -L lists them)" + ("; without a GPU, serve on the CPU (no --gpus)" if not seen else ""))


def check_placement(device_map: dict, gpus: int) -> None:
    """Raise when accelerate placed any module elsewhere than on visible GPUs 0..gpus-1 (the disk, host memory)."""
    allowed = {str(i) for i in range(gpus)} | {f"cuda:{i}" for i in range(gpus)}
    elsewhere = sorted(name for name, where in device_map.items() if str(where) not in allowed)
    if elsewhere:
        places = sorted({str(device_map[name]) for name in elsewhere})
        raise RuntimeError(
            f"the model does not fit in {WEIGHTS_SHARE:.0%} of the free memory of its {gpus} GPU(s): {len(elsewhere)} "
            f"module(s) (e.g. {elsewhere[0] or 'the whole model'}) would go to {', '.join(places)}; give the worker more GPUs or free "
            "memory, or load it in a smaller dtype")


def free_memory() -> list[int]:
    """Bytes free on each visible CUDA device now."""
    import torch

    return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]

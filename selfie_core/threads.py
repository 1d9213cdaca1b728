"""How many CPU threads torch uses in this process (`selfie worker --threads`, `selfie interpret --threads`).

torch's own default is one thread per core. The engine's time is mostly decode steps: many small ops, each split
across the threads, and every step waits for the slowest one. Where other processes share the cores (the API,
beat, other workers, other users), a descheduled thread stalls every step: on the busy 2-core development machine
(load average ~13) SmolLM2 ran 4.7-5.5x faster with one thread than with torch's two (benchmarks/threads_bench.py;
figures and command in benchmarks/README.md). The default therefore leaves half the usable cores to the rest of
the machine. It has only been measured on 2 cores; on a dedicated many-core host `--threads` may do better.
"""

from __future__ import annotations

import os

#: A ceiling on the default (not measured here, where there are 2 cores): the decode steps' ops are small, and
#: more threads mean more synchronisation per op; `--threads` overrides it.
MAX_DEFAULT_THREADS = 8


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's cpuset), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads(cores: int | None = None) -> int:
    """Half the usable cores (one on a 2-core machine), at least 1 and at most MAX_DEFAULT_THREADS."""
    cores = usable_cores() if cores is None else cores
    return max(1, min(MAX_DEFAULT_THREADS, cores // 2))


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to `threads` (None: `default_threads()`); returns the count in force."""
    import torch

    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    torch.set_num_threads(threads or default_threads())
    return torch.get_num_threads()

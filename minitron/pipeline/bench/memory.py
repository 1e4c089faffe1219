"""A benchmark process's own peak memory."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss() -> int:
    """This process's peak resident memory in bytes: ``VmHWM``, the high-water mark of its own address space.

    Not ``getrusage``'s ``ru_maxrss``: Linux carries it across ``exec``, and Python starts a subprocess with
    ``vfork`` + ``exec``, so a child's ``ru_maxrss`` starts at its parent's peak (4.4 GiB here once, when the
    parent had drawn the 8B embedding whole: the prune itself peaked at 2.5 GiB). ``ru_maxrss`` where there is
    no ``/proc``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

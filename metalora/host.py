"""Host process settings that must be in place before the process starts: glibc's malloc tunables.

XLA:CPU allocates each call's temporaries afresh (~450 MB, 115,000 pages, for the base model's pretraining step at
batch 32). glibc serves any block above its mmap threshold (at most 32 MB, and not raisable
with ``mallopt`` beyond that) with a fresh ``mmap``, so every call faults in every page of its temporaries and
unmaps them again: measured on the 2-core CPU machine, 115,000 minor page faults and ~330 ms of system time per
pretraining step of ~1 s. With one malloc arena, a 4 GB mmap threshold and a 4 GB trim threshold the memory is
carved from the heap once and reused: 0 faults and ~30 ms of system time per step. Two processes of the same
step, run in alternation (12 turns of 4 steps each, so both see the same machine load): 1090 → 1007 ms per step
(median). Huge pages instead (``glibc.malloc.hugetlb=1``) cut the faults but not the page zeroing (150-260 ms of
system time per step) and were faster in one such pair and slower in another.

glibc reads these tunables only at start-up (``GLIBC_TUNABLES``), so an entry point calls
:func:`reexec_with_malloc_tunables` first thing: if they are missing it replaces the process with the same command
line and the tunables added. It does nothing off glibc, when the user has set any of these tunables, or with
``METALORA_MALLOC_TUNABLES=0``. Library code never calls it: importing metalora changes nothing in the process.
The cost: freed memory up to 4 GB stays with the process (its RSS stays at its peak) instead of going back to the
OS.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

MALLOC_TUNABLES: Mapping[str, str] = {
    # One arena: XLA's worker threads would otherwise get their own arenas, whose heaps are at most 64 MB, so a
    # larger block falls back to mmap whatever the threshold.
    "glibc.malloc.arena_max": "1",
    "glibc.malloc.mmap_threshold": str(4 << 30),
    "glibc.malloc.trim_threshold": str(4 << 30),
}
OPT_OUT = "METALORA_MALLOC_TUNABLES"


def tuned_environment(environ: Mapping[str, str], *, libc: str | None = None) -> dict[str, str] | None:
    """``environ`` with :data:`MALLOC_TUNABLES` added to ``GLIBC_TUNABLES``, or None when nothing should change
    (not glibc, opted out, or any of these tunables already set: the user's choice wins)."""
    libc = platform.libc_ver()[0] if libc is None else libc
    if libc != "glibc" or environ.get(OPT_OUT, "1") == "0":
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    names = {item.split("=", 1)[0] for item in current.split(":") if item}
    if names & set(MALLOC_TUNABLES):
        return None
    ours = ":".join(f"{k}={v}" for k, v in MALLOC_TUNABLES.items())
    return {**environ, "GLIBC_TUNABLES": f"{current}:{ours}" if current else ours}


def reexec_with_malloc_tunables() -> None:
    """Restart this process's command line with the malloc tunables set (see the module docstring); returns only
    when no restart is needed. Call it before any work (nothing of this process survives the restart)."""
    env = tuned_environment(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # orig_argv keeps the interpreter options and ``-m module``, which sys.argv has already consumed.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)

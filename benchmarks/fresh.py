"""Shared by the benchmarks that measure one step's memory: a fresh forked process per measurement, and the
resident-set peak of what runs in it (VmHWM, reset to VmRSS through /proc/self/clear_refs)."""

from __future__ import annotations

import multiprocessing as mp
from typing import Any, Callable


def status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_growth(run: Callable[[], Any]) -> int:
    """Bytes the resident set grew to, at its peak, while `run()` ran."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = status("VmRSS")
    run()
    return status("VmHWM") - base


def in_fresh_process(target: Callable[..., Any], *args: Any) -> Any:
    """target(*args) in a process forked before any torch op here; what it returns comes back by a pipe."""
    parent, child = mp.Pipe()

    def body() -> None:
        child.send(target(*args))

    process = mp.get_context("fork").Process(target=body)
    process.start()
    child.close()  # only the child holds its end now: its death (the OOM killer, say) ends recv() with EOFError
    try:
        result = parent.recv()
    except EOFError:
        process.join()
        raise MeasurementFailed(f"the measuring process died (exit code {process.exitcode}; -9 is SIGKILL, "
                                "usually the kernel's out-of-memory killer)") from None
    process.join()
    return result


class MeasurementFailed(RuntimeError):
    """The fresh process ended without a result."""

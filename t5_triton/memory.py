"""Memory of a server's process tree (tritonserver and its python-backend stubs), read from /proc.

Used by the load tests and by `t5-triton bench`.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from t5_triton.server import process_tree, stub_models


def _kb(text: str, field: str) -> int | None:
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match[1]) * 1024 if match else None


def tree_memory(pid: int | None) -> dict[str, dict[str, int]] | None:
    """RSS and PSS in bytes of `pid` and each descendant (the python-backend stubs), by "name (pid)", from /proc.

    RSS counts the python backend's shared memory once in tritonserver and again in each stub that maps it;
    PSS splits shared pages between the processes that map them, so the PSS sum is the tree's real footprint.
    """
    if pid is None or not Path(f"/proc/{pid}").exists():
        return None
    members = process_tree(pid)
    models = stub_models(members)  # a stub is named by the model it serves
    memory: dict[str, dict[str, int]] = {}
    for member in members:
        try:
            name = models.get(member) or Path(f"/proc/{member}/comm").read_text().strip()
            rss = _kb(Path(f"/proc/{member}/status").read_text(), "VmRSS")
            pss = _kb(Path(f"/proc/{member}/smaps_rollup").read_text(), "Pss")
        except OSError:  # exited meanwhile
            continue
        if rss is not None and pss is not None:  # a zombie has no memory left
            memory[f"{name} ({member})"] = {"rss": rss, "pss": pss}
    return memory


def memory_total(memory: dict[str, dict[str, int]] | None, field: str) -> int | None:
    return sum(process[field] for process in memory.values()) if memory else None


class MemorySampler:
    """Samples the tree's summed RSS and PSS every `interval` seconds until the `with` block ends."""

    def __init__(self, pid: int | None, interval: float):
        self.pid, self.interval = pid, interval
        self.timeline: list[dict[str, float | int | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while True:
            memory = tree_memory(self.pid)
            self.timeline.append(
                {
                    "t": round(time.monotonic() - start),
                    "rss": memory_total(memory, "rss"),
                    "pss": memory_total(memory, "pss"),
                }
            )
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> MemorySampler:
        if self.pid is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def peak(self, field: str = "rss") -> int | None:
        values = [point[field] for point in self.timeline if point[field] is not None]
        return max(values) if values else None

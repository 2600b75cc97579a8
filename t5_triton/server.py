"""Start and stop a real `tritonserver` for a model repository.

Uses `tritonserver` from PATH when there is one (the NGC container, with its own backends), else the
binary bundled in the `nvidia-pytriton` wheel, which needs a backend folder of its own and a few
environment settings to run python-backend models with this interpreter (see DESIGN.md section 3).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# Big buffers stay mapped between BLS calls instead of being returned to the OS and page-faulted
# in again on every call (measured: 32 MB round trip 34 ms -> 19 ms, DESIGN.md 3b).
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


_SHM_PREFIX = "/dev/shm/triton_python_backend_shm_region_"


class ServerError(RuntimeError):
    pass


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        tree.append(current)
        frontier.extend(children.get(current, []))
    return tree


def process_state(pid: int) -> str | None:
    """A process's state letter ('R', 'S', 'Z'...), None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def stub_models(pids: list[int]) -> dict[int, str]:
    """pid -> model name for the python-backend stubs among `pids` (their command line names model.py)."""
    stubs = {}
    for pid in pids:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"triton_python_backend_stub") and len(args) > 1:
            stubs[pid] = Path(args[1].decode()).parent.parent.name  # <repo>/<model>/<version>/model.py
    return stubs


def mapped_shm_regions(pids: list[int]) -> set[str]:
    """The python backend's shared-memory files these processes have mapped."""
    regions = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        regions.update(line.split()[-1] for line in maps.splitlines() if _SHM_PREFIX in line)
    return regions


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls) -> Ports:
        return cls(free_port(), free_port(), free_port())


def _bundled_root() -> Path:
    try:
        import pytriton
    except ImportError as err:
        raise ServerError("no tritonserver on PATH and the nvidia-pytriton wheel is not installed") from err
    return Path(pytriton.__file__).parent / "tritonserver"


def _prepare_backends(root: Path, into: Path) -> Path:
    """A backend folder for the bundled server: real copies (the loader rejects symlinks) and the
    python-backend stub built for the running Python."""
    python_dir = into / "python"
    python_dir.mkdir(parents=True)
    shutil.copy2(root / "backends/python/libtriton_python.so", python_dir)
    shutil.copy2(root / "backends/python/triton_python_backend_utils.py", python_dir)
    stub = root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = stub / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"the bundled Triton has no python-backend stub for Python {sys.version.split()[0]}")
    shutil.copy2(stub, python_dir / "triton_python_backend_stub")
    (python_dir / "triton_python_backend_stub").chmod(0o755)
    return into


def _bundled_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    libs = [sysconfig.get_config_var("LIBDIR"), str(root.parent.parent / "nvidia_pytriton.libs")]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    # The stub takes sys.prefix from the first python on PATH: it must be this environment's.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


class TritonServer:
    """One tritonserver process; a context manager that always stops it."""

    def __init__(
        self,
        model_repository: Path,
        ports: Ports | None = None,
        log_file: Path | None = None,
        extra_args: tuple[str, ...] = (),
    ):
        self.model_repository = Path(model_repository).resolve()
        self.ports = ports or Ports()
        self.log_file = Path(log_file) if log_file else None
        self.extra_args = extra_args
        self.process: subprocess.Popen | None = None
        self._workdir: tempfile.TemporaryDirectory | None = None
        self._stubs: dict[int, str] = {}  # pid -> model, the python-backend stubs once the server was ready

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    def _command(self) -> tuple[list[str], dict[str, str]]:
        args = [
            f"--model-repository={self.model_repository}",
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            "--disable-auto-complete-config",
            *self.extra_args,
        ]
        native = shutil.which("tritonserver")
        if native:
            return [native, *args], {**os.environ, **_MALLOC_ENV}
        root = _bundled_root()
        backends = _prepare_backends(root, Path(self._workdir.name) / "backends")
        cpu_only = [
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            "--cuda-memory-pool-byte-size=0:0",
        ]
        command = [str(root / "bin/tritonserver"), f"--backend-directory={backends}", *cpu_only, *args]
        return command, {**_bundled_env(root), **_MALLOC_ENV}

    def start(self, timeout: float = 180.0) -> TritonServer:
        self._workdir = tempfile.TemporaryDirectory(prefix="t5-triton-server-")
        if self.log_file is None:
            self.log_file = Path(self._workdir.name) / "tritonserver.log"
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        command, env = self._command()
        with open(self.log_file, "ab") as log:
            # Own session: a Ctrl-C in the terminal reaches us, and we stop the server cleanly.
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self._stubs = stub_models(process_tree(self.process.pid)[1:])
        return self

    def dead_stubs(self) -> list[str]:
        """Models whose python-backend stub died since the server became ready.

        Triton 2.51 neither restarts a dead stub nor reports it (readiness stays true), and the requests a
        dead `t5_generate` had taken are never answered: the caller should restart the server."""
        return sorted({model for pid, model in self._stubs.items() if process_state(pid) in (None, "Z")})

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode}:\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.2)
        raise ServerError(f"tritonserver not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_file or not self.log_file.exists():
            return ""
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (Triton finishes in-flight requests and unloads models), then SIGKILL the group.

        When Triton's exit timeout expires (e.g. a client keeps an HTTP connection open), it exits
        without unloading its models and leaves the python backend's shared memory in /dev/shm:
        the regions its processes had mapped are removed here.
        """
        process, self.process = self.process, None
        code = None
        if process is not None:
            regions = mapped_shm_regions(process_tree(process.pid))
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout)
            except subprocess.TimeoutExpired:
                code = None
            # Stubs are the server's children: make sure none outlives it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            if code is None:
                code = process.wait()
            for region in regions:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(region)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None
        return code

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

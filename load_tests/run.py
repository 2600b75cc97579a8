"""Run the locust load test headless against `t5_generate`, then summarize it.

    .venv/bin/python load_tests/run.py --model-repository build/repo --run-time 60s --output build/load
    .venv/bin/python load_tests/run.py --http-url 127.0.0.1:8000 --grpc-url 127.0.0.1:8001 --server-pid PID

Locust runs as a subprocess (`python -m locust`): its gevent monkey-patching stays out of this process,
which may be running the server. Exit code: 0 when every request got its expected answer, 1 on
unexpected errors (or a server that is not ready afterwards), 2 when locust did not produce its stats.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from t5_triton.memory import MemorySampler, memory_total, tree_memory
from t5_triton.server import Ports, TritonServer

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
# locustfile.BAD_REQUEST; importing the locustfile here would monkey-patch this process with gevent.
BAD_REQUEST = "bad request (expected INVALID_ARG)"
CSV_PREFIX = "locust"  # locust writes locust_stats.csv, locust_failures.csv, locust_exceptions.csv, ...
STOP_TIMEOUT_S = 30  # users finish the request they are in when the run time is over
_TIMESPAN = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def parse_seconds(text: str) -> int:
    """Seconds from '90', '90s', '1m30s', '1h'."""
    if text.isdigit():
        return int(text)
    match = _TIMESPAN.fullmatch(text.strip())
    if not match or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"not a time span: {text!r} (e.g. 30s, 2m, 1m30s)")
    hours, minutes, seconds = (int(group or 0) for group in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Headless locust load test of t5_generate over gRPC and HTTP, with a summary.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    target = parser.add_argument_group("server (an existing one, or --model-repository to start one)")
    target.add_argument("--model-repository", type=Path, help="start a tritonserver for it on free ports")
    target.add_argument("--host", default="127.0.0.1", help="an existing server's address")
    target.add_argument("--http-port", type=int, default=8000, help="with --host")
    target.add_argument("--grpc-port", type=int, default=8001, help="with --host")
    target.add_argument("--http-url", help="host:port, instead of --host/--http-port")
    target.add_argument("--grpc-url", help="host:port, instead of --host/--grpc-port")
    target.add_argument("--server-pid", type=int, help="an existing server's pid, for its RSS")
    load = parser.add_argument_group("load")
    load.add_argument("--users", type=int, default=4, help="concurrent users, half gRPC and half HTTP")
    load.add_argument("--spawn-rate", type=float, default=2.0, help="users started per second")
    load.add_argument("--run-time", type=parse_seconds, default=60, help="e.g. 30s, 5m, 1m30s")
    load.add_argument("--rss-interval", type=float, default=10.0, help="seconds between server memory samples")
    parser.add_argument("--output", type=Path, default=Path("build/load"), help="CSV, HTML report, logs, summary")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Target:
    http: str
    grpc: str
    pid: int | None  # the tritonserver process, when known
    started: bool


@contextlib.contextmanager
def server_target(args: argparse.Namespace) -> Iterator[Target]:
    if args.model_repository:
        log_file = args.output / "tritonserver.log"
        with TritonServer(args.model_repository, Ports.free(), log_file=log_file) as server:
            yield Target(server.http_url, server.grpc_url, server.process.pid, started=True)
        return
    http = args.http_url or f"{args.host}:{args.http_port}"
    grpc = args.grpc_url or f"{args.host}:{args.grpc_port}"
    yield Target(http, grpc, args.server_pid, started=False)


def is_ready(http: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{http}/v2/health/ready", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def memory_summary(before: dict | None, after: dict | None, timeline: list[dict]) -> dict[str, Any]:
    """`before`/`after`: `tree_memory` just before and just after the load. A server that keeps growing shows it
    in the second half of the run; the first half holds the warm-up (allocator arenas, shared memory pools)."""
    sampled = [point for point in timeline if point["pss"] is not None]
    half = [point for point in sampled if point["t"] >= sampled[-1]["t"] / 2] if sampled else []
    return {
        "before": memory_total(before, "rss"),
        "after": memory_total(after, "rss"),
        "processes": len(after) if after else None,
        "pss_before": memory_total(before, "pss"),
        "pss_after": memory_total(after, "pss"),
        "pss_growth_second_half": half[-1]["pss"] - half[0]["pss"] if len(half) > 1 else None,
        "per_process": {
            name: {"rss_before": (before or {}).get(name, {}).get("rss"), "rss_after": values["rss"]}
            for name, values in (after or {}).items()
        },
        "timeline": timeline,
    }


def run_locust(args: argparse.Namespace, target: Target) -> int:
    out = args.output
    # A stale CSV from an earlier run must not pass for this run's stats.
    for old in [*out.glob(f"{CSV_PREFIX}_*.csv"), out / "client_stats.json"]:
        old.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "--users", str(args.users), "--spawn-rate", str(args.spawn_rate), "--run-time", f"{args.run_time}s",
        "--stop-timeout", str(STOP_TIMEOUT_S), "--host", f"http://{target.http}",
        "--csv", str(out / CSV_PREFIX), "--html", str(out / "report.html"), "--only-summary",
    ]  # fmt: skip
    env = {
        **os.environ,
        "T5_LOAD_HTTP_URL": target.http,
        "T5_LOAD_GRPC_URL": target.grpc,
        "T5_LOAD_CLIENT_STATS": str(out / "client_stats.json"),
    }
    with open(out / "locust.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            return process.wait(timeout=args.run_time + STOP_TIMEOUT_S + 120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return -9


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # 'N/A' when a row has no requests
        return None


def _kind(row: dict[str, str]) -> dict[str, Any]:
    return {
        "protocol": row["Type"],
        "name": row["Name"],
        "requests": int(row["Request Count"]),
        "failures": int(row["Failure Count"]),
        **{f"p{q}_ms": _number(row[f"{q}%"]) for q in (50, 95, 99)},
    }


def summarize(out: Path, target: Target, rss: dict[str, Any], locust_code: int) -> dict[str, Any]:
    rows = _read_csv(out / f"{CSV_PREFIX}_stats.csv")
    total = next(row for row in rows if row["Name"] == "Aggregated")
    kinds = [_kind(row) for row in rows if row is not total]
    bad = [kind for kind in kinds if BAD_REQUEST in kind["name"]]
    by_protocol: dict[str, int] = {}
    for kind in kinds:
        by_protocol[kind["protocol"]] = by_protocol.get(kind["protocol"], 0) + kind["requests"]
    errors = [
        {"protocol": row["Method"], "name": row["Name"], "error": row["Error"], "count": int(row["Occurrences"])}
        for row in _read_csv(out / f"{CSV_PREFIX}_failures.csv")
    ]
    # Exceptions raised in user code outside a request (e.g. a client that cannot be created): errors too.
    errors += [
        {"protocol": "locust", "name": "user code", "error": row["Message"], "count": int(row["Count"])}
        for row in _read_csv(out / f"{CSV_PREFIX}_exceptions.csv")
    ]
    errors.sort(key=lambda error: -error["count"])
    client_stats = out / "client_stats.json"
    return {
        "target": {"http": target.http, "grpc": target.grpc, "started_by_runner": target.started},
        "requests": int(total["Request Count"]),
        "requests_by_protocol": by_protocol,
        "requests_per_s": round(float(total["Requests/s"]), 2),
        "latency_ms": {f"p{q}": _number(total[f"{q}%"]) for q in (50, 95, 99)},
        "bad_requests": sum(kind["requests"] for kind in bad),
        "expected_invalid_arg": sum(kind["requests"] - kind["failures"] for kind in bad),
        "unexpected_errors": sum(error["count"] for error in errors),
        "errors": errors,
        "kinds": kinds,
        "client_max_in_flight": json.loads(client_stats.read_text())["max_in_flight"] if client_stats.exists() else {},
        "server_rss": rss,
        "server_ready_after": is_ready(target.http),
        "locust_exit_code": locust_code,
    }


def _mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f} MB"


def _signed_mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:+.1f} MB"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def report(summary: dict[str, Any], args: argparse.Namespace) -> str:
    latency, rss = summary["latency_ms"], summary["server_rss"]
    protocols = ", ".join(f"{name} {count}" for name, count in sorted(summary["requests_by_protocol"].items()))
    lines = [
        f"load test: {args.users} users, {args.run_time} s, http {summary['target']['http']}, "
        f"grpc {summary['target']['grpc']}",
        f"requests              {summary['requests']} ({protocols}), {summary['requests_per_s']} req/s",
        f"latency ms            p50 {_ms(latency['p50'])}  p95 {_ms(latency['p95'])}  p99 {_ms(latency['p99'])}",
        f"expected INVALID_ARG  {summary['expected_invalid_arg']} of {summary['bad_requests']} bad requests",
        f"unexpected errors     {summary['unexpected_errors']}",
        *(f"  {e['count']:>5} x {e['protocol']} {e['name']}: {e['error']}" for e in summary["errors"]),
        f"server RSS            before {_mb(rss['before'])}, after {_mb(rss['after'])} ({rss['processes']} processes)",
        f"server PSS            before {_mb(rss['pss_before'])}, after {_mb(rss['pss_after'])}, "
        f"second half of the run {_signed_mb(rss['pss_growth_second_half'])}",
        *(
            f"  RSS {name:<30} {_mb(values['rss_before'])} -> {_mb(values['rss_after'])}"
            for name, values in rss["per_process"].items()
        ),
        f"server ready after    {summary['server_ready_after']}",
        f"client max in flight  {summary['client_max_in_flight']}",
        "",
        f"{'protocol':<8} {'kind':<48} {'requests':>8} {'failures':>8} {'p50':>6} {'p95':>6} {'p99':>6}",
        *(
            f"{k['protocol']:<8} {k['name']:<48} {k['requests']:>8} {k['failures']:>8} "
            f"{_ms(k['p50_ms']):>6} {_ms(k['p95_ms']):>6} {_ms(k['p99_ms']):>6}"
            for k in summary["kinds"]
        ),
        "",
        f"written to {args.output}: summary.json, {CSV_PREFIX}_*.csv, report.html, locust.log"
        + (", tritonserver.log" if summary["target"]["started_by_runner"] else ""),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    with server_target(args) as target:
        if not is_ready(target.http):
            print(f"no ready server at http://{target.http}", file=sys.stderr)
            return 2
        before = tree_memory(target.pid)
        with MemorySampler(target.pid, args.rss_interval) as sampler:
            locust_code = run_locust(args, target)
        rss = memory_summary(before, tree_memory(target.pid), sampler.timeline)
        if not (args.output / f"{CSV_PREFIX}_stats.csv").exists():
            print(f"locust exited with {locust_code} without stats; see {args.output / 'locust.log'}", file=sys.stderr)
            return 2
        summary = summarize(args.output, target, rss, locust_code)
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(report(summary, args))
    return 0 if summary["unexpected_errors"] == 0 and summary["server_ready_after"] else 1


if __name__ == "__main__":
    sys.exit(main())

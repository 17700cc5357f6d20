"""``make bench``: every scenario, one table, and benchmarks/results/latest.json.

    python -m benchmarks.run [--quick] [--only http-state,engine,...]

Each row carries the command that reruns it alone. Numbers are medians where a scenario
repeats; this is a shared 2-core machine, so read them with the load average printed above.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks import audit_query, http

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PY = "python"
RATIO_TARGETS = {4: 0.5, 64: 0.8}
"""http-state: ours/ceiling at these connection counts (issue 15); the other counts are reported."""


def engine(backend: str, **kw: int | str) -> dict[str, Any]:
    args = [f"--{k}={v}" for k, v in kw.items()]
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.engine", backend, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stderr
    return json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[len("RESULT ") :])


@contextlib.contextmanager
def pg_schema(base: str) -> Iterator[str]:
    """A fresh schema in ``base`` for one scenario (dropped afterwards); its URL."""
    import psycopg
    from psycopg import sql

    schema = f"opscore_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def postgres_available() -> str | None:
    """Why the PostgreSQL variants are skipped, or ``None`` when they can run."""
    url = os.environ.get("OPSCORE_TEST_DATABASE_URL", "")
    if not url:
        return "OPSCORE_TEST_DATABASE_URL is not set"
    try:
        import opscore.storage.postgres  # noqa: F401
    except ImportError:
        return "this branch has no PostgreSQL store (opscore/storage/postgres.py) yet"
    return None


def _mean_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several pg_http runs of one replica count as one: mean rate, worst p99, summed errors, all verified."""
    return {
        "rps": sum(r["rps"] for r in runs) / len(runs),
        "p99_ms": max(r["p99_ms"] for r in runs),
        "non200": sum(r["non200"] for r in runs),
        "verify_ok": all(r["verify_ok"] for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="shorter runs, 100k audit records at most")
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--connections", default="1,4,16,64", help="http-state: comma-separated wrk connection counts")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    quick = args.quick

    def wanted(name: str) -> bool:
        return not only or name in only

    rows: list[dict[str, Any]] = []

    def row(scenario: str, metric: str, value: Any, target: str, met: bool | None, command: str) -> None:
        rows.append(
            {"scenario": scenario, "metric": metric, "value": value, "target": target, "met": met, "command": command}
        )

    details: dict[str, Any] = {}
    seconds, rounds = (5, 2) if quick else (10, 3)
    if wanted("http-state"):
        counts = tuple(int(c) for c in args.connections.split(","))
        cmd = (
            f"{PY} -c 'from benchmarks import http; "
            f"print(http.http_state(rounds={rounds}, seconds={seconds}, connections={counts}))'"
        )
        r = http.http_state(rounds=rounds, seconds=seconds, connections=counts)
        details["http-state"] = r
        for c, s in r["by_c"].items():
            target = RATIO_TARGETS.get(c)
            row(
                "http-state",
                f"c={c}: ours / ceiling req/s",
                f"{round(s['ours_rps'])} / {round(s['ceiling_rps'])}",
                "",
                None,
                cmd,
            )
            row(
                "http-state",
                f"c={c}: ratio ours/ceiling",
                round(s["ratio"], 2),
                "" if target is None else f">= {target}",
                None if target is None else s["ratio"] >= target,
                cmd,
            )
            row(
                "http-state",
                f"c={c}: ours p50 / p99 ms",
                f"{s['ours_p50_ms']:.1f} / {s['ours_p99_ms']:.1f}",
                "p99 <= 50",
                s["ours_p99_ms"] <= 50,
                cmd,
            )
            row(
                "http-state",
                f"c={c}: server CPU us/request ours / ceiling",
                f"{s['ours_cpu_us']:.0f} / {s['ceiling_cpu_us']:.0f}",
                "",
                None,
                cmd,
            )
            row(
                "http-state",
                f"c={c}: ceiling p50 / p99 ms",
                f"{s['ceiling_p50_ms']:.1f} / {s['ceiling_p99_ms']:.1f}",
                "",
                None,
                cmd,
            )
            row(
                "http-state",
                f"c={c}: errors (ours, ceiling)",
                f"{s['ours_errors']}, {s['ceiling_errors']}",
                "0",
                s["ours_errors"] == 0,
                cmd,
            )
    for backend, target in (("sqlite", 20_000), ("memory", 50_000)):
        name = f"engine-{backend}"
        if wanted("engine") or wanted(name):
            r = engine(backend)
            details[name] = r
            row(
                "engine",
                f"{backend} transitions/s",
                round(r["per_s"]),
                f">= {target:,}",
                r["per_s"] >= target,
                f"{PY} -m benchmarks.engine {backend}",
            )
            row(
                "engine",
                f"{backend} CPU us/transition",
                round(r["cpu_us_per_transition"], 1),
                "",
                None,
                f"{PY} -m benchmarks.engine {backend}",
            )
    if wanted("batch"):
        r = http.batch(seconds=seconds)
        details["batch"] = r
        cmd = f"{PY} -c 'from benchmarks import http; print(http.batch(seconds={seconds}))'"
        row(
            "batch",
            "transitions/s (100 a request)",
            round(r["transitions_per_s"]),
            ">= 20,000",
            r["transitions_per_s"] >= 20_000,
            cmd,
        )
        row("batch", "refused / errors", f"{r['refused_reports']} / {r['errors']}", "0", r["refused_reports"] == 0, cmd)
    if wanted("audit-query"):
        sizes = [10_000, 100_000] if quick else [10_000, 100_000, 1_000_000]
        r = audit_query.run(sizes)
        details["audit-query"] = r
        cmd = f"{PY} -m benchmarks.audit_query --sizes {','.join(map(str, sizes))}"
        for size in sizes:
            q = r[str(size)]
            big = size == max(sizes)
            row(
                "audit-query",
                f"{size:,}: agent page p50/p99 ms",
                f"{q['agent_page_p50_ms']:.2f} / {q['agent_page_p99_ms']:.2f}",
                "p99 <= 5 at 1M" if big else "",
                q["agent_page_p99_ms"] <= 5 if big else None,
                cmd,
            )
            row(
                "audit-query",
                f"{size:,}: global page p50/p99 ms",
                f"{q['global_page_p50_ms']:.2f} / {q['global_page_p99_ms']:.2f}",
                "p99 <= 5 at 1M" if big else "",
                q["global_page_p99_ms"] <= 5 if big else None,
                cmd,
            )
        v = r["verify"]
        row(
            "audit-query",
            f"verify {v['records']:,} records/s",
            round(v["records_per_s"]),
            ">= 200,000",
            v["records_per_s"] >= 200_000,
            cmd,
        )
    if wanted("memory"):
        r = http.memory(agents=100_000)
        details["memory"] = r
        row(
            "memory",
            "RSS MB, 100k agents + 1 transition each",
            round(r["rss_mb"]),
            "<= 300",
            r["rss_mb"] <= 300,
            f"{PY} -c 'from benchmarks import http; print(http.memory())'",
        )
    if wanted("startup"):
        r = http.startup()
        details["startup"] = r
        row(
            "startup",
            "process start -> /health 200, s (median of 5)",
            round(r["median_s"], 2),
            "<= 1.5",
            r["median_s"] <= 1.5,
            f"{PY} -c 'from benchmarks import http; print(http.startup())'",
        )
    if wanted("cli"):
        r = http.cli_help()
        details["cli"] = r
        row(
            "cli",
            "opscore --help, s (best of 5)",
            round(r["best_s"], 2),
            "< 0.5",
            r["best_s"] < 0.5,
            f"{PY} -c 'from benchmarks import http; print(http.cli_help())'",
        )
    if wanted("postgres"):
        why = postgres_available()
        cmd = "OPSCORE_TEST_DATABASE_URL=postgresql://... python -m benchmarks.run --only postgres"
        if why is not None:
            row("postgres", "http-state / engine", "skipped", "", None, f"{cmd}  ({why})")
            print(f"postgres variants skipped: {why}", file=sys.stderr)
        else:
            base = os.environ["OPSCORE_TEST_DATABASE_URL"]
            with pg_schema(base) as url:
                r = http.http_state(rounds=rounds, seconds=seconds, connections=64, database_url=url)
            details["postgres-http-state"] = r
            row("postgres", "http-state ours req/s", round(r["ours_rps"]), "", None, cmd)
            row("postgres", "http-state ceiling req/s", round(r["ceiling_rps"]), "", None, cmd)
            row("postgres", "http-state ratio ours/ceiling", round(r["ratio"], 2), "", None, cmd)
            row(
                "postgres",
                "http-state ours p50 / p99 ms",
                f"{r['ours_p50_ms']:.1f} / {r['ours_p99_ms']:.1f}",
                "",
                None,
                cmd,
            )
            row("postgres", "http-state errors (ours)", r["ours_errors"], "0", r["ours_errors"] == 0, cmd)
            with pg_schema(base) as url:
                e = engine("postgresql", url=url)
            details["postgres-engine"] = e
            ecmd = "OPSCORE_TEST_DATABASE_URL=postgresql://... python -m benchmarks.engine postgresql"
            row("postgres", "engine transitions/s", round(e["per_s"]), ">= 8,000", e["per_s"] >= 8000, ecmd)
            row("postgres", "engine CPU us/transition", round(e["cpu_us_per_transition"], 1), "", None, ecmd)
            row("postgres", "engine mean batch (group commit)", round(e.get("mean_batch", 1), 1), "", None, ecmd)
            lite = details.get("engine-sqlite")
            if lite:
                cpu = e["cpu_us_per_transition"] / lite["cpu_us_per_transition"]
                row("postgres", "engine CPU/transition PG / SQLite", round(cpu, 2), "<= 1.5", cpu <= 1.5, ecmd)
            lite_http = details.get("http-state")
            if lite_http:
                ratio = r["ours_rps"] / lite_http["ours_rps"]
                row("postgres", "http-state PG / SQLite (same run)", round(ratio, 2), ">= 0.6", ratio >= 0.6, cmd)
            with pg_schema(base) as url:
                b = http.batch(seconds=seconds, database_url=url)
            details["postgres-batch"] = b
            bcmd = f"{PY} -c 'from benchmarks import http; print(http.batch(database_url=...))'"
            row("postgres", "batch transitions/s", round(b["transitions_per_s"]), ">= 10,000",
                b["transitions_per_s"] >= 10_000, bcmd)  # fmt: skip
            row("postgres", "batch refused / errors", f"{b['refused_reports']} / {b['errors']}", "0",
                b["refused_reports"] == 0 and b["errors"] == 0, bcmd)  # fmt: skip
            from benchmarks import pg_http

            # 1, 2, 2, 1 replicas: a machine that speeds up or slows down during the four runs
            # moves both means alike, where one run of each would credit the drift to one side.
            runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
            for n in (1, 2, 2, 1):
                ns = argparse.Namespace(backend="postgres", replicas=n, duration=int(seconds), connections=64,
                                        threads=2, agents=4096, pool_max=0)  # fmt: skip
                runs[n].append(pg_http.run(ns))
            reps = {n: _mean_run(r) for n, r in runs.items()}
            for n, r in runs.items():
                details[f"postgres-replicas-{n}"] = {**reps[n], "runs": r}
            rcmd = "python -m benchmarks.pg_http --backend postgres --replicas N --duration 10  # 1, 2, 2, 1"
            row("postgres", "state reports/s, 1 replica (wrk, 64 conns, mean of 2)", round(reps[1]["rps"]), "", None,
                rcmd)  # fmt: skip
            row("postgres", "state reports/s, 2 replicas (mean of 2)", round(reps[2]["rps"]), "> 1 replica",
                reps[2]["rps"] > reps[1]["rps"], rcmd)  # fmt: skip
            row("postgres", "replicas: non-200 / verify", f"{reps[1]['non200'] + reps[2]['non200']} / "
                f"{reps[1]['verify_ok'] and reps[2]['verify_ok']}", "0 / True", None, rcmd)  # fmt: skip

    machine = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_end": os.getloadavg(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print_table(rows, machine)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps({"machine": machine, "rows": rows, "details": details}, indent=1))


def print_table(rows: list[dict[str, Any]], machine: dict[str, Any]) -> None:
    print(
        f"\nmachine: {machine['nproc']} CPUs, Python {machine['python']}, {machine['platform']}, "
        f"load average at end {machine['loadavg_at_end'][0]:.2f}"
    )
    widths = [12, 44, 22, 16, 5]
    head = ["scenario", "metric", "value", "target", "met"]
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        cells = [r["scenario"], r["metric"], str(r["value"]), r["target"], met]
        print(" | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))
    print("\nrerun a scenario:")
    seen = set()
    for r in rows:
        if r["command"] not in seen:
            seen.add(r["command"])
            print(f"  {r['scenario']:<12} {r['command']}")


if __name__ == "__main__":
    main()

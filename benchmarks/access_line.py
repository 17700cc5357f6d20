"""What one access line costs the request that logs it: ``python -m benchmarks.access_line``.

Times ``opscore.logs.access_line`` (template ``LogRecord``, spliced JSON text, enqueue for the
writer thread) against the plain way (``logger.info("request", extra={...})`` through
python-json-logger), both into the same background handler writing to ``/dev/null``, and the
formatting alone. Prints CPU µs per line on the caller's thread (median of rounds) and a
``RESULT {json}`` line.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time

from opscore import logs

ROUTE = "/v1/opscore/agent/{agent_id}/state"


def per_line(fn: object, n: int, rounds: int) -> float:
    """Median CPU µs of the calling thread per ``fn()``, over ``rounds`` rounds of ``n`` calls.

    CPU time of this thread (``time.thread_time``), not wall time: what a request pays, without
    the writer thread's turns and other processes on a shared machine (log lines are flushed
    between rounds, outside the measurement).
    """
    results = []
    for _ in range(rounds):
        start = time.thread_time()
        for _ in range(n):
            fn()  # type: ignore[operator]
        results.append((time.thread_time() - start) / n * 1e6)
        logs.flush()
    return statistics.median(results)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    rounds = 7
    sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    logs.configure("INFO", sink)
    plain = logging.getLogger("bench.plain")
    rid = "9f1c2a0b3d4e5f600000000000000001"

    def ours() -> None:
        logs.access_line("POST", ROUTE, 200, 0.000412, rid, True, "agents")

    def client_id() -> None:
        logs.access_line("POST", ROUTE, 200, 0.000412, 'client "trace" 42', False, "agents")

    def stdlib() -> None:
        plain.info(
            "request",
            extra={
                "method": "POST",
                "route": ROUTE,
                "status": 200,
                "durationMs": 0.412,
                "requestId": rid,
                "keyName": "agents",
            },
        )

    record = logs._access_record(
        '{"method":"POST","route":"' + ROUTE + '","status":200,"durationMs":0.412,"requestId":"x","keyName":"a"}'
    )
    formatter = logging.getLogger().handlers[0].formatter
    assert formatter is not None

    def format_only() -> None:
        formatter.format(record)

    result = {
        "access_line_us": round(per_line(ours, n, rounds), 2),
        "access_line_client_request_id_us": round(per_line(client_id, n, rounds), 2),
        "stdlib_extra_us": round(per_line(stdlib, n, rounds), 2),
        "format_only_us": round(per_line(format_only, n, rounds), 2),
        "lines": n,
        "rounds": rounds,
    }
    for name, value in result.items():
        print(f"{name:36} {value}", file=sys.stderr)
    print("RESULT " + json.dumps(result), file=sys.stderr)
    logs.shutdown()


if __name__ == "__main__":
    main()

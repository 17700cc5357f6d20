"""Group py-spy collapsed stacks (``--format raw``) of the server into hot-path components.

    python benchmarks/flame_summary.py benchmarks/results/profile.txt

Each sample goes to the leaf-most frame that belongs to a named component; what is left is
framework plumbing, then the event loop.
"""

import collections
import sys

cats = [  # first match from the leaf upwards wins
    ("sqlite writer thread: SQL, seal, rows", ["opscore-sqlite-writer", "storage/writer.py"]),
    ("log writer thread", ["BackgroundHandler._run"]),
    ("pg: psycopg + pool (adapt, send, parse, checkout)", ["psycopg/", "psycopg_pool/"]),
    (
        "pg group writer: decide on locked rows, seal, rows as JSON",
        ["_apply_set", "_commit_set", "_update_row", "_create_row"],
    ),
    ("pg reads: coalesced point reads (rows to entities)", ["ReadCoalescer.", "_get_set", "_drain ("]),
    ("pg group writer: queue, batch, answer", ["GroupWriter.", "pgwrite.py"]),
    ("audit log line (format, LogRecord, enqueue)", ["Engine._emit"]),
    ("engine: fsm decision", ["Fsm.fire", "decide"]),
    (
        "engine: store round trip (submit, await, deliver)",
        ["SQLiteStore.apply", "SQLiteStore.get", "_deliver", "PostgresStore.apply", "PostgresStore.get"],
    ),
    ("engine: the rest (locks, records, results)", ["Engine.report", "Engine._run", "Engine._attempt"]),
    ("dependencies: auth, scopes, context (FastAPI's solver or a twin)", ["solve_dependencies", "opscore/api/deps.py"]),
    (
        "body parsing + validation",
        ["request_body_to_args", "request_params_to_args", "Request.json", "Request.body", "_validate", "Call."],
    ),
    (
        "response: JSONResponse + send",
        ["JSONResponse", "Response.__call__", "RequestResponseCycle.send", "send_with_id", "_send"],
    ),
    ("route function (seed, answer)", ["report_state"]),
    ("twin dispatch (match, Request, send; api/fastroute.py)", ["_Answer.__call__", "FastRoutes.", "OpsCoreApp."]),
    ("uvicorn HTTP parsing + protocol", ["HttpToolsProtocol"]),
    ("Starlette/FastAPI routing + middleware stack", ["fastapi/", "starlette/", "uvicorn/"]),
    ("event loop (uvloop) and other", [""]),
]
tot = collections.Counter()
total = 0
with open(sys.argv[1]) as fh:
    lines = fh.read().splitlines()
for line in lines:
    stack, _, n = line.rstrip().rpartition(" ")
    n = int(n)
    total += n
    frames = stack.split(";")
    chosen = "Guard middleware (own frames)" if "Guard." in frames[-1] else None
    specific = cats[:-3]
    for f in [] if chosen else reversed(frames):  # the leaf-most frame of a specific category decides
        for name, keys in specific:
            if any(k in f for k in keys):
                chosen = name
                break
        if chosen:
            break
    if chosen is None:
        for name, keys in cats[-3:]:
            if any(any(k in f for k in keys) for f in frames):
                chosen = name
                break
    tot[chosen] += n
for name in [c[0] for c in cats] + ["Guard middleware (own frames)"]:
    print(f"{100 * tot[name] / total:5.1f}%  {name}")
print("samples", total)

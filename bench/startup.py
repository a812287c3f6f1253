"""Start-up figures for `make bench`: init time, peak RSS and zip size of the
Flotilla functions, against a hello-world `lambda_runtime` binary (the
floor) and a Python + boto3 baseline. Standard library only.

Each run spawns one binary against a local Lambda Runtime API stub:
  init  = spawn to the first GET .../invocation/next at the stub;
  RSS   = VmHWM of the process, read after the 1st and the Nth response is
          posted (while the process waits for the stub's reply, so it is idle).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
PREFIX = "/2018-06-01/runtime/invocation/"
EMPTY_BATCH = b'{"Records": []}'
# Every tick lists the S3 ledger first: no tick event avoids an AWS call.
# dry_run keeps the reaper to planning should that call ever succeed.
TICK_EVENT = b'{"dry_run": true}'
ZIP_GOAL_MB = 5.0

# Plausible deployment values; AWS_ENDPOINT_URL is the discard port, so an
# SDK call is refused locally instead of leaving the machine. No profile
# files and no IMDS: as in Lambda, credentials come from the environment.
BASE_ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "AKIAFLOTILLABENCH000",
    "AWS_SECRET_ACCESS_KEY": "bench-fake-secret",
    "AWS_SESSION_TOKEN": "bench-fake-token",
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    # lambda_runtime panics without these three.
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "256",
    "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
    "FLOTILLA_STACK": "flotilla-bench",
    "FLOTILLA_BUCKET": "flotilla-bench-jobs",
    "FLOTILLA_RECONCILE_QUEUE_URL": "http://127.0.0.1:9/123456789012/flotilla-bench-reconcile",
    "FLOTILLA_ACCOUNT_ID": "123456789012",
}
NOTIFY_ENV = {"FLOTILLA_JOBS_QUEUE_URL": "http://127.0.0.1:9/123456789012/flotilla-bench-jobs"}
TICK_ENV = {
    "FLOTILLA_RECONCILE_DLQ_URL": "http://127.0.0.1:9/123456789012/flotilla-bench-reconcile-dlq",
    "FLOTILLA_REAPER_DRY_RUN": "true",
}


class Run:
    """One process's life against the stub."""

    def __init__(self, event, invocations):
        self.event, self.limit = event, invocations
        self.pid = None
        self.first_get = None
        self.handed = 0
        self.posted = 0
        self.rss_kib = {}
        self.errors = []
        self.lock = threading.Lock()
        self.done = threading.Event()  # Nth response posted
        self.over = threading.Event()  # process killed: release held polls


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a killed process resets its connection: expected, not news


class Stub(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as lambda_runtime expects

    def log_message(self, *args):
        pass

    def reply(self, status, body=b"{}", headers=()):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        run = self.server.run
        if self.path != PREFIX + "next":
            return self.reply(404)
        with run.lock:
            run.first_get = run.first_get or time.monotonic()
            run.handed += 1
            n = run.handed
        if n > run.limit:
            # The long poll Lambda holds while a sandbox is frozen.
            run.over.wait()
            self.close_connection = True
            return
        self.reply(200, run.event, [
            ("Lambda-Runtime-Aws-Request-Id", f"bench-{n:04d}"),
            ("Lambda-Runtime-Deadline-Ms", str(int(time.time() * 1000) + 900_000)),
            ("Lambda-Runtime-Invoked-Function-Arn",
             "arn:aws:lambda:us-east-1:123456789012:function:flotilla-bench"),
            ("Lambda-Runtime-Trace-Id", "Root=1-00000000-000000000000000000000000;Sampled=0"),
        ])

    def do_POST(self):
        run = self.server.run
        body = self.read_body()
        if not self.path.startswith(PREFIX) or not self.path.endswith(("/response", "/error")):
            return self.reply(404)
        if self.path.endswith("/error"):
            run.errors.append(body.decode(errors="replace")[:300])
        with run.lock:
            run.posted += 1
            n = run.posted
        if n in (1, run.limit):
            run.rss_kib[n] = vm_hwm_kib(run.pid)
        if n == run.limit:
            run.done.set()
        self.reply(202, b'{"status":"OK"}')

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline().strip():  # trailers
            pass
        return b"".join(chunks)


def vm_hwm_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def run_once(target, timeout):
    run = Run(target["event"], target["invocations"])
    server = Server(("127.0.0.1", 0), Stub)
    server.run = run
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**BASE_ENV, **target["env"], "AWS_LAMBDA_FUNCTION_NAME": f"flotilla-bench-{target['name']}",
           "AWS_LAMBDA_RUNTIME_API": f"127.0.0.1:{server.server_address[1]}"}
    with tempfile.TemporaryFile() as log:
        start = time.monotonic()
        proc = subprocess.Popen(target["cmd"], env=env, stdout=log, stderr=subprocess.STDOUT)
        run.pid = proc.pid
        while not run.done.wait(0.05) and proc.poll() is None and time.monotonic() - start < timeout:
            pass
        exited = proc.poll()
        proc.kill()
        proc.wait()
        run.over.set()
        server.shutdown()
        server.server_close()
        log.seek(0)
        output = log.read().decode(errors="replace")
    problem = None
    if not run.done.is_set():
        how = f"exited with {exited}" if exited is not None else f"timed out after {timeout} s"
        problem = f"{how} after {run.posted} responses; output ends: {output[-400:].strip()!r}"
    return {
        "init_ms": (run.first_get - start) * 1000 if run.first_get else None,
        "rss_kib": run.rss_kib,
        "errors": run.errors,
        "problem": problem,
    }


def summarise(target, runs):
    inits = [r["init_ms"] for r in runs if r["init_ms"] is not None]
    out = {
        "invocations": target["invocations"],
        "init_ms": {"median": statistics.median(inits), "min": min(inits), "max": max(inits)} if inits else None,
        "rss_mib": {},
        "error_responses": sum(len(r["errors"]) for r in runs),
        "errors_seen": sorted({e for r in runs for e in r["errors"]}),
        "failed_runs": [r["problem"] for r in runs if r["problem"]],
    }
    for n in sorted({1, target["invocations"]}):
        values = [r["rss_kib"][n] for r in runs if r["rss_kib"].get(n)]
        if values:
            out["rss_mib"][str(n)] = statistics.median(values) / 1024
    return out


def zip_sizes(zip_dir, functions):
    sizes = {}
    for name in functions:
        path = Path(zip_dir) / name / "bootstrap.zip"
        sizes[name] = path.stat().st_size / 1e6 if path.exists() else None
    return sizes


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def table(results, invocations):
    floor = results.get("floor", {})
    boto3 = results.get("boto3", {})
    med = lambda r: (r.get("init_ms") or {}).get("median")
    rss = lambda r, n: r.get("rss_mib", {}).get(str(n))
    head = (f"{'name':<10} {'init med':>9} {'min':>7} {'max':>7} {'x floor':>8} {'boto3/x':>8} "
            f"{'RSS@1':>7} {'x floor':>8} {f'RSS@{invocations}':>9} {'x floor':>8} {'errors':>6}")
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        init = r.get("init_ms")
        cells = [f"{init['median']:9.1f}", f"{init['min']:7.1f}", f"{init['max']:7.1f}"] if init else \
            [f"{'failed':>9}", f"{'-':>7}", f"{'-':>7}"]
        mib = lambda v, w: f"{v:{w}.1f}" if v else f"{'n/a':>{w}}"
        lines.append(" ".join([
            f"{name:<10}", *cells, f"{ratio(med(r), med(floor)):>8}", f"{ratio(med(boto3), med(r)):>8}",
            mib(rss(r, 1), 7), f"{ratio(rss(r, 1), rss(floor, 1)):>8}",
            mib(rss(r, invocations), 9), f"{ratio(rss(r, invocations), rss(floor, invocations)):>8}",
            f"{r['error_responses']:>6}",
        ]))
    lines.append("init in ms; RSS = VmHWM in MiB, medians over runs; boto3/x = boto3's median over this one's.")
    return "\n".join(lines)


def main():
    default_bins = Path(os.environ.get("CARGO_TARGET_DIR") or HERE.parent / "target") / "release"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin-dir", type=Path, default=default_bins, help=f"default {default_bins}")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--invocations", type=int, default=1000, help="RSS is also read after this many")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--zip-dir", type=Path, help="where cargo lambda put <function>/bootstrap.zip")
    args = parser.parse_args()

    n = args.invocations
    targets = [
        {"name": "floor", "cmd": [args.bin_dir / "bench-floor"], "event": EMPTY_BATCH, "invocations": n, "env": {}},
        {"name": "intake", "cmd": [args.bin_dir / "intake"], "event": EMPTY_BATCH, "invocations": n, "env": {}},
        {"name": "reconcile", "cmd": [args.bin_dir / "reconcile"], "event": EMPTY_BATCH, "invocations": n, "env": {}},
        # One invocation only: each one is an S3 call refused and retried.
        {"name": "tick", "cmd": [args.bin_dir / "tick"], "event": TICK_EVENT, "invocations": 1, "env": TICK_ENV},
        {"name": "notify", "cmd": [args.bin_dir / "notify"], "event": EMPTY_BATCH, "invocations": n, "env": NOTIFY_ENV},
        {"name": "boto3", "cmd": [sys.executable, HERE / "boto3_baseline" / "bootstrap.py"],
         "event": EMPTY_BATCH, "invocations": n, "env": {}},
    ]
    missing = [t for t in targets if not Path(t["cmd"][0]).exists()]
    for t in missing:
        print(f"skipped {t['name']}: no {t['cmd'][0]}", file=sys.stderr)
    targets = [t for t in targets if t not in missing]

    # Interleaved, so load from elsewhere on the machine spreads over all.
    runs = {t["name"]: [] for t in targets}
    for i in range(args.runs):
        for t in targets:
            runs[t["name"]].append(run_once(t, args.timeout))
        print(f"run {i + 1}/{args.runs} done", file=sys.stderr)
    results = {t["name"]: summarise(t, runs[t["name"]]) for t in targets}

    print(table(results, n))
    for name, r in results.items():
        for problem in sorted(set(r["failed_runs"])):
            print(f"{name}: run failed: {problem}")
        for error in r["errors_seen"]:
            print(f"{name}: error response: {error}")
    if "tick" in results:
        print("tick: RSS after 1 invocation only (every tick event lists S3 first).")
    report = {"bin_dir": str(args.bin_dir), "runs": args.runs, "invocations": n, "results": results}
    if args.zip_dir:
        report["zip_mb"] = zip_sizes(args.zip_dir, ["intake", "reconcile", "tick", "notify"])
        print(f"\nzip size, MB (10^6 bytes), goal {ZIP_GOAL_MB:g} MB:")
        for name, size in report["zip_mb"].items():
            verdict = "missing" if size is None else f"{size:.2f} {'ok' if size <= ZIP_GOAL_MB else 'OVER'}"
            print(f"  {name:<10} {verdict}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""`sdrt serve` under load, on this machine's loopback: what the server costs per request
against the same generation in-process, and how it behaves when its queue is full.

    python benchmarks/serve_load.py [--artifacts DIR | --work DIR] [--clients 16] [--requests 200]
                                    [--steps 4] [--sequential 15] [--quick] [--json FILE]

Without --artifacts, the built-in tiny SD 1.5 model (128x128) is made and exported in
--work (reused when a complete export is there, as `sdrt demo` reuses one). Then:

1. in-process: `Pipeline.load(ART)` and one txt2img request's settings (prompt, steps,
   sampler, guidance, seed) timed --sequential times; also the PNG encoding the server
   adds to each image;
2. `sdrt serve ART --port FREE --max-queue CLIENTS` in a child process, bound to
   127.0.0.1 only; its resident set size (RSS, with any children) once ready;
3. sequential: one client, one request at a time, each followed by the same generation
   in-process (interleaved, so both see the same machine): the server's overhead per
   request is the difference of the medians; /metrics splits the server's own part
   (time in the server beyond queue wait and generation) from the client's and HTTP's;
4. load: CLIENTS threads, one httpx.Client each, sending REQUESTS requests in total with
   distinct seeds; throughput, p50/p99 latency, every status (all must be 200), and
   the server's time per image against the in-process median;
5. overload: the server restarted with --max-queue OVERLOAD_QUEUE, CLIENTS threads
   sending the next request as soon as one is answered, never honouring Retry-After:
   counts of 200, 429 and anything else (must be none), and whether every 429 carried
   a Retry-After of at least one second; the server's rejected-jobs counter must match;
6. RSS before the load, after it and the growth.

Everything is bounded: requests by count, each phase by --max-seconds. The server is
terminated on the way out, on an error or Ctrl-C too. Progress goes to stderr; the
table to stdout.
"""

from __future__ import annotations

import argparse
import base64
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdrt.engines.progress import Progress

HOST = "127.0.0.1"   # loopback only: this benchmark never binds or calls any other address
PROMPT = "a watercolor fox in a snowy forest"
SAMPLER_A1111, SAMPLER = "Euler a", "euler_a"
GUIDANCE = 7.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROUTE = "/sdapi/v1/txt2img"
READY_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 300.0

say = Progress()


# -- the model ---------------------------------------------------------------------------------

def built_in_artifacts(work: Path) -> Path:
    """The built-in tiny model's export in `work`, made the way `sdrt demo` makes it."""
    from sdrt.engines.errors import SdrtError
    from sdrt.engines.manifest import load_manifest

    model_dir, artifact_dir = work / "model", work / "artifacts"
    try:
        load_manifest(artifact_dir)
        say(f"reusing the export in {artifact_dir}")
        return artifact_dir
    except SdrtError:
        pass
    from sdrt.export.config import ExportConfig
    from sdrt.export.exporter import export_artifacts
    from sdrt.export.tiny import make_tiny_model

    work.mkdir(parents=True, exist_ok=True)
    if not (model_dir / "model_index.json").is_file():
        say(f"writing the built-in tiny SD 1.5 model to {model_dir}")
        make_tiny_model(model_dir, variant="sd15", force=model_dir.exists())
    say(f"exporting it to ONNX in {artifact_dir}")
    export_artifacts(ExportConfig(model_dir=model_dir, out_dir=artifact_dir, force=artifact_dir.exists(),
                                  model_name="sdrt-tiny-sd15"), say)
    return artifact_dir


# -- the server --------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """RSS of a process and its children (uvicorn runs one process, but count any)."""
    import psutil

    p = psutil.Process(pid)
    total = p.memory_info().rss
    for child in p.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class Server:
    """`sdrt serve` in a child process on a free loopback port; `stop()` always ends it."""

    def __init__(self, artifacts: Path, max_queue: int, log_dir: Path):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = log_dir / f"serve-{self.port}.log"
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "sdrt.cli.main", "serve", str(artifacts), "--host", HOST,
               "--port", str(self.port), "--max-queue", str(max_queue)]
        say(f"starting sdrt serve {' '.join(cmd[4:])}")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, client) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < READY_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sdrt serve exited with {self.proc.returncode} before it was ready:\n"
                                   f"{self.log_tail()}")
            try:
                if client.get(f"{self.url}/v2/health/ready", timeout=2.0).status_code == 200:
                    return time.perf_counter() - t0
            except Exception:   # noqa: BLE001 - not listening yet
                pass
            time.sleep(0.1)
        raise RuntimeError(f"sdrt serve not ready after {READY_TIMEOUT_S:g} s:\n{self.log_tail()}")

    def rss(self) -> int:
        return rss_bytes(self.proc.pid)

    def metrics(self, client) -> dict[tuple[str, frozenset], float]:
        return parse_prometheus(client.get(f"{self.url}/metrics", timeout=10.0).text)

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def parse_prometheus(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus' text format, enough of it for prometheus-client's output: one sample
    per line, `name{k="v",...} value`; label values here hold no commas or quotes."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        pairs = (p.split("=", 1) for p in labels.rstrip("}").split(",") if "=" in p)
        out[(name, frozenset((k, v.strip('"')) for k, v in pairs))] = float(value)
    return out


def metric(m: dict, name: str, **labels: str) -> float:
    return m.get((name, frozenset(labels.items())), 0.0)


def server_split(before: dict, after: dict) -> dict[str, float]:
    """Per-request means between two /metrics readings: time in the server, its queue
    wait and its generation (stage 'total'); the rest is the server's own overhead."""
    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    n = delta("sdrt_request_seconds_count", route=ROUTE)
    jobs = delta("sdrt_queue_wait_seconds_count")
    if not n or not jobs:
        return {}
    request = delta("sdrt_request_seconds_sum", route=ROUTE) / n
    wait = delta("sdrt_queue_wait_seconds_sum") / jobs
    generation = delta("sdrt_stage_seconds_sum", stage="total") / jobs
    return {"requests": n, "request_s": request, "queue_wait_s": wait, "generation_s": generation,
            "server_own_s": request - wait - generation}


# -- clients -----------------------------------------------------------------------------------

@dataclass
class Answer:
    status: int            # 0: no answer (a connection error or timeout)
    seconds: float
    retry_after: str | None = None
    valid: bool = True     # a 200 with one base64 PNG in images
    error: str = ""


def payload(seed: int, steps: int) -> dict:
    return {"prompt": PROMPT, "steps": steps, "seed": seed, "sampler_name": SAMPLER_A1111, "cfg_scale": GUIDANCE}


def post(client, url: str, body: dict) -> Answer:
    t0 = time.perf_counter()
    try:
        r = client.post(url + ROUTE, json=body, timeout=REQUEST_TIMEOUT_S)
    except Exception as e:   # noqa: BLE001 - counted as a failed request, the run goes on
        return Answer(0, time.perf_counter() - t0, valid=False, error=f"{type(e).__name__}: {e}")
    seconds = time.perf_counter() - t0
    answer = Answer(r.status_code, seconds, r.headers.get("retry-after"))
    if r.status_code == 200:
        try:
            images = r.json()["images"]
            answer.valid = len(images) == 1 and base64.b64decode(images[0]).startswith(PNG_MAGIC)
        except (ValueError, KeyError, TypeError):
            answer.valid = False
        if not answer.valid:
            answer.error = "a 200 without one PNG in images"
    else:
        answer.error = r.text[:200]
    return answer


@dataclass
class LoadRun:
    answers: list[Answer] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False


def run_clients(url: str, clients: int, requests: int, steps: int, first_seed: int, max_seconds: float) -> LoadRun:
    """`clients` threads, one httpx.Client each, take the next seed from a shared counter
    and send it at once when their previous request is answered, until `requests` were
    sent or `max_seconds` passed."""
    import httpx

    lock = threading.Lock()
    state = {"next": 0}
    run = LoadRun()
    deadline = time.perf_counter() + max_seconds

    def client_loop() -> None:
        with httpx.Client() as client:
            while True:
                with lock:
                    i = state["next"]
                    if i >= requests:
                        return
                    if time.perf_counter() > deadline:
                        run.stopped_early = True
                        return
                    state["next"] += 1
                answer = post(client, url, payload(first_seed + i, steps))
                with lock:
                    run.answers.append(answer)

    threads = [threading.Thread(target=client_loop, name=f"client-{k}", daemon=True) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run.seconds = time.perf_counter() - t0
    return run


# -- figures -----------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q% of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.1f} ms"


def statuses(answers: list[Answer]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for a in answers:
        counts[a.status] = counts.get(a.status, 0) + 1
    return dict(sorted(counts.items()))


# -- the benchmark -----------------------------------------------------------------------------

def benchmark(args: argparse.Namespace, artifacts: Path, log_dir: Path) -> dict:
    import httpx

    from sdrt.runtime.pipeline import Pipeline
    from sdrt.serve.jobs import png_bytes

    r: dict = {"settings": {"artifacts": str(artifacts), "steps": args.steps, "sampler": SAMPLER_A1111,
                            "cfg_scale": GUIDANCE, "clients": args.clients, "requests": args.requests,
                            "sequential": args.sequential, "overload_requests": args.overload_requests,
                            "overload_queue": args.overload_queue, "cores": os.cpu_count(),
                            "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                            else os.cpu_count()}}

    # 1. in-process ---------------------------------------------------------------------------
    say(f"in-process: Pipeline.load({artifacts}) and {args.sequential} generations")
    t0 = time.perf_counter()
    pipe = Pipeline.load(artifacts)
    r["inproc_load_s"] = time.perf_counter() - t0

    def generate(seed: int):
        return pipe(PROMPT, steps=args.steps, guidance=GUIDANCE, scheduler=SAMPLER, seed=seed)

    generate(0)   # warm-up: first-call allocations, as the server's first request pays them too
    gen_times, png_times = [], []
    for i in range(args.sequential):
        t0 = time.perf_counter()
        result = generate(1000 + i)
        gen_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        png_bytes(result.images[0], result.images[0].info.get("parameters", ""))
        png_times.append(time.perf_counter() - t0)
    r["inproc_s"] = statistics.median(gen_times)
    r["png_s"] = statistics.median(png_times)

    server = None
    try:
        with httpx.Client() as http:
            # 2. the server, a queue that refuses nothing -------------------------------------------
            server = Server(artifacts, max_queue=max(1, args.clients), log_dir=log_dir)
            r["ready_s"] = server.wait_ready(http)
            r["rss_ready"] = server.rss()
            say(f"server ready in {r['ready_s']:.1f} s, RSS {r['rss_ready'] / 2**20:.1f} MiB")

            # 3. sequential, interleaved with the same generation in-process -------------------------
            say(f"sequential: {args.sequential} requests, one at a time, each beside an in-process generation")
            warm = post(http, server.url, payload(0, args.steps))
            if warm.status != 200:
                raise RuntimeError(f"the warm-up request got {warm.status}: {warm.error}\n{server.log_tail()}")
            before = server.metrics(http)
            seq, side = [], []
            for i in range(args.sequential):
                seq.append(post(http, server.url, payload(2000 + i, args.steps)))
                t0 = time.perf_counter()
                generate(2000 + i)
                side.append(time.perf_counter() - t0)
            r["seq_split"] = server_split(before, server.metrics(http))
            r["seq_statuses"] = statuses(seq)
            ok = [a.seconds for a in seq if a.status == 200 and a.valid]
            r["seq_s"] = statistics.median(ok) if ok else float("nan")
            r["inproc_side_s"] = statistics.median(side)

            # 4. load ----------------------------------------------------------------------------
            r["rss_before_load"] = server.rss()
            say(f"load: {args.clients} clients, {args.requests} requests")
            before = server.metrics(http)
            load = run_clients(server.url, args.clients, args.requests, args.steps, 10_000, args.max_seconds)
            after = server.metrics(http)
            r["rss_after_load"] = server.rss()
            r["load_split"] = server_split(before, after)
            r["load_statuses"] = statuses(load.answers)
            r["load_invalid"] = sum(1 for a in load.answers if a.status == 200 and not a.valid)
            r["load_errors"] = sorted({a.error for a in load.answers if a.error})[:5]
            good = [a.seconds for a in load.answers if a.status == 200 and a.valid]
            r["load_sent"] = len(load.answers)
            r["load_stopped_early"] = load.stopped_early
            r["load_wall_s"] = load.seconds
            r["throughput"] = len(good) / load.seconds if load.seconds else 0.0
            r["load_p50_s"] = percentile(good, 50) if good else float("nan")
            r["load_p99_s"] = percentile(good, 99) if good else float("nan")
            r["load_max_s"] = max(good) if good else float("nan")
            r["metrics_request"] = _histogram(after, "sdrt_request_seconds", route=ROUTE)
            r["metrics_queue_wait"] = _histogram(after, "sdrt_queue_wait_seconds")
            server.stop()
            server = None

            # 5. overload: a small queue, clients that never wait --------------------------------------
            server = Server(artifacts, max_queue=args.overload_queue, log_dir=log_dir)
            server.wait_ready(http)
            say(f"overload: --max-queue {args.overload_queue}, {args.clients} clients, "
                f"{args.overload_requests} requests sent back to back")
            before = server.metrics(http)
            over = run_clients(server.url, args.clients, args.overload_requests, args.steps, 50_000,
                               args.max_seconds)
            after = server.metrics(http)
            refused = [a for a in over.answers if a.status == 429]
            r["over_statuses"] = statuses(over.answers)
            r["over_sent"] = len(over.answers)
            r["over_stopped_early"] = over.stopped_early
            r["over_wall_s"] = over.seconds
            r["over_invalid"] = sum(1 for a in over.answers if a.status == 200 and not a.valid)
            r["over_retry_after_missing"] = sum(1 for a in refused if not _valid_retry_after(a.retry_after))
            r["over_retry_after_values"] = sorted({a.retry_after for a in refused if a.retry_after})
            r["over_429_p50_s"] = percentile([a.seconds for a in refused], 50) if refused else float("nan")
            r["over_rejected_metric"] = (metric(after, "sdrt_jobs_rejected_total", reason="queue_full")
                                         - metric(before, "sdrt_jobs_rejected_total", reason="queue_full"))
            r["over_errors"] = sorted({a.error for a in over.answers if a.error and a.status != 429})[:5]
    except Exception as e:
        if server is not None and server.proc.poll() is not None:
            raise RuntimeError(f"sdrt serve exited with {server.proc.returncode} during the run ({e}); the end of "
                               f"its log:\n{server.log_tail()}") from e
        raise
    finally:
        if server is not None:
            server.stop()
        pipe.close()
    return r


def _histogram(m: dict, name: str, **labels: str) -> dict[str, float]:
    n = metric(m, f"{name}_count", **labels)
    return {"count": n, "mean_s": metric(m, f"{name}_sum", **labels) / n if n else float("nan")}


def _valid_retry_after(value: str | None) -> bool:
    """RFC 9110's delay-seconds form, which sdrt sends: a non-negative integer; the
    server promises at least one second (executor.retry_after)."""
    return value is not None and value.isdigit() and int(value) >= 1


def report(r: dict, total_s: float) -> list[str]:
    s = r["settings"]
    inproc = r["inproc_side_s"]
    per_image = 1 / r["throughput"] if r["throughput"] else float("nan")
    seq_split, load_split = r.get("seq_split") or {}, r.get("load_split") or {}
    lines = [
        f"sdrt serve load benchmark ({s['artifacts']})",
        f"  settings: {s['steps']} steps, {s['sampler']}, cfg {s['cfg_scale']:g}, {s['clients']} clients, "
        f"{s['requests']} requests, {s['sequential']} sequential, overload {s['overload_requests']} requests "
        f"at --max-queue {s['overload_queue']}; {s['cores_usable']} of {s['cores']} cores",
        "",
        "in-process (Pipeline.__call__, median)",
        f"  before the server ran                {ms(r['inproc_s'])}",
        f"  interleaved with the sequential run  {ms(inproc)}",
        f"  PNG encoding of the image (median)   {ms(r['png_s'])}",
        "sequential, one client",
        f"  HTTP latency, median                 {ms(r['seq_s'])}   statuses {r['seq_statuses']}",
        f"  overhead over in-process             {ms(r['seq_s'] - inproc)}   "
        f"({100 * (r['seq_s'] - inproc) / inproc:+.0f} %)",
    ]
    if seq_split:
        lines += [
            f"  in the server, mean (/metrics)       {ms(seq_split['request_s'])}   = queue wait "
            f"{seq_split['queue_wait_s'] * 1e3:.1f} + generation {seq_split['generation_s'] * 1e3:.1f} + "
            f"server's own {seq_split['server_own_s'] * 1e3:.1f} ms",
            f"  outside the server (client, HTTP)    {ms(r['seq_s'] - seq_split['request_s'])}"
            f"   (median latency - mean time in server)",
        ]
    lines += [
        f"load, {s['clients']} clients",
        f"  sent / answered 200                  {r['load_sent']:8d} / {r['load_statuses'].get(200, 0)}"
        f"{'   STOPPED AT --max-seconds' if r['load_stopped_early'] else ''}",
        f"  statuses                             {r['load_statuses']}   (invalid 200 bodies: {r['load_invalid']})",
        f"  wall time                            {r['load_wall_s']:8.2f} s",
        f"  throughput                           {r['throughput']:8.2f} images/s",
        f"  time per image                       {ms(per_image)}   ({per_image / inproc:.2f}x in-process, "
        f"+{(per_image - inproc) * 1e3:.1f} ms)",
        f"  latency p50 / p99 / max              {r['load_p50_s'] * 1e3:8.1f} / {r['load_p99_s'] * 1e3:.1f} / "
        f"{r['load_max_s'] * 1e3:.1f} ms",
    ]
    if load_split:
        lines.append(f"  in the server, mean (/metrics)       {ms(load_split['request_s'])}   = queue wait "
                     f"{load_split['queue_wait_s'] * 1e3:.1f} + generation {load_split['generation_s'] * 1e3:.1f} + "
                     f"server's own {load_split['server_own_s'] * 1e3:.1f} ms")
    lines += [
        f"  RSS ready / before / after load      {r['rss_ready'] / 2**20:8.1f} / {r['rss_before_load'] / 2**20:.1f} / "
        f"{r['rss_after_load'] / 2**20:.1f} MiB",
        f"  RSS growth during the load           {(r['rss_after_load'] - r['rss_before_load']) / 2**20:+8.1f} MiB",
        f"  /metrics, whole run: txt2img         {r['metrics_request']['count']:8.0f} requests, mean "
        f"{r['metrics_request']['mean_s'] * 1e3:.1f} ms; "
        f"queue wait mean {r['metrics_queue_wait']['mean_s'] * 1e3:.1f} ms",
        f"overload, --max-queue {s['overload_queue']}, {s['clients']} clients never waiting",
        f"  sent                                 {r['over_sent']:8d} in {r['over_wall_s']:.2f} s"
        f"{'   STOPPED AT --max-seconds' if r['over_stopped_early'] else ''}",
        f"  200 / 429 / other                    {r['over_statuses'].get(200, 0):8d} / "
        f"{r['over_statuses'].get(429, 0)} / {sum(v for k, v in r['over_statuses'].items() if k not in (200, 429))}"
        f"   (invalid 200 bodies: {r['over_invalid']})",
        f"  429 without a valid Retry-After      {r['over_retry_after_missing']:8d}   "
        f"(values seen: {', '.join(r['over_retry_after_values']) or '-'})",
        f"  429 latency, median                  {ms(r['over_429_p50_s'])}",
        f"  server's queue_full rejections       {r['over_rejected_metric']:8.0f}   "
        f"({'matches' if r['over_rejected_metric'] == r['over_statuses'].get(429, 0) else 'DIFFERS FROM'} the 429s)",
        "",
        f"total wall time                        {total_s:8.1f} s",
    ]
    return lines


def problems(r: dict) -> list[str]:
    out = []
    for phase in ("seq", "load", "over"):
        bad = {k: v for k, v in r[f"{phase}_statuses"].items() if k not in ((200, 429) if phase == "over" else (200,))}
        if bad:
            out.append(f"{phase}: unexpected statuses {bad}")
    for phase in ("load", "over"):
        if r[f"{phase}_invalid"]:
            out.append(f"{phase}: {r[f'{phase}_invalid']} answers with status 200 but no PNG")
        if r[f"{phase}_stopped_early"]:
            out.append(f"{phase}: stopped at --max-seconds before every request was sent")
    if r["over_retry_after_missing"]:
        out.append(f"overload: {r['over_retry_after_missing']} 429 answers without a valid Retry-After")
    if r["over_statuses"].get(429, 0) == 0:
        out.append("overload: no request was refused; the queue never filled")
    for e in r.get("load_errors", []) + r.get("over_errors", []):
        out.append(f"error seen: {e}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, help="artifact folder to serve (default: the built-in tiny model)")
    p.add_argument("--work", type=Path, help="folder for the built-in model's export, reused when complete "
                                             "(default: a temporary folder, removed at the end)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--requests", type=int, default=200, help="requests of the load run, in total (default 200)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps per image (default 4)")
    p.add_argument("--sequential", type=int, default=15,
                   help="in-process generations, and sequential requests, for the medians (default 15)")
    p.add_argument("--overload-queue", type=int, default=2, help="--max-queue of the overload run (default 2)")
    p.add_argument("--overload-requests", type=int, default=200, help="requests of the overload run (default 200)")
    p.add_argument("--max-seconds", type=float, default=300.0,
                   help="each of the load and overload runs stops sending after this (default 300)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 4 clients, 24 requests, 2 steps, 5 sequential, 24 overload requests")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.requests, args.steps, args.sequential, args.overload_requests = 4, 24, 2, 5, 24
    for name in ("clients", "requests", "steps", "sequential", "overload_queue", "overload_requests"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.artifacts is not None and args.work is not None:
        p.error("give --artifacts (an export to serve) or --work (where to make the built-in one), not both")

    # SIGTERM ends the run as Ctrl-C does, through the finally blocks that stop the server.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sdrt-serve-load-") as tmp:
        artifacts = args.artifacts or built_in_artifacts(args.work or Path(tmp))
        try:
            r = benchmark(args, artifacts, Path(tmp))
        except KeyboardInterrupt:
            say("interrupted; the server was stopped")
            return 130
    lines = report(r, time.perf_counter() - started)
    print("\n".join(lines), flush=True)
    found = problems(r)
    for line in found:
        print(f"PROBLEM: {line}")
    if args.json:
        from sdrt.engines.files import atomic_write_json
        atomic_write_json(args.json, {**r, "problems": found})
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())

"""Serving benchmark over loopback: `python -m bench.serve`.

One workload (R requests, each its own new image and a question, exactly T output tokens:
min_tokens = max_tokens; new images every round, so no image comes from the engine's image cache)
is run three ways, interleaved over --runs rounds so drift in machine load hits all alike:
  http      N concurrent streaming clients (or a Poisson arrival rate, --rate) against the server;
  http-1    the same requests one at a time (what batching gains: http over http-1);
  engine    the engine driven in-process without HTTP, with the same concurrency, its inputs
            prepared (image decoded, processor run) before the clock starts: the engine alone, so
            http against engine is everything the server costs (HTTP, JSON, base64 and PNG decoding,
            preprocessing, the thread hand-offs).
Reports requests/s, output tokens/s, TTFT p50/p90/p99, inter-token latency p50/p90 and e2e latency
per way (medians over rounds), and the CPU time each request cost (server and client processes,
or the in-process engine: on a machine shared with other jobs this is the steadier figure), writes
JSON and a PNG plot. The server is started as a subprocess
(`python -m blip2_fast serve --port 0`) unless --url names a running one; the in-process engine
loads the same checkpoint in this process. TTFT and the gaps between streamed chunks are measured by
the client; in-process, from add_request to the first output with tokens. The load generator is a
lean HTTP/1.1 client on asyncio streams (it shares the server's cores, so it builds every request
body before the clock; --client httpx for httpx).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _workload(n: int, seed: int) -> list[tuple[bytes, str]]:
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    qs = ["what is in the picture?", "what color is the house?", "who is riding the bicycle?",
          "what is on the table?", "how many cats are there?"]
    out = []
    for i in range(n):
        px = (torch.rand(224, 224, 3, generator=g) * 255).to(torch.uint8).numpy()
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, "PNG")
        out.append((buf.getvalue(), qs[i % len(qs)]))
    return out


def _arrivals(n: int, rate: float | None, seed: int) -> list[float] | None:
    if rate is None:
        return None
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def _pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def _summary(wall: float, reqs: list[dict]) -> dict:
    ttft = [r["ttft"] for r in reqs]
    gaps = [g for r in reqs for g in r["gaps"]]
    e2e = [r["e2e"] for r in reqs]
    toks = sum(r["tokens"] for r in reqs)
    return {"requests": len(reqs), "wall_s": round(wall, 3), "requests_per_s": round(len(reqs) / wall, 3),
            "output_tokens_per_s": round(toks / wall, 1),
            **{f"ttft_p{q}_ms": round(_pct(ttft, q) * 1e3, 2) for q in (50, 90, 99)},
            **{f"itl_p{q}_ms": round(_pct(gaps, q) * 1e3, 2) for q in (50, 90)},
            **{f"e2e_p{q}_ms": round(_pct(e2e, q) * 1e3, 1) for q in (50, 90)}}


# ---- over HTTP ----------------------------------------------------------------------------------
def _chat_body(model: str, png: bytes, q: str, max_tokens: int) -> bytes:
    import base64

    return json.dumps({"model": model, "stream": True, "stream_options": {"include_usage": True},
                       "max_tokens": max_tokens, "min_tokens": max_tokens,
                       "messages": [{"role": "user", "content": [
                           {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
                           {"type": "text", "text": q}]}]}).encode()


class _Stream:
    """Client-side timing of one streamed request: TTFT, the gaps between chunks with content, and
    the completion tokens the final usage chunk reports."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.first = self.last = None
        self.gaps, self.tokens = [], 0

    def event(self, payload: bytes) -> None:
        if payload == b"[DONE]":
            return
        ev = json.loads(payload)
        if ev.get("usage"):
            self.tokens = ev["usage"]["completion_tokens"]
        if ev.get("choices") and ev["choices"][0]["delta"].get("content"):
            now = time.perf_counter()
            if self.first is None:
                self.first = now
            else:
                self.gaps.append(now - self.last)
            self.last = now

    def result(self) -> dict:
        return {"ttft": self.first - self.t0, "gaps": self.gaps, "e2e": time.perf_counter() - self.t0,
                "tokens": self.tokens}


class _Conn:
    """A lean HTTP/1.1 client on asyncio streams: one keep-alive connection, a POST, its chunked
    server-sent events split as they arrive. The load generator shares the server's cores, so each
    CPU ms it spends per request is taken from the server (httpx cost several ms per request)."""

    def __init__(self, host: str, port: int, headers: dict):
        self.host, self.port = host, port
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.reader = self.writer = None

    async def _open(self):
        if self.writer is None or self.writer.is_closing() or self.reader.at_eof():
            await self.close()
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def close(self):
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
            self.writer = None

    async def post_sse(self, path: str, body: bytes, stream: _Stream) -> None:
        await self._open()
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n{self.extra}\r\n").encode()
        self.writer.writelines((head, body))  # no 200 KB concatenation
        r = self.reader
        status_line, *lines = (await r.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines if ln)}
        chunked = hdrs.get("transfer-encoding", "").lower() == "chunked"
        buf = b""
        if chunked:
            while True:
                size = int((await r.readline()).split(b";", 1)[0], 16)
                if size == 0:
                    while (await r.readline()) not in (b"\r\n", b""):  # trailers
                        pass
                    break
                buf += (await r.readexactly(size + 2))[:-2]
                if status == 200:
                    *events, buf = buf.split(b"\n\n")
                    for e in events:
                        if e.startswith(b"data: "):
                            stream.event(e[6:])
        else:
            buf = await r.readexactly(int(hdrs.get("content-length", 0)))
        if hdrs.get("connection", "").lower() == "close":
            await self.close()
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {buf[:300]!r}")


async def _http_run(url: str, model: str, work, concurrency: int, arrivals, max_tokens: int, api_key=None,
                    client: str = "lean") -> dict:
    """The workload through HTTP: `concurrency` closed-loop clients (or one per Poisson arrival),
    each streaming its requests with the lean client (`client="httpx"`: with httpx, as before)."""
    from urllib.parse import urlsplit

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results = []
    if client == "httpx":
        import httpx

        limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
        hx = httpx.AsyncClient(base_url=url, timeout=600, limits=limits)

        async def one(_conn, body):
            st = _Stream()
            async with hx.stream("POST", "/v1/chat/completions", content=body,
                                 headers={**headers, "Content-Type": "application/json"}) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        st.event(line[6:].encode())
            results.append(st.result())
    else:
        hx = None

        async def one(conn, body):
            st = _Stream()
            await conn.post_sse("/v1/chat/completions", body, st)
            results.append(st.result())

    # every body (base64 of the PNG inside the JSON: 0.6 ms of CPU per 224 px request) is built before
    # the clock: the load generator shares the server's cores, and a remote client would build its own
    bodies = [_chat_body(model, png, q, max_tokens) for png, q in work]
    u = urlsplit(url)
    new_conn = lambda: _Conn(u.hostname, u.port or 80, headers)  # noqa: E731
    conns = []
    try:
        t0 = time.perf_counter()
        if arrivals is None:  # closed loop: `concurrency` clients, each sending its next request when done
            it = iter(bodies)

            async def client_loop():
                conns.append(conn := new_conn())
                for body in it:
                    await one(conn, body)
            await asyncio.gather(*(client_loop() for _ in range(concurrency)))
        else:
            async def at(t, body):
                await asyncio.sleep(max(0.0, t0 + t - time.perf_counter()))
                conns.append(conn := new_conn())
                await one(conn, body)
            await asyncio.gather(*(at(t, body) for t, body in zip(arrivals, bodies)))
        wall = time.perf_counter() - t0
    finally:
        for c in conns:
            await c.close()
        if hx is not None:
            await hx.aclose()
    return _summary(wall, results)


# ---- in-process ---------------------------------------------------------------------------------
def _engine_run(engine, model, processor, work, concurrency: int, arrivals, max_tokens: int) -> dict:
    """The engine loop on a thread of its own in inference mode, as the server's engine thread runs
    (on a crowded CPU, torch's OpenMP GEMMs issued from the main thread ran up to 10x slower than the
    same GEMMs from another thread here, which would flatter the server)."""
    import threading

    import torch

    out = {}

    def body():
        with torch.inference_mode():
            out["r"] = _engine_loop(engine, model, processor, work, concurrency, arrivals, max_tokens)
    t = threading.Thread(target=body, name="bench-engine")
    t.start()
    t.join()
    if "r" not in out:
        raise RuntimeError("the in-process engine run failed (see the traceback above)")
    return out["r"]


def _engine_loop(engine, model, processor, work, concurrency, arrivals, max_tokens) -> dict:
    from PIL import Image

    from blip2_fast.serving import inputs
    from blip2_fast.serving.protocol import GenOptions, conversation_prompt

    opts = GenOptions(max_tokens=max_tokens, min_tokens=max_tokens)
    prepared = []  # before the clock: this way is the engine alone, the ceiling the server is held to
    for png, q in work:
        image = Image.open(io.BytesIO(png)).convert("RGB")
        ins = inputs.prepare(model, processor, image, conversation_prompt([("user", q)]))
        prepared.append((ins, inputs.sampling(model, opts, 1, ins.prompt_ids.numel())))
    todo = list(enumerate(prepared))
    live, results = {}, []
    t0 = time.perf_counter()
    while todo or live:
        now = time.perf_counter()
        while todo and (len(live) < concurrency if arrivals is None else t0 + arrivals[todo[0][0]] <= now):
            i, (ins, p) = todo.pop(0)
            engine.add_request(i, pixel_values=ins.pixel_values, prompt=ins.prompt_ids, sampling=p)
            live[i] = {"t0": time.perf_counter() if arrivals is None else t0 + arrivals[i], "first": None,
                       "last": None, "gaps": []}
        if not live:
            time.sleep(max(0.0, t0 + arrivals[todo[0][0]] - time.perf_counter()))
            continue
        for out in engine.step():
            r = live[out.request_id]
            now = time.perf_counter()
            if out.new_token_ids:
                if r["first"] is None:
                    r["first"] = now
                else:
                    r["gaps"].append(now - r["last"])
                r["last"] = now
            if out.finished:
                del live[out.request_id]
                results.append({"ttft": r["first"] - r["t0"], "gaps": r["gaps"], "e2e": now - r["t0"],
                                "tokens": len(out.token_ids)})
    return _summary(time.perf_counter() - t0, results)


# ---- CPU time: robust to a crowded machine where wall time is not ---------------------------------
def _cpu_s(pid=None) -> float | None:
    """CPU seconds (user + system, all threads) used so far by this process, or by process `pid`."""
    if pid is None:
        import resource

        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _with_cpu(fn, server_pid, n_requests: int) -> dict:
    """fn()'s summary plus the CPU time it cost: this process (the clients, or the in-process
    engine) and the server process, per request."""
    c0, s0 = _cpu_s(), _cpu_s(server_pid) if server_pid else None
    res = fn()
    here = _cpu_s() - c0
    res["cpu_ms_per_request_here"] = round(here / n_requests * 1e3, 2)
    if s0 is not None:
        srv = _cpu_s(server_pid) - s0
        res["cpu_ms_per_request_server"] = round(srv / n_requests * 1e3, 2)
        res["cpu_ms_per_request"] = round((srv + here) / n_requests * 1e3, 2)
    else:
        res["cpu_ms_per_request"] = res["cpu_ms_per_request_here"]
    return res


# ---- the server ---------------------------------------------------------------------------------
def _start_server(model_dir, backend, max_num_seqs, log_path):
    cmd = [sys.executable, "-m", "blip2_fast", "serve", "--port", "0", "--max-num-seqs", str(max_num_seqs),
           "--log-level", "warning"]
    if model_dir:
        cmd += ["--model", str(model_dir)]
    if backend:
        cmd += ["--backend", backend]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    deadline = time.time() + 600
    for line in proc.stdout:
        m = re.search(r"serving (\S+) .* on (http://\S+)", line)
        if m:
            return proc, m.group(2), m.group(1)
        if time.time() > deadline:
            break
    proc.kill()
    raise RuntimeError(f"the server did not start; see {log_path}")


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ways = list(res["median"])
    med = res["median"]
    fig, ax = plt.subplots(1, 3, figsize=(13, 4))
    ax[0].bar(ways, [med[w]["requests_per_s"] for w in ways], color=["C0", "C1", "C2"][: len(ways)])
    ax[0].set_title("requests/s (higher is better)")
    for k, (q, off) in enumerate(((50, -0.25), (90, 0), (99, 0.25))):
        ax[1].bar([i + off for i in range(len(ways))], [med[w][f"ttft_p{q}_ms"] for w in ways], width=0.25,
                  label=f"p{q}")
    ax[1].set_xticks(range(len(ways)), ways)
    ax[1].set_title("time to first token, ms")
    ax[1].legend()
    for q, off in ((50, -0.2), (90, 0.2)):
        ax[2].bar([i + off for i in range(len(ways))], [med[w][f"itl_p{q}_ms"] for w in ways], width=0.4,
                  label=f"p{q}")
    ax[2].set_xticks(range(len(ways)), ways)
    ax[2].set_title("inter-token latency, ms")
    ax[2].legend()
    load = f"{res['concurrency']} clients" if res["rate"] is None else f"Poisson {res['rate']}/s"
    fig.suptitle(f"blip2_fast serving, {res['model']}: {res['requests']} requests x {res['max_tokens']} tokens, "
                 f"{load}, medians of {res['runs']} rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="a running server (default: start one as a subprocess)")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the demo checkpoint)")
    ap.add_argument("--served-model-name", default=None, help="with --url: the model id the server serves")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--backend", default=None, choices=["fast", "reference"])
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (closed loop)")
    ap.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second instead of --clients")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--runs", type=int, default=3, help="interleaved rounds of all three ways")
    ap.add_argument("--no-one-at-a-time", action="store_true", help="skip the http-1 way (it is the slowest)")
    ap.add_argument("--client", default="lean", choices=["lean", "httpx"],
                    help="the load generator's HTTP client: lean (asyncio streams) or httpx")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="output (default bench/results/serve-<date>.json; the PNG beside it)")
    a = ap.parse_args(argv)

    import torch

    import blip2_fast
    from blip2_fast.demo import demo_checkpoint
    from blip2_fast.generation import processor_for

    model_dir = Path(a.model) if a.model else demo_checkpoint()
    arrivals = _arrivals(a.requests, a.rate, a.seed)
    proc = None
    if a.url is None:
        proc, url, name = _start_server(model_dir, a.backend, max(a.clients, 1), "/tmp/blip2_fast-bench-serve.log")
    else:
        url, name = a.url, a.served_model_name or model_dir.name
    try:
        model = blip2_fast.load(model_dir, backend=a.backend, progress=False)
        engine = blip2_fast.Engine(model, max_num_seqs=max(a.clients, 1))
        processor = processor_for(model)
        conc = a.clients if a.rate is None else a.requests
        ways = {"http": lambda w: asyncio.run(_http_run(url, name, w, conc, arrivals, a.max_tokens, a.api_key,
                                                        a.client)),
                "engine": lambda w: _engine_run(engine, model, processor, w, conc, arrivals, a.max_tokens)}
        if not a.no_one_at_a_time:
            ways["http-1"] = lambda w: asyncio.run(_http_run(url, name, w, 1, None, a.max_tokens, a.api_key, a.client))
        warm = _workload(4, a.seed - 1)  # warm-up: first-call costs (allocator, extension loading) in both processes
        asyncio.run(_http_run(url, name, warm, 2, None, 4, a.api_key, a.client))
        _engine_run(engine, model, processor, warm, 2, None, 4)
        server_pid = proc.pid if proc is not None else None
        rounds = []
        for r in range(a.runs):
            order = list(ways) if r % 2 == 0 else list(ways)[::-1]  # alternate the order across rounds
            rd = {}
            for k, w in enumerate(order):
                # new images every time: a repeated image would come from the engine's image cache
                # and skip the vision encoder, which is not what serving new requests costs
                work = _workload(a.requests, a.seed + 1000 * r + 100 * k)
                rd[w] = _with_cpu(lambda: ways[w](work), server_pid if w != "engine" else None, a.requests)
            rounds.append(rd)
            print(f"round {r + 1}/{a.runs}: " + "  ".join(
                f"{w} {rounds[-1][w]['requests_per_s']} req/s ttft p50 {rounds[-1][w]['ttft_p50_ms']} ms "
                f"cpu {rounds[-1][w]['cpu_ms_per_request']} ms/req" for w in ways),
                flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    median = {w: {k: round(statistics.median(rd[w][k] for rd in rounds), 3) for k in rounds[0][w]} for w in ways}
    http, eng = median["http"], median["engine"]
    res = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "model": model_dir.name,
           "backend": a.backend or "default", "requests": a.requests, "max_tokens": a.max_tokens,
           "concurrency": None if a.rate is not None else a.clients, "rate": a.rate, "runs": a.runs,
           "client": a.client,
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "torch_threads": torch.get_num_threads(),
                       "note": "shared with other jobs while measured: absolute figures are contended"},
           "versions": {"python": platform.python_version(), "torch": torch.__version__, "blip2_fast": blip2_fast.__version__},
           "rounds": rounds, "median": median,
           "http_over_engine_requests_per_s": round(http["requests_per_s"] / eng["requests_per_s"], 3),
           "http_over_engine_ttft_p50": round(http["ttft_p50_ms"] / eng["ttft_p50_ms"], 3),
           "http_over_engine_cpu_per_request": round(http["cpu_ms_per_request"] / eng["cpu_ms_per_request"], 3)}
    if "http-1" in median:
        res["batching_gain_requests_per_s"] = round(http["requests_per_s"] / median["http-1"]["requests_per_s"], 3)
    res["targets"] = {"requests_per_s_at_least_0.9x_engine": res["http_over_engine_requests_per_s"] >= 0.9,
                      "ttft_p50_at_most_2x_engine": res["http_over_engine_ttft_p50"] <= 2.0}
    out = Path(a.json or f"bench/results/serve-{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    _plot(res, out.with_suffix(".png"))
    print(json.dumps({k: res[k] for k in res if k not in ("rounds",)}, indent=2))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return res


if __name__ == "__main__":
    main()

"""`python -m blip2_fast serve` as a real process on 127.0.0.1 (a port the OS picks), driven by the
official `openai` client, streaming and not; SIGTERM lets a stream in flight finish, then exits 0."""
import os
import queue
import re
import signal
import subprocess
import sys
import threading

import pytest

# the server's extra (pip install -e ".[serve]"): without it these tests skip, not fail collection
for _mod in ("fastapi", "uvicorn", "prometheus_client", "httpx"):
    pytest.importorskip(_mod)

import blip2_fast
from blip2_fast.demo import build_demo_checkpoint
from serving_helpers import data_url, images

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return build_demo_checkpoint(tmp_path_factory.mktemp("serving-cli") / "ckpt")


class Server:
    """The server process; its output lines are read by a thread into a queue (bounded waits)."""

    def __init__(self, *args):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "blip2_fast", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.port = int(self.wait_for(r"serving .* on http://127\.0\.0\.1:(\d+)").group(1))

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern, timeout=240):
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s; output:\n{''.join(self.log)}")
            if line is None:
                raise AssertionError(f"the server exited ({self.proc.wait()}) before {pattern!r}:\n{''.join(self.log)}")
            self.log.append(line)
            m = re.search(pattern, line)
            if m:
                return m

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def test_serve_subprocess_with_the_openai_client(demo_dir):
    img = images()[0]
    q = "what is in the picture?"
    m = blip2_fast.load(demo_dir, backend="reference", progress=False)
    want = m.answer(img, q)[0]
    want_caption = m.caption(img, prompt="a photo of", max_new_tokens=6)[0]
    want_long = m.answer(img, q, max_new_tokens=80, min_new_tokens=80)[0]
    srv = Server("--model", str(demo_dir), "--backend", "reference", "--max-num-seqs", "8", "--api-key", "k1")
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="k1", timeout=120, max_retries=0)
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}},
                                             {"type": "text", "text": q}]}]
        r = c.chat.completions.create(model="ckpt", messages=msgs)
        assert r.choices[0].message.content == want and r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.prompt_tokens > 32 and r.usage.completion_tokens >= 1
        srv.wait_for(rf"{r.id} 200 prompt_tokens=\d+ completion_tokens={r.usage.completion_tokens} .*latency=")
        chunks = list(c.chat.completions.create(model="ckpt", messages=msgs, stream=True,
                                                stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
        cr = c.completions.create(model="ckpt", prompt="a photo of", max_tokens=6, extra_body={"image": data_url(img)})
        assert cr.choices[0].text == want_caption
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="wrong", max_retries=0).models.list()
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="ckpt", messages=[{"role": "user", "content": "no image"}])
        assert [x.id for x in c.models.list()] == ["ckpt"]

        # SIGTERM while a stream is in flight: it finishes, then the server exits cleanly
        stream = c.chat.completions.create(model="ckpt", messages=msgs, stream=True, max_tokens=80,
                                           extra_body={"min_tokens": 80})
        it = iter(stream)
        first = [next(it) for _ in range(2)]  # the role, then the first text
        srv.proc.send_signal(signal.SIGTERM)
        rest = list(it)
        text = "".join(ch.choices[0].delta.content or "" for ch in first + rest if ch.choices)
        assert text == want_long and rest[-1].choices[0].finish_reason == "length"
        assert srv.proc.wait(120) == 0
        srv.wait_for("shut down cleanly")
    finally:
        srv.stop()


def test_serve_exits_cleanly_on_sigint_when_idle(demo_dir):
    srv = Server("--model", str(demo_dir), "--backend", "reference")
    try:
        srv.proc.send_signal(signal.SIGINT)
        assert srv.proc.wait(120) == 0
        srv.wait_for("shut down cleanly")
    finally:
        srv.stop()


def test_serve_reports_a_bad_model_directory(tmp_path):
    r = subprocess.run([sys.executable, "-m", "blip2_fast", "serve", "--model", str(tmp_path), "--port", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "processor" in r.stderr


def test_the_benchmarks_lean_client_streams_against_the_server(demo_dir):
    """bench.serve's load generator (a lean HTTP/1.1 client on asyncio streams, keep-alive, chunked
    server-sent events): every request of a closed loop comes back with its exact token count, as
    with httpx, and an HTTP error is raised with its status, not read as a stream."""
    import asyncio

    from bench import serve as bench_serve

    srv = Server("--model", str(demo_dir), "--backend", "reference", "--max-num-seqs", "4", "--api-key", "k2")
    try:
        url = f"http://127.0.0.1:{srv.port}"
        work = bench_serve._workload(5, seed=7)  # 5 requests over 2 connections: each is reused
        for client in ("lean", "httpx"):
            res = asyncio.run(bench_serve._http_run(url, "ckpt", work, 2, None, 6, "k2", client))
            assert res["requests"] == 5 and res["output_tokens_per_s"] > 0, (client, res)
            # tokens per request, from each stream's final usage chunk (both figures are rounded)
            assert abs(res["output_tokens_per_s"] / res["requests_per_s"] - 6) < 0.02, (client, res)
        with pytest.raises(RuntimeError, match="HTTP 401"):
            asyncio.run(bench_serve._http_run(url, "ckpt", work[:1], 1, None, 6, "wrong", "lean"))
    finally:
        srv.stop()

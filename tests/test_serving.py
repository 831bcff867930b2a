"""The HTTP server in-process (httpx's ASGI transport, no sockets): its text equals model.answer /
model.caption exactly, streamed or not, alone or among 16 concurrent clients; bad input gets its
status and an OpenAI-shaped error; a cut stream frees its blocks; the key; /metrics; /health."""
import asyncio
import contextlib
import http.server
import json
import threading
import time

import pytest

# the server's extra (pip install -e ".[serve]"): without it these tests skip, not fail collection
for _mod in ("fastapi", "uvicorn", "prometheus_client", "httpx"):
    pytest.importorskip(_mod)

import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import ClientDisconnect

import blip2_fast
from blip2_fast.demo import build_demo_checkpoint
from blip2_fast.generation import processor_for
from blip2_fast.serving import build_app
from serving_helpers import chat, data_url, images, sse_events, streamed_texts


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = build_demo_checkpoint(tmp_path_factory.mktemp("serving") / "ckpt")
    return blip2_fast.load(d, backend="reference", progress=False)


@contextlib.contextmanager
def serving(model, **kw):
    app = build_app(model, **{"max_num_seqs": 16, **kw})
    try:
        yield app
    finally:
        app.state.server.close()


def client(app, **kw):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120, **kw)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 300))


def n_prompt(model, img, text):
    """usage.prompt_tokens as a client should see it: the processor's ids, image tokens included."""
    return processor_for(model)(images=[img], text=[text], return_tensors="pt")["input_ids"].shape[1]


def content(r):
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_answers_captions_and_streams_equal_the_model(model):
    imgs = images()
    q = "what is in the picture?"
    want = {
        "answer": [model.answer(im, q)[0] for im in imgs],
        "caption": [model.caption(im)[0] for im in imgs],
        "short": model.answer(imgs[1], q, max_new_tokens=5)[0],
        "beams": model.answer(imgs[0], q, num_beams=3, max_new_tokens=8)[0],
        "sampled": [model.answer(imgs[2], q, do_sample=True, temperature=0.7, top_k=10, seed=s)[0] for s in (11, 12)],
        "prompted": model.caption(imgs[0], prompt="a photo of")[0],
        "multi": model.caption(imgs[1], prompt="Question: what is this? Answer: a house Question: what color? Answer:")[0],
        "penalized": model.answer(imgs[1], q, repetition_penalty=1.5, min_new_tokens=4, max_new_tokens=9)[0],
    }
    assert len(set(want["answer"] + want["caption"])) > 2, "the images should give different texts"
    with serving(model) as app:
        async def go():
            async with client(app) as c:
                for im, a, cap in zip(imgs, want["answer"], want["caption"]):
                    url = data_url(im)
                    r = await c.post("/v1/chat/completions", json=chat(url, q))
                    assert content(r) == a
                    u = r.json()["usage"]
                    assert u["prompt_tokens"] == n_prompt(model, im, f"Question: {q} Answer:")
                    assert 1 <= u["completion_tokens"] <= 20 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
                    assert r.json()["choices"][0]["finish_reason"] == ("length" if u["completion_tokens"] == 20 else "stop")
                    assert content(await c.post("/v1/chat/completions", json=chat(url))) == cap
                    for body, text in ((chat(url, q), a), (chat(url), cap)):
                        r = await c.post("/v1/chat/completions", json={**body, "stream": True,
                                                                         "stream_options": {"include_usage": True}})
                        ev = sse_events(r.text)
                        assert ev[-1] == "[DONE]" and ev[0]["choices"][0]["delta"]["role"] == "assistant"
                        assert streamed_texts(ev) == [text]
                        assert ev[-2]["choices"] == [] and ev[-2]["usage"]["completion_tokens"] >= 1
                        assert [c_["finish_reason"] for e in ev[1:-2] for c_ in e["choices"]][-1] in ("stop", "length")
                url0, url1, url2 = (data_url(im) for im in imgs)
                r = await c.post("/v1/chat/completions", json=chat(url1, q, max_tokens=5))
                assert content(r) == want["short"] and r.json()["usage"]["completion_tokens"] <= 5
                assert content(await c.post("/v1/chat/completions", json=chat(url0, q, num_beams=3, max_tokens=8))) == want["beams"]
                r = await c.post("/v1/chat/completions", json=chat(url2, q, temperature=0.7, top_k=10, seed=11, n=2))
                assert [ch["message"]["content"] for ch in r.json()["choices"]] == want["sampled"]
                r = await c.post("/v1/chat/completions", json=chat(url1, q, repetition_penalty=1.5, min_tokens=4,
                                                                    max_completion_tokens=9))
                assert content(r) == want["penalized"]
                multi = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url1}},
                                                                   {"type": "text", "text": "what is this?"}]},
                                      {"role": "assistant", "content": "a house"},
                                      {"role": "user", "content": "what color?"}]}
                assert content(await c.post("/v1/chat/completions", json=multi)) == want["multi"]
                r = await c.post("/v1/completions", json={"model": "ckpt", "prompt": "a photo of", "image": url0})
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == want["prompted"]
                r = await c.post("/v1/completions", json={"prompt": "a photo of", "image": url0, "stream": True})
                assert streamed_texts(sse_events(r.text), key="text") == [want["prompted"]]
        run(go())


def test_stop_strings_cut_streamed_and_not(model):
    img, q = images()[0], "what is in the picture?"
    full = model.answer(img, q, max_new_tokens=30)[0]
    stop = next((w for w in full.split()[1:] if w != full.split()[0]), None)  # a word after the first
    assert stop is not None, f"the model's text {full!r} repeats one word: pick another image"
    want = full[: full.index(stop)].strip()
    with serving(model) as app:
        async def go():
            async with client(app) as c:
                body = chat(data_url(img), q, max_tokens=30, stop=[stop, "zzz-never"])
                r = await c.post("/v1/chat/completions", json=body)
                assert content(r) == want and r.json()["choices"][0]["finish_reason"] == "stop"
                ev = sse_events((await c.post("/v1/chat/completions", json={**body, "stream": True})).text)
                assert streamed_texts(ev) == [want]
                assert [ch["finish_reason"] for e in ev[:-1] for ch in e["choices"]][-1] == "stop"
            for _ in range(200):  # the request cut by the stop string is aborted in the engine
                if app.state.server.driver.stats.num_free_blocks == app.state.server.engine.num_blocks:
                    break
                await asyncio.sleep(0.05)
            assert app.state.server.driver.stats.num_free_blocks == app.state.server.engine.num_blocks
        run(go())


def test_sixteen_concurrent_clients_are_each_right(model):
    imgs = images()
    qs = ["what is this?", "what color is the house?", "who is on the bicycle?", "what is on the table?"]
    cases = [(imgs[i % 3], qs[i % 4], 6 + i % 5) for i in range(16)]
    want = [model.answer(im, q, max_new_tokens=n)[0] for im, q, n in cases]
    with serving(model) as app:
        async def one(c, i):
            im, q, n = cases[i]
            body = chat(data_url(im), q, max_tokens=n, stream=i % 2 == 0)
            r = await c.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            return streamed_texts(sse_events(r.text))[0] if i % 2 == 0 else content(r)

        async def go():
            async with client(app) as c:
                return await asyncio.gather(*(one(c, i) for i in range(16)))
        assert run(go()) == want


def _error(r, status, param=None):
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and isinstance(e["message"], str) and e["message"]
    if param is not None:
        assert e["param"] == param, e
    return e


def test_bad_input_gets_its_status_and_an_error_body(model, tmp_path):
    img = images()[0]
    url = data_url(img)
    good = chat(url, "what is this?")
    want = model.answer(img, "what is this?")[0]
    big = images()[1].resize((300, 300))
    with serving(model, max_image_pixels=250 * 250, max_image_bytes=400_000, max_body_bytes=600_000) as app:
        async def go():
            async with client(app) as c:
                post = lambda body, **kw: c.post("/v1/chat/completions", json=body, **kw)  # noqa: E731
                _error(await post({"messages": [{"role": "user", "content": "hi"}]}), 400, "messages")
                two = chat(url, "what?")
                two["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": url}})
                _error(await post(two), 400, "messages[0].content[2].image_url")
                _error(await post(chat("data:image/png;base64,iVBORw0KGgoA" + "A" * 40, "x")), 400)  # a PNG signature, then junk
                _error(await post(chat("data:image/png;base64,@@@", "x")), 400)
                _error(await post(chat("data:image/gif;base64,R0lGOD", "x")), 400)
                e = _error(await post(chat("http://127.0.0.1:1/x.png", "x")), 400)
                assert "--allow-remote-images" in e["message"]
                _error(await post(chat("ftp://host/x.png", "x")), 400)
                _error(await post(chat(f"file://{tmp_path}/x.png", "x")), 400)
                e = _error(await post(chat(url, "what is this? " * 60)), 400)  # past the model's 128 positions
                assert "positions" in e["message"]
                for key, bad in [("temperature", 3), ("temperature", "hot"), ("top_p", 0), ("max_tokens", 0),
                                 ("max_tokens", "10"), ("max_tokens", True), ("n", 0), ("n", 99), ("seed", -1),
                                 ("top_k", -2), ("num_beams", 1.5), ("stop", [""]), ("stream", "yes"),
                                 ("logprobs", True), ("presence_penalty", 0.5), ("stream_options", {})]:
                    _error(await post({**good, key: bad}), 400, key)
                _error(await post({**good, "min_tokens": 9, "max_tokens": 3}), 400, "min_tokens")
                _error(await post({**good, "messages": "hi"}), 400, "messages")
                _error(await post({**good, "messages": [{"role": "tool", "content": "x"}]}), 400)
                _error(await post({**good, "messages": [*good["messages"], {"role": "assistant", "content": "a"}]}), 400)
                _error(await post({**good, "model": "gpt-4"}), 404, "model")
                _error(await c.post("/v1/chat/completions", content=b"{not json"), 400)
                _error(await c.post("/v1/chat/completions", content=b"[1, 2]"), 400)
                _error(await c.post("/v1/chat/completions", content=b'{"messages": NaN}'), 400)
                _error(await c.post("/v1/chat/completions", content=b"\xff\xfe"), 400)
                e = _error(await c.post("/v1/chat/completions", content=b"[" * 100_000 + b"]" * 100_000), 400)
                assert "nested too deeply" in e["message"]  # the JSON decoder's RecursionError, not a 500
                # a JSON escape spelling a lone UTF-16 surrogate: no tokenizer takes it
                lone = json.dumps(chat(url, "SURROGATE what?")).replace("SURROGATE", "\\ud800").encode()
                e = _error(await c.post("/v1/chat/completions", content=lone), 400, "messages[0].content[1].text")
                assert "surrogate" in e["message"]
                lone = json.dumps({**good, "stop": ["SURROGATE"]}).replace("SURROGATE", "\\udfff").encode()
                _error(await c.post("/v1/chat/completions", content=lone), 400, "stop")
                lone = json.dumps({"prompt": "SURROGATE a photo of", "image": url}).replace("SURROGATE", "\\ud83d").encode()
                _error(await c.post("/v1/completions", content=lone), 400, "prompt")
                for key, bad in [("logit_bias", {"50": 100}), ("ignore_eos", True), ("guided_json", {"type": "object"}),
                                 ("guided_choice", ["a", "b"])]:  # known features that change the output: refused
                    _error(await post({**good, key: bad}), 400, key)
                _error(await c.post("/v1/completions", json={"prompt": "a photo of"}), 400, "image")
                _error(await c.post("/v1/completions", json={"prompt": ["a", "b"], "image": url}), 400, "prompt")
                _error(await post(chat(data_url(big), "x")), 413)  # 90000 pixels > 62500
                _error(await c.post("/v1/chat/completions", content=b" " * 700_000), 413)  # > the body limit
                _error(await c.get("/v1/nothing"), 404)
                # none of it touched the engine's state or other requests
                assert content(await post(good)) == want
                assert (await c.get("/health")).status_code == 200
        run(go())
        assert app.state.server.driver.stats.num_free_blocks == app.state.server.engine.num_blocks


def test_local_files_only_under_the_allowed_directory_and_remote_only_when_allowed(model, tmp_path):
    img = images()[2]
    want = model.answer(img, "what is this?")[0]
    media, outside = tmp_path / "media", tmp_path / "outside"
    media.mkdir(), outside.mkdir()
    img.save(media / "a.png"), img.save(outside / "b.png")
    (media / "link.png").symlink_to(outside / "b.png")
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(media), **kw)  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    remote = f"http://127.0.0.1:{httpd.server_address[1]}/a.png"
    try:
        with serving(model, allowed_local_media_path=media, allow_remote_images=True) as app:
            async def go():
                async with client(app) as c:
                    post = lambda u: c.post("/v1/chat/completions", json=chat(u, "what is this?"))  # noqa: E731
                    assert content(await post(f"file://{media}/a.png")) == want
                    _error(await post(f"file://{outside}/b.png"), 400)
                    _error(await post(f"file://{media}/../outside/b.png"), 400)
                    _error(await post(f"file://{media}/link.png"), 400)  # a symlink out of the directory
                    _error(await post(f"file://{media}/missing.png"), 400)
                    assert content(await post(remote)) == want
                    _error(await post(remote.replace("a.png", "missing.png")), 400)
            run(go())
    finally:
        httpd.shutdown()


def test_queue_full_gets_503(model):
    img = images()[0]
    long = chat(data_url(img), "what is this?", max_tokens=80, min_tokens=80)
    with serving(model, max_num_seqs=1, max_queue=1) as app:
        driver = app.state.server.driver

        async def go():
            async with client(app) as c:
                async def until(cond):
                    for _ in range(1000):
                        if cond():
                            return
                        await asyncio.sleep(0.01)
                    raise AssertionError("the engine never reached the expected state")
                first = asyncio.ensure_future(c.post("/v1/chat/completions", json=long))
                await until(lambda: driver.stats.num_running == 1)
                second = asyncio.ensure_future(c.post("/v1/chat/completions", json=long))
                await until(lambda: driver.num_waiting() == 1)  # one runs, one waits: the queue is full
                e = _error(await c.post("/v1/chat/completions", json=long), 503)
                assert e["code"] == "queue_full"
                for r in await asyncio.gather(first, second):
                    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 80
        run(go())


async def _asgi_stream_then_cut(app, body: bytes, spec: str):
    """Drive the app as a server would, and disconnect after the first streamed content: ASGI spec
    2.3 servers say so through receive(), 2.4 servers raise OSError from the next send()."""
    cut, done, seen = asyncio.Event(), asyncio.Event(), []
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await cut.wait()
        return {"type": "http.disconnect"}

    async def send(msg):
        if spec == "2.4" and cut.is_set():
            raise OSError("the client went away")
        seen.append(msg)
        if msg["type"] == "http.response.body" and b'"content":"' in msg.get("body", b"") and b'"content":""' not in msg["body"]:
            cut.set()
        if msg["type"] == "http.response.body" and not msg.get("more_body"):
            done.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80)}
    with contextlib.suppress(OSError, ClientDisconnect):
        await app(scope, receive, send)
    return seen, cut.is_set()


def _samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.mark.parametrize("spec", ["2.3", "2.4"])
def test_a_stream_cut_by_the_client_frees_its_blocks(model, spec):
    img = images()[0]
    body = json.dumps(chat(data_url(img), "what is this?", max_tokens=80, min_tokens=80, stream=True)).encode()
    with serving(model) as app:
        server = app.state.server
        start = server.driver.stats.num_free_blocks
        assert start == server.engine.num_blocks

        async def go():
            seen, was_cut = await _asgi_stream_then_cut(app, body, spec)
            assert was_cut and seen[0]["status"] == 200
            for _ in range(600):
                s = server.driver.stats
                if s.num_free_blocks == start and s.num_running == 0:
                    break
                await asyncio.sleep(0.05)
            async with client(app) as c:
                return (await c.get("/metrics")).text
        m = _samples(run(go()))
        assert server.driver.stats.num_free_blocks == start
        assert m[("blip2_fast_request_success_total", (("finished_reason", "abort"), ("model_name", "ckpt")))] == 1
        assert m[("blip2_fast_generation_tokens_total", (("model_name", "ckpt"),))] < 80  # cut, not finished


def test_api_key_is_enforced(model):
    url = data_url(images()[0])
    with serving(model, api_key="sekrit") as app:
        async def go():
            async with client(app) as c:
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
                    e = _error(await c.post("/v1/chat/completions", json=chat(url, "hi"), headers=headers), 401)
                    assert e["code"] == "invalid_api_key"
                    _error(await c.get("/v1/models", headers=headers), 401)
                ok = {"Authorization": "Bearer sekrit"}
                assert (await c.post("/v1/chat/completions", json=chat(url, "hi"), headers=ok)).status_code == 200
                assert (await c.get("/v1/models", headers=ok)).json()["data"][0]["id"] == "ckpt"
                assert (await c.get("/health")).status_code == 200  # probes need no key
        run(go())


METRICS = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total",
           "prompt_tokens_total", "generation_tokens_total", "request_success_total",
           "time_to_first_token_seconds_count", "inter_token_latency_seconds_count", "e2e_request_latency_seconds_count",
           "request_queue_time_seconds_count", "image_encode_seconds_count", "image_cache_hits_total"]


def test_metrics_parse_and_move(model):
    imgs = images()
    with serving(model) as app:
        async def go():
            async with client(app) as c:
                before = _samples((await c.get("/metrics")).text)
                usages = []
                for im, n in ((imgs[0], 4), (imgs[1], 7)):
                    r = await c.post("/v1/chat/completions", json=chat(data_url(im), "what?", max_tokens=n, min_tokens=n))
                    usages.append(r.json()["usage"])
                r = await c.get("/metrics")
                assert r.headers["content-type"].startswith("text/plain")
                return before, _samples(r.text), usages
        before, after, usages = run(go())
    lab = (("model_name", "ckpt"),)
    names = {k[0] for k in after}
    assert {f"blip2_fast_{m}" for m in METRICS} - names == set()

    def moved(name, labels=lab):
        return after[(name, labels)] - before.get((name, labels), 0.0)
    assert moved("blip2_fast_request_success_total", (("finished_reason", "length"), *lab)) == 2
    assert moved("blip2_fast_generation_tokens_total") == 4 + 7 == sum(u["completion_tokens"] for u in usages)
    assert moved("blip2_fast_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert moved("blip2_fast_time_to_first_token_seconds_count") == 2
    assert moved("blip2_fast_e2e_request_latency_seconds_count") == 2
    assert moved("blip2_fast_request_queue_time_seconds_count") == 2
    assert moved("blip2_fast_inter_token_latency_seconds_count") == (4 - 1) + (7 - 1)
    assert after[("blip2_fast_num_requests_running", lab)] == 0
    assert after[("blip2_fast_kv_cache_usage_perc", lab)] == 0.0  # every block free again
    assert after[("blip2_fast_e2e_request_latency_seconds_sum", lab)] > after[("blip2_fast_time_to_first_token_seconds_sum", lab)]


def test_health_is_503_once_the_engine_thread_dies(model):
    url = data_url(images()[0])
    with serving(model) as app:
        server = app.state.server

        def boom():
            raise RuntimeError("injected engine failure")

        async def go():
            async with client(app) as c:
                assert (await c.get("/health")).status_code == 200
                server.engine.step = boom  # the engine thread's next step raises: the thread ends
                e = _error(await c.post("/v1/chat/completions", json=chat(url, "hi")), 503)
                assert "injected engine failure" in e["message"]
                for _ in range(200):
                    if not server.driver.alive:
                        break
                    await asyncio.sleep(0.01)
                e = _error(await c.get("/health"), 503)
                assert e["code"] == "engine_not_running"
                _error(await c.post("/v1/chat/completions", json=chat(url, "hi")), 503)
                ev = sse_events((await c.post("/v1/chat/completions", json=chat(url, "hi", stream=True))).text)
                assert ev == [] or "error" in ev[0]
        run(go())
        assert isinstance(server.driver.error, RuntimeError)


def test_models_version_and_a_request_id_per_response(model):
    with serving(model, served_model_name="blip2-demo") as app:
        async def go():
            async with client(app) as c:
                m = (await c.get("/v1/models")).json()
                assert [d["id"] for d in m["data"]] == ["blip2-demo"] and m["data"][0]["max_model_len"] == 128
                assert (await c.get("/version")).json() == {"version": blip2_fast.__version__}
                r = await c.post("/v1/chat/completions", json={**chat(data_url(images()[0]), "hi"), "model": "blip2-demo"})
                assert r.headers["x-request-id"] == r.json()["id"] and r.json()["id"].startswith("chatcmpl-")
        run(go())


def test_build_app_validates_its_arguments(model, tmp_path):
    eng = blip2_fast.Engine(model, max_num_seqs=2)
    with pytest.raises(TypeError, match="engine options"):
        build_app(eng, max_num_seqs=4)
    with pytest.raises(ValueError, match="max_queue"):
        build_app(eng, max_queue=0)
    with pytest.raises(ValueError, match="not a directory"):
        build_app(eng, allowed_local_media_path=tmp_path / "nope")


def test_engine_thread_sleeps_when_idle(model):
    """Idle, the engine thread waits on its condition: it does not step (no busy loop)."""
    with serving(model) as app:
        server = app.state.server
        calls = []
        real = server.engine.has_unfinished
        server.engine.has_unfinished = lambda: calls.append(1) or real()
        time.sleep(0.3)
        assert len(calls) <= 2, f"the idle engine thread polled has_unfinished {len(calls)} times in 0.3 s"


def test_closing_the_server_aborts_requests_in_flight(model):
    """What SIGTERM does once --shutdown-timeout has passed: the lifespan shutdown closes the server,
    the engine thread aborts what is still running, and the clients are told."""
    long = chat(data_url(images()[0]), "what is this?", max_tokens=80, min_tokens=80)
    with serving(model) as app:
        server = app.state.server

        async def go():
            async with client(app) as c:
                streamed = asyncio.ensure_future(c.post("/v1/chat/completions", json={**long, "stream": True}))
                plain = asyncio.ensure_future(c.post("/v1/chat/completions", json=long))
                for _ in range(1000):
                    if server.driver.stats.num_running == 2 and server.driver.stats.generation_tokens > 2:
                        break
                    await asyncio.sleep(0.01)
                server.close()
                ev = sse_events((await streamed).text)
                assert "shutting down" in ev[-2]["error"]["message"] and ev[-1] == "[DONE]"
                assert 0 < len(streamed_texts(ev)[0].split()) < 80
                e = _error(await plain, 503)
                assert "shutting down" in e["message"]
                _error(await c.get("/health"), 503)
        run(go())
        assert not server.driver.alive and server.engine.num_free_blocks == server.engine.num_blocks


def test_decode_only_steps_leave_a_core_to_the_event_loop(model, monkeypatch):
    import os

    import torch

    from blip2_fast.serving import driver as drv_mod
    from blip2_fast.serving import inputs

    eng = blip2_fast.Engine(model, max_num_seqs=4)
    # the default: one thread fewer where torch's threads fill the cores, all of them otherwise
    monkeypatch.setattr(drv_mod.torch, "get_num_threads", lambda: 2)
    for cores, want in ((2, 1), (1, 1), (4, 2)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert drv_mod.EngineDriver(eng)._decode_threads == want, cores
    monkeypatch.setattr(drv_mod.torch, "get_num_threads", lambda: 1)
    assert drv_mod.EngineDriver(eng)._decode_threads == 1  # never 0
    monkeypatch.undo()
    for bad in (0, -1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="decode_threads"):
            drv_mod.EngineDriver(eng, decode_threads=bad)

    seen = []  # (requests waiting to be prefilled, torch threads) at each step, on the engine thread
    real = eng.step
    monkeypatch.setattr(eng, "step", lambda: seen.append((eng.stats().num_waiting, torch.get_num_threads())) or real())
    d = drv_mod.EngineDriver(eng, decode_threads=1)
    full = d._threads
    im = images()[1]
    ins = inputs.prepare(model, processor_for(model), im, "Question: what is in the picture? Answer:")
    p = blip2_fast.SamplingParams(max_new_tokens=5, min_new_tokens=5)
    d.start()
    try:
        async def go():
            q = asyncio.Queue()
            assert d.submit("a", {"pixel_values": ins.pixel_values, "prompt": ins.prompt_ids, "sampling": p},
                            ins.num_prompt_tokens, q)
            while True:
                item = await q.get()
                if getattr(getattr(item, "output", None), "finished", False):
                    return item.output
        out = run(go())
    finally:
        d.stop()
    assert len(out.token_ids) == 5
    assert seen[0] == (1, full) and seen[1:] == [(0, 1)] * 4, seen  # the prefill at every thread, then decodes at one
    assert d._step_threads == full  # back to every thread once idle

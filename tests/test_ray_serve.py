"""Ray Serve: two CPU replicas (ray.init(num_cpus=2)), one engine each, answer concurrent requests
exactly as model.answer does, and shut down cleanly. Every wait is bounded."""
import asyncio
import shutil
import tempfile
import threading

import httpx
import pytest

import blip2_fast
from blip2_fast.demo import build_demo_checkpoint
from serving_helpers import chat, data_url, free_port, images

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")


def bounded(fn, timeout_s):
    """fn() on a thread, failing the test if it takes longer (the fixture's ray.shutdown() then ends it)."""
    out = {}

    def body():
        try:
            out["r"] = fn()
        except BaseException as e:  # re-raised on the test's thread
            out["e"] = e
    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise AssertionError(f"did not finish within {timeout_s} s")
    if "e" in out:
        raise out["e"]
    return out.get("r")


@pytest.fixture
def local_ray(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # never join a cluster someone else runs
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    tmp = tempfile.mkdtemp(prefix="b2f-ray-")  # short: Ray's unix socket paths must fit in 107 bytes
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tmp,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def test_two_replicas_answer_concurrent_requests(tmp_path_factory, local_ray):
    from blip2_fast.serving.ray import deployment

    d = build_demo_checkpoint(tmp_path_factory.mktemp("ray") / "ckpt")
    m = blip2_fast.load(d, backend="reference", progress=False)
    imgs = images()
    qs = ["what is this?", "what color is the house?", "who is on the bicycle?"]
    cases = [(imgs[i % 3], qs[i % 3], 5 + i % 4) for i in range(8)]
    want = [m.answer(im, q, max_new_tokens=n)[0] for im, q, n in cases]

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = deployment(str(d), num_replicas=2, ray_actor_options={"num_cpus": 1}, load_kwargs={"backend": "reference"},
                     engine_kwargs={"max_num_seqs": 4})
    bounded(lambda: serve.run(app, name="blip2_fast", route_prefix="/"), 300)  # replicas load the model
    st = serve.status().applications["blip2_fast"]
    assert st.status == "RUNNING"
    dep = st.deployments["blip2_fast"]
    assert dep.replica_states.get("RUNNING") == 2, dep.replica_states

    async def go():
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120, trust_env=False) as c:
            async def one(i):
                im, q, n = cases[i]
                r = await c.post("/v1/chat/completions", json=chat(data_url(im), q, max_tokens=n))
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["message"]["content"]
            got = await asyncio.gather(*(one(i) for i in range(len(cases))))
            health = (await c.get("/health")).status_code
            return got, health
    got, health = asyncio.run(asyncio.wait_for(go(), 300))
    assert got == want and health == 200

    bounded(lambda: serve.delete("blip2_fast"), 120)  # replicas run the app's lifespan shutdown: engine threads stop
    assert "blip2_fast" not in serve.status().applications

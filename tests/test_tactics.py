"""Tactic choice (blip2_fast/tactics.py) on the CPU with a fake timer: the winner is bound per shape
class, the on-disk cache is used and keyed by device, versions, op and shape class, the overrides
work, a corrupt or unwritable cache is survived; and the bound ops still compute the spec."""
from __future__ import annotations

import copy
import json
import os
import pickle
import warnings

import pytest
import torch

import blip2_fast
from blip2_fast import _ext, ops, ops_torch, reference, tactics
from conftest import image_prompt, paged_case


class FakeTimer:
    """Returns scripted times: times[name] (a number, or a function of the call count)."""

    def __init__(self, **times):
        self.times = times
        self.calls = 0
        self.seen: list[list[str]] = []

    def __call__(self, thunks):
        self.calls += 1
        self.seen.append(list(thunks))
        for f in thunks.values():
            f()  # the thunks must run (a real timer runs them)
        return {n: float(self.times[n]) for n in thunks}


class Counting:
    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, *a, **kw):
        self.n += 1
        return self.fn(*a, **kw)


def tuner(tmp_path, timer, label="fake-gpu | torch x | triton y"):
    return tactics.Tuner("cpu", timer=timer, cache=tactics.TacticCache(tmp_path / "tactics.json"), device_label=label)


def norm_candidates():
    ours = Counting(reference.layer_norm_ref)
    theirs = Counting(ops_torch.layer_norm)
    return ours, theirs, [("triton", ours), ("torch", theirs)]


def x_w_b(rows=6, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, n, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g)


def test_the_faster_candidate_is_bound_per_shape_class(tmp_path):
    ours, theirs, cands = norm_candidates()
    timer = FakeTimer(triton=2.0, torch=1.0)
    op = tactics.TacticOp("layer_norm", cands, tuner(tmp_path, timer))
    x, w, b = x_w_b()
    y = op(x, w, b, 1e-5)
    torch.testing.assert_close(y, reference.layer_norm_ref(x, w, b, 1e-5))
    assert timer.calls == 1 and timer.seen[0] == ["triton", "torch"]
    n_theirs = theirs.n
    for _ in range(3):
        op(x, w, b, 1e-5)
    assert timer.calls == 1 and theirs.n == n_theirs + 3  # bound: no more timing, torch runs
    (key, choice), = op.choices.items()
    assert choice.winner == "torch" and choice.source == "measured"
    assert choice.times_ms == {"triton": 2.0, "torch": 1.0}
    op(*x_w_b(rows=5), 1e-5)  # 5 rows: the same power-of-two class as 6
    assert timer.calls == 1
    op(*x_w_b(rows=40), 1e-5)  # a new class is timed on its first call
    assert timer.calls == 2 and len(op.choices) == 2


def test_a_tie_keeps_our_kernel_and_a_failing_candidate_loses(tmp_path):
    ours, theirs, cands = norm_candidates()
    op = tactics.TacticOp("layer_norm", cands, tuner(tmp_path, FakeTimer(triton=1.0, torch=1.0)))
    x, w, b = x_w_b()
    op(x, w, b, 1e-5)
    assert next(iter(op.choices.values())).winner == "triton"

    def broken(*a, **kw):
        raise RuntimeError("no kernel for this shape")

    timer = FakeTimer(triton=5.0, torch=1.0)
    op = tactics.TacticOp("layer_norm", [("triton", ours), ("torch", broken)], tuner(tmp_path / "b", timer))
    torch.testing.assert_close(op(x, w, b, 1e-5), reference.layer_norm_ref(x, w, b, 1e-5))
    c = next(iter(op.choices.values()))
    assert c.winner == "triton" and c.times_ms["torch"] is None and "no kernel" in c.errors["torch"]
    assert timer.calls == 0  # one runnable candidate: nothing to time
    with pytest.raises(RuntimeError, match="every candidate"):
        tactics.TacticOp("layer_norm", [("triton", broken), ("torch", broken)], tuner(tmp_path / "c", timer))(x, w, b, 1e-5)


def test_the_cache_is_used_and_keyed_by_device_versions_op_and_class(tmp_path):
    x, w, b = x_w_b()
    t1 = FakeTimer(triton=2.0, torch=1.0)
    op = tactics.TacticOp("layer_norm", norm_candidates()[2], tuner(tmp_path, t1, label="GPU-A | v1"))
    op(x, w, b, 1e-5)
    data = json.loads((tmp_path / "tactics.json").read_text())
    key = f"layer_norm: {tactics.KEYS['layer_norm'](x, w, b, 1e-5)}"
    assert key == "layer_norm: float32 rows~8 N32"
    entry = data["entries"]["GPU-A | v1"][key]
    assert entry["winner"] == "torch" and entry["times_ms"] == {"triton": 2.0, "torch": 1.0} and entry["when"]

    # a second process on the same device and versions: no timing, the cached winner
    t2 = FakeTimer(triton=1.0, torch=9.0)
    ours, theirs, cands = norm_candidates()
    op2 = tactics.TacticOp("layer_norm", cands, tuner(tmp_path, t2, label="GPU-A | v1"))
    op2(x, w, b, 1e-5)
    assert t2.calls == 0 and theirs.n == 1 and ours.n == 0
    assert next(iter(op2.choices.values())).source == "cache"
    # another device, or other versions: timed afresh, and both entries kept in the file
    op3 = tactics.TacticOp("layer_norm", norm_candidates()[2], tuner(tmp_path, t2, label="GPU-B | v1"))
    op3(x, w, b, 1e-5)
    assert t2.calls == 1 and next(iter(op3.choices.values())).winner == "triton"
    data = json.loads((tmp_path / "tactics.json").read_text())
    assert set(data["entries"]) == {"GPU-A | v1", "GPU-B | v1"}
    # the same class of another op is another entry
    op4 = tactics.TacticOp("rms_norm", [("triton", reference.rms_norm_ref), ("torch", ops_torch.rms_norm)],
                           tuner(tmp_path, t2, label="GPU-A | v1"))
    op4(x, w, 1e-5)
    assert t2.calls == 2
    # a cached winner that is no candidate any more (a renamed kernel) is timed again
    data["entries"]["GPU-A | v1"][key]["winner"] = "cutlass"
    (tmp_path / "tactics.json").write_text(json.dumps(data))
    t3 = FakeTimer(triton=1.0, torch=2.0)
    op5 = tactics.TacticOp("layer_norm", norm_candidates()[2], tuner(tmp_path, t3, label="GPU-A | v1"))
    op5(x, w, b, 1e-5)
    assert t3.calls == 1 and next(iter(op5.choices.values())).winner == "triton"


def test_the_device_key_names_device_and_versions():
    key = tactics.device_key("cpu")
    assert f"torch {torch.__version__}" in key and "blip2_fast" in key and "triton" in key and "kernels" in key


@pytest.mark.parametrize("content", ["{not json", '{"format": 99, "entries": {}}', '["a list"]', ""])
def test_a_corrupt_cache_is_ignored_with_one_warning_and_replaced(tmp_path, content):
    (tmp_path / "tactics.json").write_text(content)
    timer = FakeTimer(triton=2.0, torch=1.0)
    op = tactics.TacticOp("layer_norm", norm_candidates()[2], tuner(tmp_path, timer))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        op(*x_w_b(), 1e-5)
        op(*x_w_b(rows=40), 1e-5)
    msgs = [str(m.message) for m in w if "tactic cache" in str(m.message)]
    assert len(msgs) == 1 and "ignored" in msgs[0], msgs
    assert timer.calls == 2
    data = json.loads((tmp_path / "tactics.json").read_text())  # rewritten as a valid cache
    assert data["format"] == 1 and len(data["entries"]["fake-gpu | torch x | triton y"]) == 2


def test_an_unwritable_cache_keeps_the_choices_in_memory(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache's directory would be")
    cache = tactics.TacticCache(blocker / "tactics.json")
    timer = FakeTimer(triton=2.0, torch=1.0)
    op = tactics.TacticOp("layer_norm", norm_candidates()[2],
                          tactics.Tuner("cpu", timer=timer, cache=cache, device_label="dev"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for rows in (6, 40, 6, 40):
            op(*x_w_b(rows=rows), 1e-5)
    msgs = [str(m.message) for m in w if "tactic cache" in str(m.message)]
    assert len(msgs) == 1 and "cannot be written" in msgs[0], msgs
    assert timer.calls == 2 and all(c.winner == "torch" for c in op.choices.values())
    if os.geteuid() != 0:  # root writes anywhere: only the not-a-directory case fails for it
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        cache = tactics.TacticCache(ro / "tactics.json")
        with pytest.warns(RuntimeWarning, match="cannot be written"):
            cache.put("dev", "k", {"winner": "torch"})
        assert cache.get("dev", "k") == {"winner": "torch"}


def test_no_timing_while_tracing_or_capturing(tmp_path, monkeypatch):
    ours, theirs, cands = norm_candidates()
    timer = FakeTimer(triton=2.0, torch=1.0)
    op = tactics.TacticOp("layer_norm", cands, tuner(tmp_path, timer))
    x, w, b = x_w_b()
    monkeypatch.setattr(tactics, "_not_now", lambda: "a CUDA graph is being captured")
    op(x, w, b, 1e-5)
    assert timer.calls == 0 and ours.n == 1 and theirs.n == 0
    assert next(iter(op.choices.values())).source.startswith("not measured")
    monkeypatch.undo()
    op(x, w, b, 1e-5)  # the next eager call measures and binds
    assert timer.calls == 1 and next(iter(op.choices.values())).winner == "torch"
    # torch.compile traces our kernel in, whatever was chosen eagerly
    f = torch.compile(lambda x: op(x, w, b, 1e-5), backend="eager", fullgraph=True)
    n = ours.n
    torch.testing.assert_close(f(x), reference.layer_norm_ref(x, w, b, 1e-5))
    assert ours.n > n


def test_time_candidates_on_the_cpu_runs_every_thunk_interleaved():
    order = []
    times = tactics.time_candidates({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, "cpu",
                                    warmup=2, reps=3)
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    assert order == ["a", "b"] * 5


def test_keys_bucket_sizes_and_name_what_changes_the_kernel():
    q = torch.empty(2, 16, 257, 88)
    k = torch.empty(2, 16, 257, 88)
    key = tactics.KEYS["attention"]
    assert key(q, k, k) == key(torch.empty(2, 16, 300, 88), torch.empty(2, 16, 300, 88), torch.empty(2, 16, 300, 88))
    assert key(q, k, k) != key(torch.empty(2, 16, 513, 88), torch.empty(2, 16, 513, 88), torch.empty(2, 16, 513, 88))
    assert key(q, k, k) != key(q.half(), k.half(), k.half())
    assert key(q, k, k, causal=True) != key(q, k, k) != key(q, k, k, bias=torch.empty(1))
    assert "D88" in key(q, k, k)
    assert tactics.KEYS["linear_gelu"](torch.empty(3, 7, 12), torch.empty(5, 12), None) == "float32 M~32 K12 N5 gelu-none"


def test_paged_attention_is_timed_at_full_context(tmp_path):
    q, kc, vc, bt, lens = paged_case([3, 17], 2, 16, 8, torch.float32)
    kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)  # the probe reads every table entry's block
    seen = []

    def ours(q, kc, vc, bt, lens, scale, rel_bias=None):
        seen.append(lens.tolist())
        return reference.paged_attention_ref(q, kc, vc, bt, lens, scale, rel_bias)

    op = tactics.TacticOp("paged_attention", [("triton", ours), ("torch", ops_torch.paged_attention)],
                          tuner(tmp_path, FakeTimer(triton=1.0, torch=2.0)))
    out = op(q, kc, vc, bt, lens, 0.25)
    full = bt.shape[1] * kc.shape[1]
    assert seen[0] == [full, full] and seen[-1] == [3, 17]  # timed at full context, run on the real one
    torch.testing.assert_close(out, reference.paged_attention_ref(q, kc, vc, bt, lens, 0.25))


def test_impl_compares_as_its_string_and_tells_why(tmp_path):
    op = tactics.TacticOp("layer_norm", norm_candidates()[2], tuner(tmp_path, FakeTimer(triton=2.0, torch=1.0)))
    impl = tactics.Impl("fast", "per shape class", op)
    assert impl == "fast" and isinstance(impl, str) and json.dumps({"a": impl}) == '{"a": "fast"}'
    op(*x_w_b(), 1e-5)
    assert "torch (measured: triton 2 ms, torch 1 ms)" in repr(impl) and impl.why == "per shape class"
    assert repr(tactics.Impl("fast", "the CPU's")) == "'fast'"  # nothing chosen yet: the plain string
    assert pickle.loads(pickle.dumps(impl)) == "fast" and copy.deepcopy(impl) == "fast"
    rep = tactics.report({"layer_norm": impl, "write_kv": tactics.Impl("reference", "backend 'reference'")})
    assert rep["layer_norm"]["choices"]["float32 rows~8 N32"]["winner"] == "torch"
    assert rep["write_kv"] == {"impl": "reference", "why": "backend 'reference'", "choices": {}}


def test_the_switch(monkeypatch):
    for value, on in (("", True), ("on", True), ("1", True), ("off", False), ("0", False), ("FALSE", False)):
        monkeypatch.setenv(tactics.ENV, value)
        assert tactics.enabled() is on
    monkeypatch.setenv(tactics.ENV, "off")
    assert tactics.default_tuner("cuda") is None  # off: no timing, our kernels
    monkeypatch.setenv(tactics.ENV, "sometimes")
    with pytest.raises(ValueError, match=tactics.ENV):
        tactics.enabled()
    monkeypatch.delenv(tactics.ENV)
    assert tactics.default_tuner("cpu") is None  # the CPU keeps its own fast implementations


# ------------------------------------------------------------------------------- through bind


@pytest.fixture(scope="module")
def ext():
    reason = _ext.unavailable_reason("cpu")
    assert reason is None, f"the C++ extension did not build: {reason}"
    return _ext


def test_bind_wraps_our_kernels_and_overrides_force_them(ext, tmp_path):
    timer = FakeTimer(cpp=1.0, torch=3.0)
    bound = ops.bind("fast", None, "cpu", tuner=tuner(tmp_path, timer))
    # on the CPU our kernels are the extension's (cross / paged attention); the rest are torch already
    assert isinstance(bound.cross_attention, tactics.TacticOp) and isinstance(bound.paged_attention, tactics.TacticOp)
    assert bound.attention is ops.get("attention", "fast", "cpu") and not isinstance(bound.layer_norm, tactics.TacticOp)
    assert set(bound.impls.values()) == {"fast"} and "timed at first use" in bound.impls["cross_attention"].why
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 16, generator=g), torch.randn(2, 3, 9, 16, generator=g), torch.randn(2, 3, 9, 16, generator=g)
    out = bound.cross_attention(q, k, v)
    torch.testing.assert_close(out, reference.cross_attention_ref(q, k, v), atol=1e-5, rtol=1e-5)
    assert timer.calls == 1 and bound.impls["cross_attention"].choices["float32 B*H~8 Nq~8 Nk~16 D16"].winner == "cpp"

    forced = ops.bind("fast", {"cross_attention": "fast"}, "cpu", tuner=tuner(tmp_path, timer))
    assert forced.cross_attention is _ext.cross_attention
    assert "asked for with ops=" in forced.impls["cross_attention"].why
    assert isinstance(forced.paged_attention, tactics.TacticOp)  # only the op named is forced
    off = ops.bind("fast", None, "cpu", tuner=None)
    assert off.cross_attention is _ext.cross_attention and off.impls["cross_attention"].choices == {}
    ref = ops.bind("reference", None, "cpu", tuner=tuner(tmp_path, timer))
    assert ref.cross_attention is reference.cross_attention_ref and ref.impls["cross_attention"].why == "backend 'reference'"


def test_the_model_runs_on_the_bound_tactics(ext, ckpt, tmp_path, monkeypatch):
    """A whole load with tactics on (a fake timer that prefers PyTorch's path): every op still
    computes the model, and `model.impls` says what each op got."""
    d, hf = ckpt("opt")
    timer = FakeTimer(cpp=2.0, torch=1.0)
    monkeypatch.setattr(tactics, "default_tuner", lambda device: tuner(tmp_path, timer))
    m = blip2_fast.load(d)
    assert set(m.impls.values()) == {"fast"}
    pv, ids, mask = image_prompt(hf, 2, pads=((1, 2),))
    with torch.no_grad():
        ref = hf(pixel_values=pv, input_ids=ids, attention_mask=mask).logits
    out = m(pixel_values=pv, input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert ((out - ref).abs()[valid].max() / ref[valid].abs().max()).item() <= 1e-3
    choices = m.impls["cross_attention"].choices
    assert choices and all(c.winner == "torch" for c in choices.values()), m.impls
    assert "-> torch (measured: cpp 2 ms, torch 1 ms)" in repr(m.impls)


# ------------------------------------------------------------------------------ deprecated names


def test_old_norm_names_are_deprecated_aliases(monkeypatch):
    monkeypatch.setattr(ops, "_alias_warned", set())
    with pytest.warns(DeprecationWarning, match="'layernorm' is deprecated; use 'layer_norm'"):
        assert ops.get("layernorm") is ops.get("layer_norm")
    with pytest.warns(DeprecationWarning, match="'rmsnorm' is deprecated"):
        bound = ops.bind("fast", {"rmsnorm": "reference"}, "cpu", tuner=None)
    assert bound.impls["rms_norm"] == "reference" and "rmsnorm" not in bound.impls
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per alias, not per call
        assert bound.rmsnorm is bound.rms_norm and bound.layernorm is bound.layer_norm
        ops.get("layernorm")

"""The packed small-M linear inside the model on a CPU (blip2_fast/layers/linear.py): which linears a
load packs, that state_dict still holds the checkpoint's weights, the `Linear` layer's activations and
`out=` against float64, and the whole model token-identical to transformers with each ISA branch
forced (AVX2, and "torch": nothing packed)."""
import pytest
import torch
import torch.nn.functional as F

import blip2_fast
from blip2_fast import _ext
from blip2_fast.layers import Linear
from blip2_fast.layers.params import as_param
from blip2_fast.linear_cpu import ISA_ENV, resolve_isa
from conftest import image_prompt


def _linears(m):
    return {n: x for n, x in m.named_modules() if isinstance(x, Linear)}


def _packs():
    return resolve_isa() not in ("torch", "scalar")


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_fast_load_packs_every_model_linear_and_keeps_the_state_dict(ckpt, lm):
    if not _packs():
        pytest.skip(f"the packed kernel does not run here ({resolve_isa()})")
    d, _ = ckpt(lm)
    fast, ref = blip2_fast.load(d, backend="fast"), blip2_fast.load(d, backend="reference")
    lins = _linears(fast)
    unpacked = sorted(n for n, x in lins.items() if x.packed is None)
    # model.py's own projections are not under the four models; everything in vision / qformer / lm is
    assert all(not n.startswith(("vision.", "qformer.", "lm.")) for n in unpacked), unpacked
    assert any(n.startswith("lm.") for n in lins) and any(n.startswith("vision.") for n in lins)
    assert all(x.packed is None for x in _linears(ref).values())  # the reference backend: F.linear, the spec
    sf, sr = fast.state_dict(), ref.state_dict()
    assert list(sf) == list(sr)
    for k in sf:  # the checkpoint's weights, not the packed copies
        assert sf[k].shape == sr[k].shape and torch.equal(sf[k], sr[k]), k
    assert fast.checkpoint_keys() == ref.checkpoint_keys()
    names = {n for n, _ in fast.named_parameters()}
    assert not any("packed" in n for n in names)


@pytest.mark.parametrize("isa", ["auto", "avx2", "torch"])
@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
@pytest.mark.parametrize("M,N,K", [(1, 97, 64), (8, 256, 80), (13, 33, 7), (515, 64, 48)])
def test_linear_layer_activation_and_out(isa, act, M, N, K, monkeypatch):
    """Linear(x, act, out=) within the fp32 error rule of float64, packed (each ISA) or not."""
    monkeypatch.setenv(ISA_ENV, isa)
    g = torch.Generator().manual_seed(M * N + K)
    w, b = torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(N, generator=g)
    lin = Linear(as_param(w, ["w"]), as_param(b, ["b"]))
    from blip2_fast.linear_cpu import PackedLinear

    packed = lin.pack(PackedLinear)
    assert packed == (resolve_isa() not in ("torch", "scalar")) == (lin.packed is not None)
    x = torch.randn(M, K, generator=g)
    y64 = x.double() @ w.double().t() + b.double()
    y64 = F.relu(y64) if act == "relu" else F.gelu(y64) if act == "gelu" else y64
    eager = F.linear(x, w, b)
    eager = F.relu(eager) if act == "relu" else F.gelu(eager) if act == "gelu" else eager
    base = (eager.double() - y64).abs().max().item()
    got = lin(x, act)
    err = (got.double() - y64).abs().max().item()
    assert got.dtype == torch.float32 and err <= 2 * base + 1e-6, (err, base)
    out = torch.full((M, N), float("nan"))
    assert lin(x, act, out=out) is out
    assert not out.isnan().any() and (out.double() - y64).abs().max().item() <= 2 * base + 1e-6
    with pytest.raises(ValueError, match="activation"):
        lin(x, "tanh")


def test_reference_op_is_not_kept():
    """`pack` keeps only a form that runs a packed kernel: the reference op's prepared form is not one."""
    from blip2_fast.reference import LinearRef

    lin = Linear(as_param(torch.randn(8, 4), ["w"]))
    assert lin.pack(LinearRef) is False and lin.packed is None
    lin16 = Linear(as_param(torch.randn(8, 4).half(), ["w"]))
    from blip2_fast.linear_cpu import PackedLinear

    assert lin16.pack(PackedLinear) is False  # float32 CPU weights only


@pytest.mark.parametrize("isa", ["avx2", "torch"])
@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_forced_isa_matches_transformers(ckpt, lm, isa, monkeypatch):
    """The model with the packed kernel forced down to AVX2, and with packing off ("torch"), against
    transformers: logits within 1e-3 relative, greedy tokens identical (the default ISA is
    test_model_fast's)."""
    if isa != "torch" and _ext.unavailable_reason("cpu") is None and _ext.linear_isa(isa) != isa:
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv(ISA_ENV, isa)
    d, hf = ckpt(lm)
    m = blip2_fast.load(d, backend="fast")
    lm_lins = [x for n, x in _linears(m).items() if n.startswith("lm.")]
    assert all((x.packed is not None) == (isa != "torch") for x in lm_lins)
    if isa != "torch":
        assert {x.packed.isa for x in lm_lins} == {isa}
    pv, ids, mask = image_prompt(hf, 2, pads=((1, 2),))
    kw = {"decoder_input_ids": torch.randint(2, 200, (2, 4), generator=torch.Generator().manual_seed(0))} if lm == "t5" else {}
    with torch.no_grad():
        ref = hf(pixel_values=pv, input_ids=ids, attention_mask=mask, **kw).logits
        g_ref = hf.generate(pixel_values=pv, input_ids=ids, attention_mask=mask, max_new_tokens=6)
    out = m(pixel_values=pv, input_ids=ids, attention_mask=mask, **kw).logits
    valid = mask.bool() if lm == "opt" else torch.ones(ref.shape[:2], dtype=torch.bool)
    err = ((out - ref).abs()[valid].max() / ref[valid].abs().max()).item()
    assert err <= 1e-3, f"relative logits error {err:.2e}"
    assert torch.equal(m.generate(pv, input_ids=ids, attention_mask=mask, max_new_tokens=6), g_ref)


def test_cpu_benchmarks_run_quick(tmp_path):
    """bench.cpu_compare's sweep and bench.cpu_limits --step on the tiny presets: every case and field
    there, the plot written when matplotlib is installed (no timings checked)."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmp_json, step_json = tmp_path / "compare.json", tmp_path / "step.json"
    for args in (["bench.cpu_compare", "--presets", "blip2-opt-tiny", "blip2-t5-tiny", "--batches", "1", "3",
                  "--new-tokens", "2", "3", "--runs", "1", "--threads", "1", "--json", str(cmp_json)],
                 ["bench.cpu_limits", "--step", "--quick", "--step-presets", "blip2-opt-tiny", "blip2-t5-tiny",
                  "--step-batches", "1", "2", "--step-count", "2", "--step-threads", "2", "--json", str(step_json)]):
        p = subprocess.run([sys.executable, "-m", *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(cmp_json.read_text())
    assert set(res["presets"]) == {"blip2-opt-tiny", "blip2-t5-tiny"} and res["machine"]["model"]
    for cases in res["presets"].values():
        assert sorted((c["batch"], c["new_tokens"]) for c in cases) == [(1, 2), (1, 3), (3, 2), (3, 3)]
        assert all(c["ratio"] > 0 and c["cpu_time_ratio"] > 0 and isinstance(c["token_identical"], bool) for c in cases)
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert cmp_json.with_suffix(".png").exists() == has_mpl == ("plot" in res)
    step = json.loads(step_json.read_text())
    rows = step["decode_steps"]
    assert [(r["preset"], r["batch"]) for r in rows] == [(p, b) for p in ("blip2-opt-tiny", "blip2-t5-tiny") for b in (1, 2)]
    assert all(r["floor_ms"] > 0 and r["packed_ms"] > 0 and r["bytes"]["linears"] > 0 for r in rows)
    for r in rows:  # a bandwidth probe before the first block and after each
        assert len(r["probe_gbs"]) == len(r["packed_block_ms"]) + 1 and min(r["probe_gbs"]) > 0
        assert r["packed_best_block_over_floor"] > 0
    assert step["threads"] == 2 and all(r["threads"] == 2 for r in rows) and "wall time" in step["note"]
    assert step["kernel_peaks"]["float32"]["best_gflops"] > 0 and all(r["compute_floor_ms"] > 0 for r in rows)


def test_no_packing_when_the_copies_would_not_fit(ckpt, monkeypatch):
    """The packed copies are a second copy of every fp32 weight: where they would take more than half
    the memory available, a load packs nothing, says so once per model part, and still computes
    the model (the same logits as the reference backend within the fp32 rule)."""
    if not _packs():
        pytest.skip(f"the packed kernel does not run here ({resolve_isa()})")
    from blip2_fast.engine import limits

    d, hf = ckpt("opt")
    monkeypatch.setattr(limits, "available_memory", lambda device: 64 * 1024)  # 64 KiB: nothing fits
    with pytest.warns(UserWarning, match=r"not packing .* linear layers .* more than half of the 64\.0 KiB available"):
        fast = blip2_fast.load(d, backend="fast")
    assert all(x.packed is None for x in _linears(fast).values())
    monkeypatch.undo()
    ref = blip2_fast.load(d, backend="reference")
    pv, ids, mask = image_prompt(hf, 2, pads=((1, 2),))
    a = fast(pixel_values=pv, input_ids=ids, attention_mask=mask).logits
    b = ref(pixel_values=pv, input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert ((a - b).abs()[valid].max() / b[valid].abs().max()).item() <= 1e-4

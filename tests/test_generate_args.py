"""Arguments to generate(), caption(), answer(), SamplingParams and Engine (issue 12): ints are ints,
ids are ids, tensors or arrays are pixels, and sizes the model cannot use are refused at once, with
the argument named; allocation cases run under a memory cap (RLIMIT_AS) in a subprocess."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import blip2_fast
from blip2_fast import Engine, SamplingParams
from conftest import address_space_cap, image_prompt


@pytest.fixture(scope="module")
def opt(ckpt):
    d, hf = ckpt("opt")
    return blip2_fast.load(d, backend="reference"), hf


@pytest.mark.parametrize("kw, exc, name", [
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens"),
    (dict(max_new_tokens="3"), TypeError, "max_new_tokens"),
    (dict(num_beams=2.5), TypeError, "num_beams"),
    (dict(num_return_sequences=0), ValueError, "num_return_sequences"),
    (dict(num_return_sequences=1.0), TypeError, "num_return_sequences"),
    (dict(eos_token_id="3"), TypeError, "eos_token_id"),
    (dict(eos_token_id=[3, "4"]), TypeError, r"eos_token_id\[1\]"),
    (dict(eos_token_id=2**63), ValueError, "eos_token_id"),
    (dict(eos_token_id=211), ValueError, "eos_token_id"),  # the vocabulary has 211 ids
    (dict(do_sample=True, seed=1.5), TypeError, "seed"),
    (dict(do_sample=True, seed=2**64), ValueError, "seed"),
    (dict(do_sample="yes"), TypeError, "do_sample"),
    (dict(top_k=1.5, do_sample=True), TypeError, "top_k"),
    (dict(temperature="hot", do_sample=True), TypeError, "temperature"),
    (dict(min_new_tokens=-1), ValueError, "min_new_tokens"),
    (dict(max_length=3.0), TypeError, "max_length"),
    (dict(pad_token_id="1"), TypeError, "pad_token_id"),
    (dict(generator=5, do_sample=True), TypeError, "generator"),
    (dict(interpolate_pos_encoding="no"), TypeError, "interpolate_pos_encoding"),
])
def test_generate_refuses_reinterpretable_arguments(opt, kw, exc, name):
    m, hf = opt
    pv, ids, _ = image_prompt(hf, 1)
    kw = {"max_new_tokens": 2, **kw}
    with pytest.raises(exc, match=name):
        m.generate(pv, input_ids=ids, **kw)


@pytest.mark.parametrize("kw, exc, name", [
    (dict(stop_token_ids="ab"), TypeError, "stop_token_ids"),
    (dict(stop_token_ids=[1.0]), TypeError, r"stop_token_ids\[0\]"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed=2**64), ValueError, "seed"),
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens"),
    (dict(num_return_sequences=0), ValueError, "num_return_sequences"),
    (dict(num_beams=0), ValueError, "num_beams"),
])
def test_sampling_params_validate(kw, exc, name):
    with pytest.raises(exc, match=name):
        SamplingParams(**kw).validate()
    p = SamplingParams(max_new_tokens=np.int64(5), temperature=1, stop_token_ids=(np.int32(3),))
    p.validate(vocab=10)
    assert type(p.max_new_tokens) is int and type(p.temperature) is float and p.stop_token_ids == [3]


def test_generate_inputs(opt):
    m, hf = opt
    pv, ids, mask = image_prompt(hf, 2)
    want = m.generate(pv, input_ids=ids, attention_mask=mask, max_new_tokens=4)
    # numpy pixels (as an image pipeline may hand them over), other float dtypes: converted
    assert torch.equal(m.generate(pv.numpy(), input_ids=ids.numpy(), attention_mask=mask.numpy(), max_new_tokens=4), want)
    assert torch.equal(m.generate(pv.double(), input_ids=ids.tolist(), max_new_tokens=4), want)
    with pytest.raises(ValueError, match="meta"):
        m.generate(torch.empty(2, 3, 42, 42, device="meta"), input_ids=ids, max_new_tokens=2)
    with pytest.raises(TypeError, match="pixel_values"):
        m.generate([[0.0]], input_ids=ids, max_new_tokens=2)
    with pytest.raises(TypeError, match="input_ids"):
        m.generate(pv, input_ids={"input_ids": ids}, max_new_tokens=2)
    with pytest.raises(ValueError, match="float"):
        m.generate(pv.to(torch.uint8), input_ids=ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="vocabulary"):
        m.generate(pv, input_ids=torch.full((2, 7), 500), max_new_tokens=2)


def test_caption_and_answer_check_their_generation_arguments(tmp_path_factory):
    from blip2_fast.demo import build_demo_checkpoint, sample_image

    d = build_demo_checkpoint(tmp_path_factory.mktemp("demo") / "ckpt")
    m = blip2_fast.load(d, backend="reference")
    img = sample_image()
    with pytest.raises(TypeError, match="max_new_tokens"):
        m.caption(img, max_new_tokens=2.5)
    with pytest.raises(TypeError, match="num_beams"):
        m.answer([img], ["what?"], num_beams=2.5)
    with pytest.raises(ValueError, match="num_return_sequences"):
        m.caption(img, prompt="a photo of", num_return_sequences=0)
    with pytest.raises(TypeError, match="questions"):
        m.answer([img], [{"q": "what?"}])
    assert len(m.caption(img, max_new_tokens=2)) == 1


def test_sizes_the_model_cannot_use_are_refused_at_once(opt):
    m, hf = opt
    pv, ids, _ = image_prompt(hf, 1)
    with pytest.raises(ValueError, match="max_new_tokens=1000000000.*128 positions"):
        m.generate(pv, input_ids=ids, max_new_tokens=10**9)
    with pytest.raises(ValueError, match="max_new_tokens=200.*128 positions"):
        m.generate(pv, input_ids=ids, max_new_tokens=200)
    with pytest.raises(ValueError, match="num_beams=10000000"):
        m.generate(pv, input_ids=ids, max_new_tokens=5, num_beams=10**7)
    with pytest.raises(ValueError, match="block_size"):
        Engine(m, block_size=2**30)
    with pytest.raises(ValueError, match="block_size"):
        Engine(m, block_size=12)
    with pytest.raises(ValueError, match="num_blocks=1000000000"):
        Engine(m, num_blocks=10**9)
    with pytest.raises(ValueError, match="max_num_seqs=1000000000"):
        Engine(m, max_num_seqs=10**9)
    with pytest.raises(ValueError, match="max_model_len"):
        Engine(m, max_model_len=4096)  # OPT has 128 positions
    with pytest.raises(TypeError, match="max_num_seqs"):
        Engine(m, max_num_seqs=2.0)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        Engine(m, gpu_memory_utilization=1.5)


def _capped(code: str, headroom_gib: float = 2.0, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter whose address space is capped (RLIMIT_AS) at what it maps once
    torch, transformers and blip2_fast are imported, plus `headroom_gib` (relative: a CUDA build of
    torch maps gigabytes of libraries before any tensor)."""
    pre = address_space_cap(int(headroom_gib * 2**30), "torch, transformers, blip2_fast, blip2_fast.presets")
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-c", pre + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=os.path.dirname(__file__))


@pytest.mark.parametrize("call, name", [
    ("m.generate(pv, max_new_tokens=10**9)", "max_new_tokens"),
    ("m.generate(pv, max_new_tokens=5, num_beams=10**7)", "num_beams"),
    ("m.generate(pv, max_new_tokens=50, num_beams=40, num_return_sequences=2, do_sample=True)", None),
    ("Engine(m, num_blocks=10**9)", "num_blocks"),
    ("Engine(m, max_num_seqs=10**9)", "max_num_seqs"),
    ("Engine(m, block_size=2**30)", "block_size"),
    ("Engine(m, num_blocks=600_000)", "num_blocks"),  # 600k blocks of 5 KiB: past the 2 GiB headroom, within RAM
])
@pytest.mark.parametrize("preset", ["blip2-opt-tiny", "blip2-t5-tiny"])
def test_allocations_are_refused_under_a_memory_cap(preset, call, name):
    r = _capped(f"""
        import torch
        from blip2_fast import Engine
        from blip2_fast.presets import load_preset
        m = load_preset({preset!r}, device="cpu", dtype=torch.float32, backend="reference")
        pv = torch.randn(1, 3, 42, 42)
        try:
            {call}
        except (ValueError, TypeError) as e:
            print("REFUSED", type(e).__name__, e)
        else:
            print("RAN")
    """)
    assert r.returncode == 0, r.stderr[-3000:]
    line = r.stdout.strip().splitlines()[-1]
    if name is None:  # a request that fits: it runs under the cap
        assert line == "RAN", line
    else:
        assert line.startswith("REFUSED ValueError") and name in line, line

"""load() and the inputs as transformers code spells them (issue 14): torch_dtype / "auto",
device_map for one device, and the model card's processor flow (one image, a batch of prompts of
different lengths, a processor with num_query_tokens), against transformers on the same checkpoint."""
import json

import pytest
import torch

import blip2_fast
from blip2_fast.demo import build_processor_checkpoint, sample_image


@pytest.fixture(scope="module")
def proc_ckpt(tmp_path_factory):
    cache = {}

    def make(lm):
        if lm not in cache:
            from transformers import Blip2ForConditionalGeneration

            d = build_processor_checkpoint(tmp_path_factory.mktemp(f"proc-{lm}") / "ckpt", lm)
            cache[lm] = d, Blip2ForConditionalGeneration.from_pretrained(str(d)).eval()
        return cache[lm]

    return make


def test_torch_dtype_and_auto(ckpt, tmp_path):
    d, _ = ckpt("opt")
    assert blip2_fast.load(d, torch_dtype=torch.bfloat16, backend="reference").dtype == torch.bfloat16
    assert blip2_fast.load(d, torch_dtype="float16", dtype="float16", backend="reference").dtype == torch.float16
    with pytest.raises(ValueError, match="torch_dtype"):
        blip2_fast.load(d, dtype=torch.float32, torch_dtype=torch.float16)
    raw = json.loads((d / "config.json").read_text())
    saved = raw.get("torch_dtype", raw.get("dtype"))
    m = blip2_fast.load(d, torch_dtype="auto", backend="reference")
    assert m.dtype == {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(saved, torch.float32)
    # a checkpoint saying bfloat16 loads in bfloat16 under "auto"; one saying nothing gets the device's default
    import shutil

    c = tmp_path / "c"
    shutil.copytree(d, c)
    for key, value, want in (("torch_dtype", "bfloat16", torch.bfloat16), ("dtype", "float16", torch.float16),
                             (None, None, torch.float32)):
        cfg = {k: v for k, v in raw.items() if k not in ("torch_dtype", "dtype")}
        if key:
            cfg[key] = value
        (c / "config.json").write_text(json.dumps(cfg))
        assert blip2_fast.load(c, dtype="auto", backend="reference").dtype == want, (key, value)


@pytest.mark.parametrize("device_map", ["auto", "cpu", {"": "cpu"}, {"vision_model": "cpu", "language_model": "cpu"},
                                        torch.device("cpu")])
def test_device_map_for_one_device(ckpt, device_map):
    d, _ = ckpt("opt")
    assert blip2_fast.load(d, device_map=device_map, backend="reference").device == torch.device("cpu")


@pytest.mark.parametrize("device_map, exc, match", [
    ({"vision_model": "cpu", "language_model": 0}, ValueError, "one device"),
    ({"vision_model": 0, "language_model": 1}, ValueError, "one device"),
    ({"": "disk"}, ValueError, "disk"),
    ({}, ValueError, "empty"),
    (["cpu"], TypeError, "device_map"),
])
def test_device_map_over_several_devices_raises(ckpt, device_map, exc, match):
    d, _ = ckpt("opt")
    with pytest.raises(exc, match=match):
        blip2_fast.load(d, device_map=device_map)


def test_device_map_cuda_spellings_name_cuda(ckpt):
    d, _ = ckpt("opt")
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only message")
    for dm in ("cuda", "cuda:1", {"": 0}, 0):
        with pytest.raises(ValueError, match="CUDA"):
            blip2_fast.load(d, device_map=dm)
    with pytest.raises(ValueError, match="disagree"):
        blip2_fast.load(d, device="cpu", device_map="cuda:0")


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_model_card_processor_flow(proc_ckpt, lm):
    d, hf = proc_ckpt(lm)
    m = blip2_fast.load(d, backend="reference")
    processor = m.processor()
    image = sample_image()
    prompt = "Question: what is in the picture? Answer:"
    inputs = processor(images=image, text=prompt, return_tensors="pt").to("cpu", torch.float16)
    assert inputs["pixel_values"].dtype == torch.float16
    out = m.generate(**inputs, max_new_tokens=6)
    text = processor.batch_decode(out, skip_special_tokens=True)
    ref_in = dict(inputs)
    ref_in["pixel_values"] = inputs["pixel_values"].float()  # transformers' fp32 model takes fp32 pixels
    with torch.no_grad():
        ref = hf.generate(**ref_in, max_new_tokens=6)
    assert torch.equal(out, ref)
    assert text == processor.batch_decode(ref, skip_special_tokens=True)


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_batch_of_prompts_of_different_lengths(proc_ckpt, lm):
    d, hf = proc_ckpt(lm)
    m = blip2_fast.load(d, backend="reference")
    processor = m.processor()
    assert processor.num_query_tokens == hf.config.num_query_tokens  # image tokens are laid out in the prompt
    img = sample_image()
    prompts = ["a photo of", "Question: what is in the picture? Answer:", "two cats"]
    side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "left" if lm == "opt" else "right"  # as batched generation wants
    try:
        inputs = processor(images=[img, img.rotate(90), img.resize((60, 90))], text=prompts, padding=True,
                           return_tensors="pt")
    finally:
        processor.tokenizer.padding_side = side
    assert (inputs["attention_mask"] == 0).any()  # the prompts were padded
    out = m.generate(**inputs, max_new_tokens=7)
    with torch.no_grad():
        ref = hf.generate(**inputs, max_new_tokens=7)
    assert torch.equal(out, ref)
    assert processor.batch_decode(out, skip_special_tokens=True) == processor.batch_decode(ref, skip_special_tokens=True)


def test_moving_to_where_the_model_already_is_is_a_no_op(ckpt):
    """transformers code calls model.to(device) after loading; on the device and dtype the model was
    loaded with that returns the model itself (as nn.Module does), elsewhere it raises naming load()."""
    m = blip2_fast.load(ckpt("opt")[0], backend="reference")
    assert m.device == torch.device("cpu") and m.dtype == torch.float32
    same = [m.to("cpu"), m.to(torch.device("cpu")), m.to(torch.float32), m.to("cpu", torch.float32),
            m.to(device="cpu", dtype=torch.float32), m.to(torch.zeros(1)), m.cpu(), m.float(), m.eval().to("cpu")]
    assert all(x is m for x in same)
    for move in (lambda: m.to(torch.float16), lambda: m.half(), lambda: m.bfloat16(), lambda: m.to("meta"),
                 lambda: m.to("cpu", torch.bfloat16), lambda: m.double()):
        with pytest.raises(TypeError, match=r"placed when it is loaded .* blip2_fast\.load\(source, device="):
            move()
    if not torch.cuda.is_available():
        with pytest.raises(TypeError, match="placed when it is loaded"):
            m.cuda()
    assert next(m.parameters()).dtype == torch.float32  # nothing moved

"""The server's fast preprocessing (serving/pixels.py, inputs.Preparer) against the processor it
replaces: the same pixels (within float32 rounding, never asserted bitwise) on images of several
sizes and modes, the same prompt ids, and the processor itself wherever its pipeline or options
are not the one the lookup table reproduces."""
import numpy as np
import pytest
import torch

for _mod in ("fastapi", "uvicorn", "prometheus_client", "httpx"):
    pytest.importorskip(_mod)
from PIL import Image

pil_backend = pytest.importorskip("transformers.image_processing_backends")
from transformers import BlipImageProcessorPil  # noqa: E402

import blip2_fast  # noqa: E402
from blip2_fast.demo import build_demo_checkpoint  # noqa: E402
from blip2_fast.serving import inputs  # noqa: E402
from blip2_fast.serving.pixels import LookupPixels  # noqa: E402

ATOL = 1e-5  # float32 outputs of one elementwise formula; the mean/std scale keeps them within ~2


def _images(seed=0):
    """Seeded random images: the target size, odd sizes (up- and downscaled), and non-RGB modes."""
    rng = np.random.default_rng(seed)
    u8 = lambda *shape: rng.integers(0, 256, shape, dtype=np.uint8)  # noqa: E731
    rgb = [Image.fromarray(u8(h, w, 3)) for h, w in ((224, 224), (61, 97), (480, 640), (1, 1), (300, 17))]
    gray = Image.fromarray(u8(50, 70))
    rgba = Image.fromarray(u8(40, 33, 4))  # alpha: the processor composites onto white
    la = Image.fromarray(u8(40, 33, 4)).convert("LA")
    pal = Image.fromarray(u8(64, 48, 3)).convert("P")
    cmyk = Image.fromarray(u8(29, 31, 3)).convert("CMYK")
    return rgb + [gray, rgba, la, pal, cmyk]


def _check_matches(ip, imgs):
    fast = LookupPixels.of(ip)
    assert fast is not None, "this processor's pipeline is the one the table reproduces"
    for im in imgs:
        want = ip(images=[im], return_tensors="pt")["pixel_values"][0]
        got = fast(im)
        assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape, (im.mode, im.size)
        err = (got - want).abs().max().item()
        assert err <= ATOL, f"{im.mode} {im.size}: max error {err}"


@pytest.mark.parametrize("kw", [
    {},  # BLIP-2's own: 384 px bicubic, CLIP mean/std
    {"size": {"height": 224, "width": 224}},
    {"size": {"height": 42, "width": 58}, "resample": Image.Resampling.BILINEAR},
    {"size": {"height": 37, "width": 37}, "resample": Image.Resampling.NEAREST, "rescale_factor": 1 / 127.5,
     "image_mean": [0.5, 0.25, 0.125], "image_std": [0.2, 0.9, 1.7]},
])
def test_lookup_table_pixels_equal_the_processors(kw):
    _check_matches(BlipImageProcessorPil(**kw), _images())


@pytest.mark.parametrize("returns", ["array", "image"])
def test_either_kind_of_rgb_conversion_result(monkeypatch, returns):
    """transformers' convert_to_rgb gives an array on some versions and a PIL image on others (5.17):
    the table's path takes either, and agrees with the processor on non-RGB images both ways."""
    ip = BlipImageProcessorPil(size={"height": 32, "width": 40})
    fast = LookupPixels.of(ip)
    assert fast is not None
    imgs = _images()[5:]  # gray, RGBA, LA, P, CMYK
    wants = [ip(images=[im], return_tensors="pt")["pixel_values"][0] for im in imgs]
    convert = ip.convert_to_rgb

    def as_returned(image):
        out = convert(image)
        return (out if isinstance(out, Image.Image) else Image.fromarray(np.asarray(out))) if returns == "image" \
            else np.asarray(out)

    monkeypatch.setattr(ip, "convert_to_rgb", as_returned)  # what the table's path calls
    for im, want in zip(imgs, wants):
        err = (fast(im) - want).abs().max().item()
        assert err <= ATOL, f"{im.mode} {im.size}: max error {err}"


def test_a_table_whose_own_path_raises_is_not_used(monkeypatch):
    ip = BlipImageProcessorPil(size={"height": 32, "width": 40})
    monkeypatch.setattr(LookupPixels, "__call__", lambda self, image: 1 / 0)
    assert LookupPixels.of(ip) is None


@pytest.mark.parametrize("kw", [
    {"do_normalize": False}, {"do_rescale": False}, {"do_resize": False}, {"do_convert_rgb": False},
    {"do_center_crop": True, "crop_size": {"height": 20, "width": 20}},
    {"do_pad": True, "pad_size": {"height": 400, "width": 400}},
    {"size": {"shortest_edge": 224}},
])
def test_other_options_fall_back_to_the_processor(kw):
    assert LookupPixels.of(BlipImageProcessorPil(**kw)) is None


def test_other_processor_classes_fall_back():
    class Cropping(BlipImageProcessorPil):  # a pipeline step overridden: not the one reproduced
        def _preprocess(self, images, **kw):
            return super()._preprocess([im[:, 1:, 1:] for im in images], **kw)

    assert LookupPixels.of(Cropping()) is None
    assert LookupPixels.of(object()) is None


def test_a_table_that_disagrees_with_the_processor_is_not_used():
    ip = BlipImageProcessorPil(size={"height": 30, "width": 30})
    good = LookupPixels.of(ip)
    assert good is not None and good._agrees()
    bad = LookupPixels(ip, (30, 30), int(ip.resample), good.table + np.float32(1e-3))
    assert not bad._agrees()
    off_by_one = LookupPixels(ip, (30, 30), int(Image.Resampling.NEAREST), good.table)  # another filter
    assert not off_by_one._agrees()


def test_lookup_pixels_refuses_what_is_not_a_pil_image():
    fast = LookupPixels.of(BlipImageProcessorPil(size={"height": 30, "width": 30}))
    with pytest.raises(TypeError, match="PIL image"):
        fast(np.zeros((30, 30, 3), np.uint8))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = build_demo_checkpoint(tmp_path_factory.mktemp("pixels") / "ckpt")
    return blip2_fast.load(d, backend="reference", progress=False)


def _same_inputs(a: inputs.EngineInputs, b: inputs.EngineInputs):
    assert torch.equal(a.prompt_ids, b.prompt_ids) and a.prompt_ids.dtype == b.prompt_ids.dtype == torch.long
    assert a.num_prompt_tokens == b.num_prompt_tokens
    assert a.pixel_values.shape == b.pixel_values.shape and a.pixel_values.dtype == b.pixel_values.dtype
    err = (a.pixel_values.float() - b.pixel_values.float()).abs().max().item()
    assert err <= ATOL, f"max pixel error {err}"


def test_preparer_gives_prepares_inputs(model):
    proc = model.processor()
    prep = inputs.Preparer(model, proc)
    assert prep.fast, "the demo checkpoint's processor is the PIL BLIP one"
    assert prep.prefix.numel() == model.cfg.num_query_tokens
    prompts = [None, "Question: what is in the picture? Answer:", "a photo of", "Question: who ? Answer: a man "
               "Question: where? Answer:"]
    for i, im in enumerate(_images(1)):
        p = prompts[i % len(prompts)]
        _same_inputs(prep(im, p), inputs.prepare(model, proc, im, p))


def test_preparer_falls_back_to_the_processor(model, monkeypatch):
    proc = model.processor()
    ip = proc.image_processor
    monkeypatch.setattr(ip, "do_center_crop", True)
    monkeypatch.setattr(ip, "crop_size", type(ip.size)(height=20, width=20))
    prep = inputs.Preparer(model, proc)
    assert not prep.fast and prep.pixels is None
    calls = []
    real = type(ip).__call__
    monkeypatch.setattr(type(ip), "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    im = _images(2)[1]
    for p in (None, "a photo of"):
        got = prep(im, p)
        _same_inputs(got, inputs.prepare(model, proc, im, p))
        assert got.pixel_values.shape[-2:] == (20, 20)  # the processor's crop, not the table's resize
    assert len(calls) == 4  # the Preparer's two calls ran the processor, as prepare's two did


def test_the_server_uses_the_fast_path_and_hands_the_engine_prepared_pixels(model, monkeypatch):
    import asyncio

    import httpx

    from blip2_fast.engine import intake
    from blip2_fast.serving import build_app
    from serving_helpers import chat, data_url

    seen = []
    real = intake.new_request
    monkeypatch.setattr(intake, "new_request", lambda eng, rid, px, *a: seen.append(type(px)) or real(eng, rid, px, *a))
    monkeypatch.setattr("blip2_fast.engine.engine.new_request", intake.new_request)
    app = build_app(model, max_num_seqs=4)
    try:
        assert app.state.server.prepare.fast
        im = _images(3)[6]  # RGBA: the server converts it to RGB before preprocessing, as model.answer does
        want = model.answer(im, "what is in the picture?", max_new_tokens=6)[0]
        seen.clear()  # model.answer's own engine request

        async def go():
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120) as c:
                r = await c.post("/v1/chat/completions", json=chat(data_url(im), "what is in the picture?", max_tokens=6,
                                                                   n=2, temperature=0))
                assert r.status_code == 200, r.text
                return [ch["message"]["content"] for ch in r.json()["choices"]]
        assert asyncio.run(go()) == [want, want]
    finally:
        app.state.server.close()
    assert seen == [intake.PreparedPixels] * 2  # both choices' requests took the one prepared copy

"""Engine.prepare_pixels: add_request's pixel checks, copy and image-cache digest done on the
caller's thread. The engine's results are those of the raw pixels; the copy is the engine's own
(the caller's tensor can change afterwards); the digest is computed by engine code from that copy
(nothing a caller hands in can name other pixels in the image cache); misuse is refused."""
import hashlib

import pytest
import torch

import blip2_fast
from blip2_fast import Engine, SamplingParams
from blip2_fast.engine.intake import PreparedPixels
from blip2_fast.engine.runner import image_digest
from conftest import image_prompt


@pytest.fixture(scope="module")
def setup(ckpt):
    d, hf = ckpt("opt")
    m = blip2_fast.load(d, backend="reference")
    pv, ids, _ = image_prompt(hf, 3, seed=5)
    return m, hf, pv, ids


def _greedy(eng, rid, px, ids, n=6, **kw):
    eng.add_request(rid, pixel_values=px, prompt=ids, sampling=SamplingParams(max_new_tokens=n), **kw)
    return eng.run()[rid].token_ids


def test_prepared_pixels_give_the_raw_pixels_tokens(setup):
    m, hf, pv, ids = setup
    eng = Engine(m, max_num_seqs=4, block_size=4, num_blocks=64)
    for i in range(3):
        want = _greedy(Engine(m, max_num_seqs=4, block_size=4, num_blocks=64), "raw", pv[i], ids[i])
        assert _greedy(eng, f"p{i}", eng.prepare_pixels(pv[i]), ids[i]) == want
    assert eng.num_free_blocks == eng.num_blocks


def test_the_engine_owns_its_copy_and_digests_it(setup):
    m, hf, pv, ids = setup
    eng = Engine(m, max_num_seqs=4, block_size=4, num_blocks=64)
    mine = pv[0].clone()
    prep = eng.prepare_pixels(mine)
    assert prep._pixels.data_ptr() != mine.data_ptr()
    assert prep._digest == image_digest(prep._pixels) == image_digest(pv[0])
    want0 = _greedy(Engine(m, max_num_seqs=4, block_size=4, num_blocks=64), "a", pv[0], ids[0])
    want1 = _greedy(Engine(m, max_num_seqs=4, block_size=4, num_blocks=64), "b", pv[1], ids[0])
    assert want0 != want1, "the two images should give different tokens"
    mine.copy_(pv[1])  # the caller reuses its buffer for another image after preparing the first
    assert _greedy(eng, "first", prep, ids[0]) == want0
    # the cached features of image 0 are not served for image 1, whose pixels now sit in the caller's buffer
    hits = eng.stats().image_cache_hits
    assert _greedy(eng, "second", mine, ids[0]) == want1
    assert eng.stats().image_cache_hits == hits
    # the prepared image again: a cache hit, with image 0's tokens
    assert _greedy(eng, "again", prep, ids[0]) == want0
    assert eng.stats().image_cache_hits == hits + 1


def test_one_prepared_image_serves_several_requests(setup):
    m, hf, pv, ids = setup
    eng = Engine(m, max_num_seqs=4, block_size=4, num_blocks=64)
    prep = eng.prepare_pixels(pv[2])
    for i in range(3):
        eng.add_request(i, pixel_values=prep, prompt=ids[i], sampling=SamplingParams(max_new_tokens=5))
    got = {k: o.token_ids for k, o in eng.run().items()}
    for i in range(3):
        assert got[i] == _greedy(Engine(m, max_num_seqs=4, block_size=4, num_blocks=64), "r", pv[2], ids[i], n=5)


def test_prepared_pixels_cannot_be_forged_or_changed(setup):
    m, hf, pv, ids = setup
    eng = Engine(m, max_num_seqs=4, block_size=4, num_blocks=64)
    with pytest.raises(TypeError, match="prepare_pixels"):
        PreparedPixels()
    with pytest.raises(TypeError, match="prepare_pixels"):
        PreparedPixels(pv[0], "0" * 40)
    prep = eng.prepare_pixels(pv[0])
    with pytest.raises(AttributeError, match="read-only"):
        prep._digest = image_digest(pv[1])
    with pytest.raises(AttributeError):
        prep.extra = 1
    assert prep.shape == pv[0].shape and prep.interpolate_pos_encoding is False
    assert "PreparedPixels" in repr(prep)


def test_misuse_is_refused_as_add_request_refuses_it(setup, ckpt):
    m, hf, pv, ids = setup
    eng = Engine(m, max_num_seqs=4, block_size=4, num_blocks=64)
    for bad, match in ((pv[0][:2], "shape"), (torch.full_like(pv[0], float("nan")), "NaN"),
                       (pv[0].to(torch.int64), "float"), ("pixels", "torch.Tensor")):
        for call in (lambda: eng.prepare_pixels(bad),
                     lambda: eng.add_request("x", pixel_values=bad, prompt=ids[0])):
            with pytest.raises((ValueError, TypeError), match=match):
                call()
    prep = eng.prepare_pixels(pv[0])
    with pytest.raises(TypeError, match="already"):
        eng.prepare_pixels(prep)
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        eng.add_request("x", pixel_values=prep, prompt=ids[0], interpolate_pos_encoding=True)
    with pytest.raises(ValueError, match="exactly one"):
        eng.add_request("x", pixel_values=prep, image=object(), prompt=ids[0])
    with pytest.raises(TypeError, match="interpolate_pos_encoding"):
        eng.prepare_pixels(pv[0], interpolate_pos_encoding=1)
    other = blip2_fast.load(ckpt("opt")[0], backend="reference")  # the same weights, another model object
    with pytest.raises(ValueError, match="another model"):
        Engine(other, max_num_seqs=4, block_size=4, num_blocks=64).add_request("x", pixel_values=prep, prompt=ids[0])
    assert not eng.has_unfinished() and eng.num_free_blocks == eng.num_blocks


def test_interpolated_pixels_keep_their_own_digest(setup):
    m, hf, pv, ids = setup
    eng = Engine(m, max_num_seqs=4, block_size=4, num_blocks=64)
    plain, interp = eng.prepare_pixels(pv[0]), eng.prepare_pixels(pv[0], interpolate_pos_encoding=True)
    assert interp._digest == plain._digest + "/i" and interp.interpolate_pos_encoding is True
    want = _greedy(Engine(m, max_num_seqs=4, block_size=4, num_blocks=64), "r", pv[0], ids[0],
                   interpolate_pos_encoding=True)
    assert _greedy(eng, "i", interp, ids[0], interpolate_pos_encoding=True) == want


def test_image_digest_hashes_the_pixel_bytes_and_shape():
    g = torch.Generator().manual_seed(3)
    for shape in ((3, 5, 7), (3, 42, 42)):
        px = torch.randn(*shape, generator=g)
        want = hashlib.sha1(px.numpy().tobytes() + str(tuple(px.shape)).encode()).hexdigest()  # the digest as it was
        assert image_digest(px) == want == image_digest(px.to(torch.float16).float().clone().copy_(px))
    a = torch.randn(3, 6, 4, generator=g)
    assert image_digest(a) != image_digest(a.reshape(3, 4, 6).contiguous())  # same bytes, another shape

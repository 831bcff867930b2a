"""Bad input gets a clear exception naming the problem."""
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import blip2_fast
from blip2_fast import CheckpointError, UnsupportedModelError
from conftest import image_prompt


def _copy(d, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(d, dst)
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        blip2_fast.load(tmp_path / "nope")


def test_missing_weights(ckpt, tmp_path):
    d = _copy(ckpt("opt")[0], tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        blip2_fast.load(d)


def test_truncated_safetensors(ckpt, tmp_path):
    d = _copy(ckpt("opt")[0], tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        blip2_fast.load(d)


def test_garbage_safetensors(ckpt, tmp_path):
    d = _copy(ckpt("opt")[0], tmp_path)
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="safetensors"):
        blip2_fast.load(d)


def _rewrite(d, drop=None, reshape=None):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(d / "model.safetensors"))
    if drop:
        del sd[drop]
    if reshape:
        sd[reshape] = torch.zeros(3, 3)
    save_file(sd, str(d / "model.safetensors"))


def test_missing_tensor_named(ckpt, tmp_path):
    d = _copy(ckpt("opt")[0], tmp_path)
    key = "qformer.encoder.layer.0.attention.attention.query.weight"
    _rewrite(d, drop=key)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        blip2_fast.load(d)


def test_wrong_shape_names_key_and_shapes(ckpt, tmp_path):
    d = _copy(ckpt("opt")[0], tmp_path)
    key = "language_projection.weight"
    _rewrite(d, reshape=key)
    with pytest.raises(CheckpointError, match=r"language_projection\.weight.*\[3, 3\].*expected \[80, 64\]"):
        blip2_fast.load(d)


def test_unsupported_language_model(tmp_path):
    from blip2_fast.testing import tiny_config

    cfg = tiny_config("opt").to_dict()
    cfg["text_config"] = {"model_type": "llama", "hidden_size": 32}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="llama"):
        blip2_fast.load(tmp_path)


def test_not_blip2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnsupportedModelError, match="bert"):
        blip2_fast.load(tmp_path)


def test_shard_index_outside_directory(ckpt, tmp_path):
    d = _copy(ckpt("opt")[0], tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"query_tokens": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        blip2_fast.load(d)


def test_pickle_bin_is_refused(ckpt, tmp_path):
    import pickle

    d = _copy(ckpt("opt")[0], tmp_path)
    (d / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(CheckpointError, match="refused to load"):
        blip2_fast.load(d)


def test_wrong_image_size_and_mode(ckpt):
    d, hf = ckpt("opt")
    m = blip2_fast.load(d, backend="reference")
    _, ids, _ = image_prompt(hf, 1)
    with pytest.raises(ValueError, match="42x42"):
        m.generate(torch.randn(1, 3, 40, 40), input_ids=ids)
    with pytest.raises(ValueError, match=r"\[batch, 3, height, width\]"):
        m.generate(torch.randn(1, 1, 42, 42), input_ids=ids)
    with pytest.raises(ValueError, match="float"):
        m(pixel_values=torch.zeros(1, 3, 42, 42, dtype=torch.uint8), input_ids=ids)


def test_wrong_image_token_count(ckpt):
    d, hf = ckpt("opt")
    m = blip2_fast.load(d, backend="reference")
    pv, ids, _ = image_prompt(hf, 1)
    with pytest.raises(ValueError, match="image tokens"):
        m.generate(pv, input_ids=ids[:, 2:], max_new_tokens=2)
    with pytest.raises(ValueError, match="image tokens"):
        m(pixel_values=pv, input_ids=ids[:, 1:])


def test_prompt_too_long(ckpt):
    d, hf = ckpt("opt")
    m = blip2_fast.load(d, backend="reference")
    pv, _, _ = image_prompt(hf, 1)
    ids = torch.randint(4, 100, (1, 200))
    with pytest.raises(ValueError, match="positions"):
        m.generate(pv, input_ids=ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="positions"):
        m(pixel_values=pv, input_ids=ids)


def test_out_of_vocab_and_bad_args(ckpt):
    d, hf = ckpt("opt")
    m = blip2_fast.load(d, backend="reference")
    pv, ids, _ = image_prompt(hf, 1)
    with pytest.raises(ValueError, match="vocabulary"):
        m(pixel_values=pv, input_ids=torch.full((1, 3), 10_000))
    with pytest.raises(TypeError, match="unsupported"):
        m.generate(pv, input_ids=ids, max_new_tokens=2, foo=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate(pv, input_ids=ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="dtype"):
        blip2_fast.load(d, dtype="int8")
    with pytest.raises(ValueError, match="backend"):
        blip2_fast.load(d, backend="turbo")
    with pytest.raises(ValueError, match="unknown op"):
        blip2_fast.load(d, ops={"softmax": "fast"})


def test_explicit_fast_op_that_cannot_run_raises(ckpt, monkeypatch):
    """Asking for a fast op explicitly never silently falls back to the reference."""
    from blip2_fast import ops

    d, _ = ckpt("opt")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # every op has a CPU implementation now: leave rmsnorm only its Triton kernel, which needs a GPU
    monkeypatch.setitem(ops._FAST, "rms_norm", [f for f in ops._FAST["rms_norm"] if f.kind == "triton"])
    with pytest.raises(RuntimeError, match="rmsnorm"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the other ops' expected fallbacks
        blip2_fast.load(d, ops={"rmsnorm": "fast"})


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never touch the network from tests
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(CheckpointError) as e:
        blip2_fast.load("Salesforce/blip2-opt-2.7b-does-not-exist-here")
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg and str(tmp_path / "hub-cache") in msg and "local Hugging Face cache" in msg, msg
    assert msg.endswith("checkpoint directory.") and msg.count("(") == msg.count(")"), msg  # whole sentences


def test_live_model_of_wrong_class_is_refused():
    with pytest.raises(UnsupportedModelError, match="Linear"):
        blip2_fast.load(torch.nn.Linear(2, 2))


def test_moving_a_loaded_model_is_a_clear_error(ckpt):
    """Elsewhere than where it was loaded (to the same place is a no-op: test_dropin_load)."""
    m = blip2_fast.load(ckpt("opt")[0], backend="reference")
    for move in (lambda: m.to("meta"), lambda: m.half(), lambda: m.to(torch.bfloat16)):
        with pytest.raises(TypeError, match="blip2_fast.load"):
            move()
    assert m.eval() is m  # eval()/train() stay harmless


# ---- regressions found by adversarial testing ------------------------------------------------------

def test_hf_cache_layout_with_symlinked_shards(ckpt, tmp_path):
    """The Hugging Face cache links snapshots/<rev>/<file> to ../../blobs/<sha>: shards may be symlinks
    that resolve outside the snapshot directory."""
    d, hf = ckpt("opt")
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snap.mkdir(parents=True)
    hf.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    for f in (tmp_path / "src").iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../..") / "blobs" / f.name)
    pv, ids, _ = image_prompt(hf, 1)
    a = blip2_fast.load(snap, backend="reference")(pixel_values=pv, input_ids=ids).logits
    b = blip2_fast.load(d, backend="reference")(pixel_values=pv, input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # other alignment, maybe other BLAS paths


def _header_edit(path, edit):
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + n])
    edit(header)
    raw = json.dumps(header).encode()  # data offsets are relative to the data, so the header may grow
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


@pytest.mark.parametrize("edit,match", [
    (lambda h: h["query_tokens"].__setitem__("data_offsets", [-8, h["query_tokens"]["data_offsets"][1]]), "data_offsets"),
    (lambda h: h["query_tokens"].__setitem__("data_offsets", "abc"), "data_offsets"),
    (lambda h: h["query_tokens"].__setitem__("shape", [1, 5.0, 64]), "shape"),
    (lambda h: h["language_projection.bias"].__setitem__("data_offsets", list(h["language_projection.weight"]["data_offsets"][:1]) + [h["language_projection.weight"]["data_offsets"][0] + 320]), "overlap|bytes"),
])
def test_lying_safetensors_header(ckpt, tmp_path, edit, match):
    d = _copy(ckpt("opt")[0], tmp_path)
    _header_edit(d / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=match):
        blip2_fast.load(d)


@pytest.mark.parametrize("archs,match", [(["Foo"], "Foo"), (None, None)])
def test_architectures_field(ckpt, tmp_path, archs, match):
    d = _copy(ckpt("opt")[0], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = archs if archs is not None else "Blip2ForConditionalGeneration"  # a bare string is fine
    (d / "config.json").write_text(json.dumps(cfg))
    if match:
        with pytest.raises(UnsupportedModelError, match=match):
            blip2_fast.load(d)
    else:
        assert blip2_fast.load(d, backend="reference").architecture == "Blip2ForConditionalGeneration"


def test_config_with_fewer_layers_than_the_weights_warns(ckpt, tmp_path):
    d = _copy(ckpt("opt")[0], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="not used"):
        blip2_fast.load(d, backend="reference")
    cfg["text_config"]["num_hidden_layers"] = -1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="positive"):
        blip2_fast.load(d)


@pytest.mark.parametrize("edit", [lambda c: c.update(vision_config=[1]), lambda c: c["qformer_config"].update(cross_attention_frequency=0),
                                  lambda c: c["vision_config"].update(num_attention_heads=0)])
def test_malformed_config_values(ckpt, tmp_path, edit):
    d = _copy(ckpt("opt")[0], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError):
        blip2_fast.load(d)


def test_output_indexing_returns_the_same_tensors(ckpt):
    d, hf = ckpt("opt")
    m = blip2_fast.load(d, backend="reference")
    pv, ids, _ = image_prompt(hf, 1)
    out = m(pixel_values=pv, input_ids=ids)
    assert out[0] is out.logits and out["logits"] is out.logits and out.to_tuple()[0] is out.logits
    with pytest.raises(KeyError):
        out["nope"]


def test_live_model_is_copied_and_meta_is_refused():
    import transformers

    from blip2_fast.testing import randomize_, tiny_config

    hf = randomize_(transformers.Blip2ForConditionalGeneration(tiny_config("opt")).eval())
    m = blip2_fast.load(hf, backend="reference")
    assert m.query_tokens.data_ptr() != hf.query_tokens.data_ptr()
    with torch.device("meta"):
        meta = transformers.Blip2ForConditionalGeneration(tiny_config("opt"))
    with pytest.raises(CheckpointError, match="meta"):
        blip2_fast.load(meta)


def test_checkpoint_and_argument_errors_come_before_the_ops_are_bound(monkeypatch, tmp_path):
    """Binding the ops may build the C++ extension (~40 s the first time): a mistyped path, a broken
    config.json or a bad backend name is reported before that, not after."""
    from blip2_fast import ops as ops_module
    from blip2_fast.files import CheckpointError

    bound = []
    monkeypatch.setattr(ops_module, "bind", lambda *a, **k: bound.append(a))
    with pytest.raises(CheckpointError, match="does not exist"):
        blip2_fast.load(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        blip2_fast.load(tmp_path / "bad")
    with pytest.raises(ValueError, match="backend must be one of"):
        blip2_fast.load(tmp_path / "nope", backend="bogus")
    with pytest.raises(ValueError, match="unknown op"):
        blip2_fast.load(tmp_path / "nope", ops={"no_such_op": "fast"})
    assert bound == []


def test_cli_reports_user_errors_without_tracebacks(tmp_path):
    import subprocess
    import sys

    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(img)
    r = subprocess.run([sys.executable, "-m", "blip2_fast", "caption", str(img), "--model", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_cuda_device_without_a_gpu_is_a_clear_error(ckpt):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="CUDA"):
        blip2_fast.load(ckpt("opt")[0], device="cuda")

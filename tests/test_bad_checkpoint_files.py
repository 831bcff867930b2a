"""Untrusted checkpoint files: each broken file is a CheckpointError naming it, in bounded time and memory.

Hangs are tested in a subprocess with a timeout, allocations in a subprocess under RLIMIT_AS, so a
regression fails the test instead of hanging or swapping the run.
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import blip2_fast
from blip2_fast import CheckpointError
from conftest import address_space_cap, image_prompt


def _copy(d, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(d, dst)
    return dst


def _split(path):
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data[8: 8 + n], data[8 + n:]


def _write(path, header: bytes, body: bytes):
    Path(path).write_bytes(struct.pack("<Q", len(header)) + header + body)


def _run_script(code: str, timeout: float, headroom_as: int | None = None) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line. headroom_as: cap the address space
    at what the interpreter maps once blip2_fast and transformers are imported, plus this many bytes
    (relative, not absolute: a CUDA build of torch maps gigabytes of libraries before any tensor)."""
    pre = "" if headroom_as is None else address_space_cap(headroom_as)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", pre + textwrap.dedent(code)], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=Path(__file__).parent)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


_LOAD_AND_REPORT = """
import json, sys, warnings
warnings.simplefilter("ignore")
import blip2_fast
out = {}
for d in sys.argv[1:] or DIRS:
    try:
        blip2_fast.load(d, backend="reference", progress=False)
        out[d] = ["loaded", ""]
    except Exception as e:
        out[d] = [type(e).__name__, str(e)]
print(json.dumps(out))
"""


# ---- not regular files -----------------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
def test_fifo_config_index_and_shard_are_refused_without_hanging(ckpt, tmp_path):
    d = ckpt("opt")[0]
    dirs = []
    for name in ("config.json", "model.safetensors.index.json", "model.safetensors", "generation_config.json"):
        c = _copy(d, tmp_path, name.replace(".", "_"))
        if (c / name).exists():
            (c / name).unlink()
        os.mkfifo(c / name)  # no writer ever opens it: a blocking open() or read() would wait forever
        dirs.append(str(c))
    out = _run_script(f"DIRS = {dirs!r}\n" + _LOAD_AND_REPORT, timeout=180)
    for d_, name in zip(dirs, ("config.json", "model.safetensors.index.json", "model.safetensors", "generation_config.json")):
        kind, msg = out[d_]
        assert kind == "CheckpointError" and name in msg and "FIFO" in msg and "not a regular file" in msg, (name, kind, msg)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "model.safetensors", "shard"])
def test_directory_where_a_file_belongs(ckpt, tmp_path, name):
    d = _copy(ckpt("opt")[0], tmp_path)
    if name == "shard":
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"query_tokens": "shard-1.safetensors"}}))
        (d / "shard-1.safetensors").mkdir()
        name = "shard-1.safetensors"
    else:
        if (d / name).exists():
            (d / name).unlink()
        (d / name).mkdir()
    with pytest.raises(CheckpointError, match=rf"{name}.*is a directory, not a regular file"):
        blip2_fast.load(d)


def test_dangling_symlink_is_named(ckpt, tmp_path):
    d = _copy(ckpt("opt")[0], tmp_path)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").symlink_to(tmp_path / "gone")
    with pytest.raises(CheckpointError, match="model.safetensors.*dangling symlink"):
        blip2_fast.load(d)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "generation_config.json"])
def test_non_utf8_json_names_the_file(ckpt, tmp_path, name):
    d = _copy(ckpt("opt")[0], tmp_path)
    text = (d / name).read_bytes() if (d / name).exists() else b'{"weight_map": {}}'
    (d / name).write_bytes(text.replace(b"{", b'{"x": "\xff\xfe",', 1))
    with pytest.raises(CheckpointError, match=rf"{name}.*not UTF-8"):
        blip2_fast.load(d)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "generation_config.json"])
def test_deeply_nested_json_is_a_checkpoint_error(ckpt, tmp_path, name):
    d = _copy(ckpt("opt")[0], tmp_path)
    (d / name).write_text('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointError, match=rf"{name}.*nested too deeply"):
        blip2_fast.load(d)


def test_huge_integer_in_config_is_a_checkpoint_error(ckpt, tmp_path):
    d = _copy(ckpt("opt")[0], tmp_path)
    cfg = (d / "config.json").read_text()
    (d / "config.json").write_text(cfg.replace('"num_query_tokens": 5', '"num_query_tokens": ' + "9" * 5000))
    with pytest.raises(CheckpointError, match="config.json"):
        blip2_fast.load(d)


# ---- safetensors headers ------------------------------------------------------------------------------

def test_duplicate_tensor_name_in_header(ckpt, tmp_path):
    d = _copy(ckpt("opt")[0], tmp_path)
    f = d / "model.safetensors"
    header, body = _split(f)
    h = json.loads(header)
    # the same name twice: Python's json keeps the second, the safetensors library refuses the file
    entry = json.dumps(h["query_tokens"])
    raw = header.decode().replace('"query_tokens":', f'"query_tokens": {entry}, "query_tokens":', 1).encode()
    _write(f, raw, body)
    with pytest.raises(CheckpointError, match="'query_tokens' appears twice"):
        blip2_fast.load(d)


@pytest.mark.parametrize("where", ["__metadata__", "tensor", "top"])
def test_header_nested_100k_deep(ckpt, tmp_path, where):
    d = _copy(ckpt("opt")[0], tmp_path)
    f = d / "model.safetensors"
    header, body = _split(f)
    deep = "[" * 100_000 + "]" * 100_000
    text = header.decode()
    if where == "__metadata__":
        text = text.replace("{", '{"__metadata__": {"x": ' + deep + "},", 1)
    elif where == "tensor":
        text = text.replace('"query_tokens":{', '"query_tokens":{"extra": ' + deep + ",", 1).replace(
            '"query_tokens": {', '"query_tokens": {"extra": ' + deep + ",", 1)
    else:
        text = "{" + '"x": ' + deep + ", " + text[1:]
    _write(f, text.encode(), body)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        blip2_fast.load(d)


def _edit(d, edit, body_edit=None):
    f = d / "model.safetensors"
    header, body = _split(f)
    h = json.loads(header)
    edit(h)
    _write(f, json.dumps(h).encode(), body if body_edit is None else body_edit(body))


@pytest.mark.parametrize("edit,body_edit,match", [
    (lambda h: h.__setitem__("__metadata__", {"format": 1}), None, "__metadata__"),
    (lambda h: h.__setitem__("__metadata__", {"format": {"a": "b"}}), None, "__metadata__"),
    (lambda h: h["query_tokens"].__setitem__("shape", [1, 2**64, 0]), None, "shape"),
    (lambda h: h["query_tokens"].__setitem__("dtype", "U16"), None, "dtype"),
    (lambda h: h["query_tokens"].__setitem__("shape", [1, 5, True]), None, "shape"),
    (None, lambda b: b + b"\0" * 16, "bytes after the last tensor"),
], ids=["metadata-int", "metadata-nested", "shape-overflow", "unknown-dtype", "bool-dim", "trailing-bytes"])
def test_header_rules_of_the_safetensors_format(ckpt, tmp_path, edit, body_edit, match):
    d = _copy(ckpt("opt")[0], tmp_path)
    _edit(d, edit or (lambda h: None), body_edit)
    with pytest.raises(CheckpointError, match=match):
        blip2_fast.load(d)


def test_gap_between_tensors_is_refused(ckpt, tmp_path):
    """The format tiles the data section exactly; a hole means the offsets were edited."""
    d = _copy(ckpt("opt")[0], tmp_path)
    f = d / "model.safetensors"
    header, body = _split(f)
    h = json.loads(header)
    for info in h.values():
        if isinstance(info, dict) and "data_offsets" in info:
            info["data_offsets"] = [o + 4 for o in info["data_offsets"]]
    _write(f, json.dumps(h).encode(), b"\0" * 4 + body)
    with pytest.raises(CheckpointError, match="gap of 4 bytes"):
        blip2_fast.load(d)


def test_nan_literal_in_header_is_refused(ckpt, tmp_path):
    d = _copy(ckpt("opt")[0], tmp_path)
    f = d / "model.safetensors"
    header, body = _split(f)
    _write(f, header.decode().replace("{", '{"__metadata__": {"a": NaN},', 1).encode(), body)
    with pytest.raises(CheckpointError, match="NaN"):
        blip2_fast.load(d)


def test_integer_tensor_where_a_weight_belongs(ckpt, tmp_path):
    """An F32 weight relabelled I32 has the same byte count; cast to float it would be garbage."""
    d = _copy(ckpt("opt")[0], tmp_path)
    _edit(d, lambda h: h["language_projection.weight"].__setitem__("dtype", "I32"))
    with pytest.raises(CheckpointError, match=r"language_projection\.weight.*torch\.int32.*floating-point"):
        blip2_fast.load(d)


def test_format_padding_whitespace_still_loads(ckpt, tmp_path):
    """The format allows a header padded with spaces (safetensors pads for alignment)."""
    d, hf = ckpt("opt")
    c = _copy(d, tmp_path)
    header, body = _split(c / "model.safetensors")
    _write(c / "model.safetensors", header + b" " * 5, body)
    pv, ids, _ = image_prompt(hf, 1)
    a = blip2_fast.load(c, backend="reference")(pixel_values=pv, input_ids=ids).logits
    torch.testing.assert_close(a, hf(pixel_values=pv, input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_shard_names_with_nul_or_outside_paths(ckpt, tmp_path):
    d = _copy(ckpt("opt")[0], tmp_path)
    for bad in ("a\0b.safetensors", "/etc/passwd", "", "sub/../../x"):
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"query_tokens": bad}}))
        with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
            blip2_fast.load(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["x"]}))
    with pytest.raises(CheckpointError, match="malformed shard index"):
        blip2_fast.load(d)


# ---- bounded memory ----------------------------------------------------------------------------------

_HEADROOM = 2 * 2**30  # address space beyond the imported libraries: a tiny model fits, a 4 TB tensor does not


def test_header_claiming_huge_tensors_is_refused_before_allocation(ckpt, tmp_path):
    """A header whose shapes and offsets agree on a 4 TB tensor, in a 1.5 MB file: refused from the
    header alone, under an address-space cap no allocation of that size could pass."""
    d = _copy(ckpt("opt")[0], tmp_path)
    f = d / "model.safetensors"
    header, body = _split(f)
    h = json.loads(header)
    end = max(v["data_offsets"][1] for k, v in h.items() if k != "__metadata__")
    h["zz.huge"] = {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [end, end + 4 * 2**40]}
    _write(f, json.dumps(h).encode(), body)
    out = _run_script(f"DIRS = [{str(d)!r}]\n" + _LOAD_AND_REPORT, timeout=180, headroom_as=_HEADROOM)
    kind, msg = out[str(d)]
    assert kind == "CheckpointError" and "truncated" in msg, (kind, msg)


def test_oversized_header_and_json_are_refused_before_parsing(ckpt, tmp_path):
    d = _copy(ckpt("opt")[0], tmp_path)
    header, body = _split(d / "model.safetensors")
    _write(d / "model.safetensors", header[:-1] + b" " * (17 * 2**20) + b"}", body)  # valid JSON, 17 MiB
    with pytest.raises(CheckpointError, match="larger than the 16777216 this loader reads"):
        blip2_fast.load(d)
    cfg = (d / "config.json").read_text()
    (d / "config.json").write_text(cfg[:-1] + " " * (17 * 2**20) + "}")
    with pytest.raises(CheckpointError, match=r"config\.json.*larger than"):
        blip2_fast.load(d)


def test_shape_of_half_a_million_huge_dims_is_refused_quickly(ckpt, tmp_path):
    """The element count stops at 2**64 (as the safetensors library's u64 arithmetic does) instead
    of multiplying out a number of millions of digits."""
    d = _copy(ckpt("opt")[0], tmp_path)
    _edit(d, lambda h: h["query_tokens"].__setitem__("shape", [2**62] * 500_000))
    out = _run_script(f"DIRS = [{str(d)!r}]\n" + _LOAD_AND_REPORT, timeout=120)
    kind, msg = out[str(d)]
    assert kind == "CheckpointError" and "more than 2**64 elements" in msg, (kind, msg[:300])


def _legacy_bin(path, state, numel_override=None):
    """torch.save in the pre-zip format; numel_override rewrites the first storage's declared size."""
    import io
    import pickletools

    torch.save(state, path, _use_new_zipfile_serialization=False)
    if numel_override is None:
        return
    data = Path(path).read_bytes()
    f = io.BytesIO(data)
    for _ in range(3):  # magic number, protocol version, system info; then the object pickle
        for _op in pickletools.genops(f):
            pass
    ops = list(pickletools.genops(f))
    # its first persistent id is ('storage', <type>, key, 'cpu', numel, None): numel is the int op after 'cpu'
    i = next(n for n, (op, arg, _) in enumerate(ops) if arg == "cpu")
    n = next(n for n in range(i + 1, len(ops)) if ops[n][0].name.startswith("BININT"))
    start, stop = ops[n][2], ops[n + 1][2]
    data = data[:start] + b"\x8a\x08" + numel_override.to_bytes(8, "little") + data[stop:]  # LONG1, 8 bytes
    Path(path).write_bytes(data)


def test_legacy_bin_claiming_a_huge_storage_is_a_checkpoint_error(tmp_path):
    d = tmp_path / "leg"
    d.mkdir()
    _legacy_bin(d / "pytorch_model.bin", {"w": torch.randn(4, 4)}, numel_override=2**40)
    code = f"""
    import json, torch
    from blip2_fast import weights
    try:
        weights.from_directory({str(d)!r}, device="cpu", dtype=torch.float32)
        print(json.dumps(["loaded", ""]))
    except Exception as e:
        print(json.dumps([type(e).__name__, str(e)]))
    """
    kind, msg = _run_script(code, timeout=180, headroom_as=_HEADROOM)
    assert kind == "CheckpointError" and "pytorch_model.bin" in msg, (kind, msg)
    assert f"declares {4 * 2**40} bytes" in msg and "before allocating" in msg, msg  # from the scan, not the allocator


# ---- PyTorch .bin files -------------------------------------------------------------------------------

def test_legacy_pytorch_bin_loads_with_weights_only(ckpt, tmp_path):
    """A pre-zip pytorch_model.bin cannot be memory-mapped; it is read with weights_only=True instead."""
    d, hf = ckpt("opt")
    leg = tmp_path / "leg"
    leg.mkdir()
    shutil.copy(d / "config.json", leg / "config.json")
    _legacy_bin(leg / "pytorch_model.bin", hf.state_dict())
    pv, ids, _ = image_prompt(hf, 1)
    a = blip2_fast.load(leg, backend="reference")(pixel_values=pv, input_ids=ids).logits
    torch.testing.assert_close(a, hf(pixel_values=pv, input_ids=ids).logits, rtol=1e-4, atol=1e-4)


class _Evil:
    marker = None

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))  # what a malicious checkpoint would run on unpickling


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw-pickle"])
def test_malicious_pickle_never_runs(ckpt, tmp_path, fmt):
    import pickle

    d = _copy(ckpt("opt")[0], tmp_path)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    if fmt == "raw-pickle":
        with open(d / "pytorch_model.bin", "wb") as f:
            pickle.dump({"x": evil}, f)
    else:
        torch.save({"x": evil}, d / "pytorch_model.bin", _use_new_zipfile_serialization=fmt == "zip")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused to load"):
        blip2_fast.load(d)
    assert not marker.exists(), "unpickling ran the checkpoint's code"


def test_bin_holding_something_else_than_named_tensors(ckpt, tmp_path):
    d = _copy(ckpt("opt")[0], tmp_path)
    (d / "model.safetensors").unlink()
    torch.save({1: torch.zeros(2)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="dict of tensors by name"):
        blip2_fast.load(d)
    torch.save([torch.zeros(2)], d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="dict of tensors"):
        blip2_fast.load(d)

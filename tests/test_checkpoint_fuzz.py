"""Fuzzing the checkpoint parsers: seeded random mutations of a valid small checkpoint's safetensors
header and config.json.

Every outcome must be one of:
- a clear error: CheckpointError or UnsupportedModelError, which name the file (these are
  ValueErrors; an error of any other type, or a bare ValueError, from a broken file fails the test);
- a load whose outputs match an oracle: for a header, the file as the safetensors library reads it
  (which must accept the file: blip2_fast accepts nothing the format's reference parser refuses);
  for a config, transformers' model built from the same mutated config with the same weights.
Anything else (another exception type, a hang past the per-case alarm, outputs that differ) fails,
with the case's seed and mutation in the message so it can be replayed.

Bounded for CI: BLIP2_FAST_FUZZ_CASES cases per target (default below), seeded by
BLIP2_FAST_FUZZ_SEED (default 0); raise both to fuzz longer.
"""
import contextlib
import copy
import json
import math
import os
import random
import shutil
import signal
import struct
import warnings
from pathlib import Path

import pytest
import torch

import blip2_fast
from blip2_fast import CheckpointError, UnsupportedModelError

CASES = int(os.environ.get("BLIP2_FAST_FUZZ_CASES", "120"))
SEED = int(os.environ.get("BLIP2_FAST_FUZZ_SEED", "0"))
# a broken file is a CheckpointError (or UnsupportedModelError) naming it: a bare ValueError or
# TypeError from inside a parser ("unhashable type: 'list'") is not a clear error about a file
CLEAR = (CheckpointError, UnsupportedModelError)
CASE_SECONDS = 60  # far above any case's time; a case past it is a hang


@contextlib.contextmanager
def _alarm(seconds, what):
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def fire(signum, frame):
        raise TimeoutError(f"{what}: no answer after {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _load(d):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return blip2_fast.load(d, backend="reference", progress=False)


def _try_load(work, label: str, outcomes: dict, failures: list):
    """Load one fuzzed case within its time limit: the model, or None after counting a clear error
    in `outcomes` (by type) or recording any other exception in `failures`."""
    try:
        with _alarm(CASE_SECONDS, label):
            m = _load(work)
    except CLEAR as e:
        outcomes[type(e).__name__] = outcomes.get(type(e).__name__, 0) + 1
        return None
    except Exception as e:
        failures.append(f"{label}: {type(e).__name__}: {str(e)[:300]}")
        return None
    outcomes["loaded"] = outcomes.get("loaded", 0) + 1
    return m


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


# ---- random values ------------------------------------------------------------------------------------

def _nasty(rng: random.Random, like=None):
    """A value to put where `like` was: near misses of it, wrong types, extremes."""
    pool = [0, -1, 1, 2, 3, 7, 2**31, 2**63, 2**64, 10**30, -(2**63), 0.5, 1.5, -0.0, 1e-300, 1e308,
            math.nan, math.inf, -math.inf, "", "abc", "F32", "BF16", "I32", "U8", "F8_E4M3", None, True, False,
            [], {}, [1, 2], [[1]], {"a": 1}, "gelu", "relu", "\u00e9", [0, 0], [-1, 5]]
    if isinstance(like, bool):
        pool += [not like, 0, 1, "true", None]
    elif isinstance(like, int):
        pool += [like + 1, like - 1, like * 2, like // 2, -like, float(like), str(like), like + 0.5, [like]]
    elif isinstance(like, float):
        pool += [like * 10, like / 10, -like, int(like) if math.isfinite(like) else 0, str(like)]
    elif isinstance(like, str):
        pool += [like.upper(), like[:-1], like + "x", like * 2]
    elif isinstance(like, list):
        pool += [like[::-1], like + [1], like[:-1], [str(x) for x in like], [x * 2 if type(x) is int else x for x in like]]
    return copy.deepcopy(rng.choice(pool))


def _paths(obj, prefix=()):
    """Every (container, key) path in a JSON value."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append(prefix + (k,))
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.append(prefix + (i,))
            out += _paths(v, prefix + (i,))
    return out


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def _mutate_json(rng, obj, favour=()):
    """One structural mutation of a JSON object in place; returns its description. `favour` lists
    keys whose paths are picked more often (the fields that matter)."""
    paths = _paths(obj)
    hot = [p for p in paths if p[-1] in favour]
    path = rng.choice(hot if hot and rng.random() < 0.6 else paths)
    parent, key = _get(obj, path[:-1]), path[-1]
    op = rng.choice(["set", "set", "set", "delete", "add", "swap"])
    if op == "set":
        old = parent[key]
        parent[key] = _nasty(rng, old)
        return f"set {'.'.join(map(str, path))}: {old!r} -> {parent[key]!r}"
    if op == "delete":
        if isinstance(parent, list):
            parent.pop(key)
        else:
            del parent[key]
        return f"delete {'.'.join(map(str, path))}"
    if op == "add" and isinstance(parent, dict):
        name = rng.choice(["extra", "__metadata__", "dtype", "shape", "model_type", str(key) + "_2"])
        parent[name] = _nasty(rng)
        return f"add {'.'.join(map(str, path[:-1] + (name,)))} = {parent[name]!r}"
    other = rng.choice(paths)
    o_parent, o_key = _get(obj, other[:-1]), other[-1]
    if other[: len(path)] == path or path[: len(other)] == other:
        return "no-op (nested swap)"
    parent[key], o_parent[o_key] = o_parent[o_key], parent[key]
    return f"swap {'.'.join(map(str, path))} <-> {'.'.join(map(str, other))}"


def _mutate_bytes(rng, data: bytes) -> tuple[bytes, str]:
    op = rng.choice(["flip", "truncate", "insert", "delete", "bom", "deep", "nul"])
    i = rng.randrange(len(data) + 1)
    if op == "flip" and data:
        i = min(i, len(data) - 1)
        return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:], f"flip a bit of byte {i}"
    if op == "truncate":
        return data[:i], f"truncate at {i}"
    if op == "insert":
        junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        return data[:i] + junk + data[i:], f"insert {junk!r} at {i}"
    if op == "delete":
        j = min(len(data), i + rng.randint(1, 16))
        return data[:i] + data[j:], f"delete bytes {i}:{j}"
    if op == "bom":
        return b"\xef\xbb\xbf" + data, "UTF-8 BOM in front"
    if op == "deep":
        k = data.find(b":", i)
        if k < 0:
            return data + b"[" * 50_000, "unclosed nesting at the end"
        return data[:k + 1] + b"[" * 50_000 + b"]" * 50_000 + b"," + data[k + 1:], f"50k-deep list after byte {k}"
    return data[:i] + b"\0" + data[i:], f"NUL at {i}"


# ---- the safetensors header -------------------------------------------------------------------------

def _split(path):
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data[8: 8 + n], data[8 + n:]


def _relayout(rng, h: dict, body: bytes) -> tuple[bytes, str]:
    """A valid file with the same tensors in another order, or one tensor stored in another float
    dtype: what another writer could legitimately produce. It must load."""
    names = [k for k in h if k != "__metadata__"]
    chunks = {k: body[h[k]["data_offsets"][0]: h[k]["data_offsets"][1]] for k in names}
    what = "tensors laid out in another order"
    if rng.random() < 0.5:
        k = rng.choice([n for n in names if h[n]["dtype"] == "F32"])
        dt = rng.choice(["F16", "BF16", "F64"])
        t = torch.frombuffer(bytearray(chunks[k]), dtype=torch.float32)
        chunks[k] = t.to({"F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}[dt]).numpy().tobytes() \
            if dt != "BF16" else t.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
        h[k]["dtype"] = dt
        what = f"{k} stored as {dt}"
    rng.shuffle(names)
    out, at = [], 0
    for k in names:
        h[k]["data_offsets"] = [at, at + len(chunks[k])]
        out.append(chunks[k])
        at += len(chunks[k])
    raw = json.dumps(h).encode()
    return struct.pack("<Q", len(raw)) + raw + b"".join(out), what


def _header_case(rng, header: bytes, body: bytes) -> tuple[bytes, str]:
    """A whole mutated safetensors file."""
    kind = rng.random()
    h = json.loads(header)
    if kind < 0.08:
        return _relayout(rng, h, body)
    if kind < 0.55:  # structure: what a writer with a bug, or an attacker, puts in the JSON
        favour = ("dtype", "shape", "data_offsets", "__metadata__")
        what = "; ".join(_mutate_json(rng, h, favour) for _ in range(rng.choice([1, 1, 1, 2, 3])))
        raw = json.dumps(h, allow_nan=True).encode()
        if rng.random() < 0.1:  # a repeated name, which json.dumps cannot write
            name = rng.choice([k for k in h if k != "__metadata__"] or ["x"])
            raw = raw.replace(b"{", b'{"%s": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, ' % name.encode(), 1)
            what += f"; duplicate {name!r}"
        return struct.pack("<Q", len(raw)) + raw + body, what
    if kind < 0.85:  # bytes of the header text
        raw, what = _mutate_bytes(rng, header)
        return struct.pack("<Q", len(raw)) + raw + body, what
    whole = struct.pack("<Q", len(header)) + header + body
    op = rng.choice(["length", "length", "cut", "append", "pad"])
    if op == "length":  # the 8-byte length prefix lies
        n = rng.choice([0, 1, len(header) - 1, len(header) + 1, len(header) + rng.randint(2, 64), 2**63, 2**64 - 1,
                        len(whole), 100_000_001])
        return struct.pack("<Q", n) + whole[8:], f"length prefix {len(header)} -> {n}"
    if op == "cut":
        i = rng.randrange(len(whole))
        return whole[:i], f"file cut at {i} of {len(whole)}"
    if op == "append":
        return whole + b"\0" * rng.randint(1, 64), "bytes appended"
    pad = b" " * rng.randint(1, 16)  # valid: the format allows space padding
    return struct.pack("<Q", len(header) + len(pad)) + header + pad + body, f"{len(pad)} spaces of padding"


def _safetensors_reads(path):
    """The tensors as the safetensors library reads the file, or the reason it refuses it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, None
    except Exception as e:  # the library's own refusal (SafetensorError and others)
        return None, e


@pytest.fixture(scope="module")
def opt_case(ckpt):
    from conftest import image_prompt

    d, hf = ckpt("opt")
    pv, ids, _ = image_prompt(hf, 1)
    with torch.no_grad():
        base = _load(d)(pixel_values=pv, input_ids=ids).logits
    return d, hf, pv, ids, base


def test_fuzz_safetensors_header(opt_case, tmp_path):
    from safetensors.torch import load_file, save_file

    d, hf, pv, ids, base = opt_case
    header, body = _split(d / "model.safetensors")
    original = load_file(str(d / "model.safetensors"))
    work = tmp_path / "case"
    work.mkdir()
    for f in ("config.json", "generation_config.json"):
        (work / f).symlink_to(d / f)
    rng = random.Random(SEED)
    outcomes, failures = {}, []
    for case in range(CASES):
        data, what = _header_case(rng, header, body)
        (work / "model.safetensors").write_bytes(data)
        label = f"case {case} (seed {SEED}): {what}"
        m = _try_load(work, label, outcomes, failures)
        if m is None:
            continue
        tensors, refusal = _safetensors_reads(work / "model.safetensors")
        if refusal is not None:
            failures.append(f"{label}: loaded a file the safetensors library refuses ({refusal})")
            continue
        with torch.no_grad():
            got = m(pixel_values=pv, input_ids=ids).logits
        same = tensors.keys() == original.keys() and all(torch.equal(tensors[k], original[k]) for k in tensors)
        if same:
            want = base
        else:  # a valid file with other contents: what our loader makes of the library's reading
            canon = tmp_path / "canonical"
            shutil.rmtree(canon, ignore_errors=True)
            canon.mkdir()
            (canon / "config.json").symlink_to(d / "config.json")
            save_file(tensors, str(canon / "model.safetensors"))
            with torch.no_grad():
                want = _load(canon)(pixel_values=pv, input_ids=ids).logits
        if got.shape != want.shape or not rel_err(got, want) <= 1e-5:
            failures.append(f"{label}: loaded, but the logits differ from the file's contents")
    assert not failures, f"{len(failures)} of {CASES} cases failed:\n" + "\n".join(failures[:20])
    # a fuzzer that only ever produced one outcome would test nothing
    assert outcomes.get("loaded", 0) >= 3 and outcomes.get("CheckpointError", 0) >= CASES // 3, outcomes


# ---- config.json ------------------------------------------------------------------------------------

_CONFIG_FIELDS = ("layer_norm_eps", "layer_norm_epsilon", "image_size", "patch_size", "num_attention_heads",
                  "num_heads", "hidden_size", "d_model", "d_kv", "num_hidden_layers", "num_layers",
                  "num_decoder_layers", "intermediate_size", "ffn_dim", "d_ff", "vocab_size", "num_query_tokens",
                  "image_token_index", "relative_attention_max_distance", "relative_attention_num_buckets",
                  "cross_attention_frequency", "max_position_embeddings", "eos_token_id", "pad_token_id",
                  "bos_token_id", "decoder_start_token_id", "word_embed_proj_dim", "hidden_act", "activation_function",
                  "feed_forward_proj", "qkv_bias", "do_layer_norm_before", "tie_word_embeddings", "model_type",
                  "architectures", "encoder_hidden_size", "enable_bias", "layer_norm_elementwise_affine")


# what blip2_fast reads beyond _CONFIG_FIELDS; every other field (dropout, initialisers, dtype, labels,
# output flags) only matters to training or to transformers' own construction
_READ = set(_CONFIG_FIELDS) | {"vision_config", "qformer_config", "text_config", "use_qformer_text_input",
                               "image_text_hidden_size", "image_token_id", "scale_decoder_outputs", "is_gated_act",
                               "dense_act_fn", "_remove_final_layer_norm", "decoder_start_token_id"}


def _inference_view(mutated, original):
    """`mutated` with every field blip2_fast does not read put back as in `original`: the config
    transformers is built from for the oracle (it refuses, say, a dropout of 2.0 that inference never uses)."""
    if not isinstance(mutated, dict) or not isinstance(original, dict):
        return mutated
    out = {k: v for k, v in mutated.items() if k in _READ}
    for k, v in original.items():
        if k not in _READ:
            out[k] = v
        elif k in out and isinstance(v, dict):
            out[k] = _inference_view(out[k], v)
    return out


def _config_case(rng, raw_text: bytes) -> tuple[bytes, str]:
    if rng.random() < 0.8:
        cfg = json.loads(raw_text)
        what = "; ".join(_mutate_json(rng, cfg, _CONFIG_FIELDS) for _ in range(rng.choice([1, 1, 2])))
        return json.dumps(cfg, allow_nan=True).encode(), what
    return _mutate_bytes(rng, raw_text)


def _transformers_logits(cfg_dict, hf, lm, mutated_cfg):
    """transformers' logits for the mutated config on the original weights, or None where transformers
    is no oracle (it would randomly initialise weights the checkpoint does not have)."""
    import transformers

    from conftest import image_prompt

    cfg = transformers.Blip2Config(**{k: v for k, v in cfg_dict.items() if k != "transformers_version"})
    with torch.device("meta"):  # no random init (seconds per model); every weight is assigned below
        ref = getattr(transformers, (cfg_dict.get("architectures") or ["Blip2ForConditionalGeneration"])[0])(cfg).eval()
    missing, _ = ref.load_state_dict(hf.state_dict(), strict=False, assign=True)
    ref.tie_weights()
    if any(t.is_meta for t in ref.state_dict().values()):  # a weight the checkpoint does not have
        return None, None
    image = cfg.vision_config.image_size
    pv, ids, _ = image_prompt(hf, 1, image=image if isinstance(image, int) else image[0])
    if cfg.image_token_index is None:  # no image tokens: both prepend the queries to the text
        ids = ids[:, hf.config.num_query_tokens:]
    else:
        ids[:, : cfg.num_query_tokens] = cfg.image_token_index
    kw = {"decoder_input_ids": torch.tensor([[0, 5, 9, 13, 2]])} if lm == "t5" else {}
    try:
        with torch.no_grad():
            return ref(pixel_values=pv, input_ids=ids, **kw).logits, (pv, ids, kw)
    except Exception:  # transformers' own forward fails (its T5 path without image tokens does): no oracle
        return None, None


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_fuzz_config(ckpt, tmp_path, lm):
    d, hf = ckpt(lm)
    raw_text = (d / "config.json").read_bytes()
    work = tmp_path / "case"
    work.mkdir()
    for f in ("model.safetensors", "generation_config.json"):
        if (d / f).exists():
            (work / f).symlink_to(d / f)
    rng = random.Random(SEED * 1000 + (lm == "t5"))
    outcomes, failures, oracle = {}, [], {}
    for case in range(CASES):
        data, what = _config_case(rng, raw_text)
        (work / "config.json").write_bytes(data)
        label = f"{lm} case {case} (seed {SEED}): {what}"
        m = _try_load(work, label, outcomes, failures)
        if m is None:
            continue
        try:
            cfg_dict = _inference_view(json.loads(data), json.loads(raw_text))
            key = json.dumps(cfg_dict, sort_keys=True, allow_nan=True)
            if key not in oracle:  # most loads differ only in fields inference never reads
                oracle[key] = _transformers_logits(cfg_dict, hf, lm, m.cfg)
            want, inputs = oracle[key]
        except Exception as e:
            failures.append(f"{label}: blip2_fast loaded a config transformers cannot build a model from "
                            f"({type(e).__name__}: {str(e)[:200]})")
            continue
        if want is None:
            outcomes["no oracle"] = outcomes.get("no oracle", 0) + 1
            continue
        pv, ids, kw = inputs
        try:
            with torch.no_grad():
                got = m(pixel_values=pv, input_ids=ids, **kw).logits
        except Exception as e:
            failures.append(f"{label}: loaded, but a forward transformers runs fails ({type(e).__name__}: {str(e)[:200]})")
            continue
        if got.shape != want.shape or not rel_err(got, want) <= 1e-4:
            err = rel_err(got, want) if got.shape == want.shape else f"shapes {list(got.shape)} vs {list(want.shape)}"
            failures.append(f"{label}: loaded, but its logits are not transformers' (relative error {err})")
    assert not failures, f"{len(failures)} of {CASES} cases failed:\n" + "\n".join(failures[:20])
    assert outcomes.get("loaded", 0) >= 3 and outcomes.get("CheckpointError", 0) >= CASES // 4, outcomes

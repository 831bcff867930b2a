"""`load()`: a BLIP-2 checkpoint (directory, hub id, or live transformers model) -> `Blip2`."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from . import config as _config
from . import ops as _ops
from . import weights
from .config import UnsupportedModelError
from .files import CheckpointError, read_json
from .model import Blip2

_HF_CLASSES = ("Blip2ForConditionalGeneration", "Blip2Model", "Blip2ForImageTextRetrieval",
               "Blip2VisionModelWithProjection", "Blip2TextModelWithProjection")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _resolve_device_dtype(device, dtype):
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, (str, int, torch.device)) or isinstance(device, bool):
        raise TypeError(f"device must be a str, int or torch.device, got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError as e:  # torch's spelling errors are RuntimeErrors
        raise ValueError(f"device {device!r} is not a device torch knows ({_first_line(e)})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for, but torch {torch.__version__} sees no CUDA GPU")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device type {device.type!r} is not supported (expected cpu or cuda)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return device, dtype


def _hub_dir(repo_id: str) -> Path:
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise CheckpointError(f"{repo_id!r} is not a local directory, and huggingface_hub is not installed to fetch it "
                              "(pip install huggingface_hub), so pass a local checkpoint directory") from None
    cache = getattr(constants, "HF_HUB_CACHE", "the Hugging Face cache")
    offline = _offline(constants)
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"],
                                      local_files_only=offline))
    except Exception as e:  # huggingface_hub raises many kinds: not found, gated, offline, network
        if offline:
            raise CheckpointError(
                f"{repo_id!r} is not a local directory, and it is not in the local Hugging Face cache ({cache}); "
                "HF_HUB_OFFLINE is set, so it was not downloaded. Unset HF_HUB_OFFLINE to download it, or pass a "
                "local checkpoint directory.") from None
        raise CheckpointError(
            f"{repo_id!r} is not a local directory, and it could not be downloaded from the Hugging Face hub into "
            f"the local cache ({cache}): {type(e).__name__}: {_first_line(e)}. Without network access, set "
            "HF_HUB_OFFLINE=1 to use only the local cache, or pass a local checkpoint directory.") from None


def _offline(constants) -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, or as the environment says now (huggingface_hub
    reads it once, at import)."""
    env = os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or env.strip().upper() in ("1", "ON", "YES", "TRUE")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0].rstrip(". ")


def _device_from_map(device_map, device):
    """transformers' `device_map` for one device -> a `device` argument (or None: the default)."""
    if device_map is None:
        return device
    if isinstance(device_map, dict):
        if not device_map:
            raise ValueError("device_map is an empty dict; use {'': device} to place the whole model")
        places = {str(torch.device(v if not isinstance(v, int) or isinstance(v, bool) else f"cuda:{v}"))
                  if not (isinstance(v, str) and v in ("cpu", "disk", "meta")) else v for v in device_map.values()}
        if len(places) > 1:
            raise ValueError(f"device_map places modules on {len(places)} devices ({', '.join(sorted(places))}): "
                             "blip2_fast runs a model on one device; pass device_map={'': device} or device=")
        (only,) = places
        if only in ("disk", "meta"):
            raise ValueError(f"device_map {only!r} is not supported: blip2_fast keeps the weights on one device")
        mapped = only
    elif isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        mapped = None  # one device: the default (the GPU when there is one)
    elif isinstance(device_map, (str, int, torch.device)) and not isinstance(device_map, bool):
        mapped = device_map
    else:
        raise TypeError(f"device_map must be 'auto', a device (str, int, torch.device) or {{'': device}}, "
                        f"got {type(device_map).__name__}")
    if isinstance(mapped, int):
        mapped = f"cuda:{mapped}"
    if device is not None and mapped is not None and torch.device(device) != torch.device(mapped):
        raise ValueError(f"device={device!r} and device_map={device_map!r} disagree; pass one of them")
    return device if mapped is None else mapped


def _checkpoint_dtype(source):
    """The dtype a checkpoint was saved in (config.json's torch_dtype / dtype), or None."""
    if isinstance(source, torch.nn.Module):
        return next((p.dtype for p in source.parameters() if p.is_floating_point()), None)
    try:
        path = Path(os.fspath(source)).expanduser()
        raw = read_json(path / "config.json", "config.json") if (path / "config.json").is_file() else {}
    except (TypeError, ValueError, OSError):
        return None  # load() reports what is wrong with the checkpoint itself
    name = raw.get("torch_dtype", raw.get("dtype")) if isinstance(raw, dict) else None
    return _DTYPES.get(name) if isinstance(name, str) else None


def load(source, *, device=None, dtype=None, torch_dtype=None, device_map=None, backend: str | None = None,
         ops: dict | None = None, progress: bool = True) -> Blip2:
    """Load a BLIP-2 model onto blip2_fast's runtime.

    source: a checkpoint directory (config.json + model.safetensors, a sharded
        model.safetensors.index.json, or pytorch_model.bin read with weights_only=True), a hub id
        (fetched with huggingface_hub when online), or a live transformers `Blip2ForConditionalGeneration`,
        `Blip2Model`, `Blip2ForImageTextRetrieval`, `Blip2VisionModelWithProjection` or
        `Blip2TextModelWithProjection` (its state dict is used; it is not modified).
    device / dtype: default cuda + bfloat16 when a GPU is available, else cpu + float32.
        dtype="auto": the checkpoint's own torch_dtype (config.json), else that default.
        `torch_dtype=` is transformers' spelling of dtype=; `device_map=` places the model on one
        device as transformers would ("auto", "cuda", "cuda:1", "cpu", 0, {"": 0}); a map over
        several devices raises (one device is supported). With
        float16 the Q-Former and its query tokens stay in float32, as transformers keeps them
        (`model.qformer_dtype`); its output is cast to float16 before the projections. A float16
        Flan-T5 keeps each feed-forward's `wo` in float32 and clamps overflowing float16 states,
        also as transformers does.
    backend: "fast" or "reference" for every op; default $BLIP2_FAST_BACKEND, else "fast".
    ops: per-op overrides, e.g. {"attention": "reference"}. An op asked for as "fast" here that
        cannot run on the device raises; one that falls back under `backend="fast"` warns once.
    progress: show shard/byte progress on stderr when loading takes more than ~2 s.

    Raises CheckpointError naming the file (and the field or tensor) for anything wrong with the
    checkpoint: missing, not a regular file, malformed, a config value out of range, weights that do
    not match the config; UnsupportedModelError for a model blip2_fast does not run; ValueError /
    TypeError for bad arguments. Nothing is unpickled (see the README's "Untrusted checkpoints").
    """
    if torch_dtype is not None:
        if dtype is not None and dtype != torch_dtype:
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass one of them")
        dtype = torch_dtype
    device = _device_from_map(device_map, device)
    if isinstance(dtype, str) and dtype == "auto":
        dtype = _checkpoint_dtype(source)
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            dtype = None  # not saved with one we run: the default for the device
    device, dtype = _resolve_device_dtype(device, dtype)
    # the ops are bound (which may build the C++ extension: ~40 s the first time) once the checkpoint's
    # path and config have passed their checks, so a mistyped path is reported at once
    _ops.check_choice(backend, ops)  # bad arguments first, at no cost
    bind = functools.partial(_ops.bind, backend, ops, device)
    source_dir = None
    if isinstance(source, torch.nn.Module):
        name = type(source).__name__
        if name not in _HF_CLASSES:
            raise UnsupportedModelError(f"cannot load a {name}; expected one of {', '.join(_HF_CLASSES)}")
        raw = source.config.to_dict()
        raw["architectures"] = [name]
        cfg = _config.parse(raw, f"the live {name}'s config")
        bound = bind()
        src = weights.from_state_dict(source.state_dict(), device=device, dtype=dtype, describe=f"live {name}")
    else:
        if not isinstance(source, (str, os.PathLike)):
            raise TypeError(f"source must be a checkpoint directory (str or os.PathLike), a hub id or a transformers "
                            f"BLIP-2 model, got {type(source).__name__}")
        if isinstance(source, str) and not source.strip():
            raise CheckpointError("source is an empty string; pass a checkpoint directory or a hub id")
        path = Path(os.fspath(source)).expanduser()
        if "\0" in str(path):
            raise CheckpointError(f"checkpoint path {str(path)!r} contains a NUL byte")
        if not path.exists():
            if isinstance(source, str) and source.count("/") == 1 and not source.startswith((".", "/")):
                path = _hub_dir(source)
            else:
                raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a directory (expected a checkpoint directory with config.json)")
        source_dir = path
        cfg = _config.read(path)
        bound = bind()
        src = weights.from_directory(path, device=device, dtype=dtype, progress=progress)
    _check_flags_against_weights(cfg, src, "config.json" if source_dir is None else str(source_dir / "config.json"))
    with torch.inference_mode():
        model = Blip2(cfg, bound, src, source_dir=source_dir)
    _warn_unused(src, cfg)
    if getattr(src, "progress", None) is not None:
        src.progress.close()
    model.generation_defaults, model._generation_file = _generation_defaults(source, source_dir, cfg, with_file=True)
    model._hf_config_source = source.config if source_dir is None else read_json(source_dir / "config.json", "config.json")
    return model


def _generation_defaults(source, source_dir, cfg, with_file: bool = False):
    """eos/pad/bos ids and length defaults from generation_config.json or the text config; the file's
    values are checked here, where the file can be named, not later in every generate() call."""
    d = {}
    lm = cfg.lm
    if lm is not None:
        d["eos_token_id"] = lm.eos_token_id
        d["pad_token_id"] = lm.pad_token_id
        if hasattr(lm, "bos_token_id"):
            d["bos_token_id"] = lm.bos_token_id
        if hasattr(lm, "decoder_start_token_id"):
            d["decoder_start_token_id"] = lm.decoder_start_token_id
    gen, where = None, None
    if source_dir is not None and os.path.lexists(source_dir / "generation_config.json"):
        where = source_dir / "generation_config.json"
        gen = read_json(where, "generation_config.json")
        if not isinstance(gen, dict):
            raise CheckpointError(f"{where}: must hold a JSON object, got {type(gen).__name__}")
    elif isinstance(source, torch.nn.Module) and getattr(source, "generation_config", None) is not None:
        gen, where = source.generation_config.to_dict(), f"the live {type(source).__name__}'s generation_config"
    for k in _GEN_FIELDS:
        if gen and gen.get(k) is not None:
            d[k] = _check_gen_field(where, k, gen[k], None if lm is None else lm.vocab)
    if d.get("do_sample") and "temperature" in d and not d["temperature"] > 0:
        raise CheckpointError(f"{where}: temperature must be > 0 with do_sample=true, got {d['temperature']!r}")
    if not with_file:
        return d
    gen = dict(gen or {})
    _warn_unimplemented(where, gen)
    return d, gen


def _warn_unimplemented(where, gen: dict) -> None:
    """generation_config.json fields generate() does not implement are ignored, said once here
    (transformers would apply them)."""
    import warnings

    from .generation import _GEN_KEYS, _META_KEYS, _global_defaults

    defaults = _global_defaults()
    odd = [k for k, v in gen.items() if k not in _GEN_KEYS and k not in _META_KEYS and v is not None
           and not (k in defaults and defaults[k] == v) and k not in ("output_scores", "return_dict_in_generate",
                                                                      "output_logits")]
    if odd:
        warnings.warn(f"blip2_fast: {where} sets {', '.join(sorted(odd))}, which generate() does not implement; "
                      "ignored", UserWarning, stacklevel=4)


# field -> (kind, lower bound): what transformers' GenerationConfig documents for each
_GEN_FIELDS = {"eos_token_id": ("tokens", 0), "pad_token_id": ("token", 0), "bos_token_id": ("token", 0),
               "decoder_start_token_id": ("token", 0), "max_length": ("int", 1), "max_new_tokens": ("int", 1),
               "min_new_tokens": ("int", 0), "num_beams": ("int", 1), "top_k": ("int", 0),
               "length_penalty": ("number", None), "repetition_penalty": ("positive", None),
               "temperature": ("number", 0), "top_p": ("unit", None), "do_sample": ("bool", None),
               "early_stopping": ("early", None)}


def _check_gen_field(where, k, v, vocab):
    import math

    kind, lo = _GEN_FIELDS[k]
    is_int = isinstance(v, int) and not isinstance(v, bool)
    is_num = (is_int or isinstance(v, float)) and math.isfinite(v)
    if kind == "tokens" and isinstance(v, list) and v:
        return [_check_gen_field(where, k, t, vocab) for t in v]
    if kind in ("token", "tokens"):
        ok, want = is_int and 0 <= v and (vocab is None or v < vocab), f"a token id in [0, {vocab})"
    elif kind == "int":
        ok, want = is_int and v >= lo, f"an integer >= {lo}"
    elif kind == "number":
        ok, want = is_num and (lo is None or v >= lo), "a finite number" + ("" if lo is None else f" >= {lo}")
    elif kind == "positive":
        ok, want = is_num and v > 0, "a finite number > 0"
    elif kind == "unit":
        ok, want = is_num and 0 < v <= 1, "a number in (0, 1]"
    elif kind == "bool":
        ok, want = isinstance(v, bool), "true or false"
    else:
        ok, want = isinstance(v, bool) or v == "never", 'true, false or "never"'
    if not ok:
        raise CheckpointError(f"{where}: {k} must be {want}, got {v!r}")
    return v


def _check_flags_against_weights(cfg, src, where: str) -> None:
    """Config switches that no tensor shape pins down, against the tensors that are there: a config
    that says a weight is absent while the checkpoint has it (or the reverse) is a mismatched file,
    and following either one silently would compute something neither author meant."""
    if cfg.vision is not None and cfg.architecture != "Blip2TextModelWithProjection" and not cfg.vision.qkv_bias:
        biased = [k for k in src.keys if k.startswith("vision_model.encoder.layers.")
                  and k.endswith(("self_attn.qkv.bias", "self_attn.q_bias", "self_attn.v_bias"))]
        if biased:
            raise CheckpointError(f"{where}: vision_config.qkv_bias is false, but the checkpoint has attention "
                                  f"biases ({biased[0]!r}); the config does not match the weights")
    lm = cfg.lm
    if lm is not None and cfg.architecture in ("Blip2ForConditionalGeneration", "Blip2Model") and not lm.tie_embeddings:
        if src.keys and "language_model.lm_head.weight" not in src.keys:
            raise CheckpointError(f"{where}: text_config.tie_word_embeddings is false, but the checkpoint has no "
                                  "language_model.lm_head.weight; the config does not match the weights")


# Tensors a checkpoint may carry that the model legitimately does not read: T5 stores tied copies of
# its embedding per stack; an LM head tied to the embeddings may be saved too.
_IGNORABLE = ("language_model.encoder.embed_tokens.weight", "language_model.decoder.embed_tokens.weight",
              "language_model.lm_head.weight", "embeddings.position_ids", "qformer.embeddings.position_ids")


def _warn_unused(src, cfg) -> None:
    import warnings

    unused = [k for k in src.unused() if k not in _IGNORABLE]
    if cfg.architecture not in ("Blip2ForConditionalGeneration", "Blip2Model"):
        # retrieval / projection models read a subset of a full checkpoint by design
        unused = [k for k in unused if not k.startswith(("language_model.", "language_projection."))]
    if unused:
        warnings.warn(f"blip2_fast: {len(unused)} checkpoint tensors were not used (does config.json match the "
                      f"weights?), e.g. {', '.join(unused[:3])}", UserWarning, stacklevel=3)

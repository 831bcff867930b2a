"""`load()`: a BLIP-2 checkpoint (directory, hub id, or live transformers model) -> `Blip2`."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from . import config as _config
from . import ops as _ops
from . import weights
from .config import UnsupportedModelError
from .model import Blip2
from .weights import CheckpointError

_HF_CLASSES = ("Blip2ForConditionalGeneration", "Blip2Model", "Blip2ForImageTextRetrieval",
               "Blip2VisionModelWithProjection", "Blip2TextModelWithProjection")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _resolve_device_dtype(device, dtype):
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
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
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{repo_id!r} is not a local directory, and huggingface_hub is not installed to fetch it") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:
        raise CheckpointError(
            f"{repo_id!r} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {str(e)[:200]}). Offline? Pass a local checkpoint directory instead.") from None


def load(source, *, device=None, dtype=None, backend: str | None = None, ops: dict | None = None,
         progress: bool = True) -> Blip2:
    """Load a BLIP-2 model onto blip2_fast's runtime.

    source: a checkpoint directory (config.json + model.safetensors, a sharded
        model.safetensors.index.json, or pytorch_model.bin read with weights_only=True), a hub id
        (fetched with huggingface_hub when online), or a live transformers `Blip2ForConditionalGeneration`,
        `Blip2Model`, `Blip2ForImageTextRetrieval`, `Blip2VisionModelWithProjection` or
        `Blip2TextModelWithProjection` (its state dict is used; it is not modified).
    device / dtype: default cuda + bfloat16 when a GPU is available, else cpu + float32. With
        float16 the Q-Former and its query tokens stay in float32, as transformers keeps them
        (`model.qformer_dtype`); its output is cast to float16 before the projections. A float16
        Flan-T5 keeps each feed-forward's `wo` in float32 and clamps overflowing float16 states,
        also as transformers does.
    backend: "fast" or "reference" for every op; default $BLIP2_FAST_BACKEND, else "fast".
    ops: per-op overrides, e.g. {"attention": "reference"}. An op asked for as "fast" here that
        cannot run on the device raises; one that falls back under `backend="fast"` warns once.
    progress: show shard/byte progress on stderr when loading takes more than ~2 s.
    """
    device, dtype = _resolve_device_dtype(device, dtype)
    bound = _ops.bind(backend, ops, device)
    source_dir = None
    if isinstance(source, torch.nn.Module):
        name = type(source).__name__
        if name not in _HF_CLASSES:
            raise UnsupportedModelError(f"cannot load a {name}; expected one of {', '.join(_HF_CLASSES)}")
        raw = source.config.to_dict()
        raw["architectures"] = [name]
        cfg = _config.parse(raw)
        src = weights.from_state_dict(source.state_dict(), device=device, dtype=dtype, describe=f"live {name}")
    else:
        if isinstance(source, str) and not source.strip():
            raise CheckpointError("source is an empty string; pass a checkpoint directory or a hub id")
        path = Path(os.fspath(source)).expanduser()
        if not path.exists():
            if isinstance(source, str) and source.count("/") == 1 and not source.startswith((".", "/")):
                path = _hub_dir(source)
            else:
                raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a directory (expected a checkpoint directory with config.json)")
        source_dir = path
        cfg = _config.read(path)
        src = weights.from_directory(path, device=device, dtype=dtype, progress=progress)
    with torch.inference_mode():
        model = Blip2(cfg, bound, src, source_dir=source_dir)
    _warn_unused(src, cfg)
    if getattr(src, "progress", None) is not None:
        src.progress.close()
    model.generation_defaults = _generation_defaults(source, source_dir, cfg)
    return model


def _generation_defaults(source, source_dir, cfg) -> dict:
    """eos/pad/bos ids and length defaults from generation_config.json or the text config."""
    d = {}
    lm = cfg.lm
    if lm is not None:
        d["eos_token_id"] = lm.eos_token_id
        d["pad_token_id"] = lm.pad_token_id
        if hasattr(lm, "bos_token_id"):
            d["bos_token_id"] = lm.bos_token_id
        if hasattr(lm, "decoder_start_token_id"):
            d["decoder_start_token_id"] = lm.decoder_start_token_id
    gen = None
    if source_dir is not None and (source_dir / "generation_config.json").exists():
        import json

        try:
            gen = json.loads((source_dir / "generation_config.json").read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{source_dir / 'generation_config.json'}: not valid JSON ({e})") from None
    elif isinstance(source, torch.nn.Module) and getattr(source, "generation_config", None) is not None:
        gen = source.generation_config.to_dict()
    for k in ("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id", "max_length",
              "max_new_tokens", "min_new_tokens", "num_beams", "length_penalty", "early_stopping",
              "repetition_penalty", "do_sample", "temperature", "top_k", "top_p"):
        if gen and gen.get(k) is not None:
            d[k] = gen[k]
    return d


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

"""`Blip2.generate` on the engine, and the caption / answer helpers."""
from __future__ import annotations

import math

import torch

from .engine.engine import Engine
from .engine.sampling import SamplingParams

_GEN_KEYS = {"max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k",
             "top_p", "repetition_penalty", "num_beams", "length_penalty", "early_stopping", "eos_token_id",
             "pad_token_id", "seed", "generator", "num_return_sequences", "use_cache", "bos_token_id",
             "decoder_start_token_id"}


def _params(model, kw: dict, prompt_len: int) -> SamplingParams:
    unknown = set(kw) - _GEN_KEYS
    if unknown:
        raise TypeError(f"generate() got unsupported arguments: {', '.join(sorted(unknown))}")
    d = dict(getattr(model, "generation_defaults", {}))
    d.update({k: v for k, v in kw.items() if v is not None})
    dec_prompt = 1 if model.is_encoder_decoder else prompt_len
    if d.get("max_new_tokens") is not None:
        max_new = d["max_new_tokens"]
    elif "max_length" in kw and kw["max_length"] is not None:
        max_new = kw["max_length"] - dec_prompt
    else:
        max_new = 20  # transformers' default: 20 new tokens
    if max_new < 1:
        if d.get("max_new_tokens") is not None:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
        raise ValueError(f"max_length={kw.get('max_length')} leaves no room for new tokens after a {dec_prompt}-token prompt")
    min_new = d.get("min_new_tokens") or 0
    if not min_new and kw.get("min_length"):
        min_new = max(kw["min_length"] - dec_prompt, 0)
    eos = d.get("eos_token_id")
    do_sample = bool(d.get("do_sample", False))
    return SamplingParams(
        max_new_tokens=int(max_new), min_new_tokens=int(min(min_new, max_new)), do_sample=do_sample,
        temperature=float(d.get("temperature") if d.get("temperature") is not None else 1.0),
        top_k=int(d.get("top_k") if d.get("top_k") is not None else 50),
        top_p=float(d.get("top_p") if d.get("top_p") is not None else 1.0),
        repetition_penalty=float(d.get("repetition_penalty") if d.get("repetition_penalty") is not None else 1.0),
        num_beams=int(d.get("num_beams") if d.get("num_beams") is not None else 1),
        length_penalty=float(d.get("length_penalty") if d.get("length_penalty") is not None else 1.0),
        early_stopping=d.get("early_stopping", False), seed=kw.get("seed"),

        stop_token_ids=None if eos is None else ([eos] if isinstance(eos, int) else list(eos)))


def _engine_for(model, n_seqs: int, blocks_needed: int) -> Engine:
    eng = getattr(model, "_engine", None)
    if eng is None or eng.has_unfinished() or eng.num_blocks < blocks_needed or eng.max_num_seqs < n_seqs:
        model._engine = None  # drop the old pool before allocating a new one
        eng = Engine(model, max_num_seqs=max(n_seqs, 8), num_blocks=max(blocks_needed, 64))
        model._engine = eng
    return eng


@torch.inference_mode()
def generate(model, pixel_values, input_ids=None, attention_mask=None, interpolate_pos_encoding=False, **kw):
    if model.lm is None:
        raise ValueError(f"a {model.architecture} checkpoint has no language model to generate with")
    if pixel_values is None:
        raise ValueError("generate needs pixel_values")
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be a [batch, 3, H, W] tensor, got {getattr(pixel_values, 'shape', type(pixel_values))}")
    model.vision.check_pixels(pixel_values, interpolate_pos_encoding)
    B = pixel_values.shape[0]
    if B == 0:
        raise ValueError("pixel_values has batch size 0")
    if not bool(torch.isfinite(pixel_values).all()):
        raise ValueError("pixel_values contain NaN or infinite values")
    defaults = getattr(model, "generation_defaults", {})
    if input_ids is None:
        if model.is_encoder_decoder:
            rows = [torch.zeros(0, dtype=torch.long) for _ in range(B)]
            out_prefix = None
        else:
            img, Q, bos = model.cfg.image_token_id, model.cfg.num_query_tokens, defaults.get("bos_token_id")
            start = ([img] * Q if img is not None else []) + ([bos] if bos is not None else [])
            input_ids = torch.tensor([start] * B, dtype=torch.long)
    if input_ids is not None:
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() != 2 or input_ids.shape[0] != B:
            raise ValueError(f"input_ids must be [batch={B}, seq], got {list(input_ids.shape)}")
        mask = torch.ones_like(input_ids) if attention_mask is None else torch.as_tensor(attention_mask)
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {list(mask.shape)}, input_ids {list(input_ids.shape)}")
        if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        ids_cpu, mask_cpu = input_ids.cpu().long(), mask.cpu().bool()
        empty = [i for i in range(B) if not bool(mask_cpu[i].any())]
        if input_ids.shape[1] and empty:
            raise ValueError(f"attention_mask row {empty[0]} masks out its whole prompt")
        rows = [ids_cpu[i][mask_cpu[i]] for i in range(B)]
        out_prefix = ids_cpu
    generator = kw.pop("generator", None)
    n_ret = int(kw.pop("num_return_sequences", None) or 1)
    if n_ret < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {n_ret}")
    p = _params(model, kw, input_ids.shape[1] if input_ids is not None else 0)
    if p.num_beams > 1:
        if n_ret > p.num_beams:
            raise ValueError(f"num_return_sequences={n_ret} exceeds num_beams={p.num_beams}")
        p.num_return_sequences = n_ret
    elif n_ret > 1 and not p.do_sample:
        raise ValueError("num_return_sequences > 1 needs do_sample=True or num_beams >= num_return_sequences "
                         "(greedy decoding would return the same sequence)")
    if generator is not None and p.do_sample:
        p.seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    bs = 16
    per = max(len(r) for r in rows) + model.cfg.num_query_tokens + p.max_new_tokens
    need = B * p.num_beams * (math.ceil(per / bs) + 2) * (2 if model.is_encoder_decoder else 1)
    need *= n_ret if p.num_beams == 1 else 1
    eng = _engine_for(model, B * p.num_beams * (n_ret if p.num_beams == 1 else 1), need)
    # several samples per row are several requests (they share the prompt's KV blocks); several beams
    # come back as one request's candidates
    n_samples = n_ret if p.num_beams == 1 else 1
    for i in range(B):
        for j in range(n_samples):
            pi = SamplingParams(**{**p.__dict__})
            if p.seed is not None:
                pi.seed = p.seed + i * n_samples + j
            elif p.do_sample:
                pi.seed = int(torch.randint(0, 2**62, (1,)))  # drawn from the global RNG: torch.manual_seed reproduces
            eng.add_request(("generate", i, j), pixel_values=pixel_values[i], prompt=rows[i], sampling=pi,
                            interpolate_pos_encoding=interpolate_pos_encoding)
    final = eng.run()
    outs = []
    for i in range(B):
        if p.num_beams > 1:
            outs += final[("generate", i, 0)].candidates
        else:
            outs += [final[("generate", i, j)].token_ids for j in range(n_samples)]
    if n_ret > 1:  # transformers repeats each prompt row for its returned sequences
        out_prefix = None if out_prefix is None else out_prefix.repeat_interleave(n_ret, 0)
        B = B * n_ret
    pad = defaults.get("pad_token_id")
    if pad is None:
        eos = p.stop_token_ids
        pad = eos[0] if eos else 0
    if p.num_beams > 1 and not pad and p.stop_token_ids:
        pad = p.stop_token_ids[0]  # transformers' beam search fills with `pad_token_id or eos_token_id[0]`
    n = max(len(o) for o in outs)
    gen = torch.full((B, n), pad, dtype=torch.long)
    for i, o in enumerate(outs):
        gen[i, : len(o)] = torch.tensor(o, dtype=torch.long)
    if model.is_encoder_decoder:
        start = defaults.get("decoder_start_token_id", 0)
        return torch.cat([torch.full((B, 1), start, dtype=torch.long), gen], 1).to(model.device)
    return torch.cat([out_prefix, gen], 1).to(model.device)


def processor_for(model):
    """The checkpoint's Blip2Processor (tokenizer + image processor), loaded once."""
    if model._processor is None:
        if model.source_dir is None:
            raise ValueError("this model was not loaded from a directory, so it has no processor: "
                             "tokenize the text yourself, or load from a checkpoint directory with its processor files")
        model._processor = load_processor(model.source_dir)
    return model._processor


def load_processor(path):
    """The Blip2Processor saved in checkpoint directory `path`, or a ValueError saying what is missing."""
    from pathlib import Path

    from transformers import Blip2Processor

    path = Path(path)
    if not (path / "preprocessor_config.json").exists() and not (path / "processor_config.json").exists():
        raise ValueError(f"{path} has no processor files (preprocessor_config.json, tokenizer files): captioning "
                         "needs the checkpoint's Blip2Processor; save one with processor.save_pretrained(dir)")
    try:
        return Blip2Processor.from_pretrained(str(path))
    except Exception as e:  # transformers raises many kinds for broken tokenizer files
        raise ValueError(f"{path}: its Blip2Processor files could not be loaded ({type(e).__name__})") from None


def _images(images):
    from .images import to_rgb_images  # PIL images, paths, arrays, tensors; pixel-limited (images.py)

    return to_rgb_images(images)


def _decode(model, ids: torch.Tensor, n_prompt: int) -> list[str]:
    proc = processor_for(model)
    new = ids[:, n_prompt:] if not model.is_encoder_decoder else ids[:, 1:]
    return [t.strip() for t in proc.tokenizer.batch_decode(new, skip_special_tokens=True)]


def caption(model, images, prompt=None, **gen):
    images = _images(images)
    proc = processor_for(model)
    if prompt is None:
        px = proc.image_processor(images=images, return_tensors="pt")["pixel_values"]
        ids = model.generate(px.to(model.device, model.dtype), **gen)
        plen = 0 if model.is_encoder_decoder else (model.cfg.num_query_tokens if model.cfg.image_token_id is not None else 0) + 1
        return _decode(model, ids, plen)
    prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
    return _run_prompts(model, proc, images, prompts, gen)


def answer(model, images, questions, **gen):
    images = _images(images)
    questions = [questions] if isinstance(questions, str) else list(questions)
    if len(questions) != len(images):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    proc = processor_for(model)
    prompts = [q if q.strip().startswith("Question:") else f"Question: {q} Answer:" for q in questions]
    return _run_prompts(model, proc, images, prompts, gen)


def _run_prompts(model, proc, images, prompts, gen):
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    tok = proc.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"  # decoder-only prompts are left-padded for batched generation
    try:
        enc = proc(images=images, text=prompts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    ids = model.generate(enc["pixel_values"].to(model.device, model.dtype), input_ids=enc["input_ids"],
                         attention_mask=enc["attention_mask"], **gen)
    return _decode(model, ids, enc["input_ids"].shape[1])

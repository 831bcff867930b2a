"""`Blip2.generate` on the engine, and the caption / answer helpers.

Every argument is checked before anything runs (ints are ints, ids are in the vocabulary, sizes
fit the model and the memory), then each prompt row becomes one engine request (several for
several samples). The engine comes from the model's pool of idle engines: a call takes one that
is large enough (or builds one sized to the call) and gives it back when done, so concurrent calls
from several threads never share one.
"""
from __future__ import annotations

import math
import threading

import numpy as np
import torch

from .engine import Engine, SamplingParams
from .engine.limits import available_memory, format_bytes, to_pixels
from .engine.params import SEED_LIMIT, check_bool, check_ids, check_int
from .engine.runner import ModelRunner

_GEN_KEYS = {"max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k",
             "top_p", "repetition_penalty", "num_beams", "length_penalty", "early_stopping", "eos_token_id",
             "pad_token_id", "seed", "generator", "num_return_sequences", "use_cache", "bos_token_id",
             "decoder_start_token_id", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens"}
# generate()'s own arguments beyond the sampling ones (popped before `_params`)
_CALL_KEYS = {"generation_config", "streamer", "logits_processor", "stopping_criteria", "return_dict_in_generate",
              "output_scores", "output_logits"}
# GenerationConfig bookkeeping, never a generation setting
_META_KEYS = {"transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash"}
_BLOCK_SIZE = 16  # the engine's default


class EnginePool:
    """Idle engines of one model, for generate(): `acquire` hands out one large enough (or builds
    one), `release` takes it back. At most one idle engine is kept."""

    def __init__(self, model):
        self.model = model
        self.lock = threading.Lock()
        self.idle: list[Engine] = []

    def acquire(self, n_seqs: int, n_blocks: int, max_model_len: int) -> Engine:
        with self.lock:
            for i, e in enumerate(self.idle):
                if e.max_num_seqs >= n_seqs and e.num_blocks >= n_blocks and e.max_model_len >= max_model_len:
                    return self.idle.pop(i)
            self.idle.clear()  # too small: drop it before allocating a bigger pool
        return Engine(self.model, max_num_seqs=n_seqs, num_blocks=n_blocks, max_model_len=max_model_len,
                      block_size=_BLOCK_SIZE)

    def release(self, e: Engine) -> None:
        if e.has_unfinished():  # a call that raised midway: its requests are not ours to keep
            return
        with self.lock:
            self.idle = [e]


def _pool(model) -> EnginePool:
    with _pool_lock:
        if model._generate_engines is None:
            model._generate_engines = EnginePool(model)
        return model._generate_engines


_pool_lock = threading.Lock()


def _params(model, kw: dict, prompt_len: int) -> SamplingParams:
    unknown = set(kw) - _GEN_KEYS
    if unknown:
        raise TypeError(f"generate() got unsupported arguments: {', '.join(sorted(unknown))}")
    given = {k: v for k, v in kw.items() if v is not None}
    vocab = model.cfg.lm.vocab
    for k in ("use_cache", "do_sample"):
        if k in given:
            check_bool(k, given[k])
    for k in ("pad_token_id", "bos_token_id", "decoder_start_token_id"):
        if k in given:
            check_int(k, given[k])
    if "eos_token_id" in given:
        given["eos_token_id"] = check_ids("eos_token_id", given["eos_token_id"], vocab)
    for k in ("max_length", "min_length", "min_new_tokens"):
        if k in given:
            given[k] = check_int(k, given[k], 0)
    d = dict(getattr(model, "generation_defaults", {}))
    d.update(given)
    dec_prompt = 1 if model.is_encoder_decoder else prompt_len
    if "max_new_tokens" in given:
        max_new = check_int("max_new_tokens", given["max_new_tokens"], 1)
    elif "max_length" in given:
        max_new = given["max_length"] - dec_prompt
        if max_new < 1:
            raise ValueError(f"max_length={given['max_length']} leaves no room for new tokens after a "
                             f"{dec_prompt}-token prompt")
    else:
        max_new = check_int("max_new_tokens", d.get("max_new_tokens") or 20, 1)  # transformers' default: 20
    min_new = given.get("min_new_tokens") or 0
    if not min_new and given.get("min_length"):
        min_new = max(given["min_length"] - dec_prompt, 0)
    eos = d.get("eos_token_id")
    for k in ("bad_words_ids", "suppress_tokens"):  # ids in the vocabulary, checked by name
        if given.get(k) is not None:
            SamplingParams(**{k: given[k]}).validate(vocab)
    p = SamplingParams(
        max_new_tokens=max_new, min_new_tokens=min(min_new, max_new), do_sample=d.get("do_sample", False),
        temperature=d.get("temperature", 1.0), top_k=d.get("top_k", 50), top_p=d.get("top_p", 1.0),
        repetition_penalty=d.get("repetition_penalty", 1.0), num_beams=d.get("num_beams", 1),
        length_penalty=d.get("length_penalty", 1.0), early_stopping=d.get("early_stopping", False),
        seed=given.get("seed"), stop_token_ids=None if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        no_repeat_ngram_size=d.get("no_repeat_ngram_size") or 0, bad_words_ids=d.get("bad_words_ids"),
        suppress_tokens=d.get("suppress_tokens"))
    p.validate(vocab if "eos_token_id" in given else None)  # the checkpoint's own eos ids are trusted
    return p


def _ids(x, name: str, B: int | None = None) -> torch.Tensor:
    """input_ids / attention_mask as a 2-D integer CPU tensor (tensors, numpy arrays, lists of lists)."""
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        if x.dtype.kind not in "iub":
            raise ValueError(f"{name} must be integers, got a {x.dtype} array")
        t = torch.from_numpy(np.array(x))
    elif isinstance(x, (list, tuple)):
        try:
            t = torch.tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be a [batch, seq] tensor or nested list of ints ({e})") from None
    else:
        raise TypeError(f"{name} must be a [batch, seq] tensor (or numpy array / nested list), got {type(x).__name__}")
    if t.is_meta:
        raise ValueError(f"{name} is on the meta device (a tensor without data)")
    if t.dim() != 2 or (B is not None and t.shape[0] != B):
        raise ValueError(f"{name} must be [batch={B}, seq], got {list(t.shape)}")
    if t.is_floating_point() or t.is_complex() or (t.dtype == torch.bool and name == "input_ids"):
        raise ValueError(f"{name} must be integer token ids, got dtype {t.dtype}")
    return t.cpu()


def _check_size(model, B: int, p: SamplingParams, n_ret: int, prompt_len: int) -> tuple[int, int, int]:
    """Refuse at once what the model cannot serve; returns the engine's (max_num_seqs, num_blocks,
    max_model_len) for this call."""
    t5 = model.is_encoder_decoder
    if not t5:
        positions = model.cfg.lm.max_positions
        if prompt_len + p.max_new_tokens > positions:
            raise ValueError(f"max_new_tokens={p.max_new_tokens} after a {prompt_len}-position prompt (image queries "
                             f"included) exceeds the language model's {positions} positions: at most "
                             f"{max(positions - prompt_len, 0)} new tokens")
        max_len = positions
    else:
        max_len = 256 * math.ceil((1 + p.max_new_tokens) / 256)  # engines of a similar size get reused
    samples = n_ret if p.num_beams == 1 else 1
    n_seqs = B * p.num_beams * samples
    per = (1 if t5 else prompt_len) + p.max_new_tokens
    need = n_seqs * (math.ceil(per / _BLOCK_SIZE) + 2) + (B * math.ceil(prompt_len / _BLOCK_SIZE) if t5 else 0)
    kv = need * ModelRunner.bytes_per_block(model, _BLOCK_SIZE)
    step = 4 * 4 * n_seqs * model.cfg.lm.vocab  # a step's float32 logits and the sampler's copies of them
    avail = available_memory(model.device)
    if kv + step > avail:
        raise ValueError(f"generate(batch={B}, num_beams={p.num_beams}, num_return_sequences={n_ret}, max_new_tokens="
                         f"{p.max_new_tokens}) needs {format_bytes(kv + step)} ({need} KV blocks and the per-step logits "
                         f"of {n_seqs} sequences), more than the {format_bytes(avail)} available on {model.device}")
    return max(n_seqs, 8), max(need, 64), max_len


def merged_arguments(model, generation_config, kw: dict) -> dict:
    """generate()'s keyword arguments merged as transformers merges them: the fields set on
    `generation_config` (a GenerationConfig) over `model.generation_config`'s, the keyword arguments
    over both. Fields left at transformers' defaults are dropped; a field we do not implement, set
    to anything else, is a ValueError naming it; a name transformers does not know, a TypeError."""
    from transformers import GenerationConfig

    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise TypeError(f"generation_config must be a transformers GenerationConfig, got {type(generation_config).__name__}")
    loaded = getattr(model, "generation_defaults", {})
    given = {}
    base = getattr(model, "generation_config", None)
    if base is not None:  # what the caller changed on model.generation_config (the loaded values are defaults)
        file = getattr(model, "_generation_file", {})
        for k, v in base.to_diff_dict().items():
            if k in _META_KEYS or (k in loaded and loaded[k] == v):
                continue
            if k not in _GEN_KEYS and file.get(k) == v:
                continue  # a generation_config.json field we do not implement: load() warned
            given[k] = v
    if generation_config is not None:
        given.update({k: v for k, v in generation_config.to_diff_dict().items() if k not in _META_KEYS})
    given.update(kw)
    defaults = _global_defaults()
    fields = set(GenerationConfig().to_dict())
    out = {}
    for k, v in given.items():
        if k in _GEN_KEYS or k in _CALL_KEYS:
            out[k] = v
        elif k in fields:
            if v is None or (k in defaults and _same(v, defaults[k])) or (k not in defaults and v is False):
                continue  # a default that changes nothing
            raise ValueError(f"generate() does not support transformers' {k}={v!r} (supported: "
                             f"{', '.join(sorted((_GEN_KEYS | _CALL_KEYS) - {'seed', 'generator'}))}); "
                             f"remove it{' from model.generation_config' if k not in kw else ''}")
        else:
            raise TypeError(f"generate() got an unsupported keyword argument {k!r} (not a transformers generation "
                            "argument either)")
    return out


def _same(a, b) -> bool:
    try:
        return isinstance(a, bool) == isinstance(b, bool) and bool(a == b)
    except Exception:  # e.g. a tensor against a number
        return False


def _global_defaults() -> dict:
    from transformers import GenerationConfig

    get = getattr(GenerationConfig, "_get_default_generation_params", None)
    d = dict(get()) if get is not None else {}
    d.update({"output_attentions": False, "output_hidden_states": False, "renormalize_logits": False,
              "token_healing": False, "is_assistant": False, "low_memory": None, "disable_compile": False})
    return d


@torch.inference_mode()
def generate(model, pixel_values, input_ids=None, attention_mask=None, interpolate_pos_encoding=False, **kw):
    if model.lm is None:
        raise ValueError(f"a {model.architecture} checkpoint has no language model to generate with")
    if pixel_values is None:
        raise ValueError("generate needs pixel_values")
    kw = merged_arguments(model, kw.pop("generation_config", None), kw)
    streamer = kw.pop("streamer", None)
    host = _host_arguments(kw)
    interp = check_bool("interpolate_pos_encoding", interpolate_pos_encoding)
    px = to_pixels(model, pixel_values, batched=True, device=model.device, interpolate=interp)
    B = px.shape[0]
    if B == 0:
        raise ValueError("pixel_values has batch size 0")
    defaults = getattr(model, "generation_defaults", {})
    vocab = model.cfg.lm.vocab
    if input_ids is None:
        if model.is_encoder_decoder:
            rows = [[] for _ in range(B)]
            out_prefix = None
        else:
            img, Q, bos = model.cfg.image_token_id, model.cfg.num_query_tokens, defaults.get("bos_token_id")
            start = ([img] * Q if img is not None else []) + ([bos] if bos is not None else [])
            input_ids = torch.tensor([start] * B, dtype=torch.long)
    if input_ids is not None:
        input_ids = _ids(input_ids, "input_ids", B)
        mask = torch.ones_like(input_ids) if attention_mask is None else _ids(attention_mask, "attention_mask", B)
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {list(mask.shape)}, input_ids {list(input_ids.shape)}")
        ids_cpu, mask_cpu = input_ids.long(), mask.bool()
        empty = [i for i in range(B) if not bool(mask_cpu[i].any())]
        if input_ids.shape[1] and empty:
            raise ValueError(f"attention_mask row {empty[0]} masks out its whole prompt")
        rows = [ids_cpu[i][mask_cpu[i]].tolist() for i in range(B)]
        bad = [t for r in rows for t in r if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"input_ids contain ids outside the language model's vocabulary [0, {vocab}): {bad[0]}")
        out_prefix = ids_cpu
    generator = kw.pop("generator", None)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    n_ret = kw.pop("num_return_sequences", None)
    n_ret = 1 if n_ret is None else check_int("num_return_sequences", n_ret, 1)
    p = _params(model, kw, input_ids.shape[1] if input_ids is not None else 0)
    p.logits_processors, p.stopping_criteria = host["logits_processor"], host["stopping_criteria"]
    p.output_scores, p.output_logits = host["scores"], host["logits"]
    p.validate(None)  # the callables' types; the ids were checked by _params
    if p.num_beams > 1:
        if n_ret > p.num_beams:
            raise ValueError(f"num_return_sequences={n_ret} exceeds num_beams={p.num_beams}")
        p.num_return_sequences = n_ret
    elif n_ret > 1 and not p.do_sample:
        raise ValueError("num_return_sequences > 1 needs do_sample=True or num_beams >= num_return_sequences "
                         "(greedy decoding would return the same sequence)")
    if streamer is not None:
        if p.num_beams > 1:
            raise ValueError("streamer cannot be used with beam search (as in transformers): set num_beams=1")
        if B * n_ret != 1:
            raise ValueError(f"streamer needs a batch of one sequence, as transformers' streamers; got {B} rows x "
                             f"num_return_sequences={n_ret}")
        if not callable(getattr(streamer, "put", None)) or not callable(getattr(streamer, "end", None)):
            raise TypeError(f"streamer must have put(token_ids) and end() (a transformers streamer), got "
                            f"{type(streamer).__name__}")
    if generator is not None and p.do_sample:
        p.seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    Q, img = model.cfg.num_query_tokens, model.cfg.image_token_id
    longest = max(len(r) + (0 if img is not None and img in r else Q) for r in rows)  # LM positions
    n_seqs, n_blocks, max_len = _check_size(model, B, p, n_ret, longest)
    pool = _pool(model)
    eng = pool.acquire(n_seqs, n_blocks, max_len)
    try:
        if streamer is not None:
            # transformers first hands over the decoder's input: the prompt (OPT) or the start token (T5)
            t5 = model.is_encoder_decoder
            first = torch.tensor([[defaults.get("decoder_start_token_id", 0)]]) if t5 else out_prefix
            streamer.put(first.cpu())
        final = _run(eng, px, rows, p, n_ret, interp, streamer)
    finally:
        pool.release(eng)
        if streamer is not None:
            streamer.end()  # also after a failure: a TextIteratorStreamer's reader must not wait forever
    outs, finals = [], []
    n_samples = n_ret if p.num_beams == 1 else 1
    for i in range(B):
        for j in range(n_samples):
            o = final[("generate", i, j)]
            if o.finish_reason == "error":
                raise RuntimeError(f"generation failed for row {i}: {o.error}")
            finals.append(o)
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
        seqs = torch.cat([torch.full((B, 1), start, dtype=torch.long), gen], 1).to(model.device)
    else:
        seqs = torch.cat([out_prefix, gen], 1).to(model.device)
    if not host["return_dict"]:
        return seqs
    from .generate_output import generate_output

    return generate_output(model, seqs, finals, p, pad, n)


def _host_arguments(kw: dict) -> dict:
    """generate()'s arguments that are not sampling settings, popped from `kw` and checked."""
    out = {}
    for k, name in (("return_dict", "return_dict_in_generate"), ("scores", "output_scores"), ("logits", "output_logits")):
        v = kw.pop(name, None)
        out[k] = False if v is None else check_bool(name, v)
    for k in ("logits_processor", "stopping_criteria"):
        v = kw.pop(k, None)
        out[k] = () if v is None else v
    if (out["scores"] or out["logits"]) and not out["return_dict"]:
        out["scores"] = out["logits"] = False  # transformers keeps them only for return_dict_in_generate
    return out


def _run(eng: Engine, px: torch.Tensor, rows: list, p: SamplingParams, n_ret: int, interp: bool,
         streamer=None) -> dict:
    # several samples per row are several requests (they share the prompt's KV blocks); several beams
    # come back as one request's candidates
    n_samples = n_ret if p.num_beams == 1 else 1
    for i in range(len(rows)):
        for j in range(n_samples):
            pi = SamplingParams(**{**p.__dict__})
            if p.seed is not None:
                pi.seed = (p.seed + i * n_samples + j) % SEED_LIMIT
            elif p.do_sample:
                pi.seed = int(torch.randint(0, 2**62, (1,)))  # drawn from the global RNG: torch.manual_seed reproduces
            eng.add_request(("generate", i, j), pixel_values=px[i], prompt=rows[i], sampling=pi,
                            interpolate_pos_encoding=interp)
    if streamer is None:
        return eng.run()
    final = {}
    while eng.has_unfinished():  # each step's new token goes to the streamer as the engine makes it
        for o in eng.step():
            for t in o.new_token_ids:
                streamer.put(torch.tensor([t]))
            if o.finished:
                final[o.request_id] = o
    return final


def processor_for(model):
    """The checkpoint's Blip2Processor (tokenizer + image processor), loaded once (`Blip2.processor()`)."""
    return model.processor()


def load_processor(path):
    """The Blip2Processor saved in checkpoint directory `path`, or a ValueError saying what is missing."""
    from pathlib import Path

    from transformers import Blip2Processor

    from .files import check_directory_files

    path = Path(path)
    check_directory_files(path)  # transformers would block reading a FIFO named like a tokenizer file
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
    prompts = [prompt] * len(images) if isinstance(prompt, str) else _texts(prompt, "prompt")
    return _run_prompts(model, proc, images, prompts, gen)


def answer(model, images, questions, **gen):
    images = _images(images)
    questions = [questions] if isinstance(questions, str) else _texts(questions, "questions")
    if len(questions) == 1:  # one question about every image
        questions = questions * len(images)
    if len(questions) != len(images):
        raise ValueError(f"{len(images)} images but {len(questions)} questions (give one question, or one per image)")
    proc = processor_for(model)
    prompts = [q if q.strip().startswith("Question:") else f"Question: {q} Answer:" for q in questions]
    return _run_prompts(model, proc, images, prompts, gen)


def _texts(x, name: str) -> list[str]:
    if not isinstance(x, (list, tuple)) or not all(isinstance(t, str) for t in x):
        raise TypeError(f"{name} must be a string or a list of strings, got {type(x).__name__}")
    return list(x)


_padding_lock = threading.Lock()  # the tokenizer's padding side is shared state


def _run_prompts(model, proc, images, prompts, gen):
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    tok = proc.tokenizer
    with _padding_lock:
        side = tok.padding_side
        tok.padding_side = "left"  # decoder-only prompts are left-padded for batched generation
        try:
            enc = proc(images=images, text=prompts, return_tensors="pt", padding=True)
        finally:
            tok.padding_side = side
    ids = model.generate(enc["pixel_values"].to(model.device, model.dtype), input_ids=enc["input_ids"],
                         attention_mask=enc["attention_mask"], **gen)
    return _decode(model, ids, enc["input_ids"].shape[1])

"""`Blip2`: the object `blip2_fast.load()` returns, with transformers' BLIP-2 call surface.

It composes the vision encoder, Q-Former and language model from `models/` and offers
`model(...)` (logits, or ITM/ITC scores on retrieval checkpoints), `generate(...)` (on the engine's
paged KV cache), feature getters, the projection models' outputs, and `caption` / `answer` helpers.
"""
from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Blip2Config, OPTConfig
from .layers import AttnMeta, Linear, take_param
from .models.opt import OPT
from .models.qformer import QFormer, TextEmbeddings
from .models.t5 import T5
from .models.vision import VisionEncoder
from .ops import BoundOps
from .weights import DtypeView, WeightSource

_processor_lock = threading.Lock()
_HAS_LM = ("Blip2ForConditionalGeneration", "Blip2Model")
_HAS_VISION = _HAS_LM + ("Blip2ForImageTextRetrieval", "Blip2VisionModelWithProjection")
_HAS_TEXT_EMB = ("Blip2ForImageTextRetrieval", "Blip2TextModelWithProjection")


@dataclasses.dataclass
class Output:
    """Model outputs, named as in transformers. Fields that a call does not produce are None."""

    logits: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None  # vision encoder last hidden state, or projected ITC embeds
    qformer_output: torch.Tensor | None = None
    language_model_inputs: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, k) for k in self.keys())

    def __getitem__(self, i):
        """out[0] / out[0:2]: the set fields in order, as transformers' ModelOutput; out["logits"]: by name."""
        if isinstance(i, str):
            if i not in self.keys():
                raise KeyError(i)
            return getattr(self, i)
        return self.to_tuple()[i]  # the same tensor objects, never copies


class Blip2(nn.Module):
    """A BLIP-2 model on blip2_fast's op layer. Build it with `blip2_fast.load()`."""

    def __init__(self, cfg: Blip2Config, ops: BoundOps, src: WeightSource, *, source_dir: Path | None = None):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        self.device, self.dtype = src.device, src.dtype
        self.architecture = cfg.architecture
        self.source_dir = source_dir
        Q, Hq = cfg.num_query_tokens, cfg.qformer.hidden
        self.vision = VisionEncoder(cfg.vision, ops, src) if cfg.architecture in _HAS_VISION else None
        # transformers keeps the Q-Former and the query tokens in fp32 when a model is loaded in fp16
        # (`_keep_in_fp32_modules`, which it applies to fp16 only): so do we, for the same numbers. Its
        # inputs are cast up on entry and its outputs down before the model-dtype projections.
        self.qformer_dtype = torch.float32 if src.dtype == torch.float16 else src.dtype
        qsrc = src if self.qformer_dtype == src.dtype else DtypeView(src, self.qformer_dtype)
        self.query_tokens = take_param(qsrc, "query_tokens", (1, Q, Hq))
        self.qformer = QFormer(cfg.qformer, ops, qsrc)
        self.text_embeddings = TextEmbeddings(cfg.qformer, src) if cfg.architecture in _HAS_TEXT_EMB else None
        self.lm = None
        self.language_projection = None
        if cfg.architecture in _HAS_LM:
            lm_hidden = cfg.lm.hidden if isinstance(cfg.lm, OPTConfig) else cfg.lm.d_model
            self.language_projection = Linear.load(src, "language_projection", lm_hidden, Hq)
            self.lm = OPT(cfg.lm, ops, src) if isinstance(cfg.lm, OPTConfig) else T5(cfg.lm, ops, src)
        P = cfg.image_text_hidden
        self.vision_projection = Linear.load(src, "vision_projection", P, Hq) if src.has("vision_projection.weight") else None
        self.text_projection = Linear.load(src, "text_projection", P, Hq) if src.has("text_projection.weight") else None
        self.itm_head = Linear.load(src, "itm_head", 2, Hq) if src.has("itm_head.weight") else None
        self._processor = None
        self._generate_engines = None  # generate()'s idle engines (blip2_fast.generation.EnginePool), made on first use
        self._hf_config = None  # transformers' Blip2Config, made on first read of `config` ...
        self._hf_config_source = None  # ... from this: a config.json dict, or a live model's config (set by load())
        self._generation_config = None
        self._generation_file: dict = {}  # generation_config.json as read (load()), every field
        self.generation_defaults: dict = {}  # eos/pad/bos ids and the checkpoint's generation_config.json values (load())

    @property
    def config(self):
        """The checkpoint's transformers `Blip2Config` (as `Blip2ForConditionalGeneration.config`), made
        on first read. blip2_fast itself runs on its own checked config (`model.cfg`)."""
        if self._hf_config is None:
            import copy

            from transformers import Blip2Config, PretrainedConfig

            src = self._hf_config_source
            if isinstance(src, PretrainedConfig):
                self._hf_config = copy.deepcopy(src)
            elif isinstance(src, dict):
                self._hf_config = Blip2Config.from_dict(copy.deepcopy(src))
            else:
                raise AttributeError("this model was not loaded from a checkpoint, so it has no transformers config")
        return self._hf_config

    @property
    def generation_config(self):
        """The checkpoint's generation_config.json as a transformers `GenerationConfig` (or one made
        from the text config's token ids when there is none), as on transformers' models: generate()
        starts from it, and changes made to it apply to later calls."""
        if self._generation_config is None:
            from transformers import GenerationConfig

            d = {k: v for k, v in self._generation_file.items() if k not in ("transformers_version", "_from_model_config")}
            d.update(self.generation_defaults)
            self._generation_config = GenerationConfig.from_dict(d)
        return self._generation_config

    @generation_config.setter
    def generation_config(self, value):
        from transformers import GenerationConfig

        if not isinstance(value, GenerationConfig):
            raise TypeError(f"generation_config must be a transformers GenerationConfig, got {type(value).__name__}")
        self._generation_config = value

    def eval(self):
        """A no-op returning the model (it is always in inference mode), as transformers code calls it."""
        return self

    def train(self, mode: bool = True):
        if mode:
            raise TypeError("a blip2_fast model runs inference only: it cannot be put in training mode")
        return self

    def processor(self):
        """The checkpoint's Blip2Processor (tokenizer + image processor), loaded once."""
        with _processor_lock:
            if self._processor is None:
                if self.source_dir is None:
                    raise ValueError("this model was not loaded from a directory, so it has no processor: tokenize the "
                                     "text yourself, or load from a checkpoint directory with its processor files")
                from .generation import load_processor

                self._processor = load_processor(self.source_dir)
            return self._processor

    def checkpoint_keys(self) -> dict[str, tuple[str, ...]]:
        """state_dict name -> the checkpoint keys its tensor was built from (several for fused
        projections: q/k/v stacked, OPT's q scaled by head_dim**-0.5). Tied weights appear under
        both names, as in transformers."""
        return {name: p.ckpt_keys for name, p in self.named_parameters(remove_duplicate=False)}

    # The model-card idiom `model.to(device)` after loading on that device is a no-op (it returns the
    # model, as nn.Module does); a move to another device or dtype raises in _apply.
    def _placed(self, device=None, dtype=None) -> bool:
        if device is not None:
            device = torch.device(device)
            here = self.device
            if device.type != here.type or (device.index is not None and device.index != (here.index or 0)):
                return False
        return dtype is None or dtype == self.dtype

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        return self if self._placed(device, dtype) else super().to(*args, **kwargs)

    def cpu(self):
        return self if self._placed("cpu") else super().cpu()

    def cuda(self, device=None):
        if isinstance(device, int):
            device = torch.device("cuda", device)
        return self if self._placed(device if device is not None else "cuda") else super().cuda(device)

    def float(self):
        return self if self._placed(dtype=torch.float32) else super().float()

    def half(self):
        return self if self._placed(dtype=torch.float16) else super().half()

    def bfloat16(self):
        return self if self._placed(dtype=torch.bfloat16) else super().bfloat16()

    def _apply(self, fn, recurse=True):
        # Weights are parameters bound to ops resolved for one device and dtype at load time, so
        # .to() / .cuda() / .half() cannot move them correctly; say so instead of silently doing nothing.
        raise TypeError(f"a blip2_fast model is placed when it is loaded (it is on {self.device} in {self.dtype}): "
                        "use blip2_fast.load(source, device=..., dtype=...) instead of .to() / .cuda() / .half()")

    # ---- properties -------------------------------------------------------------------------
    @property
    def is_encoder_decoder(self) -> bool:
        return isinstance(self.lm, T5)

    @property
    def impls(self) -> dict:
        """Which implementation ("fast" or "reference") each op was bound to."""
        return dict(self.ops.impls)

    def _need(self, what: str, ok: bool):
        if not ok:
            raise ValueError(f"this {self.architecture} checkpoint has no {what}")

    # ---- vision side ------------------------------------------------------------------------
    @torch.inference_mode()
    def get_image_features(self, pixel_values, interpolate_pos_encoding=False) -> Output:
        """Vision encoder outputs as on `Blip2Model`: last_hidden_state [B, N, Ev], pooler_output [B, Ev]."""
        self._need("vision encoder", self.vision is not None)
        last, pooled = self.vision(pixel_values.to(self.device), interpolate_pos_encoding)
        return Output(last_hidden_state=last, pooler_output=pooled)

    def _qformer_queries(self, image_embeds: torch.Tensor) -> torch.Tensor:
        B = image_embeds.shape[0]
        return self.qformer(self.query_tokens.expand(B, -1, -1), n_query=self.cfg.num_query_tokens, image_embeds=image_embeds)

    @torch.inference_mode()
    def get_qformer_features(self, pixel_values, interpolate_pos_encoding=False) -> torch.Tensor:
        """The Q-Former's last hidden state for the learned queries: [B, num_query_tokens, Hq]."""
        return self._qformer_queries(self.get_image_features(pixel_values, interpolate_pos_encoding).last_hidden_state)

    @torch.inference_mode()
    def language_model_inputs(self, pixel_values, interpolate_pos_encoding=False) -> torch.Tensor:
        """Projected query outputs the language model sees in place of the image tokens: [B, Q, E_lm]."""
        self._need("language model", self.lm is not None)
        q = self.get_qformer_features(pixel_values, interpolate_pos_encoding)
        return self.language_projection(q.to(self.dtype))

    # ---- text side --------------------------------------------------------------------------
    def _ids(self, input_ids, attention_mask):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a [batch, seq] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
        input_ids = input_ids.to(self.device).long()
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device).long()
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {list(attention_mask.shape)}, input_ids {list(input_ids.shape)}")
        return input_ids, attention_mask

    @torch.inference_mode()
    def get_text_features(self, input_ids, attention_mask=None) -> Output:
        """The language model's text encoding as on `Blip2Model`: OPT's decoder output or T5's encoder output."""
        self._need("language model", self.lm is not None)
        input_ids, mask = self._ids(input_ids, attention_mask)
        self._check_vocab(input_ids)
        emb = self.lm.embed_tokens(input_ids)
        if self.is_encoder_decoder:
            return Output(last_hidden_state=self.lm.encode(emb, mask.bool()))
        pos = (mask.cumsum(1) * mask - 1).clamp(min=-1)
        return Output(last_hidden_state=self.lm(emb, pos, AttnMeta(prefill=True, key_padding_mask=mask.bool())))

    def _check_vocab(self, ids):
        V = self.cfg.lm.vocab
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
            raise ValueError(f"input_ids contain ids outside the language model's vocabulary [0, {V})")

    def merge_prompt(self, input_ids, attention_mask, lm_inputs):
        """Language-model input embeddings with the image queries in place.

        Prompts laid out by `Blip2Processor` carry `num_query_tokens` image tokens; those positions get
        the projected queries (transformers >= 4.47). Prompts with no image tokens (older processors)
        get the queries prepended, as older transformers did. Returns (embeds [B, S, E], mask [B, S],
        ids [B, S] with image positions kept as the image token id).
        """
        Q = self.cfg.num_query_tokens
        B = input_ids.shape[0]
        img = self.cfg.image_token_id
        n_img = (input_ids == img).sum(1) if img is not None else torch.zeros(B, dtype=torch.long, device=input_ids.device)
        if lm_inputs.shape[0] != B:
            raise ValueError(f"{lm_inputs.shape[0]} images but {B} prompts")
        if bool((n_img == 0).all()):
            pad_id = img if img is not None else 0
            ids = torch.cat([torch.full((B, Q), pad_id, device=input_ids.device, dtype=input_ids.dtype), input_ids], 1)
            mask = torch.cat([torch.ones(B, Q, device=input_ids.device, dtype=attention_mask.dtype), attention_mask], 1)
            self._check_vocab(input_ids)
            emb = self.lm.embed_tokens(input_ids)
            return torch.cat([lm_inputs.to(emb.dtype), emb], 1), mask, ids
        bad = [(i, int(n)) for i, n in enumerate(n_img.tolist()) if n != Q]
        if bad:
            i, n = bad[0]
            raise ValueError(f"prompt {i} has {n} image tokens (id {img}); expected 0 or num_query_tokens={Q}")
        self._check_vocab(input_ids)
        emb = self.lm.embed_tokens(input_ids)
        where = (input_ids == img).unsqueeze(-1)
        emb = emb.masked_scatter(where, lm_inputs.to(emb.dtype))
        return emb, attention_mask, input_ids

    # ---- forward ----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, pixel_values=None, input_ids=None, attention_mask=None, decoder_input_ids=None,
                decoder_attention_mask=None, interpolate_pos_encoding=False, use_image_text_matching_head=False) -> Output:
        """Logits as `Blip2ForConditionalGeneration` ([B, S, V]; T5: [B, T_dec, V]), or on retrieval
        checkpoints the ITM / ITC scores as `Blip2ForImageTextRetrieval` (`.logits_per_image`)."""
        if self.lm is None:
            if pixel_values is None and self.architecture in ("Blip2ForImageTextRetrieval", "Blip2VisionModelWithProjection"):
                raise ValueError(f"a {self.architecture} forward needs pixel_values")
            if self.architecture == "Blip2ForImageTextRetrieval":
                return self.image_text_scores(pixel_values, input_ids, attention_mask, use_image_text_matching_head)
            if self.architecture == "Blip2VisionModelWithProjection":
                return self.vision_with_projection(pixel_values)
            return self.text_with_projection(input_ids, attention_mask)
        if pixel_values is None or input_ids is None:
            raise ValueError("forward needs pixel_values and input_ids")
        input_ids, mask = self._ids(input_ids, attention_mask)
        lm_in = self.language_model_inputs(pixel_values, interpolate_pos_encoding)
        emb, mask, _ = self.merge_prompt(input_ids, mask, lm_in)
        if self.is_encoder_decoder:
            if decoder_input_ids is None:
                raise ValueError("T5 checkpoints need decoder_input_ids for a forward pass (generate() makes them itself)")
            dec_ids = decoder_input_ids.to(self.device).long()
            self._check_vocab(dec_ids)
            enc = self.lm.encode(emb, mask.bool())
            dmask = None if decoder_attention_mask is None else decoder_attention_mask.to(self.device).bool()
            meta = AttnMeta(prefill=True, key_padding_mask=dmask, encoder_mask=mask.bool())
            hidden = self.lm.decode(self.lm.embed_tokens(dec_ids), enc, meta)
        else:
            self._check_positions(mask.shape[1])
            pos = (mask.cumsum(1) * mask - 1).clamp(min=-1)
            hidden = self.lm(emb, pos, AttnMeta(prefill=True, key_padding_mask=mask.bool()))
        return Output(logits=self.lm.logits(hidden).float(), language_model_inputs=lm_in)

    def _check_positions(self, n: int):
        if isinstance(self.cfg.lm, OPTConfig) and n > self.cfg.lm.max_positions:
            raise ValueError(f"prompt of {n} tokens (image queries included) exceeds the language model's "
                             f"{self.cfg.lm.max_positions} positions")

    # ---- retrieval / projection checkpoints -------------------------------------------------
    def image_text_scores(self, pixel_values, input_ids, attention_mask=None, use_image_text_matching_head=False) -> Output:
        """ITM (`use_image_text_matching_head=True`: logits_per_image [B, 2]) or ITC (cosine similarity,
        logits_per_image [B_img, B_text]) exactly as `Blip2ForImageTextRetrieval`."""
        self._need("text embeddings", self.text_embeddings is not None)
        input_ids, mask = self._ids(input_ids, attention_mask)
        Q = self.cfg.num_query_tokens
        image_embeds = self.get_image_features(pixel_values).last_hidden_state
        B = image_embeds.shape[0]
        has_img_tok = self.cfg.image_token_id is not None
        if use_image_text_matching_head:
            self._need("ITM head", self.itm_head is not None)
            ids = input_ids[:, Q:] if has_img_tok else input_ids
            if not has_img_tok:
                mask = torch.cat([torch.ones(B, Q, dtype=mask.dtype, device=mask.device), mask], 1)
            text = self.text_embeddings(ids)  # model dtype; transformers casts the queries to it too
            emb = torch.cat([self.query_tokens.expand(B, -1, -1).to(text.dtype), text], 1)
            out = self.qformer(emb, n_query=Q, attention_mask=mask.bool(), image_embeds=image_embeds)
            logits = self.itm_head(out[:, :Q].to(self.dtype)).mean(1)
            return Output(logits_per_image=logits, logits_per_text=logits.t())
        self._need("projections", self.vision_projection is not None and self.text_projection is not None)
        q = self._qformer_queries(image_embeds)
        if has_img_tok:
            input_ids, mask = input_ids[:, Q:], mask[:, Q:]
        t = self.qformer(self.text_embeddings(input_ids), n_query=0, attention_mask=mask.bool())
        img = F.normalize(self.vision_projection(q.to(self.dtype)), dim=-1)  # (B, Q, P)
        txt = F.normalize(self.text_projection(t[:, 0].to(self.dtype)), dim=-1)  # (Bt, P)
        logits = torch.matmul(img, txt.t()).max(dim=1).values  # (B, Bt)
        return Output(logits_per_image=logits, logits_per_text=logits.t(), text_embeds=txt, image_embeds=img)

    @torch.inference_mode()
    def vision_with_projection(self, pixel_values) -> Output:
        """As `Blip2VisionModelWithProjection`: image_embeds [B, Q, P] (L2-normalised)."""
        self._need("vision projection", self.vision_projection is not None)
        feats = self.get_image_features(pixel_values)
        q = self._qformer_queries(feats.last_hidden_state)
        img = F.normalize(self.vision_projection(q.to(self.dtype)), dim=-1)
        return Output(image_embeds=img, last_hidden_state=feats.last_hidden_state)

    @torch.inference_mode()
    def text_with_projection(self, input_ids, attention_mask=None) -> Output:
        """As `Blip2TextModelWithProjection`: text_embeds [B, S, P] (L2-normalised)."""
        self._need("text projection", self.text_projection is not None and self.text_embeddings is not None)
        input_ids, mask = self._ids(input_ids, attention_mask)
        t = self.qformer(self.text_embeddings(input_ids), n_query=0, attention_mask=mask.bool())
        return Output(text_embeds=F.normalize(self.text_projection(t.to(self.dtype)), dim=-1), last_hidden_state=t)

    # ---- generation -------------------------------------------------------------------------
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, interpolate_pos_encoding=False, **kwargs):
        """Generate as `Blip2ForConditionalGeneration.generate`, on the paged-KV engine.

        Accepts transformers' arguments: max_new_tokens, max_length, min_new_tokens, do_sample,
        temperature, top_k, top_p, repetition_penalty, num_beams, length_penalty, early_stopping,
        eos_token_id, pad_token_id, num_return_sequences (best beams, or independent samples),
        no_repeat_ngram_size, bad_words_ids, suppress_tokens, `generator` / `seed` for reproducible
        sampling; `generation_config=` (merged as transformers merges it, over
        `model.generation_config`), `streamer=`, `logits_processor=` / `stopping_criteria=` lists
        (run on the host: slower), and `return_dict_in_generate` with `output_scores` /
        `output_logits` (transformers' output classes). Another transformers argument set to
        anything but its default is a ValueError naming it. Returns token ids [B, L] like
        transformers: for OPT the prompt ids followed by the new tokens, for T5 the decoder start
        token followed by the new tokens; rows are padded with pad_token_id.
        """
        from .generation import generate

        return generate(self, pixel_values, input_ids, attention_mask, interpolate_pos_encoding, **kwargs)

    def caption(self, images, prompt=None, **gen):
        """Caption images with the checkpoint's processor; returns a list of strings. images: one or a
        list of PIL images, paths (str / Path), HWC uint8 arrays or CHW tensors (uint8, or float in [0, 1])."""
        from .generation import caption

        return caption(self, images, prompt, **gen)

    def answer(self, images, questions, **gen):
        """Answer a question about each image ("Question: ... Answer:" prompts); returns strings.
        images: as caption(); questions: one string (or a one-element list), asked of every image, or
        one per image."""
        from .generation import answer

        return answer(self, images, questions, **gen)

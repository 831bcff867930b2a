"""The model runner: owns the KV cache tensors and turns scheduled sequences into model calls.

All tensor work of the engine lives here; the scheduler and block manager only do bookkeeping.
One K and one V pool per language-model layer, [num_blocks, block_size, H, D]; T5's cross-attention
K/V of the encoder output live in the same per-layer pools, in blocks owned by a per-request
"cross" sequence.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from collections import OrderedDict

import numpy as np
import torch

from ..models.greedy_head import ScreenedArgmax, screen_supported
from ..models.kv import AttnMeta


def image_digest(pixel_values: torch.Tensor) -> str:
    t = pixel_values.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha1(t.numpy().tobytes() + str(tuple(t.shape)).encode()).hexdigest()


def pad_tables(tables: list[list[int]], width: int) -> torch.Tensor:
    """Ragged block tables -> one zero-padded int32 [n, width] CPU tensor (numpy row fills are fast)."""
    a = np.zeros((len(tables), width), dtype=np.int32)
    for i, t in enumerate(tables):
        a[i, : len(t)] = t
    return torch.from_numpy(a)


def _greedy_head(model) -> ScreenedArgmax | None:
    """The model's screened greedy head, or None where the screen does not pay off. Built once per
    model and kept on it (a bf16 copy of the head plus its norms: about 1 s for OPT-2.7B's on 2 cores),
    not once per engine: `generate()` makes a new engine whenever it needs a bigger pool."""
    if screen_supported(model.lm.lm_head) is not None:  # also re-checks oneDNN being switched off
        return None
    if getattr(model, "_greedy_head", None) is None:
        model._greedy_head = ScreenedArgmax(model.lm.lm_head)
    return model._greedy_head


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, image_cache_size: int = 256, *,
                 max_model_len: int = 2048, max_num_seqs: int = 256, enforce_eager: bool = False):
        self.model = model
        self.lm = model.lm
        self.device, self.dtype = model.device, model.dtype
        self.block_size = block_size
        H, D = self.lm.kv_heads_dim
        shape = (num_blocks, block_size, H, D)
        self.caches = [(torch.zeros(shape, device=self.device, dtype=self.dtype),
                        torch.zeros(shape, device=self.device, dtype=self.dtype)) for _ in range(self.lm.num_layers)]
        self.t5 = model.is_encoder_decoder
        self._images: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.image_cache_size = image_cache_size
        self.images_encoded = 0  # how many images went through ViT + Q-Former (the rest were cache hits)
        # CUDA graphs for the decode step, one per batch-size bucket, captured on first use
        self.use_graphs = self.device.type == "cuda" and not enforce_eager
        self.table_width = math.ceil(max_model_len / block_size)
        self.buckets = sorted({1, 2, 4, max_num_seqs} | set(range(8, max_num_seqs + 8, 8)))
        self.buckets = [b for b in self.buckets if b <= max(max_num_seqs, 1)] or [1]
        self._graphs: dict[int, tuple] = {}
        self._graph_pool = None
        # exact greedy ids without the full fp32 head GEMM (CPU, fp32 heads, bf16-capable cores)
        self.greedy_head = _greedy_head(model)

    @staticmethod
    def bytes_per_block(model, block_size: int) -> int:
        H, D = model.lm.kv_heads_dim
        return 2 * model.lm.num_layers * block_size * H * D * torch.tensor([], dtype=model.dtype).element_size()

    # ---- images -------------------------------------------------------------------------------
    def image_inputs(self, items: list[tuple[str, torch.Tensor, bool]]) -> dict[str, torch.Tensor]:
        """(digest, pixel_values [3, H, W], interpolate) -> projected queries [Q, E]; new images run
        through the vision encoder and Q-Former as one batch per (size, interpolate) group."""
        out, todo = {}, {}
        for key, px, interp in items:
            if key in self._images:
                self._images.move_to_end(key)
                out[key] = self._images[key]
            else:
                todo.setdefault((tuple(px.shape), interp), {})[key] = px
        for (_, interp), group in todo.items():
            keys = list(group)
            batch = torch.stack([group[k] for k in keys]).to(self.device)
            feats = self.model.language_model_inputs(batch, interp)  # (B, Q, E)
            self.images_encoded += len(keys)
            for k, f in zip(keys, feats):
                out[k] = f
                self._images[k] = f
                while len(self._images) > self.image_cache_size:
                    self._images.popitem(last=False)
        return out

    # ---- helpers --------------------------------------------------------------------------------
    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate block src into dst in every layer's K and V pool."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.device)
        for k, v in self.caches:
            k[dst] = k[src]
            v[dst] = v[src]

    def _tables(self, tables: list[list[int]]) -> torch.Tensor:
        return pad_tables(tables, max(len(t) for t in tables)).to(self.device)

    def _prompt_embeds(self, prompt_ids: torch.Tensor, lm_inputs: torch.Tensor):
        """The prompt's LM embeddings with the image queries in place, as `Blip2.merge_prompt` lays
        them out; the image-token positions are found on the host (the engine validated the ids),
        so building a batch costs no device syncs."""
        img = self.model.cfg.image_token_id
        is_img = (prompt_ids == img) if img is not None else torch.zeros_like(prompt_ids, dtype=torch.bool)
        emb = self.lm.embed_tokens(prompt_ids.to(self.device, non_blocking=True))  # (S, E)
        lm_inputs = lm_inputs.to(emb.dtype)
        if not bool(is_img.any()):
            return torch.cat([lm_inputs, emb])  # no image tokens: the queries go first
        emb[is_img.nonzero()[:, 0].to(self.device)] = lm_inputs
        return emb

    # ---- prefill ------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, items: list[dict]) -> torch.Tensor:
        """Prefill a batch of sequences; returns the float32 logits of each one's last position [n, V].

        Each item: prompt_ids (1-D tensor, no padding), lm_inputs [Q, E], generated (list of ids whose
        KV is to be recomputed, after a preemption), slots (flat slot per LM token, -1 = already
        cached), and for T5: dec_start, cross_slots (per encoder token).
        """
        return self.lm.logits(self._prefill_hidden(items)).float()

    @torch.inference_mode()
    def prefill_greedy(self, items: list[dict], banned=None) -> list[int]:
        """`prefill` for sequences that only take the argmax (see `decode_greedy`): each one's next id."""
        assert self.greedy_head is not None
        return self.greedy_head(self.lm.head_input(self._prefill_hidden(items)), banned)

    def _prefill_hidden(self, items: list[dict]) -> torch.Tensor:
        """The prefill up to the LM head: each sequence's last hidden state [n, E]."""
        if self.t5:
            return self._prefill_t5(items)
        embs, cached = [], []
        for it in items:
            e = self._prompt_embeds(it["prompt_ids"], it["lm_inputs"])
            if it["generated"]:
                e = torch.cat([e, self.lm.embed_tokens(torch.tensor(it["generated"], device=self.device))])
            c = it.get("num_cached", 0)  # leading tokens whose KV is already in the blocks
            assert len(it["slots"]) == e.shape[0] and 0 <= c < e.shape[0]
            embs.append(e[c:])
            cached.append(c)
        n, S = len(embs), max(e.shape[0] for e in embs)
        E = embs[0].shape[1]
        x = torch.zeros(n, S, E, device=self.device, dtype=embs[0].dtype)
        pos = torch.full((n, S), -1, dtype=torch.long, device=self.device)
        mask = torch.zeros(n, S, dtype=torch.bool, device=self.device)
        slots = torch.full((n, S), -1, dtype=torch.long, device=self.device)
        for i, (e, c, it) in enumerate(zip(embs, cached, items)):
            L = e.shape[0]
            x[i, S - L:] = e  # left-padded, as transformers pads decoder-only prompts
            pos[i, S - L:] = torch.arange(c, c + L, device=self.device)
            mask[i, S - L:] = True
            slots[i, S - L:] = torch.tensor(it["slots"][c:], device=self.device)
        meta = AttnMeta(prefill=True, key_padding_mask=mask, slot_mapping=slots.view(-1))
        C = max(cached)
        if C:  # prefix-cache hits: attend to the cached K/V instead of recomputing it
            meta.ctx_len = C
            meta.block_tables = self._tables([it["table"] for it in items])
            meta.ctx_mask = torch.arange(C, device=self.device)[None, :] < torch.tensor(cached, device=self.device)[:, None]
        h = self.lm(x, pos, meta, self.caches)
        return h[:, -1]

    def _prefill_t5(self, items):
        embs = [self._prompt_embeds(it["prompt_ids"], it["lm_inputs"]) for it in items]
        n, Se = len(embs), max(e.shape[0] for e in embs)
        E = embs[0].shape[1]
        x = torch.zeros(n, Se, E, device=self.device, dtype=embs[0].dtype)
        emask = torch.zeros(n, Se, dtype=torch.bool, device=self.device)
        xslots = torch.full((n, Se), -1, dtype=torch.long, device=self.device)
        for i, (e, it) in enumerate(zip(embs, items)):
            L = e.shape[0]
            x[i, :L], emask[i, :L] = e, True
            xslots[i, :L] = torch.tensor(it["cross_slots"], device=self.device)
        enc = self.lm.encode(x, emask)
        decs = [[it["dec_start"]] + list(it["generated"]) for it in items]
        T = max(len(d) for d in decs)
        ids = torch.zeros(n, T, dtype=torch.long, device=self.device)
        dmask = torch.zeros(n, T, dtype=torch.bool, device=self.device)
        slots = torch.full((n, T), -1, dtype=torch.long, device=self.device)
        for i, (d, it) in enumerate(zip(decs, items)):
            ids[i, : len(d)] = torch.tensor(d, device=self.device)
            dmask[i, : len(d)] = True
            slots[i, : len(d)] = torch.tensor(it["slots"], device=self.device)
        meta = AttnMeta(prefill=True, key_padding_mask=dmask, slot_mapping=slots.view(-1),
                        cross_slot_mapping=xslots.view(-1), encoder_mask=emask)
        h = self.lm.decode(self.lm.embed_tokens(ids), enc, meta, self.caches, self.caches)
        last = torch.tensor([len(d) - 1 for d in decs], device=self.device)
        return h[torch.arange(n, device=self.device), last]

    # ---- decode -------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
               seq_lens: list[int], cross_tables=None, cross_lens=None) -> torch.Tensor:
        """One new token per sequence: returns float32 logits [n, V]."""
        n = len(tokens)
        if self.use_graphs and n <= self.buckets[-1] and max(len(t) for t in tables) <= self.table_width and (
                cross_tables is None or max(len(t) for t in cross_tables) <= self.table_width):
            try:
                return self._decode_graph(tokens, positions, slots, tables, seq_lens, cross_tables, cross_lens)
            except Exception as e:  # capture can fail on unusual setups; never lose the request over it
                warnings.warn(f"blip2_fast: CUDA graph capture failed ({type(e).__name__}: {e}); decoding eagerly", RuntimeWarning)
                self.use_graphs = False
        return self.lm.logits(self._eager_hidden(tokens, positions, slots, tables, seq_lens, cross_tables, cross_lens)).float()

    @torch.inference_mode()
    def decode_greedy(self, tokens: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
                      seq_lens: list[int], cross_tables=None, cross_lens=None, banned=None) -> list[int]:
        """One greedy step for sequences that only take the argmax (no sampling, no penalties):
        returns each one's next id; `banned[i]` ids are excluded for sequence i (min_new_tokens).
        Needs `greedy_head` (the CPU screen); the ids equal argmax of `decode`'s logits."""
        assert self.greedy_head is not None
        h = self._eager_hidden(tokens, positions, slots, tables, seq_lens, cross_tables, cross_lens)
        return self.greedy_head(self.lm.head_input(h), banned)

    def _eager_hidden(self, tokens, positions, slots, tables, seq_lens, cross_tables, cross_lens) -> torch.Tensor:
        width = max(len(t) for t in tables + (cross_tables or []))
        ins = self._inputs(len(tokens), width)
        self._fill(ins, tokens, positions, slots, tables, seq_lens, cross_tables, cross_lens)
        return self._hidden(ins)

    def _inputs(self, n: int, width: int) -> dict:
        dev = self.device
        ins = {"ids": torch.zeros(n, 1, dtype=torch.long, device=dev), "pos": torch.zeros(n, 1, dtype=torch.long, device=dev),
               "slots": torch.full((n,), -1, dtype=torch.long, device=dev),
               "tables": torch.zeros(n, width, dtype=torch.int32, device=dev),
               "lens": torch.ones(n, dtype=torch.int32, device=dev)}
        if self.t5:
            ins["xtables"] = torch.zeros(n, width, dtype=torch.int32, device=dev)
            ins["xlens"] = torch.ones(n, dtype=torch.int32, device=dev)
        return ins

    def _fill(self, ins, tokens, positions, slots, tables, seq_lens, cross_tables, cross_lens) -> None:
        """Copy one step's host-side inputs into (possibly static, larger) device buffers; rows past
        len(tokens) stay padding: slot -1 (nothing written) and a length-1 context."""
        n, W = len(tokens), ins["tables"].shape[1]
        pad = lambda ts: pad_tables(ts, W)  # noqa: E731
        ins["ids"][:n, 0].copy_(torch.tensor(tokens), non_blocking=True)
        ins["pos"][:n, 0].copy_(torch.tensor(positions), non_blocking=True)
        ins["slots"][:n].copy_(torch.tensor(slots), non_blocking=True)
        ins["slots"][n:] = -1
        ins["tables"][:n].copy_(pad(tables), non_blocking=True)
        ins["lens"][:n].copy_(torch.tensor(seq_lens, dtype=torch.int32), non_blocking=True)
        ins["lens"][n:] = 1
        if self.t5:
            ins["xtables"][:n].copy_(pad(cross_tables), non_blocking=True)
            ins["xlens"][:n].copy_(torch.tensor(cross_lens, dtype=torch.int32), non_blocking=True)
            ins["xlens"][n:] = 1

    def _forward(self, ins) -> torch.Tensor:
        return self.lm.logits(self._hidden(ins)).float()

    def _hidden(self, ins) -> torch.Tensor:
        """The decode step up to the LM head: [n, E]."""
        meta = AttnMeta(prefill=False, slot_mapping=ins["slots"], block_tables=ins["tables"], seq_lens=ins["lens"])
        emb = self.lm.embed_tokens(ins["ids"])  # (n, 1, E)
        if self.t5:
            meta.cross_block_tables, meta.cross_seq_lens = ins["xtables"], ins["xlens"]
            h = self.lm.decode(emb, None, meta, self.caches, self.caches)
        else:
            h = self.lm(emb, ins["pos"], meta, self.caches)
        return h[:, -1]

    def _decode_graph(self, tokens, positions, slots, tables, seq_lens, cross_tables, cross_lens) -> torch.Tensor:
        n = len(tokens)
        bucket = next(b for b in self.buckets if b >= n)
        if bucket not in self._graphs:
            ins = self._inputs(bucket, self.table_width)
            torch.cuda.synchronize()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):  # warm-up outside the graph: Triton compiles here, not in capture
                for _ in range(2):
                    self._forward(ins)
            torch.cuda.current_stream().wait_stream(s)
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._graph_pool):
                out = self._forward(ins)
            self._graphs[bucket] = (g, ins, out)
        g, ins, out = self._graphs[bucket]
        self._fill(ins, tokens, positions, slots, tables, seq_lens, cross_tables, cross_lens)
        g.replay()
        return out[:n].clone()

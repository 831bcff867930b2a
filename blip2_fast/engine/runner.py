"""The model runner: owns the KV cache tensors and turns scheduled sequences into model calls.

All tensor work of the engine lives here; the scheduler and block manager only do bookkeeping.
One K and one V pool per language-model layer, [num_blocks, block_size, H, D]; T5's cross-attention
K/V of the encoder output live in the same per-layer pools, in blocks owned by a per-request
"cross" sequence.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from ..models.kv import AttnMeta


def image_digest(pixel_values: torch.Tensor) -> str:
    t = pixel_values.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha1(t.numpy().tobytes() + str(tuple(t.shape)).encode()).hexdigest()


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, image_cache_size: int = 256):
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
        width = max(len(t) for t in tables)
        return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=self.device)

    def _prompt_embeds(self, prompt_ids: torch.Tensor, lm_inputs: torch.Tensor):
        ids = prompt_ids.to(self.device)[None]
        emb, _, _ = self.model.merge_prompt(ids, torch.ones_like(ids), lm_inputs[None])
        return emb[0]  # (S, E)

    # ---- prefill ------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, items: list[dict]) -> torch.Tensor:
        """Prefill a batch of sequences; returns the float32 logits of each one's last position [n, V].

        Each item: prompt_ids (1-D tensor, no padding), lm_inputs [Q, E], generated (list of ids whose
        KV is to be recomputed, after a preemption), slots (flat slot per LM token, -1 = already
        cached), and for T5: dec_start, cross_slots (per encoder token).
        """
        if self.t5:
            return self._prefill_t5(items)
        embs = []
        for it in items:
            e = self._prompt_embeds(it["prompt_ids"], it["lm_inputs"])
            if it["generated"]:
                e = torch.cat([e, self.lm.embed_tokens(torch.tensor(it["generated"], device=self.device))])
            embs.append(e)
        n, S = len(embs), max(e.shape[0] for e in embs)
        E = embs[0].shape[1]
        x = torch.zeros(n, S, E, device=self.device, dtype=embs[0].dtype)
        pos = torch.full((n, S), -1, dtype=torch.long, device=self.device)
        mask = torch.zeros(n, S, dtype=torch.bool, device=self.device)
        slots = torch.full((n, S), -1, dtype=torch.long, device=self.device)
        for i, (e, it) in enumerate(zip(embs, items)):
            L = e.shape[0]
            assert len(it["slots"]) == L
            x[i, S - L:] = e  # left-padded, as transformers pads decoder-only prompts
            pos[i, S - L:] = torch.arange(L, device=self.device)
            mask[i, S - L:] = True
            slots[i, S - L:] = torch.tensor(it["slots"], device=self.device)
        meta = AttnMeta(prefill=True, key_padding_mask=mask, slot_mapping=slots.view(-1))
        h = self.lm(x, pos, meta, self.caches)
        return self.lm.logits(h[:, -1]).float()

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
        return self.lm.logits(h[torch.arange(n, device=self.device), last]).float()

    # ---- decode -------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, tokens: list[int], positions: list[int], slots: list[int], tables: list[list[int]],
               seq_lens: list[int], cross_tables=None, cross_lens=None) -> torch.Tensor:
        """One new token per sequence: returns float32 logits [n, V]."""
        dev = self.device
        ids = torch.tensor(tokens, dtype=torch.long, device=dev)[:, None]  # (n, 1)
        meta = AttnMeta(prefill=False, slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
                        block_tables=self._tables(tables), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev))
        if self.t5:
            meta.cross_block_tables = self._tables(cross_tables)
            meta.cross_seq_lens = torch.tensor(cross_lens, dtype=torch.int32, device=dev)
            h = self.lm.decode(self.lm.embed_tokens(ids), None, meta, self.caches, self.caches)
        else:
            pos = torch.tensor(positions, dtype=torch.long, device=dev)[:, None]
            h = self.lm(self.lm.embed_tokens(ids), pos, meta, self.caches)
        return self.lm.logits(h[:, -1]).float()

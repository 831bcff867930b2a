"""The model runner: owns the KV cache, the image cache and the CUDA graphs, and turns a scheduled
batch into model calls. All of the engine's tensor work happens here and in the sampler.

`prepare_prefill` / `prepare_decode` turn a batch into one flat input struct (`PrefillInputs`,
`DecodeInputs`) whose index tensors come from the step's one `Staging` copy; `prefill` / `decode`
run the model on it. One K and one V pool per language-model layer, [num_blocks, block_size, H, D];
T5's cross-attention K/V of the encoder output live in the same pools, in blocks of a per-request
"cross" sequence.

On a GPU the decode step replays CUDA graphs, one per batch-size bucket, all captured when the
runner is built (never while serving). A capture that fails raises with its reason; a replay that
fails fails the step (the engine then fails its requests), it never turns the runner eager.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import time
import weakref
from collections import OrderedDict

import numpy as np
import torch

from ..layers import AttnMeta
from ..models.greedy_head import ScreenedArgmax, screen_supported
from .scheduler import DecodeBatch
from .staging import Staging, inference

MAX_GRAPH_BATCH = 512  # decode batches above this run eagerly (capture time and graph memory grow with it)


def image_digest(pixel_values: torch.Tensor) -> str:
    t = pixel_values.detach().to("cpu", torch.float32).contiguous()
    # hashed from the tensor's own buffer (no bytes copy; hashlib drops the GIL for it), then the shape
    h = hashlib.sha1(t.numpy())
    h.update(str(tuple(t.shape)).encode())
    return h.hexdigest()


_screens: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _greedy_head(model) -> ScreenedArgmax | None:
    """The model's screened greedy head, or None where the screen does not pay off. Built once per
    model (a bf16 copy of the head plus its norms: about 1 s for OPT-2.7B's on 2 cores), not once
    per engine: `generate()` makes a new engine whenever it needs a bigger pool."""
    if screen_supported(model.lm.lm_head) is not None:  # also re-checks oneDNN being switched off
        return None
    if model not in _screens:  # keyed weakly by the model; the screen holds only its head weight
        _screens[model] = ScreenedArgmax(model.lm.lm_head)
    return _screens[model]


@dataclasses.dataclass
class PrefillItem:
    """One sequence to prefill. Decoder-only: `tokens` are every LM position's id (-1: an image
    query, filled from `features` in order), the prompt then any generated tokens to recompute; the
    first `num_cached` already have KV in the blocks. Encoder-decoder: `tokens` are the encoder's,
    `dec_tokens` the decoder's (start token + recomputed tokens); `cross_table` holds the encoder
    K/V, of which the first `cross_cached` positions are cached."""

    tokens: list[int]
    features: torch.Tensor  # [Q, E] projected image queries
    block_table: list[int]
    num_cached: int = 0
    dec_tokens: list[int] | None = None
    cross_table: list[int] | None = None
    cross_cached: int = 0


@dataclasses.dataclass
class PrefillInputs:
    ids: torch.Tensor  # [n, S] LM (T5: encoder) token ids, 0 at image positions and padding (int32)
    positions: torch.Tensor | None  # [n, S] decoder-only positions (-1: padding)
    image_index: torch.Tensor | None  # flat [n*S] index of every image position ...
    features: torch.Tensor | None  # ... and its query embedding, [m, E]
    meta: AttnMeta
    dec_ids: torch.Tensor | None = None  # T5: [n, T] decoder ids
    last: torch.Tensor | None = None  # T5: [n] last decoder position of each row


@dataclasses.dataclass
class DecodeInputs:
    n: int  # real rows; rows past it (a graph bucket's padding) write nothing and are ignored
    ids: torch.Tensor  # [b, 1]
    positions: torch.Tensor  # [b, 1]
    meta: AttnMeta


class ImageCache:
    """Projected image queries by image digest, least recently used evicted; hit / miss counters."""

    def __init__(self, size: int):
        self.size = size
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key):
        f = self.entries.get(key)
        if f is not None:
            self.entries.move_to_end(key)
        return f

    def put(self, key, f) -> None:
        self.entries[key] = f
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, *, max_model_len: int, max_num_seqs: int,
                 enforce_eager: bool = False, image_cache_size: int = 256, image_batch: int = 32):
        self.model, self.lm = model, model.lm
        self.device, self.dtype = model.device, model.dtype
        self.block_size = block_size
        self.t5 = model.is_encoder_decoder
        H, D = self.lm.kv_heads_dim
        shape = (num_blocks, block_size, H, D)
        self.caches = [(torch.zeros(shape, device=self.device, dtype=self.dtype),
                        torch.zeros(shape, device=self.device, dtype=self.dtype)) for _ in range(self.lm.num_layers)]
        # T5's decode self-attention bias by distance, for every length this engine serves
        self.rel_table = self.lm.decoder_rel_table(max_model_len) if self.t5 else None
        self.table_width = math.ceil(max_model_len / block_size)
        self.images = ImageCache(image_cache_size)
        self.image_batch = image_batch
        self.images_encoded = 0  # how many images went through ViT + Q-Former (the rest were cache hits)
        self._encode_times: list = []  # (start, end) CUDA events or wall seconds, drained by `encode_seconds`
        self.buckets = sorted({1, 2, 4} | set(range(8, MAX_GRAPH_BATCH + 1, 8)))
        self.buckets = sorted({b for b in self.buckets if b < max_num_seqs} | {min(max_num_seqs, MAX_GRAPH_BATCH)})
        # the largest graph bucket's decode inputs must sit in the staging's first buffer (graphs read it)
        graph_words = self.buckets[-1] * (4 + self.table_width * (2 if self.t5 else 1) + (1 if self.t5 else 0))
        self.staging = Staging(self.device, max(1 << 16, 2 * graph_words))
        # exact greedy ids without the full fp32 head GEMM (CPU, fp32 heads, bf16-capable cores)
        self.greedy_head = _greedy_head(model)
        self.use_graphs = self.device.type == "cuda" and not enforce_eager
        self._graphs: dict[int, tuple] = {}
        self._decode_memo = None  # the last decode layout: reused while the batch stays the same
        self.graph_captures = 0  # CUDA graphs captured: all of them while the runner is built
        self.graph_replays = 0
        if self.use_graphs:
            self._capture_graphs()

    @staticmethod
    def bytes_per_block(model, block_size: int) -> int:
        H, D = model.lm.kv_heads_dim
        return 2 * model.lm.num_layers * block_size * H * D * torch.tensor([], dtype=model.dtype).element_size()

    # ---- images -------------------------------------------------------------------------------
    @inference
    def image_features(self, items: list[tuple[str, torch.Tensor, bool]]) -> dict[str, torch.Tensor]:
        """(digest, pixel_values [3, H, W], interpolate) -> projected queries [Q, E]; new images run
        through the vision encoder and Q-Former in batches of at most `image_batch` per (size, interpolate)."""
        out, todo = {}, {}
        for key, px, interp in items:
            if key in out or key in todo.get((tuple(px.shape), interp), {}):
                continue
            f = self.images.get(key)
            if f is not None:
                self.images.hits += 1
                out[key] = f
            else:
                todo.setdefault((tuple(px.shape), interp), {})[key] = px
        for (_, interp), group in todo.items():
            keys = list(group)
            for s in range(0, len(keys), self.image_batch):
                chunk = keys[s: s + self.image_batch]
                t0 = self._clock()
                batch = torch.stack([group[k] for k in chunk]).to(self.device, non_blocking=True)
                feats = self.model.language_model_inputs(batch, interp)  # (B, Q, E)
                self._encode_times.append((t0, self._clock()))
                self.images.misses += len(chunk)
                self.images_encoded += len(chunk)
                for k, f in zip(chunk, feats):
                    out[k] = f
                    self.images.put(k, f)
        return out

    def _clock(self):
        if self.device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def encode_seconds(self) -> tuple[float, ...]:
        """Wall time of each image-encode batch since the last call; never waits for the device (a
        batch still running on the GPU is reported by a later call)."""
        done, pending = [], []
        for a, b in self._encode_times:
            if isinstance(a, float):
                done.append(b - a)
            elif b.query():
                done.append(a.elapsed_time(b) / 1e3)
            else:
                pending.append((a, b))
        self._encode_times = pending
        return tuple(done)

    # ---- cache ----------------------------------------------------------------------------------
    def prepare_copies(self, pairs: list[tuple[int, int]]):
        """Copy-on-write pairs (src, dst) into the step's staging: (src, dst) device index views."""
        if not pairs:
            return None
        a = np.asarray(pairs, dtype=np.int32)
        return self.staging.add(a[:, 0]), self.staging.add(a[:, 1])

    @inference
    def copy_blocks(self, copies) -> None:
        """Copy-on-write (after the staging was sent): duplicate block src into dst in every layer's K
        and V pool; `copies` from `prepare_copies`."""
        if copies is None:
            return
        src, dst = copies[0].long(), copies[1].long()
        for k, v in self.caches:
            k[dst] = k[src]
            v[dst] = v[src]

    def _slots(self, table: list[int], start: int, end: int) -> np.ndarray:
        t = np.asarray(table, dtype=np.int64)
        p = np.arange(start, end)
        return t[p // self.block_size] * self.block_size + p % self.block_size

    # ---- prefill ------------------------------------------------------------------------------
    def prepare_prefill(self, items: list[PrefillItem]) -> PrefillInputs:
        """Lay a prefill batch out on the host and add it to the step's staging (sent by the caller)."""
        if self.t5:
            return self._prepare_prefill_t5(items)
        st = self.staging
        n = len(items)
        S = max(len(it.tokens) - it.num_cached for it in items)
        C = max(it.num_cached for it in items)
        ids = np.zeros((n, S), np.int32)
        pos = np.full((n, S), -1, np.int32)
        slots = np.full((n, S), -1, np.int32)
        key_slots = np.zeros((n, C + S), np.int32) if C else None
        img, feats = [], []
        for i, it in enumerate(items):
            c, L = it.num_cached, len(it.tokens)
            assert 0 <= c < L, (c, L)
            tok = np.asarray(it.tokens, dtype=np.int32)
            a = S - (L - c)  # left-padded, as transformers pads decoder-only prompts
            ids[i, a:] = np.maximum(tok[c:], 0)
            pos[i, a:] = np.arange(c, L)
            slots[i, a:] = self._slots(it.block_table, c, L)
            if C:  # prefix-cache hits: attend to every key (the cached ones and these) from the blocks
                key_slots[i, :c] = self._slots(it.block_table, 0, c)
                key_slots[i, C + a:] = slots[i, a:]
            where = np.nonzero(tok < 0)[0]
            q = np.arange(len(where))
            keep = where >= c
            img.append(i * S + a + where[keep] - c)
            feats.append(_rows(it.features, q[keep]))
        mask = pos >= 0
        img = np.concatenate(img)
        meta = AttnMeta(prefill=True, key_padding_mask=st.add(mask.astype(np.int32)), slot_mapping=st.add(slots.reshape(-1)))
        if C:
            km = np.concatenate([np.arange(C)[None, :] < np.array([it.num_cached for it in items])[:, None], mask], 1)
            meta.key_slots, meta.key_mask = st.add(key_slots), st.add(km.astype(np.int32))
        return PrefillInputs(st.add(ids), st.add(pos), st.add(img) if img.size else None,
                             torch.cat([f for f in feats if f.shape[0]]) if img.size else None, meta)

    def _prepare_prefill_t5(self, items: list[PrefillItem]) -> PrefillInputs:
        st = self.staging
        n = len(items)
        Se = max(len(it.tokens) for it in items)
        T = max(len(it.dec_tokens) for it in items)
        ids = np.zeros((n, Se), np.int32)
        emask = np.zeros((n, Se), np.int32)
        xslots = np.full((n, Se), -1, np.int32)
        dec = np.zeros((n, T), np.int32)
        dmask = np.zeros((n, T), np.int32)
        dslots = np.full((n, T), -1, np.int32)
        img, feats = [], []
        for i, it in enumerate(items):
            tok = np.asarray(it.tokens, dtype=np.int32)
            L, c = len(tok), it.cross_cached
            ids[i, :L], emask[i, :L] = np.maximum(tok, 0), 1
            xslots[i, c:L] = self._slots(it.cross_table, c, L)  # cached encoder K/V are never rewritten
            d = it.dec_tokens
            dec[i, : len(d)], dmask[i, : len(d)] = d, 1
            dslots[i, it.num_cached: len(d)] = self._slots(it.block_table, it.num_cached, len(d))
            where = np.nonzero(tok < 0)[0]
            img.append(i * Se + where)
            feats.append(_rows(it.features, np.arange(len(where))))
        img = np.concatenate(img)
        meta = AttnMeta(prefill=True, key_padding_mask=st.add(dmask), slot_mapping=st.add(dslots.reshape(-1)),
                        cross_slot_mapping=st.add(xslots.reshape(-1)), encoder_mask=st.add(emask))
        return PrefillInputs(st.add(ids), None, st.add(img) if img.size else None,
                             torch.cat([f for f in feats if f.shape[0]]) if img.size else None, meta,
                             st.add(dec), st.add(dmask.sum(1) - 1))

    @inference
    def prefill(self, inp: PrefillInputs) -> torch.Tensor:
        """Run a prefill (after the staging was sent): each sequence's last hidden state [n, E]."""
        meta = dataclasses.replace(inp.meta)  # the masks travelled as int32
        for name in ("key_padding_mask", "key_mask", "encoder_mask"):
            if getattr(meta, name) is not None:
                setattr(meta, name, getattr(meta, name).bool())
        emb = self.lm.embed_tokens(inp.ids)  # (n, S, E)
        if inp.image_index is not None:
            E = emb.shape[-1]
            emb.view(-1, E).index_copy_(0, inp.image_index.long(), inp.features.to(emb.dtype))
        if self.t5:
            enc = self.lm.encode(emb, meta.encoder_mask)
            h = self.lm.decode(self.lm.embed_tokens(inp.dec_ids), enc, meta, self.caches, self.caches)
            return h[torch.arange(h.shape[0], device=h.device), inp.last.long()]
        return self.lm(emb, inp.positions, meta, self.caches)[:, -1]

    # ---- decode -------------------------------------------------------------------------------
    def prepare_decode(self, batch) -> DecodeInputs:
        """Lay a decode batch out (a `DecodeBatch`: one row per sequence, its token at its position,
        written to its slot) and add it to the step's staging, first (a CUDA graph reads these offsets)."""
        seqs = batch.seqs
        n = len(seqs)
        rows, W, changed = self._table_rows(seqs)
        if self.t5:
            W = max(W, max(len(s.request.cross.block_table) for s in seqs))
        b = n
        if self.use_graphs and n <= self.buckets[-1] and W <= self.table_width:
            b, W = next(x for x in self.buckets if x >= n), self.table_width
        return self._decode_layout(batch, b, W, rows, changed)

    def _decode_layout(self, batch, b: int, W: int, rows=None, changed: bool = True) -> DecodeInputs:
        st = self.staging
        seqs = batch.seqs
        n = len(seqs)
        memo = self._decode_memo
        if memo is not None and st.owner is memo and memo[0] == (b, W) and st.offset == (0, 0) and memo[1] == seqs:
            # the same sequences as the last step: rewrite the inputs where they are, keep the views
            _, _, cols, tables, words, inp = memo
            cols[0, :n], cols[1, :n], cols[2, :n] = batch.tokens, batch.positions, batch.slots
            cols[3, :n] = cols[1, :n] + 1
            if changed:
                tables[:n] = np.concatenate(rows).reshape(n, -1)[:, :W]
            st.skip(words)
            return inp
        start = st.offset
        cols_a = np.zeros((4, b), np.int32)  # ids, positions, slots, lengths: one staging entry
        cols_a[2], cols_a[3] = -1, 1  # padding rows (a graph bucket's) write nothing and attend to one key
        tables_a = np.zeros((b, W), np.int32)
        if n:
            cols_a[0, :n], cols_a[1, :n], cols_a[2, :n] = batch.tokens, batch.positions, batch.slots
            cols_a[3, :n] = cols_a[1, :n] + 1
            if W <= self.table_width:
                tables_a[:n] = np.concatenate(rows).reshape(n, -1)[:, :W]
            else:  # wider than any self-attention table: T5's cross tables of a long prompt
                _fill_rows(tables_a, [s.block_table for s in seqs])
        cols, c = st.add_np(cols_a)
        tables, t = st.add_np(tables_a)
        meta = AttnMeta(prefill=False, slot_mapping=c[2], seq_lens=c[3], block_tables=t, rel_bias=self.rel_table)
        inp = DecodeInputs(n, c[0].view(b, 1), c[1].view(b, 1), meta)
        if self.t5:
            xt = np.zeros((b, W), np.int32)
            xl = np.ones(b, np.int32)
            if n:
                _fill_rows(xt, [s.request.cross.block_table for s in seqs])
                xl[:n] = [s.request.n_prompt for s in seqs]
            meta.cross_block_tables, meta.cross_seq_lens = st.add(xt), st.add(xl)
            self._decode_memo = None  # cross tables are rebuilt every step (T5)
        elif start == (0, 0) and st.cur == 0 and n:
            self._decode_memo = st.owner = ((b, W), list(seqs), cols, tables, st.offset[1], inp)
        return inp

    def _table_rows(self, seqs: list) -> tuple[list[np.ndarray], int, bool]:
        """Every sequence's block table as an int32 row of table_width, the longest table, and whether
        any changed since it was last read. Each sequence keeps its row (`Sequence.table_row`),
        rebuilt only when the table changed (a new block, or a copy-on-write of the last one), so a
        decode step copies rows in C instead of every block id in Python."""
        rows, W, tw, changed = [], 1, self.table_width, False
        for s in seqs:
            t, c = s.block_table, s.table_row
            m = len(t)
            if c is None or s.table_row_len != m or c[m - 1] != t[-1]:
                c = np.zeros(max(tw, m), np.int32)
                c[:m] = t
                s.table_row, s.table_row_len = c, m
                changed = True
            rows.append(c)
            if m > W:
                W = m
        return rows, W, changed

    @inference
    def decode(self, inp: DecodeInputs, hidden: bool = False) -> torch.Tensor:
        """One new token per sequence (after the staging was sent): float32 logits [n, V], or with
        `hidden` the final hidden states [n, E] (for the greedy screen; never on graphs)."""
        b = inp.ids.shape[0]
        if not hidden and b in self._graphs and self._graphs[b][1].meta.block_tables.shape == inp.meta.block_tables.shape:
            g, _, out = self._graphs[b]
            g.replay()  # a failure raises: the engine fails this step's requests, graphs stay on
            self.graph_replays += 1
            return out[: inp.n]
        if hidden:
            return self.hidden_decode(inp)[: inp.n]
        return self.forward_decode(inp)[: inp.n]

    def hidden_decode(self, inp: DecodeInputs) -> torch.Tensor:
        """The decode step up to the LM head: [b, E]."""
        emb = self.lm.embed_tokens(inp.ids)  # (b, 1, E)
        if self.t5:
            h = self.lm.decode(emb, None, inp.meta, self.caches, self.caches)
        else:
            h = self.lm(emb, inp.positions, inp.meta, self.caches)
        return h[:, -1]

    def forward_decode(self, inp: DecodeInputs) -> torch.Tensor:
        """The whole decode step, the function a CUDA graph captures: float32 logits [b, V]."""
        return self.lm.logits(self.hidden_decode(inp)).float()

    def _capture_graphs(self) -> None:
        """Capture the decode step for every bucket now, largest first (they share one memory pool)."""
        pool = torch.cuda.graph_pool_handle()
        with torch.inference_mode():
            for b in sorted(self.buckets, reverse=True):
                try:
                    st = self.staging
                    st.reset()
                    inp = self._decode_layout(DecodeBatch([], [], [], []), b, self.table_width)
                    self._decode_memo = None
                    st.send()
                    torch.cuda.synchronize()
                    s = torch.cuda.Stream()
                    s.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(s):  # warm-up outside the graph: Triton compiles here, not in capture
                        for _ in range(2):
                            self.forward_decode(inp)
                    torch.cuda.current_stream().wait_stream(s)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool):
                        out = self.forward_decode(inp)
                    torch.cuda.synchronize()
                except Exception as e:
                    raise RuntimeError(f"CUDA graph capture of the decode step failed for batch size {b}: "
                                       f"{type(e).__name__}: {e}. Engine(..., enforce_eager=True) runs without "
                                       "CUDA graphs") from e
                self._graphs[b] = (g, inp, out)
                self.graph_captures += 1
        self.staging.reset()


def _fill_rows(out: np.ndarray, rows: list[list[int]]) -> None:
    """Ragged int rows into the leading rows of the zeroed 2-D `out`, in a few numpy calls (not one per row)."""
    lens = np.fromiter(map(len, rows), np.int64, len(rows))
    flat = np.fromiter(itertools.chain.from_iterable(rows), np.int32, int(lens.sum()))
    out[: len(rows)][np.arange(out.shape[1])[None, :] < lens[:, None]] = flat  # row-major: rows in order


def _rows(f: torch.Tensor, q: np.ndarray) -> torch.Tensor:
    """f[q] without a host-to-device index when q is a contiguous range (always, for BLIP-2 prompts)."""
    if q.size == 0:
        return f[:0]
    if q[-1] - q[0] + 1 == q.size:
        return f[int(q[0]): int(q[-1]) + 1]
    return f[torch.from_numpy(q).to(f.device)]

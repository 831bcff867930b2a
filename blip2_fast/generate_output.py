"""`generate(return_dict_in_generate=True)`: the engine's per-request results as transformers'
output classes (GenerateDecoderOnlyOutput / GenerateEncoderDecoderOutput, and the Beam variants).

transformers decodes the whole batch in lockstep, so its per-step `scores` / `logits` are
[batch x beams, vocab] for as many steps as the longest row took. The engine keeps each request's
own steps; here they are stacked per step. A row that had already finished (it stopped earlier)
gets a filler row at that step: 0 for the pad token and -inf elsewhere, i.e. "it continues with pad
for certain" (transformers fills those rows with scores computed on the pad token instead).
"""
from __future__ import annotations

import math

import torch


def _stack(per_row: list[tuple | None], rows_each: int, V: int, pad: int, device) -> tuple | None:
    """per_row: each request's steps ([rows_each, V] tensors); -> one [n_req * rows_each, V] per step."""
    if any(s is None for s in per_row):
        return None
    T = max((len(s) for s in per_row), default=0)
    filler = torch.full((rows_each, V), -math.inf)
    if 0 <= pad < V:
        filler[:, pad] = 0.0
    steps = []
    for t in range(T):
        steps.append(torch.cat([s[t] if t < len(s) else filler for s in per_row]).to(device))
    return tuple(steps)


def generate_output(model, sequences: torch.Tensor, finals: list, p, pad: int, width: int):
    """finals: the engine's final RequestOutput per request, in generate()'s row order; width: the
    generated columns of `sequences`."""
    from transformers.generation import (GenerateBeamDecoderOnlyOutput, GenerateBeamEncoderDecoderOutput,
                                         GenerateDecoderOnlyOutput, GenerateEncoderDecoderOutput)

    V, dev = model.cfg.lm.vocab, model.device
    k = p.num_beams
    scores = _stack([o.scores for o in finals], k, V, pad, dev) if p.output_scores else None
    logits = _stack([o.logits for o in finals], k, V, pad, dev) if p.output_logits else None
    if k == 1:
        cls = GenerateEncoderDecoderOutput if model.is_encoder_decoder else GenerateDecoderOnlyOutput
        return cls(sequences=sequences, scores=scores, logits=logits)
    n_ret = p.num_return_sequences
    seq_scores = torch.tensor([s for o in finals for s in o.candidate_scores[:n_ret]], dtype=torch.float32)
    idx = torch.full((len(finals) * n_ret, width), -1, dtype=torch.int32)  # as transformers
    for i, o in enumerate(finals):  # transformers numbers the beams across the batch: row i's are i*k .. i*k+k-1
        for j, b in enumerate(o.beam_indices[:n_ret]):
            idx[i * n_ret + j, : len(b)] = torch.tensor(b, dtype=torch.int32) + i * k
    cls = GenerateBeamEncoderDecoderOutput if model.is_encoder_decoder else GenerateBeamDecoderOnlyOutput
    return cls(sequences=sequences, sequences_scores=seq_scores.to(dev) if p.output_scores else None, scores=scores,
               logits=logits, beam_indices=idx.to(dev))

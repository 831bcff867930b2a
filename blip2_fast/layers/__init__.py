"""Reusable model layers: weights as parameters (`params`), the linear layer every model applies
(`linear`), and the paged-attention layer shared by OPT's and T5's decoders (`attention`)."""
from .attention import AttnMeta, PagedAttention
from .linear import Linear, lm_head, pack_linears
from .params import concat_param, take_param

__all__ = ["AttnMeta", "PagedAttention", "Linear", "lm_head", "pack_linears", "take_param", "concat_param"]

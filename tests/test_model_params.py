"""Weights are nn.Module parameters: state_dict() and parameters() see every one, each names the
checkpoint tensors it was built from, and placement stays fixed at load."""
import pytest
import torch
from safetensors.torch import load_file

import blip2_fast
from blip2_fast.presets import weight_bytes


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_state_dict_lists_every_checkpoint_tensor(ckpt, lm):
    d, hf = ckpt(lm)
    m = blip2_fast.load(d, backend="reference")
    sd = m.state_dict()
    keys = m.checkpoint_keys()
    assert set(sd) == set(keys) and len(sd) > 50
    used = {k for ks in keys.values() for k in ks}
    ckpt_keys = set(load_file(str(d / "model.safetensors")))
    assert used <= ckpt_keys
    # every checkpoint tensor the model reads is a parameter (transformers' tied or unused buffers aside)
    assert not {k for k in ckpt_keys - used if "position_ids" not in k and "lm_head" not in k}
    params = list(m.parameters())
    assert all(isinstance(p, torch.nn.Parameter) and not p.requires_grad for p in params)
    assert sum(p.numel() for p in params) == sum(t.numel() for t in {t.data_ptr(): t for t in sd.values()}.values())
    assert weight_bytes(m) == sum(p.numel() * p.element_size() for p in params)
    # a plain tensor is stored as it is in the checkpoint; fused ones as their parts stacked
    full = load_file(str(d / "model.safetensors"))
    for name, src in keys.items():
        if len(src) == 1 and sd[name].shape == full[src[0]].shape and "q_proj" not in src[0]:
            assert torch.equal(sd[name], full[src[0]].float()), name
    with pytest.raises(TypeError, match="placed when it is loaded"):
        m.half()


def test_fused_parameters_name_their_parts(ckpt):
    d, hf = ckpt("opt")
    m = blip2_fast.load(d, backend="reference")
    keys = m.checkpoint_keys()
    qkv = keys["lm.blocks.0.qkv.weight"]
    assert [k.rsplit(".", 2)[-2] for k in qkv] == ["q_proj", "k_proj", "v_proj"]
    E = hf.config.text_config.hidden_size
    H = hf.config.text_config.num_attention_heads
    attn = hf.language_model.model.decoder.layers[0].self_attn
    want = torch.cat([attn.q_proj.weight * (E // H) ** -0.5, attn.k_proj.weight, attn.v_proj.weight])
    assert torch.allclose(m.state_dict()["lm.blocks.0.qkv.weight"], want)
    assert keys["lm.lm_head"] == keys["lm.embed"]  # tied: one tensor under both names

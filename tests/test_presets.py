"""Presets: every config parses with the real checkpoints' sizes; the tiny ones build and generate on CPU.

The big presets are never instantiated here (ViT-g + OPT-2.7B is 3.8B parameters).
"""
import pytest
import torch

from blip2_fast import config
from blip2_fast.config import OPTConfig, T5Config
from blip2_fast.presets import list_presets, load_preset, preset_config, weight_bytes

BIG = ["blip2-opt-2.7b", "blip2-opt-6.7b", "blip2-flan-t5-xl", "blip2-flan-t5-xxl", "blip2-itm-vit-g"]
TINY = ["blip2-opt-tiny", "blip2-t5-tiny"]


def test_list_presets():
    names = list_presets()
    for n in BIG + TINY + ["blip2-cpu-mid"]:
        assert n in names, (n, names)


@pytest.mark.parametrize("name", list_presets())
def test_parses(name):
    cfg = config.parse(preset_config(name))
    assert cfg.vision.hidden % cfg.vision.heads == 0
    assert cfg.qformer.encoder_hidden == cfg.vision.hidden


@pytest.mark.parametrize("name", BIG)
def test_big_vision_and_qformer(name):
    cfg = config.parse(preset_config(name))
    v, q = cfg.vision, cfg.qformer
    assert (v.hidden, v.layers, v.heads, v.mlp, v.image_size, v.patch, v.eps, v.qkv_bias) == (1408, 39, 16, 6144, 224, 14, 1e-6, True)
    assert v.num_patches + 1 == 257
    assert (q.hidden, q.layers, q.heads, q.mlp, q.cross_every, q.encoder_hidden, q.vocab) == (768, 12, 12, 3072, 2, 1408, 30523)
    assert cfg.num_query_tokens == 32


@pytest.mark.parametrize("name,hidden,ffn", [("blip2-opt-2.7b", 2560, 10240), ("blip2-opt-6.7b", 4096, 16384)])
def test_big_opt(name, hidden, ffn):
    cfg = config.parse(preset_config(name))
    lm = cfg.lm
    assert isinstance(lm, OPTConfig) and cfg.architecture == "Blip2ForConditionalGeneration"
    assert (lm.hidden, lm.layers, lm.heads, lm.ffn, lm.vocab, lm.max_positions) == (hidden, 32, 32, ffn, 50304, 2048)
    assert (lm.eos_token_id, lm.bos_token_id, lm.pad_token_id, cfg.image_token_id) == (50118, 2, 1, 50265)
    assert lm.pre_norm and lm.final_norm and lm.act == "relu"


@pytest.mark.parametrize("name,d_model,heads,d_ff", [("blip2-flan-t5-xl", 2048, 32, 5120), ("blip2-flan-t5-xxl", 4096, 64, 10240)])
def test_big_t5(name, d_model, heads, d_ff):
    lm = config.parse(preset_config(name)).lm
    assert isinstance(lm, T5Config)
    assert (lm.d_model, lm.d_kv, lm.heads, lm.d_ff, lm.enc_layers, lm.dec_layers, lm.vocab) == (d_model, 64, heads, d_ff, 24, 24, 32128)
    assert lm.gated and (lm.eos_token_id, lm.pad_token_id, lm.decoder_start_token_id) == (1, 0, 0)
    # Flan-T5 unties the LM head (transformers 5 reports this as scale_decoder_outputs=False)
    assert preset_config(name)["text_config"]["tie_word_embeddings"] is False and not lm.scale_decoder_outputs


def test_itm():
    cfg = config.parse(preset_config("blip2-itm-vit-g"))
    assert cfg.architecture == "Blip2ForImageTextRetrieval"
    assert cfg.qformer.use_text_input and cfg.image_text_hidden == 256


def test_cpu_mid_sizes():
    cfg = config.parse(preset_config("blip2-cpu-mid"))
    assert cfg.vision.num_patches + 1 == 257 and (cfg.vision.hidden, cfg.vision.heads, cfg.vision.layers) == (384, 6, 4)
    assert (cfg.qformer.hidden, cfg.qformer.layers, cfg.qformer.heads, cfg.num_query_tokens) == (256, 4, 4, 32)
    assert (cfg.lm.hidden, cfg.lm.heads, cfg.lm.layers, cfg.lm.ffn, cfg.lm.vocab) == (512, 8, 6, 2048, 50304)


def test_hf_config_accepts_presets():
    from transformers import Blip2Config

    for name in list_presets():
        hf = Blip2Config(**preset_config(name))
        assert hf.num_query_tokens == config.parse(preset_config(name)).num_query_tokens


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        load_preset("blip2-nope")


@pytest.mark.parametrize("name", TINY)
def test_tiny_generates(name):
    model = load_preset(name, device="cpu", dtype=torch.float32, backend="reference", seed=3)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    d = model.generation_defaults
    assert d["eos_token_id"] == model.cfg.lm.eos_token_id and d["pad_token_id"] == model.cfg.lm.pad_token_id
    S = model.cfg.vision.image_size
    px = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(0))
    out = model.generate(px, max_new_tokens=3, min_new_tokens=3)
    prompt = 1 if model.is_encoder_decoder else model.cfg.num_query_tokens + 1
    assert out.shape == (2, prompt + 3), out.shape
    assert int(out.max()) < model.cfg.lm.vocab
    assert weight_bytes(model, "lm") < weight_bytes(model)


def test_seed_reproducible():
    a = load_preset("blip2-opt-tiny", device="cpu", backend="reference", seed=1)
    b = load_preset("blip2-opt-tiny", device="cpu", backend="reference", seed=1)
    c = load_preset("blip2-opt-tiny", device="cpu", backend="reference", seed=2)
    assert torch.equal(a.query_tokens, b.query_tokens) and not torch.equal(a.query_tokens, c.query_tokens)

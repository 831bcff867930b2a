"""Config values: every number the model is built from is checked, and a bad one is an error naming
the field and the file, never a model that loads and then computes garbage."""
import json
import math
import shutil

import pytest

import blip2_fast
from blip2_fast import CheckpointError, UnsupportedModelError


def _with_config(d, tmp_path, edit, name="config.json"):
    dst = tmp_path / "ckpt"
    shutil.copytree(d, dst)
    cfg = json.loads((dst / name).read_text())
    edit(cfg)
    (dst / name).write_text(json.dumps(cfg))  # NaN / Infinity are written as Python's json writes them
    return dst


def _set(section, field, value):
    def edit(cfg):
        (cfg[section] if section else cfg)[field] = value
    return edit


V, Q, T = "vision_config", "qformer_config", "text_config"

OPT_CASES = [
    (V, "layer_norm_eps", math.nan), (V, "layer_norm_eps", -1.0), (V, "layer_norm_eps", 0), (V, "layer_norm_eps", math.inf),
    (V, "layer_norm_eps", "1e-5"), (V, "layer_norm_eps", True),
    (V, "image_size", -42), (V, "image_size", 0), (V, "image_size", 42.0), (V, "image_size", "42"),
    (V, "patch_size", 0), (V, "patch_size", 43), (V, "patch_size", 6.5),
    (V, "num_attention_heads", 3), (V, "num_attention_heads", 0), (V, "hidden_size", 88.5),
    (V, "num_hidden_layers", True), (V, "intermediate_size", -1), (V, "qkv_bias", "false"),
    (Q, "layer_norm_eps", math.nan), (Q, "num_attention_heads", 5), (Q, "cross_attention_frequency", 0),
    (Q, "vocab_size", 0), (Q, "max_position_embeddings", -3), (Q, "pad_token_id", -1),
    (Q, "pad_token_id", 97), (Q, "use_qformer_text_input", 1),
    (T, "num_attention_heads", 3), (T, "hidden_size", 80.0), (T, "ffn_dim", 0), (T, "vocab_size", -211),
    (T, "max_position_embeddings", 0), (T, "word_embed_proj_dim", 0), (T, "eos_token_id", -1), (T, "eos_token_id", 211),
    (T, "eos_token_id", "3"), (T, "pad_token_id", 1.0), (T, "bos_token_id", 10**30), (T, "do_layer_norm_before", "yes"),
    (T, "enable_bias", None), (T, "layer_norm_elementwise_affine", 0), (T, "num_hidden_layers", 2.5),
    (None, "num_query_tokens", 0), (None, "num_query_tokens", 2.5), (None, "num_query_tokens", -5),
    (None, "image_token_index", 211), (None, "image_token_index", -1), (None, "image_token_index", "210"),
    (None, "image_text_hidden_size", 0),
]


def _field_pattern(section, field):
    return (f"{section}." if section else "") + field


@pytest.mark.parametrize("section,field,value", OPT_CASES,
                         ids=[f"{s}.{f}={v!r}" for s, f, v in OPT_CASES])
def test_bad_opt_config_value(ckpt, tmp_path, section, field, value):
    d = _with_config(ckpt("opt")[0], tmp_path, _set(section, field, value))
    with pytest.raises(CheckpointError) as e:
        blip2_fast.load(d)
    msg = str(e.value)
    assert str(d / "config.json") in msg and _field_pattern(section, field) in msg, msg


T5_CASES = [
    ("relative_attention_max_distance", 0), ("relative_attention_max_distance", -5),
    ("relative_attention_max_distance", 4),  # == the decoder's exact buckets (8 // 2): log(1) = 0
    ("relative_attention_max_distance", 3), ("relative_attention_max_distance", 20.5),
    ("relative_attention_num_buckets", 2), ("relative_attention_num_buckets", 0),
    ("layer_norm_epsilon", math.nan), ("layer_norm_epsilon", -1e-6), ("d_kv", 0), ("num_heads", 0),
    ("num_decoder_layers", -1), ("num_layers", 0), ("decoder_start_token_id", 211), ("eos_token_id", [1, -2]),
    ("d_model", 80.0), ("vocab_size", 0),
]


@pytest.mark.parametrize("field,value", T5_CASES, ids=[f"{f}={v!r}" for f, v in T5_CASES])
def test_bad_t5_config_value(ckpt, tmp_path, field, value):
    d = _with_config(ckpt("t5")[0], tmp_path, _set(T, field, value))
    with pytest.raises(CheckpointError) as e:
        blip2_fast.load(d)
    msg = str(e.value)
    assert str(d / "config.json") in msg and f"text_config.{field}" in msg, msg


def test_smallest_valid_t5_max_distance_loads_and_matches_transformers(ckpt, tmp_path):
    """max_distance = exact buckets + 1 is the smallest the bucket formula takes; it loads and, on
    the same weights, gives transformers' logits."""
    import torch
    import transformers

    d, hf = ckpt("t5")
    c = _with_config(d, tmp_path, _set(T, "relative_attention_max_distance", 5))
    m = blip2_fast.load(c, backend="reference")
    cfg = transformers.Blip2Config.from_pretrained(str(c))
    ref = transformers.Blip2ForConditionalGeneration(cfg).eval()
    ref.load_state_dict(hf.state_dict())
    from conftest import image_prompt

    pv, ids, _ = image_prompt(hf, 1)
    dec = torch.tensor([[0, 5, 9, 13, 2, 7, 11]])
    want = ref(pixel_values=pv, input_ids=ids, decoder_input_ids=dec).logits
    got = m(pixel_values=pv, input_ids=ids, decoder_input_ids=dec).logits
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= 1e-4, f"relative logits error {err:.2e}"  # the parity tests' criterion


@pytest.mark.parametrize("section,field,value,match", [
    (V, "hidden_act", "swish", "vision_config.hidden_act"),
    (T, "activation_function", "silu", "text_config.activation_function"),
])
def test_unsupported_activation_is_unsupported_model(ckpt, tmp_path, section, field, value, match):
    d = _with_config(ckpt("opt")[0], tmp_path, _set(section, field, value))
    with pytest.raises(UnsupportedModelError, match=match):
        blip2_fast.load(d)


GEN_CASES = [("num_beams", 2.5), ("num_beams", 0), ("max_new_tokens", 2.5), ("max_new_tokens", "30"),
             ("eos_token_id", "3"), ("eos_token_id", [3, "4"]), ("eos_token_id", 211), ("pad_token_id", -1),
             ("temperature", math.nan), ("top_p", 0), ("top_p", 1.5), ("top_k", -1), ("repetition_penalty", 0),
             ("length_penalty", math.inf), ("do_sample", "true"), ("early_stopping", 1.0), ("min_new_tokens", -1),
             ("max_length", True)]


@pytest.mark.parametrize("field,value", GEN_CASES, ids=[f"{f}={v!r}" for f, v in GEN_CASES])
def test_bad_generation_config_value(ckpt, tmp_path, field, value):
    d = _with_config(ckpt("opt")[0], tmp_path, _set(None, field, value), name="generation_config.json")
    with pytest.raises(CheckpointError) as e:
        blip2_fast.load(d)
    msg = str(e.value)
    assert "generation_config.json" in msg and field in msg, msg


def test_sampling_without_temperature_is_refused(ckpt, tmp_path):
    def edit(g):
        g.update(do_sample=True, temperature=0.0)
    d = _with_config(ckpt("opt")[0], tmp_path, edit, name="generation_config.json")
    with pytest.raises(CheckpointError, match="temperature"):
        blip2_fast.load(d)


def test_valid_generation_config_values_are_kept(ckpt, tmp_path):
    def edit(g):
        g.update(num_beams=3, eos_token_id=[3, 7], early_stopping="never", top_p=1, temperature=0.0)
    d = _with_config(ckpt("opt")[0], tmp_path, edit, name="generation_config.json")
    m = blip2_fast.load(d, backend="reference")
    g = m.generation_defaults
    assert g["num_beams"] == 3 and g["eos_token_id"] == [3, 7] and g["early_stopping"] == "never" and g["top_p"] == 1


def test_invalid_device_strings_are_value_errors(ckpt):
    for dev in ("gpu", "cuda:x"):
        with pytest.raises(ValueError, match="device"):
            blip2_fast.load(ckpt("opt")[0], device=dev)
    with pytest.raises(TypeError, match="device"):
        blip2_fast.load(ckpt("opt")[0], device=1.5)
    with pytest.raises(TypeError, match="source"):
        blip2_fast.load(42)


def test_config_switches_must_match_the_weights(ckpt, tmp_path):
    """Switches no shape pins down: qkv_bias=false over a checkpoint with attention biases, and untied
    embeddings with no LM head, are mismatched files (transformers would drop the biases, or draw a
    random head)."""
    d = _with_config(ckpt("opt")[0], tmp_path, _set(V, "qkv_bias", False))
    with pytest.raises(CheckpointError, match="vision_config.qkv_bias is false, but the checkpoint has attention biases"):
        blip2_fast.load(d)
    shutil.rmtree(d)
    d = _with_config(ckpt("opt")[0], tmp_path, _set(T, "tie_word_embeddings", False))
    with pytest.raises(CheckpointError, match="tie_word_embeddings is false, but the checkpoint has no language_model.lm_head.weight"):
        blip2_fast.load(d)

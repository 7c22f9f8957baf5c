"""The tiny model, its tokenizer and processor, and loading real checkpoints (offline errors, mismatches)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs
from transformers import AutoProcessor, AutoTokenizer, LlavaOnevisionForConditionalGeneration

from covipal.errors import CovipalError
from covipal.models.architecture import ArchitectureSpec
from covipal.models.loading import check_processor_matches, load_pretrained
from covipal.models.tokenizer import build_word_tokenizer
from covipal.tiny_world.model import build_tiny, load_tiny, tiny_checkpoint


def test_tokenizer_round_trips_text_and_keeps_special_tokens(tmp_path):
    tokenizer = build_word_tokenizer(["widget"])
    text = "<image> what colour is the widget xyzzy? 42 B. Red"
    ids = tokenizer(text).input_ids
    assert tokenizer.unk_token_id not in ids
    assert ids.count(tokenizer.convert_tokens_to_ids("<image>")) == 1
    assert tokenizer.decode(ids) == "<image> what colour is the widget xyzzy? 42 B. Red"  # case kept (option letters)
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(text).input_ids == ids


def test_tiny_build_is_deterministic_and_cached(tmp_path):
    spec = ArchitectureSpec(seed=3)
    first = build_tiny(spec, tmp_path / "a")
    second = build_tiny(spec, tmp_path / "b")
    state_a = LlavaOnevisionForConditionalGeneration.from_pretrained(first).state_dict()
    state_b = LlavaOnevisionForConditionalGeneration.from_pretrained(second).state_dict()
    assert all(torch.equal(state_a[key], state_b[key]) for key in state_a)
    other = LlavaOnevisionForConditionalGeneration.from_pretrained(build_tiny(ArchitectureSpec(seed=4), tmp_path / "c"))
    assert not torch.equal(other.state_dict()["lm_head.weight"], state_a["lm_head.weight"])
    cached = tiny_checkpoint(spec, tmp_path / "cache")
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    assert tiny_checkpoint(spec, tmp_path / "cache") == cached
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("kind", ["image", "multi_image", "video"])
def test_tiny_model_runs_every_input_kind(tiny_dir, processor, sdpa_model, kind):
    inputs = make_inputs(processor, kind)
    visual = (inputs["input_ids"] == sdpa_model.config.image_token_id) | (
        inputs["input_ids"] == sdpa_model.config.video_token_id
    )
    assert int(visual.sum()) > 30  # anyres tiles + newlines, or pooled frames
    with torch.no_grad():
        logits = sdpa_model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()


def test_load_tiny_goes_through_from_pretrained(tmp_path):
    loaded = load_tiny(spec={"text_layers": 2}, pretrain={"steps": 0}, cache_dir=str(tmp_path))
    assert loaded.model.config.text_config.num_hidden_layers == 2
    assert loaded.model.config._attn_implementation == "sdpa"
    assert loaded.model.model.language_model is not None and loaded.name == "tiny"


def test_missing_weights_offline_fail_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CovipalError) as error:
        load_pretrained("llava-hf/llava-onevision-qwen2-7b-ov-chat-hf", device="cpu")
    message = str(error.value)
    assert "\n" not in message
    assert "llava-hf/llava-onevision-qwen2-7b-ov-chat-hf" in message and "model.name_or_path=" in message


def test_processor_model_mismatch_is_refused(tiny_dir, tmp_path):
    other = build_tiny(ArchitectureSpec(image_size=16, grid_pinpoints=[[16, 16], [16, 32]]), tmp_path / "other")
    with pytest.raises(CovipalError) as error:
        load_pretrained(str(tiny_dir), device="cpu", dtype="float32", processor_path=str(other))
    assert "tokens per crop" in str(error.value) and "\n" not in str(error.value)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_dir)
    check_processor_matches(model, AutoProcessor.from_pretrained(tiny_dir), "tiny")  # the matching pair passes


def test_bad_attention_and_device_choices_fail_in_one_line(tiny_dir):
    with pytest.raises(CovipalError, match="model.attn_implementation=fast"):
        load_pretrained(str(tiny_dir), attn_implementation="fast", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(CovipalError, match="flash_attention_2"):
            load_pretrained(str(tiny_dir), attn_implementation="flash_attention_2", device="cpu")
        with pytest.raises(CovipalError, match="model.device=cuda"):
            load_pretrained(str(tiny_dir), device="cuda")


def test_auto_dtype_is_bf16_only_where_the_cpu_multiplies_bf16_fast(tmp_path, monkeypatch):
    from covipal.models import loading

    amx, plain = tmp_path / "amx", tmp_path / "plain"
    amx.write_text("processor : 0\nflags : fpu sse2 avx512f avx512_bf16 amx_tile amx_bf16 amx_int8\n")
    plain.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f\n")
    assert loading.cpu_bf16_features(amx) == ["amx_bf16", "avx512_bf16"]
    assert loading.cpu_bf16_features(plain) == [] and loading.cpu_bf16_features(tmp_path / "missing") == []
    cpu = torch.device("cpu")
    monkeypatch.setattr(loading, "cpu_bf16_features", lambda: ["amx_bf16"])
    assert loading.resolve_dtype("auto", cpu) == torch.bfloat16
    assert loading.dtype_choice("auto", cpu).startswith("bfloat16 (model.dtype=auto: this CPU has amx_bf16")
    assert loading.resolve_dtype("float32", cpu) == torch.float32  # the override wins
    monkeypatch.setattr(loading, "cpu_bf16_features", lambda: [])
    assert loading.resolve_dtype("auto", cpu) == torch.float32
    assert loading.dtype_choice("auto", cpu).startswith("float32 (model.dtype=auto: this CPU has neither")
    assert loading.dtype_choice("bfloat16", cpu) == "bfloat16 (model.dtype=bfloat16)"

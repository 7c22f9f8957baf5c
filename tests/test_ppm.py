import json

import pytest
import torch

from covipal.models.ppm import PPMClassifier, PPMConfig


def tiny_config(**kw) -> PPMConfig:
    base = {
        "input_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
    }
    base.update(kw)
    return PPMConfig(**base)


def tiny_model(seed: int = 0, **kw) -> PPMClassifier:
    torch.manual_seed(seed)
    return PPMClassifier(tiny_config(**kw)).eval()


def expected_param_count(c: PPMConfig) -> int:
    head_dim = c.hidden_size // c.num_heads
    kv = c.num_kv_heads * head_dim
    attn = (c.hidden_size * c.hidden_size + c.hidden_size) + 2 * (c.hidden_size * kv + kv)
    attn += c.hidden_size * c.hidden_size  # o_proj, no bias
    mlp = 3 * c.hidden_size * c.intermediate_size
    layer = attn + mlp + 2 * c.hidden_size
    return (c.input_size * c.hidden_size + c.hidden_size) + c.num_layers * layer + c.hidden_size + (c.hidden_size + 1)


def test_paper_config_param_count_on_meta():
    cfg = PPMConfig(input_size=3584)
    with torch.device("meta"):
        model = PPMClassifier(cfg)
    n = model.num_parameters()
    assert round(n / 1e6, 1) == 71.2
    assert n == expected_param_count(cfg) == 71_195_905
    assert next(model.parameters()).device.type == "meta"


def test_tiny_param_count_formula():
    model = tiny_model()
    assert model.num_parameters() == expected_param_count(model.config)


def test_output_shape_dtype_finite():
    model = tiny_model()
    x = torch.randn(3, 7, 64)
    out = model(x)
    assert out.shape == (3, 7) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # Finite at pad positions, including a sample with no real tokens at all.
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1], [0] * 7])
    assert torch.isfinite(model(x, attention_mask=mask)).all()


def test_bidirectional():
    model = tiny_model()
    x = torch.randn(1, 6, 64)
    y = x.clone()
    y[0, -1] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model(x)[0, 0], model(y)[0, 0])


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("explicit_positions", [False, True])
def test_padded_batch_matches_single(side, explicit_positions):
    model = tiny_model()
    torch.manual_seed(1)
    lengths = [5, 9, 2]
    samples = [torch.randn(n, 64) for n in lengths]
    t = max(lengths)
    x = torch.zeros(len(samples), t, 64)
    mask = torch.zeros(len(samples), t, dtype=torch.long)
    pos = torch.zeros(len(samples), t, dtype=torch.long)
    spans = []
    for i, s in enumerate(samples):
        start = t - len(s) if side == "left" else 0
        x[i, start : start + len(s)] = s
        mask[i, start : start + len(s)] = 1
        pos[i, start : start + len(s)] = torch.arange(len(s))
        spans.append(slice(start, start + len(s)))
    with torch.no_grad():
        batched = model(x, attention_mask=mask, position_ids=pos if explicit_positions else None)
        for i, s in enumerate(samples):
            single = model(s[None])[0]
            torch.testing.assert_close(batched[i, spans[i]], single, atol=1e-5, rtol=0)


def test_save_load_roundtrip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["format"] == "covipal-ppm" and isinstance(meta["version"], int)
    assert PPMConfig.from_dict(meta) == model.config
    assert meta["input_size"] == 64 and meta["hidden_size"] == 32 and meta["num_kv_heads"] == 2

    loaded = PPMClassifier.from_pretrained(tmp_path / "ckpt", expected_input_size=64).eval()
    assert loaded.config == model.config
    x = torch.randn(2, 5, 64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        assert torch.equal(model(x, mask), loaded(x, mask))

    bf16 = PPMClassifier.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


def test_width_mismatch_raises(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError) as err:
        PPMClassifier.from_pretrained(tmp_path, expected_input_size=3584)
    msg = str(err.value)
    assert "\n" not in msg and "64" in msg and "3584" in msg and "covipal.train" in msg


@pytest.mark.parametrize("missing", ["dir", "model.safetensors", "config.json"])
def test_missing_checkpoint_raises(tmp_path, missing):
    if missing == "dir":
        path = tmp_path / "nope"
    else:
        path = tmp_path
        tiny_model().save_pretrained(path)
        (path / missing).unlink()
    with pytest.raises(FileNotFoundError) as err:
        PPMClassifier.from_pretrained(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert "covipal.train stage=1" in msg and "classifier=random" in msg


def test_determinism():
    a, b = tiny_model(seed=3).state_dict(), tiny_model(seed=3).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = tiny_model(seed=4).state_dict()
    assert not torch.equal(a["in_proj.weight"], c["in_proj.weight"])
    # Init scheme: zero biases, unit norms.
    assert torch.all(a["in_proj.bias"] == 0) and torch.all(a["norm.weight"] == 1)


def _grads(model, x, mask):
    model.zero_grad()
    model(x, attention_mask=mask).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradients_and_checkpointing():
    model = tiny_model().train()
    torch.manual_seed(2)
    x = torch.randn(2, 6, 64)
    mask = torch.tensor([[1] * 6, [0, 1, 1, 1, 1, 1]])
    plain = _grads(model, x, mask)
    for name, g in plain.items():
        assert g.abs().sum() > 0, f"no gradient reached {name}"
    model.gradient_checkpointing = True
    ckpt = _grads(model, x, mask)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5)


def test_bf16_weights_fp32_input():
    model = tiny_model().to(torch.bfloat16)
    out = model(torch.randn(2, 4, 64), attention_mask=torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_fp32_weights_bf16_input():
    model = tiny_model()
    out = model(torch.randn(2, 4, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()

import inspect
import math
import re
from pathlib import Path

import pytest
import torch
from builders import randomize

import models
from models import (
    NORM_KINDS,
    TOY_MODELS,
    Attention,
    DiT,
    DiT_models,
    DiTBlock,
    TimestepEmbedder,
    build_model,
    get_2d_sincos_pos_embed,
    make_norm,
)

# The official DiT-XL/2 256x256 checkpoint's keys and shapes (a fact of the published file).
REFERENCE_TSV = Path(__file__).resolve().parent / "data" / "dit_xl2_256_state_dict.tsv"
OFFICIAL = [name for name in DiT_models if name.startswith("DiT-")]


def toy(norm="layernorm", **overrides):
    torch.manual_seed(0)
    return build_model("ToyDiT-XS/1", norm=norm, **overrides)


def test_registry_names_and_toy_defaults():
    assert OFFICIAL == [f"DiT-{size}/{p}" for size in ("XL", "L", "B", "S") for p in (2, 4, 8)]
    assert set(TOY_MODELS) <= set(DiT_models)
    cfg = build_model("ToyDiT/1").config
    assert (cfg["depth"], cfg["hidden_size"], cfg["num_heads"]) == (4, 64, 4)
    assert (cfg["input_size"], cfg["patch_size"], cfg["in_channels"], cfg["num_classes"]) == (2, 1, 2, 1)
    assert cfg["class_dropout_prob"] == 0.0 and cfg["learn_sigma"] and cfg["norm"] == "layernorm"
    xs = build_model("ToyDiT-XS/1").config
    assert (xs["depth"], xs["hidden_size"], xs["num_heads"]) == (2, 32, 2)


@pytest.mark.parametrize("name", OFFICIAL)
def test_forward_shapes_official(name):
    # Full official config (28/24/12 blocks, 32x32x4 latent) on the meta device: shapes through every block,
    # no memory, no init cost. Then the same config with depth 1 on a 16x16 input for real, finite numbers.
    with torch.device("meta"):
        model = build_model(name)
        out = model(torch.zeros(2, 4, 32, 32), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 8, 32, 32)
    model = randomize(build_model(name, depth=1, input_size=16))
    out = model(torch.randn(2, 4, 16, 16), torch.tensor([1.5, 999.0]), torch.tensor([0, 999]))
    assert out.shape == (2, 8, 16, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", TOY_MODELS)
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_forward_shapes_toy(name, learn_sigma):
    model = randomize(build_model(name, learn_sigma=learn_sigma))
    out = model(torch.randn(5, 2, 2, 2), torch.randint(0, 1000, (5,)), torch.zeros(5, dtype=torch.long))
    assert out.shape == (5, 4 if learn_sigma else 2, 2, 2) and model.out_channels == out.shape[1]
    assert out.abs().sum() > 0


@pytest.mark.parametrize("norm", NORM_KINDS)
def test_zero_output_at_init(norm):
    model = toy(norm)
    x = torch.randn(3, 2, 2, 2) * 10
    out = model(x, torch.tensor([0, 500, 999]), torch.zeros(3, dtype=torch.long))
    assert torch.equal(out, torch.zeros_like(out))
    # Each block is the identity at init: gates come from zero-initialised modulation layers.
    tokens, c = torch.randn(3, 4, 32), torch.randn(3, 32)
    assert torch.equal(model.blocks[0](tokens, c), tokens)


def test_initialize_weights():
    model = build_model("ToyDiT/1")
    assert not model.pos_embed.requires_grad
    assert torch.equal(model.pos_embed[0], get_2d_sincos_pos_embed(64, 2).float())
    assert 0.01 < model.y_embedder.embedding_table.weight.std() < 0.03
    assert 0.01 < model.t_embedder.mlp[0].weight.std() < 0.03
    assert model.blocks[0].attn.qkv.bias.abs().sum() == 0 and model.blocks[0].attn.qkv.weight.abs().sum() > 0


def test_pos_embed_layout():
    # Official (MAE) layout: token k = row * G + col; first half encodes the column, second half the row.
    D, G = 8, 3
    emb = get_2d_sincos_pos_embed(D, G)
    assert emb.shape == (G * G, D)
    omega = [1 / 10000 ** (i / (D / 4)) for i in range(D // 4)]
    row, col = 2, 1
    expected_col = [math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
    expected_row = [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega]
    assert torch.allclose(emb[row * G + col], torch.tensor(expected_col + expected_row, dtype=torch.float64))


def test_timestep_embedding():
    t = torch.tensor([0, 3, 999])
    emb = TimestepEmbedder.timestep_embedding(t, 256)
    assert emb.shape == (3, 256)
    assert torch.equal(emb, TimestepEmbedder.timestep_embedding(t.float(), 256))
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))
    assert torch.allclose(emb[1, 1], torch.tensor(math.cos(3 * math.exp(-math.log(10000) / 128))))


def test_label_embedder_null_row_and_dropout():
    model = build_model("ToyDiT-XS/1", num_classes=3, class_dropout_prob=0.5)
    assert model.y_embedder.embedding_table.weight.shape == (4, 32)
    labels = torch.tensor([0, 1, 2, 1])
    forced = model.y_embedder(labels, train=False, force_drop_ids=torch.tensor([1, 0, 0, 1]))
    table = model.y_embedder.embedding_table.weight
    assert torch.equal(forced, table[torch.tensor([3, 1, 2, 3])])
    assert torch.equal(model.y_embedder(labels, train=False), table[labels])  # no dropping in eval
    model.y_embedder.dropout_prob = 1.0
    assert torch.equal(model.y_embedder(labels, train=True), table[[3, 3, 3, 3]])
    no_null = build_model("ToyDiT-XS/1")  # class_dropout_prob 0: no null row, training never drops
    assert no_null.y_embedder.embedding_table.weight.shape == (1, 32)
    embedded = no_null.y_embedder(torch.zeros(4, dtype=torch.long), train=True)
    assert torch.equal(embedded, no_null.y_embedder.embedding_table.weight.expand(4, 32))


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = Attention(64, num_heads=4, qkv_bias=True)
    for tokens in (4, 256):
        x = torch.randn(3, tokens, 64)
        q, k, v = attn.qkv(x).reshape(3, tokens, 3, 4, 16).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(16), dim=-1)
        expected = attn.proj((weights @ v).transpose(1, 2).reshape(3, tokens, 64))
        assert (attn(x) - expected).abs().max() < 1e-6


def test_norm_kinds_behave_as_named():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16) + 3
    assert torch.equal(make_norm("none", 16)(x), x)
    ln = make_norm("layernorm", 16)(x)
    assert torch.allclose(ln.mean(-1), torch.zeros(4, 3), atol=1e-5)
    rms = make_norm("rmsnorm", 16)(x)
    assert torch.allclose(rms.pow(2).mean(-1), torch.ones(4, 3), atol=1e-4)
    assert rms.mean(-1).min() > 0.5  # the mean is kept, unlike LayerNorm
    assert torch.allclose(make_norm("dyt", 16)(x), torch.tanh(0.5 * x))
    for kind in NORM_KINDS:
        model = toy(kind)
        expected = type(make_norm(kind, 32))
        norms = [model.final_layer.norm_final] + [n for b in model.blocks for n in (b.norm1, b.norm2)]
        assert all(type(n) is expected for n in norms)


def test_norm_none_removes_normalisation_in_block():
    # Attention branch only (MLP gate rows zeroed): delta(x) = block(x) - x = gate * attn(modulate(norm1(x))).
    # LayerNorm makes delta invariant to scaling x; with no norm, scaling x must change delta.
    torch.manual_seed(0)
    x, c = torch.randn(2, 4, 32) * 3, torch.randn(2, 32)
    deltas = {}
    for norm in ("layernorm", "none"):
        torch.manual_seed(1)
        block = DiTBlock(32, num_heads=2, norm=norm)
        randomize(block, seed=1, std=0.3)
        with torch.no_grad():
            block.adaLN_modulation[1].weight[5 * 32 :] = 0  # gate_mlp = 0
            block.adaLN_modulation[1].bias[5 * 32 :] = 0
        deltas[norm] = [block(a * x, c) - a * x for a in (1.0, 10.0)]
    small, large = deltas["layernorm"]
    assert torch.allclose(small, large, atol=1e-4)
    small, large = deltas["none"]
    assert (small - large).abs().max() > 0.1 * small.abs().max()


def test_norm_kinds_share_official_keys_and_dyt_adds_alpha():
    def shapes(norm):
        return {k: tuple(v.shape) for k, v in toy(norm).state_dict().items()}

    reference = shapes("layernorm")
    assert shapes("none") == reference and shapes("rmsnorm") == reference
    dyt = shapes("dyt")
    extra = {k for k in dyt if k not in reference}
    expected = {f"blocks.{i}.norm{j}.alpha" for i in range(2) for j in (1, 2)}
    expected.add("final_layer.norm_final.alpha")
    assert extra == expected and {k: dyt[k] for k in reference} == reference


def test_dyt_alpha_learnable():
    model = randomize(toy("dyt"))  # adaLN-Zero gates would otherwise block the gradient at init
    alphas = {k: p for k, p in model.named_parameters() if k.endswith("alpha")}
    assert all(torch.equal(toy("dyt").get_parameter(k), torch.tensor([0.5])) for k in alphas)
    for p in alphas.values():
        p.data.fill_(0.5)
    out = model(torch.randn(4, 2, 2, 2), torch.tensor([1, 10, 100, 900]), torch.zeros(4, dtype=torch.long))
    out.pow(2).mean().backward()
    assert len(alphas) == 5 and all(p.requires_grad and p.grad.abs() > 0 for p in alphas.values())


def test_config_rebuilds_model_and_stores_norm():
    model = build_model("ToyDiT-XS/1", norm="rmsnorm", learn_sigma=False)
    assert model.config["norm"] == "rmsnorm" and model.config["learn_sigma"] is False
    assert DiT(**model.config).config == model.config
    assert list(model.config) == list(inspect.signature(DiT).parameters)


def test_unknown_names_raise_value_error_listing_choices():
    with pytest.raises(ValueError, match="layernorm, none, rmsnorm, dyt"):
        build_model("ToyDiT-XS/1", norm="batchnorm")
    with pytest.raises(ValueError, match="layernorm, none, rmsnorm, dyt"):
        make_norm("groupnorm", 8)
    with pytest.raises(ValueError, match=re.escape("DiT-XL/2, DiT-XL/4")):
        build_model("DiT-XXL/2")


def _reference_shapes():
    shapes = {}
    for line in REFERENCE_TSV.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split("\t")[:2]
        shape = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
        keys = [key.replace("{i}", str(i)) for i in range(28)] if "{i}" in key else [key]
        shapes.update(dict.fromkeys(keys, shape))
    return shapes


def test_reference_state_dict_loads_strictly_into_dit_xl2():
    shapes = _reference_shapes()
    assert sum(math.prod(s) for s in shapes.values()) == 675_129_632
    with torch.device("meta"):
        model = build_model("DiT-XL/2")
        state_dict = {k: torch.empty(s) for k, s in shapes.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)  # raises on any key or shape mismatch
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    # The meta-device load really checks: a wrong shape or a missing key is refused.
    with torch.device("meta"):
        fresh = build_model("DiT-XL/2")
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict({**state_dict, "pos_embed": torch.empty(1, 1024, 1152, device="meta")})
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({k: v for k, v in state_dict.items() if k != "final_layer.linear.bias"})


def test_forward_with_cfg_guides_the_official_3_channels_by_default():
    torch.manual_seed(0)
    model = randomize(build_model("ToyDiT-XS/1", num_classes=3, class_dropout_prob=0.1)).eval()
    x = torch.randn(2, 2, 2, 2)
    x_in, t, y = torch.cat([x, x]), torch.tensor([5, 700, 5, 700]), torch.tensor([0, 2, 3, 3])
    full = model(x_in, t, y)  # (4, 4, 2, 2): 2 eps channels, then 2 variance channels
    cond, uncond = full[:2], full[2:]
    for guided, split in ((3, 3), (None, 2)):  # the official code's first 3; the 2 noise channels
        out = model.forward_with_cfg(x_in, t, y, cfg_scale=4.0, guided_channels=guided)
        assert out.shape == (4, 4, 2, 2)
        guided_eps = uncond[:, :split] + 4.0 * (cond - uncond)[:, :split]
        assert torch.allclose(out[:2, :split], guided_eps, atol=1e-5)
        assert torch.equal(out[:2, :split], out[2:, :split])  # both halves carry the guided prediction
        assert torch.equal(out[:, split:], full[:, split:])  # the rest is not guided
    assert torch.equal(model.forward_with_cfg(x_in, t, y, 4.0), model.forward_with_cfg(x_in, t, y, 4.0, 3))
    # The second half of x is ignored (replaced by the first) and scale 1 gives the conditional output.
    same = model.forward_with_cfg(torch.cat([x, torch.randn_like(x)]), t, y, cfg_scale=1.0)
    assert torch.allclose(same[:2, :3], cond[:, :3], atol=1e-6)


def test_models_py_holds_no_device_or_speed_code():
    """models.py is the official DiT plus the norm switch: no device branches, no module-level switches."""
    source = inspect.getsource(models)
    for word in ("is_cuda", "device.type", "cuda", "torch.compile", "CUDA_", "global "):
        assert word not in source, word
    constants = {name for name in vars(models) if name.isupper()}
    assert constants == {"NORM_KINDS", "TOY_DEFAULTS", "TOY_MODELS", "MNIST_DEFAULTS", "MNIST_MODELS"}


def test_the_official_registry_names_import():
    """`from models import DiT_XL_2` works as in the official code, and the registry holds those functions."""
    from models import DiT_S_8, DiT_XL_2

    assert models.DiT_models["DiT-XL/2"] is DiT_XL_2 and DiT_XL_2.__name__ == "DiT_XL_2"
    model = DiT_S_8(input_size=16, depth=1)  # the official kwargs still override
    assert (model.config["patch_size"], model.config["depth"], model.config["hidden_size"]) == (8, 1, 384)

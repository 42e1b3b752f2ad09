"""fast/small_shapes.py: the CUDA forms for small shapes compute the model's function. They run on CUDA
only in training; here each is called on the CPU and compared with the model's own layers."""

import pytest
import torch
from builders import randomize

from fast import small_shapes
from models import build_model


def values_and_grads(fn, inputs, seed=1):
    """fn(*inputs) and the gradients of a random projection of it with respect to each input."""
    out = fn(*inputs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return [out, *torch.autograd.grad(out, inputs, grad_out)]


def assert_all_close(actual, expected, rtol=1e-5, atol=1e-6):
    for a, b in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_broadcast_attention_matches_the_fused_kernel_with_gradients(tokens):
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(5, 4, tokens, 16, generator=g, requires_grad=True) for _ in range(3)]
    assert_all_close(values_and_grads(small_shapes.broadcast_attention, qkv),
                     values_and_grads(torch.nn.functional.scaled_dot_product_attention, qkv))


@pytest.mark.parametrize("channels", [2, 4])
@pytest.mark.parametrize("patch_size", [1, 2])
def test_patch_embed_as_linear_matches_conv_with_gradients(patch_size, channels):
    torch.manual_seed(0)
    model = build_model("ToyDiT-XS/1", input_size=3 * patch_size, patch_size=patch_size, in_channels=channels)
    embed = model.x_embedder  # 3 x 3 patches: token order matters
    x = torch.randn(5, channels, 3 * patch_size, 3 * patch_size, requires_grad=True)
    inputs = [x, embed.proj.weight, embed.proj.bias]
    expected = values_and_grads(lambda x, *_: embed(x), inputs)
    actual = values_and_grads(lambda x, *_: small_shapes.patch_embed_as_linear(embed, x), inputs)
    assert actual[0].shape == (5, 9, 32)
    assert_all_close(actual, expected)


@pytest.mark.parametrize("num_classes, dropout", [(1, 0.0), (3, 0.1)])
def test_label_embed_as_matmul_matches_embedding_with_gradients(num_classes, dropout):
    torch.manual_seed(0)
    embedder = build_model("ToyDiT-XS/1", num_classes=num_classes, class_dropout_prob=dropout).y_embedder
    labels = torch.randint(0, len(embedder.embedding_table.weight), (64,))
    table = [embedder.embedding_table.weight]
    expected = values_and_grads(lambda _: embedder.embedding_table(labels), table)
    actual = values_and_grads(lambda _: small_shapes.label_embed_as_matmul(embedder, labels, False), table)
    assert torch.equal(actual[0], expected[0])  # exact: one product by 1, the others by 0
    assert_all_close(actual, expected)


def toy_inputs(model, n=6):
    torch.manual_seed(2)
    size = model.config["input_size"]
    return torch.randn(n, model.in_channels, size, size), torch.randint(0, 1000, (n,)), torch.zeros(n).long()


@pytest.mark.parametrize("overrides", [{}, dict(input_size=4, patch_size=2, in_channels=4, num_classes=3)],
                         ids=["toy", "patch2"])
@pytest.mark.parametrize("norm", ["layernorm", "dyt"])
def test_small_shape_forward_matches_the_model(overrides, norm):
    model = randomize(build_model("ToyDiT-XS/1", norm=norm, **overrides)).eval()
    inputs = toy_inputs(model)
    params = [p for p in model.parameters() if p.requires_grad]
    forward = small_shapes.small_shape_forward(model)
    assert_all_close(values_and_grads(lambda *_: forward(*inputs), params),
                     values_and_grads(lambda *_: model(*inputs), params))


def test_small_shapes_are_kept_to_small_models():
    """Broadcast attention materialises T x T x d products; DiT-XL/2's 226M adaLN weights would be copied
    into one matrix at every forward."""
    assert small_shapes.small_shapes_reason(build_model("ToyDiT/1")) is None
    with torch.device("meta"):  # shapes only
        assert "tokens" in small_shapes.small_shapes_reason(build_model("DiT-XL/2"))
        wide = build_model("DiT-XL/8", input_size=32)  # 16 tokens, 28 blocks of width 1152
        assert "adaLN weights" in small_shapes.small_shapes_reason(wide)


def test_small_shape_forward_traces_to_one_graph():
    """The compiled CUDA step traces forward and loss with fullgraph=True: the forms must not break the
    graph. aot_eager traces forward and backward as inductor would, without generating kernels."""
    model = randomize(build_model("ToyDiT-XS/1"))
    inputs = toy_inputs(model, n=32)
    params = [p for p in model.parameters() if p.requires_grad]
    forward = small_shapes.small_shape_forward(model)

    def loss(*_):
        return forward(*inputs).pow(2).mean()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True, dynamic=False)
    try:
        assert_all_close(values_and_grads(compiled, params), values_and_grads(loss, params), atol=1e-7)
    finally:
        torch._dynamo.reset()

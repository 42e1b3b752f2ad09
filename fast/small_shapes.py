"""models.DiT's forward written for small shapes on CUDA (the toy: 4 tokens, 2 channels, 1 class).

The same function as the model, written so that torch.compile (inductor) fuses it into few kernels where
the generic layers leave cuBLAS/cuDNN calls and scatter-adds of their own (docs/performance.md has the
timings): attention as broadcast products and sums over T * T * d elements, the patch convolution as a
Linear over each flattened patch, the label embedding as one_hot @ table (its backward one small matmul
instead of an atomic scatter-add of every label onto its row), and the adaLN Linears of every block and
of the final layer as one stacked matmul. It reads the model's parameters and calls the model's own norm,
activation, timestep embedder and unpatchify, so most edits to models.py flow through; it is used only
after fast.proof has checked it against the model in memory.
"""

import torch
import torch.nn.functional as F

from models import modulate


def adaln_linears(model):
    """The adaLN Linears of every block, then of the final layer."""
    return [layer.adaLN_modulation[-1] for layer in [*model.blocks, model.final_layer]]


def adaln_stacked(model):
    """All adaLN weights and biases stacked, blocks then final layer: (K, D), (K,), K = (6 depth + 2) D."""
    linears = adaln_linears(model)
    return torch.cat([lin.weight for lin in linears]), torch.cat([lin.bias for lin in linears])


def broadcast_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v with each matmul as a broadcast product and a sum; (N, H, T, d)."""
    weights = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) * q.shape[-1] ** -0.5  # (N, H, T, T)
    return (weights.softmax(-1).unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)  # (N, H, T, d)


def patch_embed_as_linear(x_embedder, x):
    """The patch convolution as a Linear over each flattened (C, p, p) patch, tokens row-major: (N, T, D)."""
    N, C, H, W = x.shape
    proj = x_embedder.proj
    p = proj.stride[0]
    patches = x.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (N, H/p, W/p, C, p, p)
    patches = patches.reshape(N, -1, C * p * p)  # (N, T, C * p * p)
    return F.linear(patches, proj.weight.reshape(proj.out_channels, -1), proj.bias)  # (N, T, D)


def label_embed_as_matmul(y_embedder, labels, train):
    """The label embedder's rows as one_hot(labels) @ table (exact in fp32 with TF32 off): (N, D)."""
    if (train and y_embedder.dropout_prob > 0):
        labels = y_embedder.token_drop(labels)
    table = y_embedder.embedding_table.weight  # (rows, D)
    return F.one_hot(labels, len(table)).to(table.dtype) @ table


def attention(attn, x):
    """timm's Attention (qkv, heads, proj) with broadcast_attention: (N, T, D) -> (N, T, D)."""
    N, T, D = x.shape
    qkv = attn.qkv(x).reshape(N, T, 3, attn.num_heads, D // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each (N, H, T, d)
    return attn.proj(broadcast_attention(q, k, v).transpose(1, 2).reshape(N, T, D))


def small_shape_forward(model):
    """forward(x, t, y) -> model(x, t, y) in the forms above."""

    def forward(x, t, y):
        x = patch_embed_as_linear(model.x_embedder, x) + model.pos_embed  # (N, T, D)
        c = model.t_embedder(t) + label_embed_as_matmul(model.y_embedder, y, model.training)  # (N, D)
        weight, bias = adaln_stacked(model)
        widths = [lin.out_features for lin in adaln_linears(model)]
        mods = F.linear(F.silu(c), weight, bias).split(widths, dim=1)  # per block (N, 6 D), final (N, 2 D)
        for block, mod in zip(model.blocks, mods, strict=False):
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
            h = attention(block.attn, modulate(block.norm1(x), shift_msa, scale_msa))
            x = x + gate_msa.unsqueeze(1) * h
            h = block.mlp(modulate(block.norm2(x), shift_mlp, scale_mlp))
            x = x + gate_mlp.unsqueeze(1) * h
        final = model.final_layer
        shift, scale = mods[-1].chunk(2, dim=1)
        x = final.linear(modulate(final.norm_final(x), shift, scale))  # (N, T, p * p * C_out)
        return model.unpatchify(x)  # (N, C_out, H, W)

    return forward


# Where the forms pay: broadcast attention materialises (N, H, T, T, d) products, fine for a few tokens
# only; the stacked adaLN matmul copies every adaLN weight at each forward (0.1M values for ToyDiT/1,
# 226M for DiT-XL/2).
MAX_TOKENS = 16
MAX_ADALN_NUMEL = 1 << 20


def small_shapes_reason(model):
    """None if the forms above are meant for this model's shapes, else why not (one line)."""
    tokens = model.x_embedder.num_patches
    if tokens > MAX_TOKENS:
        return f"{tokens} tokens (the forms for small shapes take up to {MAX_TOKENS})"
    numel = sum(lin.weight.numel() for lin in adaln_linears(model))
    if numel > MAX_ADALN_NUMEL:
        return f"{numel:,} adaLN weights (the stacked matmul takes up to {MAX_ADALN_NUMEL:,})"
    return None

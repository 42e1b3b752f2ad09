"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") with a switchable normalisation.

The architecture, its timm layers (PatchEmbed, Attention, Mlp), parameter names and initialisation follow
the official implementation, so the published checkpoints load with strict=True. The one addition is
`norm`: every normalisation of the model (norm1 and norm2 of each block, norm_final of the final layer) is
built by `make_norm`, the single place where the normalisation kinds of this study are defined. Two
interventions of the study stay off by default, so that the official model is unchanged: `dropout` in
every attention and MLP (timm's own dropout layers), and `cap`, which clamps each block's output to cap
times its token's RMS (`cap_to_rms`).
"""

import math

import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed

NORM_KINDS = ("layernorm", "none", "rmsnorm", "dyt")


#################################################################################
#                                    Helpers                                    #
#################################################################################


def modulate(x, shift, scale):
    """adaLN modulation: x * (1 + scale) + shift, with per-sample shift/scale broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DynamicTanh(nn.Module):
    """DyT (Zhu et al., 2025) without affine: tanh(alpha * x), one learnable scalar alpha."""

    def __init__(self, alpha_init=0.5):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), alpha_init))

    def forward(self, x):
        return torch.tanh(self.alpha * x)


def cap_to_rms(x, cap):
    """Clamp x (..., D) as little as possible so that afterwards no |value| exceeds cap times its token's
    RMS: the k largest |values| of a token are set to the bound b that solves b = cap * RMS(clamped token).

    With k values clamped to b and S the sum of squares of the others, b^2 = cap^2 (S + k b^2) / D, so
    b = cap sqrt(S / (D - cap^2 k)); the smallest k whose bound leaves the others below it is the answer.
    Where no k < D / cap^2 works, that many large channels already satisfy the cap at any size (the RMS is
    their own), and the largest are clamped to the smallest of them."""
    D = x.shape[-1]
    a = x.abs().sort(dim=-1, descending=True).values  # (..., D), a[..., 0] the largest
    squares = a.square()
    k = torch.arange(D, device=x.device, dtype=x.dtype)  # (D,) candidate counts of clamped values
    rest = squares.sum(-1, keepdim=True) - squares.cumsum(-1) + squares  # (..., D): sum over a[k:]^2
    room = D - cap**2 * k  # (D,)
    fits = room > 0
    # (clamped below, so that sqrt's gradient stays finite where a candidate is 0 or unused)
    bound = cap * (rest / room.clamp(min=1e-12)).clamp(min=1e-30).sqrt()  # (..., D)
    valid = fits & (bound >= a)  # the k-th value and all below it stay as they are
    first = torch.where(valid, k, D).amin(dim=-1, keepdim=True).long()  # (..., 1)
    most = int(fits.sum()) - 1  # where no k fits: the largest `most` values clamped to the next one
    b = torch.where(first < D, bound.gather(-1, first.clamp(max=D - 1)), a[..., most:most + 1])  # (..., 1)
    return torch.maximum(torch.minimum(x, b), -b)


def make_norm(kind: str, hidden_size: int) -> nn.Module:
    """Build the normalisation `kind`; the one place where normalisation kinds are defined."""
    # None of these has an affine transform: in DiT the adaLN shift/scale plays that role, and leaving
    # weight/bias out keeps the state-dict keys of the official checkpoints (dyt adds only its alpha).
    if kind == "layernorm":
        return nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    if kind == "none":
        return nn.Identity()
    if kind == "rmsnorm":
        return nn.RMSNorm(hidden_size, eps=1e-6, elementwise_affine=False)
    if kind == "dyt":
        return DynamicTanh(alpha_init=0.5)
    raise ValueError(f"unknown norm {kind!r}; choose one of: {', '.join(NORM_KINDS)}")


#################################################################################
#                     Embedding layers for timesteps and labels                 #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Embed scalar timesteps: sinusoidal features followed by an MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """Sinusoidal embedding [cos, sin] of (possibly fractional) timesteps t (N,) -> (N, dim)."""
        half = dim // 2
        steps = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(max_period) * steps / half)  # (half,)
        args = t[:, None].float() * freqs[None]  # (N, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))  # (N, D)


class LabelEmbedder(nn.Module):
    """Embed class labels; with dropout > 0 an extra "null" row serves classifier-free guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Replace labels by the null class, at random (training) or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: norm -> modulate -> attn/mlp -> gated residual."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, norm="layernorm", dropout=0.0, cap=0.0):
        super().__init__()
        self.norm1 = make_norm(norm, hidden_size)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, attn_drop=dropout,
                              proj_drop=dropout)
        self.norm2 = make_norm(norm, hidden_size)
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        approx_gelu = lambda: nn.GELU(approximate="tanh")  # noqa: E731
        self.mlp = Mlp(in_features=hidden_size, hidden_features=mlp_hidden_dim, act_layer=approx_gelu,
                       drop=dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.cap = cap

    def forward(self, x, c):
        # x (N, T, D) tokens, c (N, D) conditioning; each chunk below is (N, D).
        modulation = self.adaLN_modulation(c).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return cap_to_rms(x, self.cap) if self.cap else x


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map from tokens to patches."""

    def __init__(self, hidden_size, patch_size, out_channels, norm="layernorm"):
        super().__init__()
        self.norm_final = make_norm(norm, hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # each (N, D)
        x = modulate(self.norm_final(x), shift, scale)
        return self.linear(x)  # (N, T, p * p * C_out)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone."""

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        norm="layernorm",
        dropout=0.0,
        cap=0.0,
    ):
        super().__init__()
        if norm not in NORM_KINDS:
            raise ValueError(f"unknown norm {norm!r}; choose one of: {', '.join(NORM_KINDS)}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout {dropout} is not in [0, 1)")
        if cap and cap < 1:  # a token's largest |value| is at least its RMS: cap < 1 clamps every token
            raise ValueError(f"cap {cap} is below 1; pass 0 (off) or a cap >= 1")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        # Plain data, so that DiT(**model.config) rebuilds the model and checkpoints can store it.
        self.config = dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
            num_classes=num_classes, learn_sigma=learn_sigma, norm=norm, dropout=dropout, cap=cap,
        )
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.norm = norm

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos table, kept as a frozen Parameter (not a buffer) so the official key exists.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, norm=norm, dropout=dropout, cap=cap)
             for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm=norm)
        self.initialize_weights()

    def initialize_weights(self):
        """All special initialisation of the official DiT, adaLN-Zero included."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)

        grid_size = int(self.x_embedder.num_patches**0.5)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_size)  # (T, D) float64
        self.pos_embed.data.copy_(pos_embed.float().unsqueeze(0))

        # Patch embedding: initialise like a Linear over the flattened patch (xavier), not like a conv.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: every block starts as the identity and the model output starts at zero.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """(N, T, p * p * C) tokens -> (N, C, H, W) image."""
        c = self.out_channels
        p = self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y, force_drop_ids=None):
        """x (N, C, H, W) noisy input, t (N,) timesteps, y (N,) labels -> (N, C_out, H, W).

        force_drop_ids (N,), 1 where the label is replaced by the null class, is the official
        LabelEmbedder's argument passed through (the official forward draws the drop itself): the trainer
        draws it from (seed, step) so that a batch trains the same on any number of ranks."""
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        t = self.t_embedder(t)  # (N, D)
        y = self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        c = t + y  # (N, D)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p * p * C_out)
        return self.unpatchify(x)  # (N, C_out, H, W)

    def forward_with_cfg(self, x, t, y, cfg_scale, guided_channels=3):
        """Classifier-free guidance: the batch is [conditional half, unconditional half] of the same x.

        guided_channels=3 is the official sampler, which guides the first 3 output channels "for exact
        reproducibility" (of its 4 noise channels; for the toy's 2 noise channels, 3 includes a variance
        channel); None guides exactly the in_channels noise channels."""
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        model_out = self.forward(combined, t, y)
        split = self.in_channels if guided_channels is None else guided_channels
        eps, rest = model_out[:, :split], model_out[:, split:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)


#################################################################################
#                         Sine/Cosine Positional Embedding                      #
#################################################################################


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """Fixed 2-D sin-cos table (grid_size**2, embed_dim) in float64, token order row-major."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    # As in the official (MAE) code: the first half encodes the column index, the second half the row.
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # each (G, G)
    emb_first = get_1d_sincos_pos_embed(embed_dim // 2, cols.reshape(-1))  # (G*G, D/2)
    emb_second = get_1d_sincos_pos_embed(embed_dim // 2, rows.reshape(-1))  # (G*G, D/2)
    return torch.cat([emb_first, emb_second], dim=1)  # (G*G, D)


def get_1d_sincos_pos_embed(embed_dim, pos):
    """[sin, cos] features of positions pos (M,) -> (M, embed_dim)."""
    assert embed_dim % 2 == 0
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = pos.reshape(-1)[:, None] * omega[None]  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, D)


#################################################################################
#                                   DiT Configs                                 #
#################################################################################

# Toy data is 2x2x2 (the study's constant-zero data): one token per pixel, a single class and no class
# dropout, so there is no null row and the label embedding is a learned constant.
TOY_DEFAULTS = dict(input_size=2, patch_size=1, in_channels=2, num_classes=1, class_dropout_prob=0.0,
                    learn_sigma=True)
# MNIST (28x28, one channel, 10 classes) in pixel space, with the official recipe's class dropout for
# classifier-free guidance; patch 4 gives 7x7 = 49 tokens.
MNIST_DEFAULTS = dict(input_size=28, in_channels=1, num_classes=10, class_dropout_prob=0.1, learn_sigma=True)


def _entry(name, **arch):
    """A registry function `name`: DiT with `arch` as defaults, any constructor kwarg overridable."""

    def build(**kwargs):
        return DiT(**{**arch, **kwargs})

    build.__name__ = build.__qualname__ = name
    build.arch = arch  # lets the checkpoint loader match an architecture without building a model
    return build


DiT_XL_2 = _entry("DiT_XL_2", depth=28, hidden_size=1152, patch_size=2, num_heads=16)
DiT_XL_4 = _entry("DiT_XL_4", depth=28, hidden_size=1152, patch_size=4, num_heads=16)
DiT_XL_8 = _entry("DiT_XL_8", depth=28, hidden_size=1152, patch_size=8, num_heads=16)
DiT_L_2 = _entry("DiT_L_2", depth=24, hidden_size=1024, patch_size=2, num_heads=16)
DiT_L_4 = _entry("DiT_L_4", depth=24, hidden_size=1024, patch_size=4, num_heads=16)
DiT_L_8 = _entry("DiT_L_8", depth=24, hidden_size=1024, patch_size=8, num_heads=16)
DiT_B_2 = _entry("DiT_B_2", depth=12, hidden_size=768, patch_size=2, num_heads=12)
DiT_B_4 = _entry("DiT_B_4", depth=12, hidden_size=768, patch_size=4, num_heads=12)
DiT_B_8 = _entry("DiT_B_8", depth=12, hidden_size=768, patch_size=8, num_heads=12)
DiT_S_2 = _entry("DiT_S_2", depth=12, hidden_size=384, patch_size=2, num_heads=6)
DiT_S_4 = _entry("DiT_S_4", depth=12, hidden_size=384, patch_size=4, num_heads=6)
DiT_S_8 = _entry("DiT_S_8", depth=12, hidden_size=384, patch_size=8, num_heads=6)
ToyDiT_1 = _entry("ToyDiT_1", **TOY_DEFAULTS, depth=4, hidden_size=64, num_heads=4)
ToyDiT_XS_1 = _entry("ToyDiT_XS_1", **TOY_DEFAULTS, depth=2, hidden_size=32, num_heads=2)
MnistDiT_XS_4 = _entry("MnistDiT_XS_4", **MNIST_DEFAULTS, depth=4, hidden_size=64, num_heads=4, patch_size=4)
MnistDiT_S_4 = _entry("MnistDiT_S_4", **MNIST_DEFAULTS, depth=6, hidden_size=128, num_heads=4, patch_size=4)
MnistDiT_B_4 = _entry("MnistDiT_B_4", **MNIST_DEFAULTS, depth=8, hidden_size=256, num_heads=4, patch_size=4)
MnistDiT_L_4 = _entry("MnistDiT_L_4", **MNIST_DEFAULTS, depth=12, hidden_size=384, num_heads=6, patch_size=4)

DiT_models = {
    "DiT-XL/2": DiT_XL_2, "DiT-XL/4": DiT_XL_4, "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2, "DiT-L/4": DiT_L_4, "DiT-L/8": DiT_L_8,
    "DiT-B/2": DiT_B_2, "DiT-B/4": DiT_B_4, "DiT-B/8": DiT_B_8,
    "DiT-S/2": DiT_S_2, "DiT-S/4": DiT_S_4, "DiT-S/8": DiT_S_8,
    "ToyDiT/1": ToyDiT_1, "ToyDiT-XS/1": ToyDiT_XS_1,
    "MnistDiT-XS/4": MnistDiT_XS_4, "MnistDiT-S/4": MnistDiT_S_4,
    "MnistDiT-B/4": MnistDiT_B_4, "MnistDiT-L/4": MnistDiT_L_4,
}
TOY_MODELS = ("ToyDiT/1", "ToyDiT-XS/1")
MNIST_MODELS = ("MnistDiT-XS/4", "MnistDiT-S/4", "MnistDiT-B/4", "MnistDiT-L/4")


def build_model(name: str, **overrides) -> DiT:
    """DiT_models[name](**overrides), with a clear error for an unknown name."""
    if name not in DiT_models:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(DiT_models)}")
    return DiT_models[name](**overrides)

"""A hand-written forward and backward of models.DiT for the CPU, for models with few tokens (the toy).

Why it exists: the toy DiT has 4 tokens per sample, so a training step does little arithmetic per byte it
moves. In eager PyTorch the tanh-GELU, the attention over 4 tokens and the adaLN modulation are each
several passes over (N T, D) activations in memory, and autograd adds as many again. The kernels
(kernels.py, fused_dit.c) keep a tile of samples in cache through the whole network instead
(docs/performance.md has the timings).

What it provides:
- `fused_hybrid_loss(model, diffusion)`: loss(x_start, t, noise, y) = diffusion.training_losses(model, ...)
  ["loss"].mean() as one autograd node (`HybridLossFunction`) whose forward computes every gradient in one C
  call (`TiledKernels.dit_train`); what the CPU training step uses.
- `fused_model(model)`: a callable with the model's signature, model(x_t, t, y), that runs the whole DiT as
  one autograd node (`DiTFunction`, two C calls); the loss around it stays `diffusion.training_losses`.
- `DiTPlan(model)`: the shapes and norm kind, or `reason` why a model cannot take this path.

These are second implementations of models.py and diffusion/: fast/proof.py checks them against the model
in memory before any of them is used.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import (  # noqa: F401  (load_c_kernels and keep_freed_memory: for the callers)
    MAX_DEPTH,
    MAX_FAST_TOKENS,
    NORM_CODES,
    TiledKernels,
    c_kernels,
    keep_freed_memory,
    load_c_kernels,
)

# ----------------------------------------------------------------------------- the hand-written DiT

def _norm_code(norm):
    """(kind code, eps) of a norm module the fused path knows, else None."""
    if isinstance(norm, nn.Identity):
        return NORM_CODES["none"], 0.0
    if isinstance(norm, nn.LayerNorm) and not norm.elementwise_affine and len(norm.normalized_shape) == 1:
        return NORM_CODES["layernorm"], float(norm.eps)
    if isinstance(norm, nn.RMSNorm) and norm.weight is None and len(norm.normalized_shape) == 1:
        eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        return NORM_CODES["rmsnorm"], float(eps)
    names = [name for name, _ in norm.named_parameters()]
    if type(norm).__name__ == "DynamicTanh" and names == ["alpha"] and norm.alpha.numel() == 1:
        return NORM_CODES["dyt"], 0.0
    return None


class DiTPlan:
    """Shapes and norm kind of a models.DiT for the hand-written path; `reason` says why it cannot run it."""

    def __init__(self, model):
        self.reason = None
        try:
            cfg = model.config
            self.patch, self.in_channels = cfg["patch_size"], cfg["in_channels"]
            self.grid = cfg["input_size"] // self.patch
            self.tokens, self.hidden, self.heads = self.grid ** 2, cfg["hidden_size"], cfg["num_heads"]
            self.head_dim, self.out_channels = self.hidden // self.heads, model.out_channels
            self.mlp_hidden = model.blocks[0].mlp.fc1.out_features
            self.patch_dim = self.in_channels * self.patch ** 2
            self.out_dim = self.out_channels * self.patch ** 2
            blocks, final = list(model.blocks), model.final_layer
            norms = [m for b in blocks for m in (b.norm1, b.norm2)] + [final.norm_final]
        except (AttributeError, KeyError, TypeError) as err:
            self.reason = f"not a models.DiT ({err})"
            return
        codes = {_norm_code(m) for m in norms}
        params = list(model.parameters())
        if len(codes) != 1 or None in codes:
            self.reason = "unknown or mixed norm modules"
        elif cfg.get("dropout") or cfg.get("cap"):
            self.reason = "dropout or an activation cap (neither is in the fused path)"
        elif self.tokens > MAX_FAST_TOKENS:
            self.reason = f"{self.tokens} tokens (the fused path handles up to {MAX_FAST_TOKENS})"
        elif any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
            self.reason = "parameters not float32 on the CPU"
        elif model.pos_embed.requires_grad:
            self.reason = "trainable pos_embed"
        elif len(blocks) > MAX_DEPTH:
            self.reason = f"{len(blocks)} blocks (the fused path handles up to {MAX_DEPTH})"
        else:
            self.kind, self.eps = codes.pop()
            self.depth = len(blocks)

    @staticmethod
    def weights(model):
        """DiTFunction's weights in order: embedder, final linear, per-block linears, dyt alphas."""
        out = [model.x_embedder.proj.weight, model.x_embedder.proj.bias,
               model.final_layer.linear.weight, model.final_layer.linear.bias]
        for b in model.blocks:
            out += [b.attn.qkv.weight, b.attn.qkv.bias, b.attn.proj.weight, b.attn.proj.bias,
                    b.mlp.fc1.weight, b.mlp.fc1.bias, b.mlp.fc2.weight, b.mlp.fc2.bias]
        for m in [n for b in model.blocks for n in (b.norm1, b.norm2)] + [model.final_layer.norm_final]:
            out += list(m.parameters())  # dyt alphas; the other kinds have none
        return out



def adaln_stacked(model):
    """All adaLN weights and biases stacked, blocks then final layer: (K, D), (K,), K = (6 depth + 2) D."""
    linears = [layer.adaLN_modulation[-1] for layer in [*model.blocks, model.final_layer]]
    return torch.cat([lin.weight for lin in linears]), torch.cat([lin.bias for lin in linears])


class DiTFunction(torch.autograd.Function):
    """models.DiT as one autograd node: inputs x_t, conditioning c (N, D), stacked adaLN weights, weights."""

    @staticmethod
    def forward(ctx, plan, kern, x_t, c, pos_embed, w_mod, b_mod, *weights):
        silu_c = F.silu(c)  # (N, D)
        mods = torch.addmm(b_mod, silu_c, w_mod.t())  # (N, K)
        saved = []
        out = kern.dit_forward(plan, x_t, mods, pos_embed, weights, saved)
        ctx.plan, ctx.kern, ctx.saved = plan, kern, saved
        ctx.save_for_backward(c, silu_c, mods, w_mod, *weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        c, silu_c, mods, w_mod, *weights = ctx.saved_tensors
        dsilu, dw_mod, db_mod, grads = ctx.kern.dit_backward(ctx.plan, grad_out.contiguous(), mods, silu_c,
                                                             w_mod, weights, ctx.saved)
        ctx.saved = None
        return (None, None, None, torch.ops.aten.silu_backward(dsilu, c), None, dw_mod, db_mod, *grads)


def fused_model(model, plan=None, kern=None):
    """A callable model(x_t, t, y) computing model(x_t, t, y) through DiTFunction (same values, faster)."""
    plan = plan or DiTPlan(model)
    kern = kern or c_kernels()
    if plan.reason or kern is None:
        raise ValueError(f"the fused DiT path cannot run this model: {plan.reason or 'no C kernels here'}")

    def forward(x_t, t, y):
        c = model.t_embedder(t) + model.y_embedder(y, model.training)  # (N, D)
        w_mod, b_mod = adaln_stacked(model)
        return DiTFunction.apply(plan, kern, x_t.contiguous(), c, model.pos_embed, w_mod, b_mod,
                                 *DiTPlan.weights(model))

    return forward


# The columns of dit_train's per-sample loss coefficients (LC_* in fused_dit.c, same order).
LOSS_COLUMNS = ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1",
                "posterior_mean_coef2", "posterior_log_variance_clipped", "log_betas", "vb_weight", "decoder")


def hybrid_loss_supported(diffusion):
    """Whether fused_hybrid_loss computes this diffusion's training loss: Improved DDPM's hybrid loss (eps
    prediction, learned-range variance, "mse" or "rescaled_mse"), DiT's; None if so, else the reason."""
    kind = (diffusion.model_mean_type, diffusion.model_var_type, diffusion.loss_type)
    if kind[:2] != ("epsilon", "learned_range") or kind[2] not in ("mse", "rescaled_mse"):
        return f"the fused loss is the hybrid loss (epsilon, learned_range, mse); this diffusion has {kind}"
    return None


class HybridLossFunction(torch.autograd.Function):
    """diffusion.training_losses(model, ...)["loss"].mean() as one autograd node whose forward also computes
    every gradient (TiledKernels.dit_train); its backward only hands them on, times the incoming gradient.
    Samples at t = 0, whose VB term is the decoder NLL (~1 in 1000), take it and its gradient from the C
    code too (in double there)."""

    @staticmethod
    def forward(ctx, plan, kern, diffusion, x_start, t, noise, c, pos_embed, w_mod, b_mod, *weights):
        silu_c = F.silu(c)  # (N, D)
        coefs = diffusion.coefficients(t, x_start)
        x_t = diffusion.q_sample(x_start, t, noise)  # as training_losses draws it
        N = x_start.shape[0]
        vb_weight = diffusion.num_timesteps / 1000.0 if diffusion.loss_type == "rescaled_mse" else 1.0
        columns = [getattr(coefs, name).reshape(N) for name in LOSS_COLUMNS[:6]]
        columns += [torch.full_like(columns[0], vb_weight), (t == 0).to(x_start.dtype)]
        lc = torch.stack(columns, dim=1)  # (N, len(LOSS_COLUMNS))
        losses, dsilu, dw_mod, db_mod, grads = kern.dit_train(
            plan, x_t, x_start, noise, lc, silu_c, w_mod, b_mod, pos_embed, weights)
        ctx.save_for_backward(c, dsilu, dw_mod, db_mod, *grads)
        return losses.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        c, dsilu, dw_mod, db_mod, *grads = ctx.saved_tensors
        if grad_loss.item() != 1.0:  # (a CPU scalar: no sync) loss.backward() passes 1
            dsilu, dw_mod, db_mod = dsilu * grad_loss, dw_mod * grad_loss, db_mod * grad_loss
            grads = [g * grad_loss for g in grads]
        dc = torch.ops.aten.silu_backward(dsilu, c)
        return (None, None, None, None, None, None, dc, None, dw_mod, db_mod, *grads)


def fused_hybrid_loss(model, diffusion, plan=None, kern=None):
    """loss(x_start, t, noise, y) -> diffusion.training_losses(model, ...)["loss"].mean(), with forward, loss
    and backward in one C call a tile at a time (HybridLossFunction); the same values as the plain path."""
    plan = plan or DiTPlan(model)
    kern = kern or c_kernels()
    reason = plan.reason or hybrid_loss_supported(diffusion) or (None if kern else "no C kernels here")
    if reason:
        raise ValueError(f"fused_hybrid_loss cannot run here: {reason}")

    def loss(x_start, t, noise, y):
        c = model.t_embedder(diffusion.model_timesteps(t)) + model.y_embedder(y, model.training)  # (N, D)
        w_mod, b_mod = adaln_stacked(model)
        return HybridLossFunction.apply(plan, kern, diffusion, x_start.contiguous(), t, noise.contiguous(), c,
                                        model.pos_embed, w_mod, b_mod, *DiTPlan.weights(model))

    return loss

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
  one autograd node (`DiTFunction`); the loss around it stays `diffusion.training_losses`.
- `dit_forward` / `dit_backward`: the same maths on the modular kernels (`CKernels`, `TorchKernels`).
- `DiTPlan(model)`: the shapes and norm kind, or `reason` why a model cannot take this path.

These are second implementations of models.py and diffusion/: fast/proof.py checks them against the model
in memory before any of them is used.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import (  # noqa: F401  (the kernel sets, re-exported for the tests)
    MAX_DEPTH,
    MAX_FAST_TOKENS,
    NORM_CODES,
    CKernels,
    TiledKernels,
    TorchKernels,
    default_kernels,
    keep_freed_memory,
    load_c_kernels,
    patch_rows,
    unpatch_rows,
)
from .small_shapes import adaln_stacked

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



def dit_forward(plan, kern, x, mods, pos_embed, weights, saved=None):
    """DiT forward from the adaLN vectors mods (N or 1, K): x (N, C, H, W) -> (N, C_out, H, W).

    Appends to `saved` (when given) what dit_backward needs."""
    if hasattr(kern, "dit_forward"):
        return kern.dit_forward(plan, x, mods, pos_embed, weights, saved)
    N, T, D, H, hd = x.shape[0], plan.tokens, plan.hidden, plan.heads, plan.head_dim
    wx, bx, wl, bl = weights[:4]
    alphas = [float(a) for a in weights[4 + 8 * plan.depth:]] or [0.0] * (2 * plan.depth + 1)
    xp = patch_rows(plan, x)  # (M, C p p)
    h = torch.addmm(bx, xp, wx.view(D, -1).t())  # (M, D)
    h.view(N, T, D).add_(pos_embed)
    if saved is not None:
        saved.append(xp)
    for i in range(plan.depth):
        wqkv, bqkv, wproj, bproj, w1, b1, w2, b2 = weights[4 + 8 * i: 12 + 8 * i]
        shift1, scale1, gate1, shift2, scale2, gate2 = mods[:, 6 * D * i: 6 * D * (i + 1)].split(D, dim=1)
        n1, m1, r1 = kern.norm_mod_fwd(h, N, T, plan.kind, plan.eps, alphas[2 * i], shift1, scale1)
        # Matmuls without bias: the kernel that reads each result adds the bias in the same pass
        # (addmm would first copy the broadcast bias into the output, one more pass over it).
        qkv = m1 @ wqkv.t()  # (M, 3D)
        o, probs = kern.attn_fwd(qkv, bqkv, N, T, H, hd)  # (M, D), (N, H, T, T)
        a = o @ wproj.t()  # (M, D)
        h1 = kern.gate_fwd(h, a, bproj, gate1, N, T)  # h + gate1 * a
        n2, m2, r2 = kern.norm_mod_fwd(h1, N, T, plan.kind, plan.eps, alphas[2 * i + 1], shift2, scale2)
        f1 = m2 @ w1.t()  # (M, F)
        g1 = kern.gelu_fwd(f1, b1)
        f2 = g1 @ w2.t()  # (M, D)
        if saved is not None:
            saved.append((h, n1, m1, r1, qkv, probs, o, a, h1, n2, m2, r2, f1, g1, f2))
        h = kern.gate_fwd(h1, f2, b2, gate2, N, T)
    shift, scale = mods[:, 6 * D * plan.depth:].split(D, dim=1)
    nf, mf, rf = kern.norm_mod_fwd(h, N, T, plan.kind, plan.eps, alphas[-1], shift, scale)
    out = torch.addmm(bl, mf, wl.t())  # (M, p p C_out)
    if saved is not None:
        saved.append((h, nf, mf, rf))
    return unpatch_rows(plan, out, N)


def dit_backward(plan, kern, grad_out, mods, weights, saved):
    """Gradients of dit_forward: (d mods (N, K), [d weight for weights])."""
    N, T, D, H, hd = grad_out.shape[0], plan.tokens, plan.hidden, plan.heads, plan.head_dim
    kind = plan.kind
    wx, bx, wl, bl = weights[:4]
    alpha_params = weights[4 + 8 * plan.depth:]
    alphas = [float(a) for a in alpha_params] or [0.0] * (2 * plan.depth + 1)
    grads = [None] * len(weights)
    dalphas = [None] * len(alpha_params)
    dmods = mods.new_empty(N, mods.shape[1])  # every column is written below
    xp, (hf, nf, mf, rf) = saved[0], saved.pop()

    dout = patch_rows(plan, grad_out, out=True)  # (M, p p C_out)
    grads[2], grads[3] = dout.t() @ mf, dout.sum(0)
    dmf = dout @ wl  # (M, D)
    del mf
    dshift, dscale = dmods[:, 6 * D * plan.depth:].split(D, dim=1)
    scale = mods[:, 6 * D * plan.depth + D:]
    dh, da_f = kern.norm_mod_bwd(dmf, nf, hf, rf, N, T, kind, alphas[-1], scale, dshift, dscale, None)
    if alpha_params:
        dalphas[-1] = da_f
    for i in reversed(range(plan.depth)):
        # Popping frees each block's activations as soon as they are used, so the allocator reuses that
        # memory for the gradients instead of faulting in fresh pages (measured: 20k page faults per step).
        h, n1, m1, r1, qkv, probs, o, a, h1, n2, m2, r2, f1, g1, f2 = saved.pop()
        wqkv, bqkv, wproj, bproj, w1, b1, w2, b2 = weights[4 + 8 * i: 12 + 8 * i]
        _, scale1, gate1, _, scale2, gate2 = mods[:, 6 * D * i: 6 * D * (i + 1)].split(D, dim=1)
        dshift1, dscale1, dgate1, dshift2, dscale2, dgate2 = dmods[:, 6 * D * i: 6 * D * (i + 1)].split(D, 1)
        j = 4 + 8 * i
        # MLP branch: h = h1 + gate2 * fc2(gelu(fc1(modulate(norm2(h1)))))
        df2, grads[j + 7] = kern.gate_bwd(dh, f2, gate2, dgate2, N, T)
        grads[j + 6] = df2.t() @ g1
        df1, grads[j + 5] = kern.gelu_bwd(df2 @ w2, f1)  # (M, F)
        grads[j + 4] = df1.t() @ m2
        dh1, da2 = kern.norm_mod_bwd(df1 @ w1, n2, h1, r2, N, T, kind, alphas[2 * i + 1], scale2, dshift2,
                                     dscale2, dh)
        # attention branch: h1 = h + gate1 * proj(attn(qkv(modulate(norm1(h)))))
        da, grads[j + 3] = kern.gate_bwd(dh1, a, gate1, dgate1, N, T)
        grads[j + 2] = da.t() @ o
        dqkv, grads[j + 1] = kern.attn_bwd(da @ wproj, qkv, probs, N, T, H, hd)  # (M, 3D)
        grads[j] = dqkv.t() @ m1
        dh, da1 = kern.norm_mod_bwd(dqkv @ wqkv, n1, h, r1, N, T, kind, alphas[2 * i], scale1, dshift1,
                                    dscale1, dh1)
        if alpha_params:
            dalphas[2 * i], dalphas[2 * i + 1] = da1, da2
    grads[0], grads[1] = (dh.t() @ xp).view_as(wx), dh.sum(0)
    grads[4 + 8 * plan.depth:] = dalphas
    return dmods, grads


class DiTFunction(torch.autograd.Function):
    """models.DiT as one autograd node: inputs x_t, conditioning c (N, D), stacked adaLN weights, weights."""

    @staticmethod
    def forward(ctx, plan, kern, x_t, c, pos_embed, w_mod, b_mod, *weights):
        silu_c = F.silu(c)  # (N, D)
        mods = torch.addmm(b_mod, silu_c, w_mod.t())  # (N, K)
        saved = []
        out = dit_forward(plan, kern, x_t, mods, pos_embed, weights, saved)
        ctx.plan, ctx.kern, ctx.saved = plan, kern, saved
        ctx.save_for_backward(c, silu_c, mods, w_mod, *weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        c, silu_c, mods, w_mod, *weights = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        if isinstance(ctx.kern, TiledKernels):
            dsilu, dw_mod, db_mod, grads = ctx.kern.dit_backward(ctx.plan, grad_out, mods, silu_c, w_mod,
                                                                 weights, ctx.saved)
        else:
            dmods, grads = dit_backward(ctx.plan, ctx.kern, grad_out, mods, weights, ctx.saved)
            dsilu, dw_mod, db_mod = dmods @ w_mod, dmods.t() @ silu_c, dmods.sum(0)
        ctx.saved = None
        return (None, None, None, torch.ops.aten.silu_backward(dsilu, c), None, dw_mod, db_mod, *grads)


def fused_model(model, plan=None, kern=None):
    """A callable model(x_t, t, y) computing model(x_t, t, y) through DiTFunction (same values, faster)."""
    plan = plan or DiTPlan(model)
    if plan.reason:
        raise ValueError(f"the fused DiT path cannot run this model: {plan.reason}")
    kern = kern or default_kernels()

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
    kern = kern or default_kernels()
    reason = plan.reason or hybrid_loss_supported(diffusion) or (
        None if isinstance(kern, TiledKernels) else "the fused loss needs the tiled C kernels")
    if reason:
        raise ValueError(f"fused_hybrid_loss cannot run here: {reason}")

    def loss(x_start, t, noise, y):
        c = model.t_embedder(diffusion.model_timesteps(t)) + model.y_embedder(y, model.training)  # (N, D)
        w_mod, b_mod = adaln_stacked(model)
        return HybridLossFunction.apply(plan, kern, diffusion, x_start.contiguous(), t, noise.contiguous(), c,
                                        model.pos_embed, w_mod, b_mod, *DiTPlan.weights(model))

    return loss

"""The whole optimisation step of the toy study: forward, hybrid loss, backward, all-reduce, AdamW, EMA.

`make_train_step` returns the fastest correct step for the model and device:
- CPU, DiT with few tokens (the toy): a hand-written forward and backward in C that keeps each tile of
  samples in cache through the whole network (see fused_dit.py). With DiT's hybrid loss the loss and its
  gradient are computed in C too, per tile between its forward and its backward
  (fused_dit.fused_hybrid_loss); with any other loss the model runs as fused_dit.fused_model under
  `diffusion.training_losses`.
- CUDA: the whole step (forward, backward, AdamW with capturable=True, EMA) captured in CUDA graphs and
  replayed with the caller's tensors copied into static buffers; by default the forward and loss are first
  torch.compile'd into one graph, so that the CUDA graph replays a few fused kernels instead of hundreds.
- Anything else: the plain step (model forward + autograd), also the reference of the tests.

Importing this module changes nothing global; make_train_step's docstring lists what calling it changes.
"""

import warnings

import torch
import torch.distributed as dist

from .fused_dit import (
    DiTPlan,
    TiledKernels,
    default_kernels,
    fused_hybrid_loss,
    fused_model,
    hybrid_loss_supported,
    keep_freed_memory,
)
from .proof import check_loss
from .small_shapes import small_shape_forward, small_shapes_reason


@torch.no_grad()
def update_ema(ema_params, params, decay):
    """ema <- decay * ema + (1 - decay) * param for whole parameter lists at once."""
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def all_reduce_mean(grads, world_size):
    """Average gradients over ranks with a single collective on one flattened buffer."""
    flat = torch.cat([g.reshape(-1) for g in grads])  # (P,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # gloo has no AVG
    flat.div_(world_size)
    torch._foreach_copy_(grads, [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]),
                                                                      grads, strict=True)])


def _use_fused_adam(optimizer, capturable=False):
    """Switch Adam/AdamW to its fused kernel (the same update rule, one pass over all parameters)."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return
    for group in optimizer.param_groups:
        if not group.get("differentiable", False):
            group["foreach"], group["fused"] = False, True
            group["capturable"] = group.get("capturable", False) or capturable


def _loss_fn(diffusion, model_fn):
    """loss(x_start, t, noise, y) -> the batch mean of diffusion.training_losses with model_fn."""
    def loss(x_start, t, noise, y):
        losses = diffusion.training_losses(model_fn, x_start, t, model_kwargs={"y": y}, noise=noise)
        return losses["loss"].mean()
    return loss


def _make_step(loss_fn, model, ema, optimizer, ema_decay, world_size):
    """The step around a loss callable: loss, backward, all-reduce, optimizer, EMA."""
    params = [p for p in model.parameters() if p.requires_grad]
    model_params, ema_params = list(model.parameters()), list(ema.parameters())
    if len(model_params) != len(ema_params):
        raise ValueError("ema must be a copy of model (copy.deepcopy(model))")

    def step(x_start, t, noise, y):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(x_start, t, noise, y)
        loss.backward()
        if world_size > 1:
            for p in params:
                if p.grad is None:  # every rank must send the same buffer layout
                    p.grad = torch.zeros_like(p)
            all_reduce_mean([p.grad for p in params], world_size)
        optimizer.step()
        update_ema(ema_params, model_params, ema_decay)
        return loss.detach()

    return step


def compile_options(setting):
    """A compile setting 'MODE[+FLAG...]' -> the inductor options for torch.compile: those of the mode
    (torch._inductor.list_mode_options; None or "default" for none) and each inductor config FLAG set True,
    e.g. "max-autotune-no-cudagraphs" or "default+combo_kernels". ValueError with the choices otherwise;
    modes with inductor's own CUDA graphs are refused, the step captures its own."""
    import torch._inductor.config as inductor_config

    mode, *flags = (setting or "default").split("+")
    modes = {name: options for name, options in torch._inductor.list_mode_options().items()
             if not options.get("triton.cudagraphs")}
    if mode not in modes:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(modes)}, optionally "
                         "followed by +FLAG for a boolean inductor config flag (e.g. default+combo_kernels)")
    for flag in flags:
        if not isinstance(getattr(inductor_config, flag, None), bool):
            raise ValueError(f"{flag!r} is not a boolean flag of torch._inductor.config")
        if "cudagraph" in flag:
            raise ValueError(f"{flag!r} would capture inductor's own CUDA graphs inside the step's")
    return {**modes[mode], **dict.fromkeys(flags, True)}


def _compiled_loss_fn(diffusion, model, backend="inductor", mode=None, model_fn=None):
    """_loss_fn under torch.compile: one graph or an error (a graph break would hide a host sync), fixed
    shapes (one batch size).

    The diffusion fills its lookup tables for a device on first use; filled inside the traced call, they
    change what dynamo guards on, and the second call compiled everything again. They are filled here
    first (tests/test_fast_train_step.py counts the compilations)."""
    param = next(model.parameters())
    t = torch.zeros(1, dtype=torch.long, device=param.device)
    diffusion.coefficients(t, param.new_zeros(1))
    diffusion.model_timesteps(t)
    options = compile_options(mode) or None  # (other backends take no options)
    return torch.compile(_loss_fn(diffusion, model_fn or model), backend=backend, options=options,
                         fullgraph=True, dynamic=False)


def _make_cuda_graph_step(model, ema, diffusion, optimizer, ema_decay, world_size, compile_loss,
                          compile_mode=None, model_fn=None):
    """The step captured in CUDA graphs after 3 eager warm-up steps; replayed for every later step.

    With compile_loss, the forward and hybrid loss (and through AOTAutograd their backward) are one
    torch.compile graph, whose fused kernels the CUDA graph then replays: far fewer, larger kernels than the
    plain model's. The caller's x_start/t/noise/y are copied into static buffers before each replay. With
    world_size > 1 the gradient all-reduce runs between two graphs (forward+backward, then optimizer+EMA), so
    that no collective is captured. A batch of another shape runs the eager step.
    """
    _use_fused_adam(optimizer, capturable=True)
    # cuDNN convolutions (the patch embedding) default to TF32 on Ampere+: ~1e-3 relative error, the size
    # of the effects the study measures. The toy keeps fp32 throughout.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    for p in model.parameters():  # capturable AdamW keeps its step counters on the device
        state = optimizer.state.get(p, {})
        if torch.is_tensor(state.get("step")) and state["step"].device != p.device:
            state["step"] = state["step"].to(p.device)
    if compile_loss:
        loss_fn = _compiled_loss_fn(diffusion, model, mode=compile_mode, model_fn=model_fn)
    else:
        loss_fn = _loss_fn(diffusion, model_fn or model)
    eager = _make_step(loss_fn, model, ema, optimizer, ema_decay, world_size)
    params = [p for p in model.parameters() if p.requires_grad]
    model_params, ema_params = list(model.parameters()), list(ema.parameters())
    captured = {}  # shape key -> (graphs, static inputs, static loss, flat gradient buffer)
    warmup = {"steps": 0}

    def forward_backward(x_start, t, noise, y):
        loss = loss_fn(x_start, t, noise, y)
        loss.backward()
        return loss.detach()

    def update():
        optimizer.step()
        update_ema(ema_params, model_params, ema_decay)

    def capture(inputs):
        static = [x.clone() for x in inputs]
        optimizer.zero_grad(set_to_none=True)  # the graph allocates the gradients in its own pool
        first, second = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(first):
            loss = forward_backward(*static)
            flat = torch.cat([p.grad.reshape(-1) for p in params]) if world_size > 1 else None
        with torch.cuda.graph(second, pool=first.pool()):
            if world_size > 1:
                flat.div_(world_size)
                torch._foreach_copy_([p.grad for p in params],
                                     [c.view_as(p) for c, p in zip(flat.split([p.numel() for p in params]),
                                                                   params, strict=True)])
            update()
        return (first, second), static, loss, flat

    def step(x_start, t, noise, y):
        inputs = (x_start, t, noise, y)
        if warmup["steps"] < 3:  # warm-up on a side stream, as CUDA graph capture requires
            warmup["steps"] += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = eager(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        if key not in captured:
            if captured:  # another batch shape (e.g. a last partial batch): no new graph for it
                return eager(*inputs)
            captured[key] = capture(inputs)
        (first, second), static, loss, flat = captured[key]
        for buf, x in zip(static, inputs, strict=True):
            buf.copy_(x, non_blocking=True)
        first.replay()
        if world_size > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        second.replay()
        return loss.clone()

    return step


def make_optimizer(params, lr: float):
    """AdamW of the DiT recipe (constant lr, no weight decay) with PyTorch's fused kernel: the same update
    rule in one pass over every parameter, instead of a loop of foreach ops (ToyDiT/1 on the 2-core CPU:
    0.6 ms instead of 2.6 ms per step)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=0, fused=True)


FAST_CHOICES = ("auto", "off")


def make_train_step(model, ema, diffusion, optimizer, *, ema_decay: float, world_size: int = 1,
                    fast: str = "auto", compile_cuda: bool = True, compile_mode: str | None = None, log=None):
    """Return step(x_start, t, noise, y) -> local mean loss (0-dim detached tensor).

    Does forward, hybrid loss (diffusion.training_losses semantics), backward, gradient all-reduce (mean over
    ranks via torch.distributed when world_size > 1), optimizer.step(), EMA update of `ema` (a deepcopy of
    model, requires_grad False). The returned function's `path` attribute names the implementation chosen:
    "tiled-cpu" / "fused-cpu" / "torch-cpu" (hand-written DiT, see kernels.default_kernels),
    "cuda-graph-compiled" (compile_cuda, the default), "cuda-graph", or "plain" (the model's own forward
    and autograd); `fast_reason` says why a fast path was not taken (None when one was).

    fast="auto" takes a fast path only after fast.proof.check_loss has found it to compute the loss and
    gradients of diffusion.training_losses with the model as it is in memory; otherwise, or with
    fast="off", the plain step runs, and log (a callable; default warnings.warn) gets the reason in one
    line. On CUDA the CUDA graph always holds the model's step; what is checked there is the forward for
    small shapes (fast/small_shapes.py), used only if it passes. compile_mode sets how the CUDA step's
    forward and loss are compiled (see compile_options; None: inductor's defaults).

    Effects beyond the step itself, each made here and nowhere at import (one line each, with the reason):
    - CPU fast path: glibc mallopt keeps freed memory in the heap, process-wide (kernels.keep_freed_memory):
      without it each step faulted in thousands of freshly mapped pages (docs/performance.md).
    - CUDA path: the caller's Adam/AdamW is switched to fused=True, capturable=True (graph capture needs
      capturable), and TF32 is turned off process-wide for cuDNN and matmuls (TF32's ~1e-3 error is the
      size of the effects the study measures).
    The CPU path leaves the optimizer as the caller made it; make_optimizer gives the fused AdamW that
    ditnorm/trainer.py uses.
    """
    if fast not in FAST_CHOICES:
        raise ValueError(f"fast must be one of {', '.join(FAST_CHOICES)}, got {fast!r}")
    log = log or warnings.warn
    device = next(model.parameters()).device

    def plain_loss(m):
        return _loss_fn(diffusion, m)

    if device.type == "cuda" and fast != "off":
        reason = small_shapes_reason(model)
        if reason is None:
            reason = check_loss(lambda m: _loss_fn(diffusion, small_shape_forward(m)), plain_loss, model,
                                diffusion)
            if reason is not None:
                log(f"fast path not used: the forward for small shapes: {reason}; the CUDA graph holds the "
                    "model's own forward")
        forward = small_shape_forward(model) if reason is None else None
        step = _make_cuda_graph_step(model, ema, diffusion, optimizer, ema_decay, world_size, compile_cuda,
                                     compile_mode, model_fn=forward)
        step.path = "cuda-graph-compiled" if compile_cuda else "cuda-graph"
        step.fast_reason = reason
        return step
    reason = "fast='off'" if fast == "off" else DiTPlan(model).reason
    if reason is None:
        kern = default_kernels()
        hybrid = isinstance(kern, TiledKernels) and hybrid_loss_supported(diffusion) is None

        def fast_loss(m):
            if hybrid:
                return fused_hybrid_loss(m, diffusion, DiTPlan(m), kern)
            return _loss_fn(diffusion, fused_model(m, DiTPlan(m), kern))

        reason = check_loss(fast_loss, plain_loss, model, diffusion)
        if reason is None:
            keep_freed_memory()
            step = _make_step(fast_loss(model), model, ema, optimizer, ema_decay, world_size)
            step.path, step.fast_reason = kern.name, None
            return step
        log(f"fast path not used: {reason}; training with the model's own forward and autograd")
    step = _make_step(plain_loss(model), model, ema, optimizer, ema_decay, world_size)
    step.path, step.fast_reason = "plain", reason
    return step

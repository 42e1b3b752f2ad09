"""The residual-stream probe of diffusers transformers (DiT, PixArt, SD3, Flux; probe.py runs it): N(0, 1)
latents noised to each timestep (DDPM for DiT and PixArt, flow matching for SD3 and Flux), text embeddings
a zero or random stand-in that every table names, the statistics of analysis.outlier_stats per block."""

from pathlib import Path

import torch

from diffusion import create_diffusion
from ditnorm import analysis
from ditnorm.files import CheckpointError, first_line
from ditnorm.hub import diffusers_folder, read_config, use_official_dit_function

# diffusers class: ((attribute holding a list of blocks, label prefix), ...), and the streams a block returns
FAMILIES = {
    "DiTTransformer2DModel": ((("transformer_blocks", ""),), ("image",)),
    "PixArtTransformer2DModel": ((("transformer_blocks", ""),), ("image",)),
    "SD3Transformer2DModel": ((("transformer_blocks", ""),), ("text", "image")),
    "FluxTransformer2DModel": ((("transformer_blocks", "double "), ("single_transformer_blocks", "single ")),
                               ("text", "image")),
}
TEXT_STANDINS = {"zeros": "text embeddings: ZEROS stand-in (no text encoder run)",
                 "random": "text embeddings: N(0, 1) RANDOM stand-in (no text encoder run)"}
FLUX_LATENT_SIZE = 64  # 512 x 512 pixels; Flux's config has no sample size
FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale, for the guidance-distilled models


def family_of(model) -> str:
    """The diffusers class name of a probed model (one of FAMILIES)."""
    name = type(model).__name__
    if name not in FAMILIES:
        raise ValueError(f"{name} is not probed; pass one of {', '.join(FAMILIES)}")
    return name


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_transformer(path_or_id, *, device="cpu", dtype=torch.float32, download=True):
    """A diffusers transformer of a probed family from a folder (or a pipeline folder) or a hub id, in eval
    mode; a DiT set to compute the official DiT function. dtype: a torch dtype or a name in DTYPES."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    folder = diffusers_folder(path_or_id, download)
    if folder is None:
        raise CheckpointError(f"{path_or_id} is not a diffusers model folder or hub id; pass the folder of a "
                              "transformer written by save_pretrained")
    cfg = read_config(folder)
    name = cfg.get("_class_name")
    if name == "Transformer2DModel":  # the legacy class of both DiT and PixArt folders
        name = {"ada_norm_zero": "DiTTransformer2DModel", "ada_norm_single": "PixArtTransformer2DModel"}.get(
            cfg.get("norm_type"), name)
    if name not in FAMILIES:
        raise CheckpointError(f"{folder} holds a {name}; the probe reads {', '.join(FAMILIES)}")
    import diffusers

    try:
        model = getattr(diffusers, name).from_pretrained(folder, torch_dtype=dtype)
    except Exception as e:
        raise CheckpointError(f"diffusers cannot load {folder} ({first_line(e)}); pass a complete folder "
                              "written by save_pretrained") from None
    if name == "DiTTransformer2DModel":
        use_official_dit_function(model)
    return model.to(device).eval()


def probe_inputs(model, timestep, *, batch_size=1, class_label=0, text="zeros", text_length=77,
                 latent_size=None, seed=0):
    """(forward kwargs, one-line description) for `model` at `timestep` in 0..999; the same seed gives the
    same latents, noise and text stand-in at every timestep."""
    family, cfg = family_of(model), model.config
    if not 0 <= timestep <= 999:
        raise ValueError(f"timestep {timestep} is outside 0..999; pass one inside")
    if text not in TEXT_STANDINS:
        raise ValueError(f"text={text!r}; choose one of {', '.join(TEXT_STANDINS)}")
    flux = family == "FluxTransformer2DModel"
    size = latent_size or (FLUX_LATENT_SIZE if flux else cfg.sample_size)
    if flux and size % 2:
        raise ValueError(f"latent size {size}: Flux packs 2x2 latent patches, pass an even size")
    g = torch.Generator().manual_seed(seed)
    channels = cfg.in_channels // 4 if flux else cfg.in_channels
    x_start = torch.randn(batch_size, channels, size, size, generator=g)  # (N, C, H, W) stand-in latents
    noise = torch.randn(x_start.shape, generator=g)
    if family in ("DiTTransformer2DModel", "PixArtTransformer2DModel"):  # DDPM, DiT's linear schedule
        t = torch.full((batch_size,), int(timestep), dtype=torch.long)
        x_t = create_diffusion("").q_sample(x_start, t, noise=noise)
        noising = f"N(0,1) latents noised by DDPM's q_sample to t={timestep}"
    else:
        sigma = timestep / 1000
        x_t = (1 - sigma) * x_start + sigma * noise
        noising = f"N(0,1) latents noised by flow matching to t={timestep} (sigma = t/1000)"

    def text_like(*shape):
        return torch.zeros(shape) if text == "zeros" else torch.randn(shape, generator=g)

    if family == "DiTTransformer2DModel":
        if not 0 <= class_label < cfg.num_embeds_ada_norm:
            raise ValueError(f"class {class_label} out of range: the model has classes "
                             f"0..{cfg.num_embeds_ada_norm - 1}")
        inputs = dict(hidden_states=x_t, timestep=t, class_labels=torch.full((batch_size,), class_label))
        described = f"{noising}, class {class_label}"
    elif family == "PixArtTransformer2DModel":
        width = cfg.caption_channels or model.inner_dim
        extra = dict(resolution=None, aspect_ratio=None)
        if model.use_additional_conditions:  # PixArt-alpha 1024: image size in pixels and aspect ratio
            extra = dict(resolution=torch.full((batch_size, 2), 8.0 * size),
                         aspect_ratio=torch.ones(batch_size, 1))
        inputs = dict(hidden_states=x_t, encoder_hidden_states=text_like(batch_size, text_length, width),
                      timestep=t, added_cond_kwargs=extra)
        described = f"{noising}, {TEXT_STANDINS[text]}"
    else:
        embeddings = text_like(batch_size, text_length, cfg.joint_attention_dim)
        pooled = text_like(batch_size, cfg.pooled_projection_dim)
        inputs = dict(encoder_hidden_states=embeddings, pooled_projections=pooled)
        if flux:  # packed 2x2 patches, token order row-major, with their (0, row, column) position ids
            h = size // 2
            packed = x_t.reshape(batch_size, channels, h, 2, h, 2).permute(0, 2, 4, 1, 3, 5)
            rows, cols = torch.meshgrid(torch.arange(h), torch.arange(h), indexing="ij")
            img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
            inputs.update(hidden_states=packed.reshape(batch_size, h * h, channels * 4), img_ids=img_ids,
                          txt_ids=torch.zeros(text_length, 3), timestep=torch.full((batch_size,), sigma))
            if cfg.guidance_embeds:
                inputs["guidance"] = torch.full((batch_size,), FLUX_GUIDANCE)
        else:
            inputs.update(hidden_states=x_t, timestep=torch.full((batch_size,), sigma * 1000))
        described = f"{noising}, {TEXT_STANDINS[text]}"
    return _to_model(inputs, model), described


def _to_model(inputs, model):
    """Tensors (also inside dicts) moved to the model's device, floating ones cast to its dtype except the
    timestep and guidance, which the pipelines pass in float32."""
    def move(v, key):
        if isinstance(v, dict):
            return {k: move(x, k) for k, x in v.items()}
        if not torch.is_tensor(v):
            return v
        cast = v.is_floating_point() and key not in ("timestep", "guidance")
        return v.to(model.device, model.dtype if cast else v.dtype)
    return {k: move(v, k) for k, v in inputs.items()}


@torch.no_grad()
def capture_streams(model, inputs) -> dict:
    """One forward pass; {stream: [(block label, residual stream (N, T, D) after that block)]}, hooks removed
    after. SD3's last block returns no text stream, so that stream has one entry fewer."""
    lists, names = FAMILIES[family_of(model)]
    streams = {name: [] for name in names}
    text_length = inputs["encoder_hidden_states"].shape[1] if "encoder_hidden_states" in inputs else 0

    def hook_for(label):
        def hook(_module, _args, output):
            outs = output if isinstance(output, tuple) else (output,)
            if len(names) == 2 and len(outs) == 1:  # older diffusers' single-stream block: text tokens first
                outs = (outs[0][:, :text_length], outs[0][:, text_length:])
            for name, h in zip(names, outs, strict=True):
                if h is not None:
                    streams[name].append((label, h.detach().float().cpu()))
        return hook

    handles = [block.register_forward_hook(hook_for(f"{prefix}{i}"))
               for attr, prefix in lists for i, block in enumerate(getattr(model, attr))]
    try:
        model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return streams


def probe(model, timesteps, **input_options):
    """capture_streams at every timestep, from the same latents, noise and text: ([streams per timestep],
    description of the inputs)."""
    runs, described = [], ""
    for timestep in timesteps:
        inputs, described = probe_inputs(model, timestep, **input_options)
        runs.append(capture_streams(model, inputs))
    return runs, described.replace(f"t={timesteps[-1]}", f"t={','.join(str(t) for t in timesteps)}", 1)


def layer_stats(per_timestep):
    """Statistics of one block's output over timesteps [(N, T, D), ...]: analysis.outlier_stats' top-1/2/3,
    median, ratio and massive, plus the signed top-1 value, the 3 channels with the largest peaks, the share
    of tokens whose largest |value| is in the first of them, and each timestep's top channel."""
    h = torch.cat(per_timestep)  # (len(t) * N, T, D)
    row = analysis.outlier_stats([h])[0]
    del row["layer"]
    a = h.abs()
    peaks = a.amax(dim=(0, 1))  # (D,)
    channels = torch.topk(peaks, k=min(3, len(peaks))).indices.tolist()
    row.update(top1_value=h.flatten()[a.argmax()].item(), channels=channels,
               token_share=(a.argmax(dim=-1) == channels[0]).double().mean().item(),
               timestep_channels=[x.abs().amax(dim=(0, 1)).argmax().item() for x in per_timestep])
    return row


def probe_stats(runs) -> list[dict]:
    """One row per (stream, block) of probe()'s runs."""
    rows = []
    for stream, layers in runs[0].items():
        for layer, (label, _) in enumerate(layers):
            per_timestep = [run[stream][layer][1] for run in runs]
            rows.append({"stream": stream, "layer": layer, "block": label, **layer_stats(per_timestep)})
    return rows


def _channels(values):
    return " ".join(str(c) for c in values)


def format_probe_table(rows, title=""):
    """Markdown table of probe_stats rows."""
    lines = [f"**{title}**", ""] if title else []
    lines += ["| stream | block | top-1 | top-1 value | top-2 | top-3 | median | top-1 / median | massive "
              "| top channels | tokens led by top channel | top channel per timestep |",
              "|---|---|---:|---:|---:|---:|---:|---:|:---:|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['stream']} | {r['block'] or r['layer']} | {r['top1']:.4g} "
                     f"| {r['top1_value']:.4g} | {r['top2']:.4g} | {r['top3']:.4g} | {r['median']:.3g} "
                     f"| {r['ratio']:.4g} "
                     f"| {'yes' if r['massive'] else ''} | {_channels(r['channels'])} "
                     f"| {r['token_share']:.0%} | {_channels(r['timestep_channels'])} |")
    return "\n".join(lines)


SUMMARY_HEADER = ("| model | stream | block | top-1 value | median | top-1 / median | top channels "
                  "| tokens led by top channel | top channel per timestep | inputs |\n"
                  "|---|---|---|---:|---:|---:|---|---:|---|---|")


def format_summary(model_name, rows, inputs):
    """SUMMARY_HEADER rows (docs/diffusers.md's table): per stream, the block of largest top-1 / median."""
    lines = []
    for stream in dict.fromkeys(r["stream"] for r in rows):
        r = max((r for r in rows if r["stream"] == stream), key=lambda r: r["ratio"])
        lines.append(f"| {model_name} | {stream} | {r['block'] or r['layer']} | {r['top1_value']:.4g} "
                     f"| {r['median']:.3g} | {r['ratio']:.4g} | {_channels(r['channels'])} "
                     f"| {r['token_share']:.0%} | {_channels(r['timestep_channels'])} | {inputs} |")
    return "\n".join(lines)


def evenly(count, most):
    """At most `most` indices of range(count), evenly spaced, first and last included."""
    if count <= most:
        return list(range(count))
    if most < 2:
        return [count - 1][:most]
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def subject_name(path_or_id):
    """A short name for a model folder or hub id: the id itself, or the folder's name."""
    path = Path(str(path_or_id))
    return str(path_or_id) if not path.exists() else (path.parent.name if path.name == "transformer"
                                                      else path.name)

"""Residual-stream statistics after every block of a diffusers DiT, PixArt, SD3 or Flux transformer
(ditnorm/probe.py; the inputs and what they stand in for are in its docstring and docs/diffusers.md).

    python probe.py facebook/DiT-XL-2-256 --class-label 207
    python probe.py PixArt-alpha/PixArt-XL-2-1024-MS --device cuda --dtype bfloat16
    python probe.py stabilityai/stable-diffusion-3.5-large --device cuda --dtype bfloat16
    python probe.py black-forest-labs/FLUX.1-dev --device cuda --dtype bfloat16 --out res/probe_flux.md

Each needs the weights: the hub ids download on first use, gated ones after `hf auth login`. A file or
folder that is no probed transformer ends in one line and exit status 2.
"""

import torch

from ditnorm import probe
from ditnorm.checkpoint import CheckpointError
from ditnorm.options import Parser
from ditnorm.records import write_atomic


def build_parser():
    summary, details = __doc__.split("\n\n", 1)
    parser = Parser(prog="probe.py", description=summary, epilog=details)
    parser.add_argument("model", help="a diffusers transformer folder, a pipeline folder, or a hub id")
    parser.add_argument("--timesteps", default="250,500,750", help="comma-separated, 0..999")
    parser.add_argument("--batch-size", type=int, default=1, help="inputs per timestep")
    parser.add_argument("--class-label", type=int, default=207, help="DiT's class")
    parser.add_argument("--text", choices=list(probe.TEXT_STANDINS), default="zeros",
                        help="stand-in for the text embeddings")
    parser.add_argument("--text-length", type=int, default=77, help="text tokens")
    parser.add_argument("--latent-size", type=int, default=None,
                        help=f"latent height = width (default: the config's sample size; Flux "
                        f"{probe.FLUX_LATENT_SIZE})")
    parser.add_argument("--dtype", choices=list(probe.DTYPES), default="float32", help="weights and inputs")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="seed of latents, noise and text")
    parser.add_argument("--out", default=None, help="also write the tables to this markdown file")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        timesteps = [int(t) for t in args.timesteps.split(",")]
    except ValueError:
        parser.error(f"--timesteps {args.timesteps}: give comma-separated integers, e.g. 250,500,750")
    if args.batch_size < 1 or args.text_length < 1:
        parser.error("--batch-size and --text-length must be at least 1")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        model = probe.load_transformer(args.model, device=device, dtype=args.dtype)
        runs, inputs = probe.probe(model, timesteps, batch_size=args.batch_size, class_label=args.class_label,
                                   text=args.text, text_length=args.text_length, latent_size=args.latent_size,
                                   seed=args.seed)
    except (CheckpointError, ValueError) as e:
        parser.error(str(e))
    rows = probe.probe_stats(runs)
    name = probe.subject_name(args.model)
    title = f"{name} ({type(model).__name__}): {inputs}"
    text = (f"{probe.format_probe_table(rows, title=title)}\n\n"
            f"{probe.SUMMARY_HEADER}\n{probe.format_summary(name, rows, inputs)}\n")
    print(text)
    if args.out:
        write_atomic(args.out, text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

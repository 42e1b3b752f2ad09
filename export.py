"""Export a checkpoint as a diffusers DiTTransformer2DModel folder or as shipped weights, or compare
diffusers' forward of a DiT folder with ours (docs/diffusers.md).

    python export.py diffusers results/001-ToyDiT-1-layernorm/checkpoints/0005000.pt exported/toy
    python export.py diffusers DiT-XL-2-256x256.pt exported/DiT-XL-2-256   # official, downloaded once
    python export.py compare exported/toy
    python export.py compare facebook/DiT-XL-2-256                         # a hub id (downloads)
    python export.py weights results/reproduce/zeros-none-seed0 res/reproduce/weights --steps 1000,5000 \
        --weights ema,raw                                                   # what the notebooks fall back on

weights writes a run's checkpoints as a shipped run folder with their SHA-256 and provenance
(ditnorm/pretrained.py). An exported diffusers folder loads with DiTTransformer2DModel.from_pretrained;
ditnorm.hub.use_official_dit_function(model) makes it compute the function the model was trained with.
"""

import shlex
import sys
from pathlib import Path

from ditnorm import hub, layout, pretrained
from ditnorm.checkpoint import CheckpointError, DownloadError, load_model
from ditnorm.layout import checkpoint_at, run_checkpoints
from ditnorm.options import Parser, step_set


def build_parser():
    summary, details = __doc__.split("\n\n", 1)
    parser = Parser(prog="export.py", description=summary, epilog=details)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    export = commands.add_parser("diffusers", help="write a checkpoint as a DiTTransformer2DModel folder",
                                 epilog=details)
    export.add_argument("checkpoint", help="a checkpoint of this repository, an official one, or its name")
    export.add_argument("out_dir", help="the folder to write (must not exist unless --overwrite)")
    export.add_argument("--raw", action="store_true", help="export the raw training weights (default: EMA)")
    export.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    compare = commands.add_parser("compare", help="max relative gap between diffusers' forward and ours",
                                  epilog=details)
    compare.add_argument("folder", help="a diffusers DiT folder or hub id")
    compare.add_argument("--batch-size", type=int, default=4, help="random inputs compared")
    compare.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    ship = commands.add_parser("weights", help="write a run's checkpoints as shipped safetensors weights",
                               epilog=details)
    ship.add_argument("run", help="a run folder (results/<preset>/<run>) or one checkpoint file of it")
    ship.add_argument("weights_dir", help="the weights folder, e.g. res/reproduce/weights")
    ship.add_argument("--steps", type=step_set, help="comma-separated checkpoint steps (default: the last)")
    ship.add_argument("--weights", default="ema", help="comma-separated kinds: ema, raw (default: ema)")
    ship.add_argument("--dtype", choices=sorted(pretrained.DTYPES), default="float32",
                      help="float16 halves the file; check that the figures' statistics stay the same")
    ship.add_argument("--name", help="the run's folder name in weights_dir (default: the run's own)")
    ship.add_argument("--trained-by", help="the command that trained the run (default: the experiment.py "
                      "command of results/<preset>/<run>)")
    return parser


def export_run(args, parser):
    """export.py weights: each chosen checkpoint of a run into the weights folder."""
    run = Path(args.run)
    if run.is_file():
        if args.steps:
            parser.error("--steps picks checkpoints of a run folder; drop it or pass the run folder")
        paths, run = [run], layout.run_of(run) or run.parent.parent  # (a loose file: as before)
    elif run_checkpoints(run):
        paths = [checkpoint_at(run, step) for step in sorted(args.steps or [max(run_checkpoints(run))])]
    else:
        parser.error(f"{args.run} is neither a run folder with checkpoints/<step>.pt nor a checkpoint file; "
                     "pass one")
    trained_by = args.trained_by or pretrained.training_command(run)
    if not trained_by:
        parser.error(f"cannot tell which command trained {run}; pass --trained-by")
    command = shlex.join(["python", "export.py", *args.argv])
    for path in paths:
        out = pretrained.export_weights(path, args.weights_dir, run=args.name or run.name,
                                        weights=tuple(args.weights.split(",")), dtype=args.dtype,
                                        trained_by=trained_by, command=command)
        print(f"wrote {out} ({out.stat().st_size:,} bytes)")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if args.command == "diffusers":
            model, config = load_model(args.checkpoint, use_ema=not args.raw)
            out = hub.export_diffusers(model, args.out_dir, name=config["model"], source=args.checkpoint,
                                       overwrite=args.overwrite)
            print(f"wrote {out} (load it with DiTTransformer2DModel.from_pretrained)")
        elif args.command == "weights":
            export_run(args, parser)
        else:
            folder = hub.diffusers_folder(args.folder)
            if folder is None:
                parser.error(f"{args.folder} is not a diffusers folder or hub id; pass one")
            gaps = hub.compare_with_diffusers(folder, load_model(folder)[0], batch_size=args.batch_size,
                                              seed=args.seed)
            print(f"max |diffusers - ours| / max |ours| over {args.batch_size} random inputs "
                  f"(folder norm_eps {gaps['norm_eps']:g}): as saved {gaps['as_saved']:.2e}, "
                  f"timestep shift 0 {gaps['shift_0']:.2e}, shift 0 and eps 1e-6 {gaps['official']:.2e}")
    except DownloadError as e:
        parser.fail(str(e))
    except (CheckpointError, FileNotFoundError) as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()

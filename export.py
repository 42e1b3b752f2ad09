"""Export a checkpoint as a diffusers DiTTransformer2DModel folder, or compare diffusers' forward of a DiT
folder with ours (docs/diffusers.md).

    python export.py diffusers results/001-ToyDiT-1-layernorm/checkpoints/0005000.pt exported/toy
    python export.py diffusers DiT-XL-2-256x256.pt exported/DiT-XL-2-256   # official, downloaded once
    python export.py compare exported/toy
    python export.py compare facebook/DiT-XL-2-256                         # a hub id (downloads)

Then in Python: DiTTransformer2DModel.from_pretrained("exported/toy"); call
ditnorm.hub.use_official_dit_function(model) on it for the function the model was trained with. A file or
folder that cannot be exported or compared ends in one line and exit status 2; a failed download in exit 1.
"""

from ditnorm import hub
from ditnorm.checkpoint import CheckpointError, DownloadError, load_model
from ditnorm.options import Parser


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
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "diffusers":
            model, config = load_model(args.checkpoint, use_ema=not args.raw)
            out = hub.export_diffusers(model, args.out_dir, name=config["model"], source=args.checkpoint,
                                       overwrite=args.overwrite)
            print(f"wrote {out} (load it with DiTTransformer2DModel.from_pretrained)")
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
    except CheckpointError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()

"""How far diffusers' DiT is from the official DiT function on the same weights (docs/diffusers.md).

    python benchmarks/diffusers_timestep_gap.py                      # DiT-S/2, 3 seeds
    python benchmarks/diffusers_timestep_gap.py --model DiT-B/2 --seeds 1
    python benchmarks/diffusers_timestep_gap.py --norm-eps 1e-5        # config.json as diffusers' conversion

Builds a random DiT of a registry size (DiT's own initialisation, then N(0, std) added to the adaLN-Zero and
final layers, which start at exactly 0), exports it with ditnorm.hub.export_diffusers, and prints
ditnorm.hub.compare_with_diffusers for it: max |diffusers - official| / max |official| over random inputs,
as diffusers computes it (timestep frequencies with downscale_freq_shift=1), with the shift set to 0, and
with the shift 0 and the MLP LayerNorms' eps 1e-6 (use_official_dit_function). --norm-eps writes another eps
into the exported config.json first (diffusers' default 1e-5 is what its DiT conversion script left).
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ditnorm.checkpoint import load_model
from ditnorm.hub import compare_with_diffusers, export_diffusers
from models import DiT_models, build_model


def random_dit(name, seed, std):
    """A registry DiT with DiT's initialisation and the zero-initialised layers given N(0, std) values."""
    torch.manual_seed(seed)
    model = build_model(name)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "adaLN_modulation" in key or key.startswith("final_layer.linear"):
                p.add_(std * torch.randn_like(p))
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=list(DiT_models), default="DiT-S/2", help="default: DiT-S/2")
    parser.add_argument("--seeds", type=int, default=3, help="random models (default: 3)")
    parser.add_argument("--std", type=float, default=0.02,
                        help="std added to the zero-initialised layers (default: 0.02)")
    parser.add_argument("--batch-size", type=int, default=4, help="random inputs per model (default: 4)")
    parser.add_argument("--norm-eps", type=float, default=1e-6,
                        help="norm_eps written to config.json (default: 1e-6, DiT's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print("| model | norm_eps | seed | as saved (shift 1) | shift 0 | shift 0, eps 1e-6 |\n"
          "|---|---:|---:|---:|---:|---:|")
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as tmp:
            folder = export_diffusers(random_dit(args.model, seed, args.std), Path(tmp) / "dit")
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, "norm_eps": args.norm_eps}))
            ours = load_model(folder)[0]
            gaps = compare_with_diffusers(folder, ours, batch_size=args.batch_size, seed=seed)
        print(f"| {args.model} | {args.norm_eps:g} | {seed} | {gaps['as_saved']:.2e} | {gaps['shift_0']:.2e} "
              f"| {gaps['official']:.2e} |")


if __name__ == "__main__":
    main()

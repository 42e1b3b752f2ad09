"""A diagram of one DiT block with adaLN-Zero (models.DiTBlock.forward), the norms the study switches in
orange: res/reproduce/dit_block.png."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

SWITCHED = "#f28e2b"  # the norms that models.make_norm builds
PLAIN = "#dfe7f2"
ADALN = "#d5ecd4"


def _box(ax, x, y, text, color, width=2.6, height=0.55):
    ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width, height, boxstyle="round,pad=0.05",
                                facecolor=color, edgecolor="0.3", linewidth=0.8))
    ax.text(x, y, text, ha="center", va="center", fontsize=8.5)


def _arrow(ax, start, end, **kwargs):
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="->", color="0.25", lw=0.9, **kwargs))


def plot_dit_block():
    """The figure: residual stream on the left, the two halves of a block, the adaLN branch on the right."""
    fig, ax = plt.subplots(figsize=(6.4, 6.6))
    ax.set_xlim(-1.6, 7.4)
    ax.set_ylim(-0.9, 10.3)
    ax.axis("off")
    stream_x, x, cond_x = -0.6, 2.4, 5.9
    _box(ax, x, -0.3, "input tokens  (N, T, D)", PLAIN)
    _box(ax, cond_x, 0.9, "timestep t + class y\n-> c  (N, D)", ADALN, width=2.4, height=0.8)
    _box(ax, cond_x, 2.3, "adaLN: SiLU, Linear(c)\n-> 6 vectors (N, D)", ADALN, width=2.4, height=0.8)
    _arrow(ax, (cond_x, 1.3), (cond_x, 1.9))
    ax.plot([stream_x, stream_x], [-0.3, 9.6], color="0.25", lw=0.9)
    ax.plot([stream_x, x - 1.3], [-0.3, -0.3], color="0.25", lw=0.9)
    rows = []
    for half, (base, module, vectors) in enumerate(((1.2, "multi-head self-attention", "msa"),
                                                    (5.2, "MLP (GELU)", "mlp"))):
        norm = f"norm{half + 1}: LayerNorm / none /\nRMSNorm / DyT"
        steps = [(norm, SWITCHED), (f"x (1 + scale_{vectors}) + shift_{vectors}", ADALN),
                 (module, PLAIN), (f"x gate_{vectors}  (zero at init)", ADALN)]
        for k, (text, color) in enumerate(steps):
            rows.append((base + 0.85 * k, text, color))
        _arrow(ax, (stream_x, base - 0.45), (x - 1.3, base))
        _arrow(ax, (x - 1.3, base + 2.55), (stream_x + 0.05, base + 2.95))
        ax.text(stream_x - 0.1, base + 2.95, "+", ha="right", va="center", fontsize=13)
        for k in (1, 3):
            _arrow(ax, (cond_x - 1.2, 2.3), (x + 1.3, base + 0.85 * k), connectionstyle="arc3,rad=0.0",
                   linestyle=(0, (2, 2)))
    for y, text, color in rows:
        _box(ax, x, y, text, color)
    for (y0, _, _), (y1, _, _) in zip(rows[:-1], rows[1:], strict=True):
        if y1 - y0 < 1.0:
            _arrow(ax, (x, y0 + 0.3), (x, y1 - 0.3))
    _box(ax, x, 9.6, "... depth blocks, then the final layer:\nnorm_final (switched), modulate, Linear",
         PLAIN, width=3.4, height=0.8)
    _arrow(ax, (stream_x, 9.6), (x - 1.7, 9.6))
    ax.text(stream_x - 0.15, 6.5, "residual stream", rotation=90, ha="right", va="center", fontsize=8)
    ax.set_title("One DiT block with adaLN-Zero (Peebles & Xie 2023).\nOrange: the normalisations the study "
                 "switches (models.make_norm)", fontsize=9.5)
    fig.tight_layout()
    return fig

"""The figures every study draws: a seed median with its min-max band, and residual streams side by side."""

# No matplotlib.use("Agg") here: TokenEmbeddingsViz.ipynb imports this module, and forcing Agg would hide its
# figures (the report modules that import it set Agg themselves; a headless run picks Agg by itself).
import matplotlib.pyplot as plt
import numpy as np

from ditnorm.analysis import outlier_stats
from ditnorm.records import savefig_atomic, seed_spread


def save(fig, path, dpi=120):
    """Lay fig out, write it to path atomically, close it."""
    fig.tight_layout()
    savefig_atomic(fig, path, dpi=dpi)
    plt.close(fig)


def band_plot(ax, groups, colors=None):
    """One line per label (median over seeds) with a min-max band; groups: {label: {x: [values]}}; colors:
    one per label (matplotlib's cycle by default)."""
    colors = colors or plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, (label, by_x) in zip(colors, groups.items(), strict=False):
        xs = sorted(by_x)
        med, low, high = np.array([seed_spread(by_x[x]) for x in xs]).T
        ax.plot(xs, med, marker="o", markersize=3, color=color, label=label)
        ax.fill_between(xs, low, high, color=color, alpha=0.2, linewidth=0)
    ax.set_yscale("log")
    ax.grid(True, which="both", linewidth=0.3)


def seed_dots(ax, groups, colors):
    """Each seed's value a dot, a short line at each side's median: groups {category: {side: [values]}}, the
    sides of a category side by side in the order and colours of `colors` ({side: colour})."""
    width, labelled = 0.8 / len(colors), set()
    for i, by_side in enumerate(groups.values()):
        for j, (side, color) in enumerate(colors.items()):
            values = [v for v in by_side.get(side, []) if v is not None]
            x = i - 0.4 + width * (j + 0.5)
            if values:
                ax.scatter([x] * len(values), values, color=color, s=16, zorder=3,
                           label=None if side in labelled else side)
                ax.hlines(np.median(values), x - width / 3, x + width / 3, color=color, linewidth=1)
                labelled.add(side)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.grid(axis="y", linewidth=0.3)


def plot_streams_side_by_side(streams, tokens, *, sample=0, title=""):
    """|value| against channel of the residual stream after each block, one column per model in
    `streams` ({label: depth tensors (N, T, D)}), the given tokens of one sample overlaid; each row's
    label gives that model's top-1 and top-1/median over all samples and tokens."""
    labels = list(streams)
    depth = max(len(v) for v in streams.values())
    fig, axes = plt.subplots(depth, len(labels), figsize=(4.2 * len(labels), 1.1 * depth + 1.0),
                             sharex=True, squeeze=False)
    for col, label in enumerate(labels):
        stats = outlier_stats(streams[label])
        for block, h in enumerate(streams[label]):
            ax = axes[block, col]
            for token in tokens:
                ax.plot(h[sample, token].abs().numpy(), linewidth=0.6, alpha=0.8)
            ax.tick_params(labelsize=6)
            top1, ratio = stats[block]["top1"], stats[block]["ratio"]
            ax.set_ylabel(f"block {block}\nmax {top1:.3g}\nx{ratio:.3g} med", fontsize=6, rotation=0,
                          ha="right", va="center")
        axes[0, col].set_title(label, fontsize=9)
        axes[-1, col].set_xlabel("channel", fontsize=7)
    shown = ", ".join(map(str, tokens))
    fig.suptitle(f"{title}\n|value| of the residual stream after each block, tokens {shown}", fontsize=9)
    fig.tight_layout()
    return fig

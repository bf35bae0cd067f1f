"""The report's figure helpers: pyplot on the Agg backend, the colours of architectures and sizes, panel grids,
and saving a figure as PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moescale.study.report.data import _Config


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_CMAPS = ("Blues", "Oranges", "Greens", "Reds", "Purples", "Greys", "YlOrBr", "PuRd", "BuGn")


class _Colors:
    """One colour family per architecture, in order of appearance; darker for larger sizes."""

    def __init__(self, configs: list[_Config]):
        plt = _pyplot()
        self.arch_color: dict[str, Any] = {}
        self.config_color: dict[str, Any] = {}
        for i, arch in enumerate(dict.fromkeys(c.arch for c in configs)):
            cmap = plt.get_cmap(_CMAPS[i % len(_CMAPS)])
            sizes = sorted({c.size for c in configs if c.arch == arch})
            self.arch_color[arch] = cmap(0.75)
            for c in configs:
                if c.arch == arch:
                    self.config_color[c.key] = cmap(0.45 + 0.5 * sizes.index(c.size) / max(len(sizes) - 1, 1))


def _panels(plt: Any, count: int, width: float = 5.0, height: float = 3.8) -> tuple[Any, list[Any]]:
    cols = min(count, 3)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _save(plt: Any, fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name

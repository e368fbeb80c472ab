"""The per-layer figure of ``inspect --plot``: cosine with the instruction adapter and LATA weight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_layers"]


def plot_layers(adapters: dict[str, dict[str, Any]], path: Path, scheme: str = "linear") -> Path:
    """Blocks on x; one line per adapter (``InspectResult.adapters``): norm on top, then the cosine
    with the instruction vector and the weight of ``scheme`` when scored."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = any(row["cosine"] is not None for a in adapters.values() for row in a["layers"])
    panels = 3 if scored else 1
    fig, axes = plt.subplots(panels, 1, figsize=(9, 2.6 * panels + 0.6), sharex=True, squeeze=False)
    axes = axes[:, 0]
    for label, adapter in adapters.items():
        rows = [r for r in adapter["layers"] if r["layer"] is not None and r.get("module") is None]
        layers = [r["layer"] for r in rows]
        axes[0].plot(layers, [r["norm"] for r in rows], marker="o", ms=3, label=label)
        if scored:
            axes[1].plot(layers, [r["cosine"] for r in rows], marker="o", ms=3, label=label)
            axes[2].step(layers, [r["weights"][scheme] for r in rows], where="mid", label=label)
    axes[0].set_ylabel("|ΔW| per block (Frobenius)")
    if scored:
        axes[1].set_ylabel("cosine with\ninstruction adapter")
        axes[1].axhline(0.0, color="0.6", lw=0.8)
        axes[2].set_ylabel(f"LATA weight\n({scheme})")
    axes[-1].set_xlabel("transformer block")
    axes[0].legend(loc="best", fontsize=8, frameon=False)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("Per-layer task vectors" + (" vs instruction adapter" if scored else ""))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path

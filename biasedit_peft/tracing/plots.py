"""Pictures of a trace, drawn from its JSON document (so a saved ``trace.json`` can be re-plotted).

Uses matplotlib's object API (``Figure``, no pyplot state, no backend switch). matplotlib is the optional
``[plot]`` extra; :func:`plot_trace` raises ``ModuleNotFoundError`` without it.
"""

from __future__ import annotations

from pathlib import Path

PLOT_HINT = "install matplotlib for the PNG plots: pip install 'biasedit-peft[plot]'"
KIND_TITLES = {"hidden": "block output (hidden state)", "mlp": "MLP output", "attn": "attention output"}
POSITION_LABELS = {"subject": "target tokens\n(before last)", "last_subject": "last target\ntoken",
                   "later": "later tokens", "last": "last token"}


def _heatmap(document: dict, kind: str, path: Path) -> Path:
    """Fraction restored per layer and position group, each cell annotated (comparable across columns,
    which average different subsets of items)."""
    from matplotlib.figure import Figure

    grid = [[float("nan") if v is None else v for v in row] for row in document["kinds"][kind]["fraction"]]
    n_layers = document["n_layers"]
    values = [v for row in grid for v in row if v == v]
    figure = Figure(figsize=(4.8, 0.45 * n_layers + 2.0), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(grid, cmap={"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}[kind], aspect="auto",
                        origin="lower", vmin=min([0.0] + values), vmax=max([1.0] + values))
    if n_layers <= 48:
        for layer, row in enumerate(grid):
            for column, value in enumerate(row):
                if value == value:
                    axes.text(column, layer, f"{value:.2f}", ha="center", va="center", fontsize=6.5)
    labels = [f"{POSITION_LABELS[p]}\n(n={n})" for p, n in zip(document["positions"], document["position_items"])]
    axes.set_xticks(range(len(labels)), labels, fontsize=7)
    axes.set_yticks(range(n_layers))
    axes.set_ylabel("layer")
    window = document["settings"]["window"]
    axes.set_title(f"Restoring the {KIND_TITLES[kind]}" + (f", window {window}" if window > 1 else "")
                   + f"\n{document['n_items']} items; bias effect clean {document['clean_effect']:.3f}, "
                   f"corrupted {document['corrupted_effect']:.3f}", fontsize=8)
    figure.colorbar(image, ax=axes).set_label("fraction of bias effect restored", fontsize=8)
    figure.savefig(path, dpi=130)
    return path


def _per_layer(document: dict, path: Path) -> Path:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3.2), layout="constrained")
    axes = figure.subplots()
    layers = range(document["n_layers"])
    for kind, color in (("hidden", "tab:purple"), ("mlp", "tab:green"), ("attn", "tab:red")):
        if kind in document["kinds"]:
            values = [float("nan") if v is None else v for v in document["kinds"][kind]["per_layer_fraction"]]
            axes.plot(list(layers), values, marker="o", color=color, label=KIND_TITLES[kind])
    axes.axhline(0.0, color="gray", linewidth=0.8)
    axes.set_xticks(list(layers))
    axes.set_xlabel("layer")
    axes.set_ylabel("fraction of bias effect restored")
    axes.set_title("Average over all traced positions", fontsize=9)
    axes.legend(fontsize=7)
    figure.savefig(path, dpi=130)
    return path


def plot_trace(document: dict, out_dir: str | Path) -> list[Path]:
    """Write ``trace_<kind>.png`` (layers x positions heatmap) for each kind and ``trace_per_layer.png``.

    Args:
        document: A :meth:`~biasedit_peft.tracing.TraceResult.to_json` document.
        out_dir: The folder to write (created).

    Returns:
        The paths written.
    """
    import matplotlib  # noqa: F401  (fails early, with the module name, when the extra is missing)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [_heatmap(document, kind, out / f"trace_{kind}.png") for kind in document["kinds"]]
    return paths + [_per_layer(document, out / "trace_per_layer.png")]

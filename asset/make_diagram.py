"""Draw ``asset/LoSparse_diagram.png`` (W ≈ L·R + S) and ``asset/LoSparse_logo.png`` with matplotlib.

    python asset/make_diagram.py                 # writes both PNGs next to this script
    python asset/make_diagram.py --out-dir /tmp  # somewhere else

The drawing is fixed (seeded colours, no timestamps in the PNG metadata), so reruns with the same
matplotlib give the same files.
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Rectangle  # noqa: E402

DIAGRAM_SIZE_PX = (1200, 470)
LOGO_SIZE_PX = (800, 240)
_DPI = 100
_METADATA = {"Software": None}  # keep the matplotlib version out of the file

# matrix geometry in cells: W and S are OUT x IN, L is OUT x RANK, R is RANK x IN
OUT, IN, RANK = 10, 10, 3
KEPT_ROWS = (1, 4, 8)  # rows of S that survive pruning
CELL = 0.3

COLOR_W = "Greys"
COLOR_L, COLOR_R, COLOR_S = "Blues", "Purples", "Oranges"
PRUNED_FACE, PRUNED_EDGE = "#f4f4f4", "#c8c8c8"
TEXT = "#222222"


def _grid(ax, x0, y_top, values, cmap, rows_mask=None, lo=0.25, hi=0.85):
    """Draw a matrix whose top-left corner is (x0, y_top); cells coloured from ``values`` in [0, 1]."""
    cmap = plt.get_cmap(cmap)
    n_rows, n_cols = values.shape
    for i in range(n_rows):
        for j in range(n_cols):
            kept = rows_mask is None or rows_mask[i]
            face = cmap(lo + (hi - lo) * values[i, j]) if kept else PRUNED_FACE
            edge = "white" if kept else PRUNED_EDGE
            ax.add_patch(Rectangle((x0 + j * CELL, y_top - (i + 1) * CELL), CELL, CELL,
                                   facecolor=face, edgecolor=edge, linewidth=0.8))
    ax.add_patch(Rectangle((x0, y_top - n_rows * CELL), n_cols * CELL, n_rows * CELL,
                           fill=False, edgecolor="#555555", linewidth=1.4))
    return x0 + n_cols * CELL


def _label(ax, x, y, name, shape):
    ax.text(x, y, name, ha="center", va="top", fontsize=20, color=TEXT, fontweight="bold")
    ax.text(x, y - 0.42, shape, ha="center", va="top", fontsize=12.5, color="#555555")


def draw_diagram(path):
    rng = np.random.default_rng(0)
    fig = plt.figure(figsize=(DIAGRAM_SIZE_PX[0] / _DPI, DIAGRAM_SIZE_PX[1] / _DPI), dpi=_DPI)
    ax = fig.add_axes([0, 0, 1, 1])
    height = 5.9
    width = DIAGRAM_SIZE_PX[0] / DIAGRAM_SIZE_PX[1] * height
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")

    top = 4.85
    h = OUT * CELL
    mid = top - h / 2
    gap = 0.85

    # W
    x = 0.45
    x_end = _grid(ax, x, top, rng.random((OUT, IN)), COLOR_W, lo=0.15, hi=0.6)
    _label(ax, (x + x_end) / 2, top - h - 0.15, "W", r"$d_{out} \times d_{in}$  (dense)")
    ax.text(x_end + gap / 2, mid, r"$\approx$", ha="center", va="center", fontsize=34, color=TEXT)

    # L
    x_l = x_end + gap
    x_end = _grid(ax, x_l, top, rng.random((OUT, RANK)), COLOR_L)
    _label(ax, (x_l + x_end) / 2, top - h - 0.15, "L", r"$d_{out} \times r$")
    ax.text(x_end + 0.25, mid, "·", ha="center", va="center", fontsize=34, color=TEXT)

    # R, vertically centred on L
    x_r = x_end + 0.5
    r_top = mid + RANK * CELL / 2
    x_end_r = _grid(ax, x_r, r_top, rng.random((RANK, IN)), COLOR_R)
    _label(ax, (x_r + x_end_r) / 2, top - h - 0.15, "R", r"$r \times d_{in}$")

    # bracket over L·R
    br_y = top + 0.28
    ax.plot([x_l, x_l, x_end_r, x_end_r], [br_y - 0.12, br_y, br_y, br_y - 0.12], color="#3b6ea8", lw=1.6)
    ax.text((x_l + x_end_r) / 2, br_y + 0.12, "low-rank  L·R  (top-r SVD of W)", ha="center", va="bottom",
            fontsize=14, color="#3b6ea8", fontweight="bold")

    ax.text(x_end_r + gap / 2, mid, "+", ha="center", va="center", fontsize=32, color=TEXT)

    # S with most rows pruned
    x_s = x_end_r + gap
    mask = np.zeros(OUT, dtype=bool)
    mask[list(KEPT_ROWS)] = True
    x_end_s = _grid(ax, x_s, top, rng.random((OUT, IN)), COLOR_S, rows_mask=mask)
    _label(ax, (x_s + x_end_s) / 2, top - h - 0.15, "S", r"$d_{out} \times d_{in}$  (row-sparse)")
    ax.plot([x_s, x_s, x_end_s, x_end_s], [br_y - 0.12, br_y, br_y, br_y - 0.12], color="#c0611a", lw=1.6)
    ax.text((x_s + x_end_s) / 2, br_y + 0.12, "structured-sparse  S", ha="center", va="bottom",
            fontsize=14, color="#c0611a", fontweight="bold")

    # row annotations to the right of S
    x_note = x_end_s + 0.1
    kept_y = top - (KEPT_ROWS[0] + 0.5) * CELL
    pruned_y = top - (6 + 0.5) * CELL
    ax.annotate("kept rows", xy=(x_end_s + 0.03, kept_y), xytext=(x_note + 0.35, kept_y),
                va="center", fontsize=12.5, color="#c0611a",
                arrowprops=dict(arrowstyle="->", color="#c0611a", lw=1.3))
    ax.annotate("pruned rows\n(dropped after\ntraining)", xy=(x_end_s + 0.03, pruned_y),
                xytext=(x_note + 0.35, pruned_y), va="center", fontsize=12.5, color="#777777",
                arrowprops=dict(arrowstyle="->", color="#999999", lw=1.3))

    ax.text(width / 2, 0.38,
            "LoSparse:  W ≈ L·R + S  —  low-rank L·R from SVD + structured-sparse S; "
            "pruned rows of S are dropped after training",
            ha="center", va="center", fontsize=13.5, color="#333333", style="italic")
    fig.savefig(path, dpi=_DPI, facecolor="white", metadata=_METADATA)
    plt.close(fig)


def draw_logo(path):
    rng = np.random.default_rng(1)
    fig = plt.figure(figsize=(LOGO_SIZE_PX[0] / _DPI, LOGO_SIZE_PX[1] / _DPI), dpi=_DPI)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 3)
    ax.axis("off")
    ax.add_patch(FancyBboxPatch((0.15, 0.15), 9.7, 2.7, boxstyle="round,pad=0,rounding_size=0.35",
                                facecolor="white", edgecolor="#dddddd", lw=1.5))
    # glyph: a tall L, a wide R and a row-sparse S
    cell = 0.22
    blues, purples, oranges = plt.get_cmap(COLOR_L), plt.get_cmap(COLOR_R), plt.get_cmap(COLOR_S)
    x0, y_top = 0.55, 2.45
    for i in range(8):
        for j in range(2):
            ax.add_patch(Rectangle((x0 + j * cell, y_top - (i + 1) * cell), cell, cell,
                                   facecolor=blues(0.35 + 0.5 * rng.random()), edgecolor="white", lw=0.6))
    x1, y1 = x0 + 2 * cell + 0.12, y_top - 3 * cell
    for i in range(2):
        for j in range(6):
            ax.add_patch(Rectangle((x1 + j * cell, y1 - (i + 1) * cell), cell, cell,
                                   facecolor=purples(0.35 + 0.5 * rng.random()), edgecolor="white", lw=0.6))
    x2 = x1 + 6 * cell + 0.15
    for i in range(8):
        kept = i in (1, 5)
        for j in range(6):
            face = oranges(0.35 + 0.5 * rng.random()) if kept else "#f2f2f2"
            ax.add_patch(Rectangle((x2 + j * cell, y_top - (i + 1) * cell), cell, cell,
                                   facecolor=face, edgecolor="white", lw=0.6))
    x_text = x2 + 6 * cell + 0.35
    lo = ax.text(x_text, 1.5, "Lo", ha="left", va="center", fontsize=60, fontweight="bold", color="#3b6ea8")
    box = lo.get_window_extent(renderer=fig.canvas.get_renderer())
    x_sparse = ax.transData.inverted().transform((box.x1, box.y0))[0] + 0.04
    ax.text(x_sparse, 1.5, "Sparse", ha="left", va="center", fontsize=60, fontweight="bold", color="#c0611a")
    fig.savefig(path, dpi=_DPI, facecolor="white", metadata=_METADATA)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--no-logo", action="store_true", help="only draw the diagram")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    draw_diagram(out / "LoSparse_diagram.png")
    if not args.no_logo:
        draw_logo(out / "LoSparse_logo.png")


if __name__ == "__main__":
    main()

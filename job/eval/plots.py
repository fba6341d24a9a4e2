"""The evaluation pictures: PNGs drawn from metrics.json's dicts (README: Outputs) and the training loss history.

    confusion.png    the pre and post confusion matrices side by side (counts; colour = share of the gold row)
    training.png     the training loss per step; with SFT_EVAL_STEPS, the evals during training and the best step
    reliability.png  the pre and post reliability diagrams (scoring mode: accuracy against confidence per bin)

A picture whose data is absent (an eval switched off, generate mode's missing calibration) is skipped, never an
error; so is every picture when matplotlib (the `report` extra) is not installed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from job.metric_table import BEST_METRICS, BY_NAME

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger("job.eval")

PHASES = (("pre", "pre (base model)"), ("post", "post (adapter)"))
SIZE = (10.0, 4.5)  # inches, at DPI: 1000 x 450 pixels
DPI = 100
FONT = 10
# Agg's PNGs carry no date; without the Software chunk (the matplotlib version) the bytes depend on the picture alone.
METADATA = {"Software": None}
LABEL_CHARS = 18  # longer label names are cut with an ellipsis
# The evals during training (the metric table's BEST_METRICS): the ones in [0, 1] share an axis, log-loss has its own.
UNIT_METRICS = tuple(name for name in BEST_METRICS if BY_NAME[name].unit)


def _phase(metrics: dict, phase: str) -> dict:
    value = metrics.get(phase)
    return value if isinstance(value, dict) else {}


def _number(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"


def _short(label: str) -> str:
    return label if len(label) <= LABEL_CHARS else label[:LABEL_CHARS - 1] + "\u2026"


# ---------------------------------------------------------------------------------------------------------------
# confusion.png
# ---------------------------------------------------------------------------------------------------------------

def _matrix(phase: dict) -> dict | None:
    cm = phase.get("confusion_matrix")
    if not isinstance(cm, dict) or not cm.get("labels") or not cm.get("matrix"):
        return None
    return cm


def _confusion_panel(fig: Figure, ax: Axes, cm: dict, title: str) -> None:
    rows, columns, counts = cm["labels"], cm["columns"], cm["matrix"]
    shares = [[c / sum(row) if sum(row) else 0.0 for c in row] for row in counts]
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    size = max(7.0, min(FONT, 150 / max(len(columns), len(rows))))  # 10 pt up to 15 columns, 7 pt from 21
    for i, row in enumerate(counts):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=size,
                    color="white" if shares[i][j] > 0.5 else "black")
    ax.set_xticks(range(len(columns)), [_short(c) for c in columns], fontsize=size)
    ax.set_yticks(range(len(rows)), [_short(r) for r in rows], fontsize=size)
    if len(columns) > 6 or max(len(c) for c in columns) > 6:
        ax.tick_params(axis="x", labelrotation=45)
        for tick in ax.get_xticklabels():
            tick.set_horizontalalignment("right")
            tick.set_rotation_mode("anchor")
    ax.set_xlabel("predicted", fontsize=FONT)
    ax.set_ylabel("gold", fontsize=FONT)
    ax.set_title(title, fontsize=FONT + 1)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    bar.set_label("share of the gold row", fontsize=FONT - 1)
    bar.ax.tick_params(labelsize=FONT - 2)


def _confusion(fig: Figure, metrics: dict, loss_history: list[dict]) -> bool:
    panels = [(name, title, cm) for name, title in PHASES if (cm := _matrix(_phase(metrics, name))) is not None]
    if not panels:
        return False
    largest = max(len(cm["columns"]) for _, _, cm in panels)
    # 0.4 x 0.35 in per cell holds a three-digit count at 7 pt; 10 x 4.5 in is enough up to 8 columns
    width = max(SIZE[0] * len(panels) / 2, (0.4 * largest + 2.0) * len(panels))
    fig.set_size_inches(max(width, 5.5), max(SIZE[1], 0.35 * largest + 2.0))
    for index, (name, title, cm) in enumerate(panels):
        phase = _phase(metrics, name)
        heading = (f"{title}\naccuracy {_number(phase.get('accuracy'))} \u00b7 "
                   f"macro-F1 {_number(phase.get('macro_f1'))} \u00b7 n {phase.get('n', 'n/a')}")
        _confusion_panel(fig, fig.add_subplot(1, len(panels), index + 1), cm, heading)
    return True


# ---------------------------------------------------------------------------------------------------------------
# training.png
# ---------------------------------------------------------------------------------------------------------------

def _losses(loss_history: list[dict]) -> list[tuple[float, float]]:
    """(step, loss) of the Trainer's log lines that have a training loss (eval and summary lines have none)."""
    return [(e["step"], e["loss"]) for e in loss_history
            if isinstance(e, dict) and isinstance(e.get("loss"), (int, float)) and isinstance(e.get("step"), int)]


def _series(history: list[dict], metric: str) -> list[tuple[int, float]]:
    return [(e["step"], e[metric]) for e in history
            if isinstance(e.get("step"), int) and isinstance(e.get(metric), (int, float))]


def _mark_best(ax: Axes, step: int, label: bool) -> None:
    ax.axvline(step, color="tab:red", linestyle="--", linewidth=1.2)
    if label:  # on the side of the line with more room, so a best step near the end stays inside the axes
        low, high = ax.get_xlim()
        right = step <= (low + high) / 2
        ax.annotate(f"best step {step}", xy=(step, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(4 if right else -4, -4), textcoords="offset points", ha="left" if right else "right",
                    va="top", color="tab:red", fontsize=FONT - 1)


def _eval_panel(ax: Axes, best: dict) -> None:
    history, chosen, step = best.get("history") or [], best.get("metric"), best.get("step")
    for metric in UNIT_METRICS:
        points = _series(history, metric)
        if points:
            strong = metric == chosen
            ax.plot(*zip(*points, strict=True), marker="o", markersize=4 if strong else 2.5,
                    linewidth=2.2 if strong else 1.0, alpha=1.0 if strong else 0.7,
                    label=BY_NAME[metric].label + (" (best metric)" if strong else ""))
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("metric on the eval subset", fontsize=FONT)
    handles, labels = ax.get_legend_handles_labels()
    losses = _series(history, "log_loss")
    if losses:
        twin = ax.twinx()
        twin.plot(*zip(*losses, strict=True), color="dimgray", linestyle=":", marker="s", markersize=3,
                  linewidth=2.2 if chosen == "log_loss" else 1.2, label=BY_NAME["log_loss"].label)
        twin.set_ylabel("log-loss", fontsize=FONT)
        twin.tick_params(labelsize=FONT - 1)
        extra = twin.get_legend_handles_labels()
        handles, labels = [*handles, *extra[0]], [*labels, *extra[1]]
    if handles:  # below the axes: inside, six curves leave it no free corner
        ax.legend(handles, labels, fontsize=FONT - 2, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3,
                  frameon=False)
    if isinstance(step, int):
        _mark_best(ax, step, label=True)
    rows = best.get("rows")
    ax.set_title(f"evals during training ({rows} rows)" if rows else "evals during training", fontsize=FONT + 1)


def _training(fig: Figure, metrics: dict, loss_history: list[dict]) -> bool:
    losses = _losses(loss_history)
    best = metrics.get("best") if isinstance(metrics.get("best"), dict) else None
    evals = best is not None and any(_series(best.get("history") or [], m) for m in (*UNIT_METRICS, "log_loss"))
    if not losses and not evals:
        return False
    panels = int(bool(losses)) + int(evals)
    fig.set_size_inches(SIZE[0] if panels == 2 else SIZE[0] * 0.6, SIZE[1])
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    if losses:
        ax = axes[0]
        ax.plot(*zip(*losses, strict=True), color="tab:blue", linewidth=1.5, marker="o" if len(losses) <= 30 else None,
                markersize=3)
        ax.set_ylabel("training loss", fontsize=FONT)
        final = (metrics.get("train") or {}).get("loss")
        ax.set_title(f"training loss (mean over the run {_number(final, 4)})" if isinstance(final, (int, float))
                     else "training loss", fontsize=FONT + 1)
        if best is not None and isinstance(best.get("step"), int):
            _mark_best(ax, best["step"], label=not evals)
    if evals and best is not None:
        _eval_panel(axes[-1], best)
    for ax in axes:
        ax.set_xlabel("optimizer step", fontsize=FONT)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=FONT - 1)
    return True


# ---------------------------------------------------------------------------------------------------------------
# reliability.png
# ---------------------------------------------------------------------------------------------------------------

def _bins(phase: dict) -> list[dict] | None:
    calibration = phase.get("calibration")
    bins = calibration.get("bins") if isinstance(calibration, dict) else None
    return bins if isinstance(bins, list) and any(b.get("count") for b in bins) else None


def _reliability_panel(ax: Axes, bins: list[dict], title: str) -> None:
    full = [b for b in bins if b.get("count") and b.get("accuracy") is not None]
    width = [b["hi"] - b["lo"] for b in full]
    ax.bar([b["lo"] for b in full], [b["accuracy"] for b in full], width=width, align="edge", color="tab:blue",
           alpha=0.75, edgecolor="navy", label="accuracy in the bin")
    ax.plot([b["confidence"] for b in full], [b["accuracy"] for b in full], "o", color="navy", markersize=3,
            label="mean confidence in the bin")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1, label="perfectly calibrated")
    for b in full:
        ax.annotate(str(b["count"]), xy=((b["lo"] + b["hi"]) / 2, b["accuracy"]), xytext=(0, 2),
                    textcoords="offset points", ha="center", va="bottom", fontsize=FONT - 2)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("confidence (probability of the argmax label)", fontsize=FONT)
    ax.set_ylabel("accuracy in the bin", fontsize=FONT)
    ax.set_title(title, fontsize=FONT + 1)
    ax.legend(fontsize=FONT - 2, loc="upper left")
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=FONT - 1)


def _reliability(fig: Figure, metrics: dict, loss_history: list[dict]) -> bool:
    panels = [(name, title, bins) for name, title in PHASES if (bins := _bins(_phase(metrics, name))) is not None]
    if not panels:
        return False
    fig.set_size_inches(SIZE[0] * len(panels) / 2 if len(panels) == 2 else SIZE[0] * 0.55, SIZE[1])
    for index, (name, title, bins) in enumerate(panels):
        phase = _phase(metrics, name)
        rows = sum(b.get("count") or 0 for b in bins)
        heading = f"{title}\nECE {_number(phase.get('ece'))} \u00b7 {rows} rows scored (above a bar: its rows)"
        _reliability_panel(fig.add_subplot(1, len(panels), index + 1), bins, heading)
    return True


# ---------------------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------------------

PICTURES: dict[str, Callable[[Any, dict, list[dict]], bool]] = {
    "confusion": _confusion, "training": _training, "reliability": _reliability}


def write_report(report_dir: Path, metrics: dict, loss_history: list[dict]) -> dict[str, Path]:
    """Draw the pictures whose data `metrics` (metrics.json's dict) and `loss_history` (the Trainer's log lines) hold
    into `report_dir`: {"confusion" | "training" | "reliability": the PNG's path} for those written."""
    try:
        # The `report` extra, optional: a job without matplotlib must still run (it only loses the pictures), and
        # importing it costs ~0.4 s (measured, cold) that a run pays only when it draws. Figure objects, no pyplot:
        # no GUI backend, no global figure registry to leak into (a Figure is freed with its last reference).
        from matplotlib.figure import Figure
    except ImportError as error:
        log.warning("report: the pictures are skipped, matplotlib is not installed (%s); "
                    "pip install 'qwen3-sft[report]' to draw them", error)
        return {}
    written: dict[str, Path] = {}
    for name, draw in PICTURES.items():
        fig = Figure(figsize=SIZE, dpi=DPI)
        if not draw(fig, metrics or {}, loss_history or []):
            continue
        fig.tight_layout()
        report_dir.mkdir(parents=True, exist_ok=True)
        path = report_dir / f"{name}.png"
        tmp = path.with_name(f".{path.name}.tmp")  # renamed when complete: a reader never sees half a picture
        fig.savefig(tmp, format="png", dpi=DPI, metadata=METADATA)
        tmp.replace(path)
        written[name] = path
    return written

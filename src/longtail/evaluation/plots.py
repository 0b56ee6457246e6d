"""Figures of long-tailed results: per-class accuracy vs. training counts, shot groups, confusion, sweeps.

Every function draws one figure with matplotlib's object-oriented API on the Agg canvas (no display,
no pyplot figure registry, so nothing global is touched and no figure can leak), writes it atomically
(temp file in the same folder, then ``os.replace``) and returns the written path.

pyplot is deliberately not imported and ``matplotlib.use`` not called: each figure gets its own Agg
canvas, which works headless, and importing this module does not switch the backend of a user's
notebook or close their open figures.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory

from longtail.errors import WRITE_ERRNOS, write_error
from longtail.run_folder import RunDir
from longtail.utils import display_name

DPI = 120
SHOT_KEYS = ("many", "medium", "few", "top1")
SHOT_LABELS = {"many": "many", "medium": "medium", "few": "few", "top1": "overall (top-1)"}
_REGION_COLOURS = {"few": "#d62728", "medium": "#ff7f0e", "many": "#2ca02c"}


# --------------------------------------------------------------------------------------------- helpers


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    """Tight layout, write ``fig`` to ``path`` atomically, and release it."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp.{fmt}")
    except OSError as e:
        if e.errno in WRITE_ERRNOS:
            raise write_error(path, e) from None
        raise
    os.close(fd)
    try:
        fig.tight_layout()
        fig.savefig(tmp, format=fmt, dpi=DPI)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            raise write_error(path, e) from None
        raise
    finally:
        fig.clear()
    return path


def _title(ax, text: str, fontsize: float = 11.0) -> None:
    """Set ``ax``'s title wrapped onto as many lines as the axes' width needs, so a long run name is not cut
    off at the figure's edge (matplotlib neither wraps nor shrinks titles)."""
    fig_w = ax.figure.get_figwidth() * ax.get_position().width  # inches the axes spans
    chars = max(20, int(fig_w * 72 / (0.6 * fontsize)))  # ~0.6 em per character
    ax.set_title(textwrap.fill(text, chars, break_on_hyphens=False), fontsize=fontsize)


def head_to_tail(train_counts: Sequence[int]) -> list[int]:
    """Class indices from the most to the fewest training images (ties in class order): the order of the
    confusion matrix and the per-class curves, so the head is top-left and the tail bottom-right."""
    return sorted(range(len(train_counts)), key=lambda i: (-int(train_counts[i]), i))


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _val(v) -> float:
    """A metric value as float, NaN for None / missing."""
    return float(v) if _is_num(v) else float("nan")


def _names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None or len(class_names) == 0:
        return [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    return [display_name(str(n)) for n in class_names]  # the font renderer refuses undecodable bytes


def parse_thresholds(text: str | None) -> tuple[int, int] | None:
    """``(few_below, many_above)`` from a thresholds description such as ``"many > 100, few < 20 ..."``.

    None when ``text`` is missing or does not state both thresholds.
    """
    if not text:
        return None
    many = re.search(r"many\s*>=?\s*(\d+)", text)
    few = re.search(r"few\s*<=?\s*(\d+)", text)
    if not (many and few):
        return None
    return int(few.group(1)), int(many.group(1))


def _safe_name(split: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(split)) or "split"


# --------------------------------------------------------------------------------------------- figures


def plot_per_class(
    per_class_acc: Sequence[float | None],
    train_counts: Sequence[int],
    class_names: Sequence[str] | None,
    path: str | Path,
    title: str = "",
    thresholds: tuple[int, int] | None = (20, 100),
) -> Path:
    """Scatter of per-class accuracy (%) against training images per class (log x axis).

    ``thresholds`` is ``(few_below, many_above)``: dashed lines mark them and the few / medium / many
    regions are shaded and labelled; None draws no shot regions. Class names are annotated when there
    are at most 20 classes. Classes whose accuracy is None (absent from the split) are skipped; a class
    with 0 training images is drawn at 1 (log axis).
    """
    if len(per_class_acc) != len(train_counts):
        raise ValueError(f"{len(per_class_acc)} per-class accuracies for {len(train_counts)} training counts")
    num_classes = len(train_counts)
    names = _names(class_names, num_classes)
    keep = [i for i, a in enumerate(per_class_acc) if _is_num(a)]
    xs = np.array([max(int(train_counts[i]), 1) for i in keep], dtype=float)
    ys = np.array([float(per_class_acc[i]) for i in keep], dtype=float)

    fig = _new_figure(8.0, 5.0)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    all_counts = [max(int(n), 1) for n in train_counts] or [1]
    lo, hi = min(all_counts) / 1.5, max(all_counts) * 1.5
    if thresholds is not None:
        few_t, many_t = thresholds
        lo, hi = min(lo, few_t / 1.5), max(hi, many_t * 1.5)
    ax.set_xlim(lo, hi)
    ax.set_ylim(-3, 108)

    if thresholds is not None:
        few_t, many_t = thresholds
        trans = blended_transform_factory(ax.transData, ax.transAxes)
        for name, a, b in (("few", lo, few_t), ("medium", few_t, many_t), ("many", many_t, hi)):
            if b <= a:
                continue
            ax.axvspan(a, b, color=_REGION_COLOURS[name], alpha=0.08, lw=0)
            ax.text(math.sqrt(a * b), 0.985, name, transform=trans, ha="center", va="top",
                    fontsize=9, color=_REGION_COLOURS[name], fontweight="bold")
        for t in (few_t, many_t):
            ax.axvline(t, color="0.35", ls="--", lw=1)

    ax.scatter(xs, ys, s=28, color="#1f77b4", edgecolor="white", linewidth=0.5, zorder=3)
    if num_classes <= 20:
        for i, x, y in zip(keep, xs, ys, strict=True):
            ax.annotate(names[i], (x, y), xytext=(4, 3), textcoords="offset points", fontsize=8)
    if not keep:
        ax.text(0.5, 0.5, "no evaluated classes", transform=ax.transAxes, ha="center", va="center")
    ax.set_xlabel("training images per class (log scale)")
    ax.set_ylabel("accuracy (%)")
    _title(ax, title or "Per-class accuracy")
    ax.grid(True, which="major", alpha=0.3)
    return _save(fig, path)


def plot_shot_bars(metrics_by_name: dict[str, dict], path: str | Path, title: str = "") -> Path:
    """Grouped bars of many / medium / few / overall (top1) accuracy for one or several named results.

    ``metrics_by_name`` maps a label (a split, a run) to a dict with those keys; values are printed
    above the bars, and a None (empty group) leaves the bar out with an "n/a" label.
    """
    if not metrics_by_name:
        raise ValueError("plot_shot_bars needs at least one result")
    labels = list(metrics_by_name)
    n = len(labels)
    width = 0.8 / n
    fig = _new_figure(min(12.0, 5.5 + 0.45 * n * len(SHOT_KEYS)), 4.6)
    ax = fig.add_subplot()
    fontsize = 8 if n <= 3 else 6
    for j, label in enumerate(labels):
        m = metrics_by_name[label] or {}
        offs = np.arange(len(SHOT_KEYS)) - 0.4 + width * (j + 0.5)
        vals = [_val(m.get(k)) for k in SHOT_KEYS]
        bars = ax.bar(offs, [0 if math.isnan(v) else v for v in vals], width * 0.92, label=str(label),
                      color=f"C{j % 10}")
        for bar, v in zip(bars, vals, strict=True):
            x = bar.get_x() + bar.get_width() / 2
            if math.isnan(v):
                bar.set_visible(False)
                ax.text(x, 1.0, "n/a", ha="center", va="bottom", fontsize=fontsize, color="0.4",
                        rotation=0 if n <= 3 else 90)
            else:
                ax.text(x, v + 1.0, f"{v:.1f}", ha="center", va="bottom", fontsize=fontsize,
                        rotation=0 if n <= 3 else 90)
    ax.set_xticks(np.arange(len(SHOT_KEYS)))
    ax.set_xticklabels([SHOT_LABELS[k] for k in SHOT_KEYS])
    ax.set_ylim(0, 112)
    ax.set_xlabel("shot group")
    ax.set_ylabel("accuracy (%)")
    _title(ax, title or "Accuracy by shot group")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return _save(fig, path)


def plot_confusion(
    confusion: Sequence[Sequence[int]],
    class_names: Sequence[str] | None,
    path: str | Path,
    title: str = "",
    order: Sequence[int] | None = None,
) -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted) with a colour bar.

    ``order`` lists the class indices in the order to draw them, rows and columns alike (``head_to_tail`` of
    the training counts: head top-left, tail bottom-right); None keeps the dataset's order.
    Tick labels are drawn for at most 30 classes, cell values for at most 10. Raises ValueError for
    more than 100 classes (unreadable) or a matrix that is not square.
    """
    cm = np.asarray(confusion, dtype=float)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise ValueError(f"confusion must be a non-empty square C x C matrix, got shape {cm.shape}")
    num_classes = cm.shape[0]
    if num_classes > 100:
        raise ValueError(f"plot_confusion draws at most 100 classes, got {num_classes}")
    names = _names(class_names, num_classes)
    if order is not None:
        order = [int(i) for i in order]
        if sorted(order) != list(range(num_classes)):
            raise ValueError(f"order must be a permutation of the {num_classes} classes")
        cm = cm[np.ix_(order, order)]
        names = [names[i] for i in order]
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)

    side = float(min(9.0, max(5.0, 3.0 + 0.2 * num_classes)))
    fig = _new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("fraction of the true class's samples")
    if num_classes <= 30:
        ticks = np.arange(num_classes)
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.set_xticklabels(names, rotation=90, fontsize=8)
        ax.set_yticklabels(names, fontsize=8)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if num_classes <= 10:
        for i in range(num_classes):
            for j in range(num_classes):
                v = norm[i, j]
                if v > 0:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if v > 0.6 else "black")
    ranked = " (head -> tail)" if order is not None else ""
    ax.set_xlabel("predicted class" + ranked)
    ax.set_ylabel("true class" + ranked)
    _title(ax, title or "Confusion matrix (row-normalised)")
    return _save(fig, path)


def plot_per_attribute(
    per_attribute: dict[str, float | None],
    attribute_names: Sequence[str] | None,
    path: str | Path,
    title: str = "",
) -> Path:
    """Bars of accuracy (%) per attribute group; keys are group ids ("0", "1", ...).

    ``attribute_names[i]`` names group ``"i"`` when given; a None value shows "n/a".
    """
    if not per_attribute:
        raise ValueError("plot_per_attribute needs at least one attribute group")

    def order(k: str):
        return (0, int(k), "") if str(k).lstrip("-").isdigit() else (1, 0, str(k))

    keys = sorted(per_attribute, key=order)
    labels = []
    for k in keys:
        idx = int(k) if str(k).lstrip("-").isdigit() else None
        if attribute_names is not None and idx is not None and 0 <= idx < len(attribute_names):
            labels.append(str(attribute_names[idx]))
        else:
            labels.append(f"attribute {k}")
    vals = [_val(per_attribute[k]) for k in keys]
    fig = _new_figure(max(5.0, 1.5 + 0.6 * len(keys)), 4.4)
    ax = fig.add_subplot()
    x = np.arange(len(keys))
    bars = ax.bar(x, [0 if math.isnan(v) else v for v in vals], 0.7, color="#1f77b4")
    for bar, v in zip(bars, vals, strict=True):
        cx = bar.get_x() + bar.get_width() / 2
        if math.isnan(v):
            bar.set_visible(False)
            ax.text(cx, 1.0, "n/a", ha="center", va="bottom", fontsize=8, color="0.4")
        else:
            ax.text(cx, v + 1.0, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x)
    few_keys = len(keys) <= 8
    ax.set_xticklabels(labels, rotation=0 if few_keys else 45, ha="center" if few_keys else "right")
    ax.set_ylim(0, 110)
    ax.set_xlabel("attribute group")
    ax.set_ylabel("accuracy (%)")
    _title(ax, title or "Accuracy per attribute group")
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def plot_sweep(rows: Sequence[dict], x_key: str, path: str | Path, title: str = "",
               chosen: float | None = None) -> Path:
    """Lines of many / medium / few / top1 accuracy (%) against ``x_key`` (e.g. an alpha or tau sweep), and of
    mean per-class accuracy when the rows have it (what ``OPTION: val`` chooses by).

    Rows are sorted by x; a None value leaves a gap. Non-numeric x values are placed in order as
    categories. ``chosen``: an x value marked by a vertical line (the value chosen on val).
    """
    if not rows:
        raise ValueError("plot_sweep needs at least one row")
    missing = [i for i, r in enumerate(rows) if x_key not in r]
    if missing:
        raise ValueError(f"rows {missing} have no '{x_key}'")
    numeric = all(_is_num(r[x_key]) for r in rows)
    rows = sorted(rows, key=lambda r: r[x_key]) if numeric else list(rows)
    xs = np.array([float(r[x_key]) for r in rows]) if numeric else np.arange(len(rows), dtype=float)

    fig = _new_figure(7.0, 4.6)
    ax = fig.add_subplot()
    styles = {"many": ("C2", "o"), "medium": ("C1", "s"), "few": ("C3", "^"), "top1": ("k", "D")}
    drawn = 0
    for k in SHOT_KEYS:
        if not any(_is_num(r.get(k)) for r in rows):  # absent or all None (CIFAR-10-LT has no few class)
            continue
        ys = np.array([_val(r.get(k)) for r in rows])
        colour, marker = styles[k]
        ax.plot(xs, ys, color=colour, marker=marker, ms=5, lw=1.8 if k == "top1" else 1.4,
                ls="--" if k == "top1" else "-", label=SHOT_LABELS[k])
        drawn += 1
    if any(_is_num(r.get("mean_class_acc")) for r in rows):
        ax.plot(xs, np.array([_val(r.get("mean_class_acc")) for r in rows]), color="C0", marker="v", ms=5, lw=1.8,
                label="mean per-class")
        drawn += 1
    if chosen is not None and numeric:
        ax.axvline(float(chosen), color="0.4", lw=1.0, ls=":", label=f"chosen {x_key}={chosen:g}")
        drawn += 1
    if not numeric:
        ax.set_xticks(xs)
        ax.set_xticklabels([str(r[x_key]) for r in rows])
    ax.set_xlabel(x_key)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    _title(ax, title or f"Accuracy against {x_key}")
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_compare(runs: dict[str, dict], split: str, path: str | Path, title: str = "") -> Path:
    """Several runs in one figure: grouped many / medium / few / overall bars (left) and per-class accuracy
    against the class's rank by training images, head to tail (right), one colour per run.

    ``runs`` maps a run's label to its ``metrics.json`` dict; ``split`` is the split drawn. A run without that
    split gets "n/a" bars; the curves draw the runs whose class count matches the first run's (ranked by the
    first run's ``train_counts``), and say how many were left out.
    """
    if not runs:
        raise ValueError("plot_compare needs at least one run")
    labels = list(runs)
    results = {k: ((runs[k].get("splits") or {}).get(split) or {}) for k in labels}
    n = len(labels)
    fig = _new_figure(min(16.0, 11.0 + 0.3 * n), 4.8)
    ax, cx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    width = 0.8 / n
    for j, label in enumerate(labels):
        vals = [_val(results[label].get(k)) for k in SHOT_KEYS]
        offs = np.arange(len(SHOT_KEYS)) - 0.4 + width * (j + 0.5)
        bars = ax.bar(offs, [0 if math.isnan(v) else v for v in vals], width * 0.92, color=f"C{j % 10}",
                      label=display_name(str(label)))
        for bar, v in zip(bars, vals, strict=True):
            x = bar.get_x() + bar.get_width() / 2
            ax.text(x, (1.0 if math.isnan(v) else v + 1.0), "n/a" if math.isnan(v) else f"{v:.1f}",
                    ha="center", va="bottom", fontsize=7 if n <= 3 else 5, rotation=0 if n <= 3 else 90)
    ax.set_xticks(np.arange(len(SHOT_KEYS)))
    ax.set_xticklabels([SHOT_LABELS[k] for k in SHOT_KEYS])
    ax.set_ylim(0, 112)
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, axis="y", alpha=0.3)
    _title(ax, f"by shot group, {split}")

    first = runs[labels[0]]
    counts = first.get("train_counts") or []
    order = head_to_tail(counts) if counts else None
    left_out = 0
    for j, label in enumerate(labels):
        pc = results[label].get("per_class")
        if not pc or (order is not None and len(pc) != len(order)):
            left_out += 1
            continue
        idx = order if order is not None else list(range(len(pc)))
        ys = [_val(pc[i]) for i in idx]
        cx.plot(np.arange(1, len(ys) + 1), ys, color=f"C{j % 10}", lw=1.4, marker="o" if len(ys) <= 30 else None,
                ms=3, label=display_name(str(label)))
    if order is not None:
        thr = parse_thresholds(results[labels[0]].get("thresholds") or first.get("thresholds"))
        if thr is not None:  # where the shot groups change along the ranks
            few_t, many_t = thr
            for t in (many_t, few_t):
                k = sum(1 for i in order if int(counts[i]) > t)
                if 0 < k < len(order):
                    cx.axvline(k + 0.5, color="0.35", ls="--", lw=1)
    cx.xaxis.set_major_locator(MaxNLocator(integer=True))
    cx.set_ylim(-3, 105)
    cx.set_xlabel("class rank by training images (1 = head)")
    cx.set_ylabel("per-class accuracy (%)")
    cx.grid(True, alpha=0.3)
    _title(cx, "per class, head -> tail" + (f" ({left_out} run(s) without matching per-class results)"
                                             if left_out else ""))
    handles, names = ax.get_legend_handles_labels()
    cx.legend(handles, names, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    if title:
        fig.suptitle(textwrap.fill(title, int(fig.get_figwidth() * 72 / 7.2)), fontsize=12)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------- a run


def save_run_plots(run_dir: str | Path, metrics: dict) -> list[Path]:
    """All figures of one run's ``metrics.json`` dict, written into ``run_dir/plots/``.

    Per split: ``per_class_<split>.png`` (when per-class accuracies and ``train_counts`` are known),
    ``confusion_<split>.png`` (when the split has a confusion matrix) and ``per_attribute_<split>.png``
    (when it has per-attribute accuracies); plus one ``shots.png`` comparing all splits, and for every
    prediction-time option chosen on val (``chosen_on_val``) its val curve, ``chosen_<option>_<stage>.png``.
    Returns the written paths.
    """
    run_dir = Path(run_dir)
    out_dir = RunDir(run_dir).plots
    splits: dict[str, dict] = metrics.get("splits") or {}
    train_counts = metrics.get("train_counts")
    class_names = metrics.get("class_names")
    attribute_names = metrics.get("attribute_names")
    run = run_dir.name
    written: list[Path] = []
    for split, m in splits.items():
        if not isinstance(m, dict):
            continue
        tag = _safe_name(split)
        top1 = m.get("top1")
        suffix = f" (top-1 {top1:.1f}%)" if _is_num(top1) else ""
        per_class = m.get("per_class")
        if per_class and train_counts and len(per_class) == len(train_counts):
            names = class_names if class_names and len(class_names) == len(train_counts) else None
            thr = parse_thresholds(m.get("thresholds") or metrics.get("thresholds"))
            written.append(plot_per_class(per_class, train_counts, names, out_dir / f"per_class_{tag}.png",
                                          title=f"{run}: per-class accuracy, {split}{suffix}",
                                          thresholds=thr))
        confusion = m.get("confusion")
        if confusion:
            names = class_names if class_names and len(class_names) == len(confusion) else None
            order = head_to_tail(train_counts) if train_counts and len(train_counts) == len(confusion) else None
            written.append(plot_confusion(confusion, names, out_dir / f"confusion_{tag}.png",
                                          title=f"{run}: confusion (row-normalised), {split}", order=order))
        per_attribute = m.get("per_attribute")
        if per_attribute:
            written.append(plot_per_attribute(per_attribute, attribute_names,
                                              out_dir / f"per_attribute_{tag}.png",
                                              title=f"{run}: accuracy per attribute group, {split}"))
    shot_results = {s: m for s, m in splits.items() if isinstance(m, dict)}
    if shot_results:
        written.append(plot_shot_bars(shot_results, out_dir / "shots.png",
                                      title=f"{run}: accuracy by shot group"))
    for c in metrics.get("chosen_on_val") or []:
        if isinstance(c, dict) and c.get("curve") and c.get("option"):
            name = f"chosen_{_safe_name(c['option'])}_{_safe_name(str(c.get('stage', '')))}.png"
            written.append(plot_sweep(c["curve"], c["option"], out_dir / name, chosen=c.get("value"),
                                      title=f"{run}: {c['option']} on val (chosen {c['option']}={c.get('value'):g}, "
                                            f"best {c.get('metric', 'mean_class_acc')})"))
    return written

"""Console progress, the metrics file, wandb, image grids and 2-D scatter plots.

Only rank 0 creates a MetricsLogger that writes; other ranks get one that does nothing.
"""

import json
import math
import os
import time

import numpy as np
from tqdm import tqdm

WANDB_MODES = ("auto", "online", "offline", "disabled")


def wandb_credentials_exist():
    """True when a wandb API key is in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = os.path.expanduser("~/.netrc")
    return os.path.isfile(netrc) and "api.wandb.ai" in open(netrc).read()


def resolve_wandb_mode(mode):
    """'auto' becomes 'online' where credentials exist, else 'offline'. Returns (mode, reason)."""
    if mode not in WANDB_MODES:
        raise ValueError(f"logging.wandb={mode!r} is unknown; valid choices: {WANDB_MODES}")
    if mode != "auto":
        return mode, f"wandb: {mode} (logging.wandb={mode})"
    if wandb_credentials_exist():
        return "online", "wandb: online (credentials found)"
    return "offline", (
        "wandb: offline, no credentials found (run `wandb login` for online logging, "
        "--config.logging.wandb=disabled to turn it off); sync later with `wandb sync`"
    )


class MetricsLogger:
    """Appends one JSON object per log event to `run_dir/metrics.jsonl` and mirrors it to wandb.

    wandb runs silently (no banner, no end-of-run summary, no console capture) unless
    `verbose_wandb`; its run id is kept so that a resumed run continues the same wandb run.
    """

    def __init__(
        self,
        run_dir,
        enabled,
        wandb_mode="disabled",
        project="interpolants",
        name=None,
        config=None,
        run_id=None,
        verbose_wandb=False,
    ):
        self.enabled, self.run = enabled, None
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.run_id = run_id
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if wandb_mode != "disabled":
            import wandb  # imported lazily: it is slow to import and optional at test time

            self.run = wandb.init(
                project=project,
                name=name,
                dir=run_dir,
                config=config,
                mode=wandb_mode,
                id=run_id,
                resume="allow",
                settings=wandb.Settings(silent=not verbose_wandb, console="off"),
            )
            self.run_id = self.run.id

    def log(self, step, metrics):
        """Record `metrics` (floats) at optimizer step `step`."""
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.time(), 3), **metrics}
        with open(self.path, "a") as f:
            f.write(json_line(record) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=int(step))

    def log_image(self, step, key, path):
        if self.enabled and self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(path)}, step=int(step))

    def close(self):
        if self.run is not None:
            self.run.finish()
            self.run = None


def read_metrics(run_dir):
    """All records of `run_dir/metrics.jsonl` (an empty list when there is none)."""
    return read_metrics_lines(run_dir)[0]


def read_metrics_lines(run_dir):
    """(records, torn) of `run_dir/metrics.jsonl`: `torn` counts the non-empty lines that are
    not a JSON record with an integer step, left out of `records` (the cut-off last line of a
    run killed, or out of disk, while appending)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return [], 0
    records, torn = [], 0
    with open(path, errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and type(record.get("step")) is int:
                records.append(record)
            else:
                torn += 1
    return records, torn


def save_loss_curve(records, path, keys=("loss",)):
    """Plot `keys` of the metrics records (dicts with a `step`) against the step, log-scaled y
    when every value is positive, as a PNG; non-finite values are left out. Returns the path, or
    None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for key in keys:
        points = [(r["step"], r[key]) for r in records if _is_finite_number(r.get(key))]
        if points:
            series[key] = np.array(points, dtype=np.float64)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, points in series.items():
        ax.plot(points[:, 0], points[:, 1], label=key, lw=1)
    if all((points[:, 1] > 0).all() for points in series.values()):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def non_finite_keys(record):
    """The keys of a flat dict whose values are NaN or infinite floats."""
    return [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]


def json_line(obj, **kwargs):
    """json.dumps of `obj` with NaN and infinities written as null: strict JSON, which json's
    default NaN / Infinity tokens are not (jq and most parsers reject them)."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(obj), allow_nan=False, **kwargs)


def _is_finite_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def progress_bar(total, initial, enabled):
    """tqdm bar over optimizer steps; shows rate and ETA, the loss goes in its postfix."""
    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        unit="step",
        dynamic_ncols=True,
        smoothing=0.05,
        mininterval=1.0,
    )


class TaskProgress:
    """A tqdm bar fed by `progress(done, total)` callbacks (sampling, likelihood), shown on the
    main rank only and only for work that lasts more than `delay` seconds. Use as a context
    manager, or call close()."""

    def __init__(self, description, enabled=True, delay=2.0):
        self.description, self.enabled, self.delay = description, enabled, delay
        self.bar = None

    def __call__(self, done, total):
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = tqdm(
                total=total, desc=self.description, delay=self.delay, leave=False, mininterval=1.0
            )
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def image_grid(images, nrow=None, padding=1, upscale=1):
    """Tile uint8 images (N, H, W, C) into one (rows, cols) grid array with a padding border.

    `upscale` repeats pixels (nearest neighbour) so that tiny images (8x8 digits) stay visible.
    """
    images = np.asarray(images, dtype=np.uint8)
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w, c = images.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    grid = np.full(
        (ncol * (h + padding) + padding, nrow * (w + padding) + padding, c), 255, dtype=np.uint8
    )
    for i, image in enumerate(images):
        row, col = divmod(i, nrow)
        top, left = padding + row * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = image
    return grid


def save_image_grid(images, path, nrow=None, upscale=1, padding=1):
    """Write uint8 images (N, H, W, C) as one PNG grid."""
    grid = image_grid(images, nrow=nrow, padding=padding, upscale=upscale)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    from PIL import Image  # here: a slow import that only writing pictures needs

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)
    return path


def finite_points(points):
    """The rows of a (N, 2) array whose coordinates are both finite (a diverged sampler's NaN or
    inf points cannot be drawn)."""
    points = np.asarray(points)
    return points[np.isfinite(points).all(axis=1)]


def plot_limit(points, margin):
    """Half-width of a square plot holding 99.5 % of the finite `points` (1 when none is)."""
    points = finite_points(points)
    if len(points) == 0:
        return 1.0
    return float(np.percentile(np.abs(points), 99.5)) * margin + 1e-6


def save_scatter(points, path, reference=None, title=None, limit=None):
    """Scatter plot of the finite rows of 2-D points (N, 2), optionally over reference data
    points, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    if reference is not None:
        ax.scatter(reference[:, 0], reference[:, 1], s=1, alpha=0.3, c="tab:gray", label="data")
    shown = finite_points(points)
    ax.scatter(shown[:, 0], shown[:, 1], s=1, alpha=0.5, c="tab:blue", label="samples")
    if limit is None:
        limit = plot_limit(points, 1.1)
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    if reference is not None:
        ax.legend(loc="upper right", markerscale=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_scatter_snapshots(snapshots, path, limit=None):
    """A row of scatter plots of 2-D points, one per (t, points (N, 2)) snapshot, as a PNG
    (finite rows only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if limit is None:
        limit = plot_limit(snapshots[-1][1], 1.2)
    fig, axes = plt.subplots(1, len(snapshots), figsize=(2.5 * len(snapshots), 2.7), dpi=100)
    for ax, (t, points) in zip(np.atleast_1d(axes), snapshots, strict=True):
        points = finite_points(points)
        ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.5, c="tab:blue")
        ax.set_xlim(-limit, limit)
        ax.set_ylim(-limit, limit)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"t = {t:.2f}")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path

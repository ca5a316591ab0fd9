"""Per-epoch training history: rows of metrics, saved as JSON and CSV, plotted as PNG.

``history["val_acc"]`` is a column (one value per epoch); ``history.rows`` the
list of per-epoch dicts.  Files are written atomically, so a reader (or a
crash) never sees half of one.
"""
import csv
import io
import json
import math
import os

from ..serialize import atomic_write

__all__ = ["History", "plot_history"]


def _clean(v):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class History:
    """The metrics of every finished epoch, in order."""

    def __init__(self, rows=None):
        self.rows = [dict(r) for r in (rows or [])]

    def append(self, row):
        self.rows.append(dict(row))

    def __len__(self):
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, key):
        if isinstance(key, int):
            return self.rows[key]
        return [r.get(key, float("nan")) for r in self.rows]

    def keys(self):
        seen = []
        for r in self.rows:
            for k in r:
                if k not in seen:
                    seen.append(k)
        return seen

    def best(self, monitor, mode="max"):
        """The row with the best ``monitor`` value (None if there is none)."""
        rows = [r for r in self.rows if r.get(monitor) is not None
                and not (isinstance(r[monitor], float) and math.isnan(r[monitor]))]
        if not rows:
            return None
        pick = max if mode == "max" else min
        return pick(rows, key=lambda r: r[monitor])

    def to_json(self, path, metadata=None):
        doc = {"history": [{k: _clean(v) for k, v in r.items()} for r in self.rows]}
        if metadata:
            doc["metadata"] = metadata
        text = json.dumps(doc, indent=1, allow_nan=False, default=str)
        atomic_write(path, lambda f: f.write(text.encode("utf-8")))

    def to_csv(self, path):
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.keys(), lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: ("" if _clean(v) is None else v) for k, v in r.items()})
        atomic_write(path, lambda f: f.write(buf.getvalue().encode("utf-8")))

    @classmethod
    def from_json(cls, path):
        with open(path) as f:
            doc = json.load(f)
        rows = [{k: (float("nan") if v is None else v) for k, v in r.items()}
                for r in doc["history"]]
        return cls(rows)

    def state_dict(self):
        return [dict(r) for r in self.rows]

    def __repr__(self):
        return f"History({len(self.rows)} epochs, keys={self.keys()})"


def plot_history(history, path):
    """Loss and accuracy curves as a PNG; returns False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    epochs = history["epoch"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in ((axes[0], "loss", "loss"), (axes[1], "acc", "top-1 accuracy")):
        for prefix, style in (("train_", "-o"), ("val_", "-s")):
            values = history[prefix + metric]
            if any(v == v for v in values):          # skip an all-NaN series
                ax.plot(epochs, values, style, label=prefix.rstrip("_"), markersize=3)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()

    def write(f):
        fig.savefig(f, format="png", dpi=100)
    atomic_write(os.fspath(path), write)
    plt.close(fig)
    return True

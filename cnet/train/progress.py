"""Per-batch progress: a bar with images/s and ETA.

tqdm draws it when installed; otherwise a small built-in bar redraws one line
with ``\\r`` at most a few times a second.  Nothing is drawn when ``verbose``
is 0 or the stream is not a terminal (a log file gets the per-epoch summary
lines the Trainer prints, not thousands of carriage returns); with
``verbose >= 2`` a non-terminal stream gets one line per tenth of the pass
instead (for long runs under nohup).
"""
import sys
import time

__all__ = ["ProgressBar", "format_time"]


def format_time(seconds):
    """``75.3`` -> ``'1:15'``; ``3725`` -> ``'1:02:05'``."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _isatty(stream):
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class ProgressBar:
    """``bar.update(n_batches=1, n_images=..., **postfix)``; ``bar.close()``.

    ``backend``: 'auto' (tqdm if importable, else built-in), 'tqdm', 'builtin'.
    ``enabled``: None means "when verbose and the stream is a terminal".
    """

    def __init__(self, total, desc="", verbose=1, file=None, enabled=None, backend="auto",
                 min_interval=0.2):
        self.total = int(total)
        self.desc = desc
        self.file = sys.stderr if file is None else file
        tty = _isatty(self.file)
        if enabled is None:
            enabled = bool(verbose) and (tty or verbose >= 2)
        self.enabled = bool(enabled)
        self.lines = self.enabled and not tty   # one line per 10% instead of redrawing
        self._next_line = 1
        self.count = 0
        self.images = 0
        self.start = time.perf_counter()
        self.min_interval = float(min_interval)
        self._last_draw = 0.0
        self._postfix = {}
        self._tqdm = None
        self._width = 0
        if self.enabled and not self.lines and backend in ("auto", "tqdm"):
            try:
                from tqdm.auto import tqdm
            except ImportError:
                if backend == "tqdm":
                    raise
            else:
                self._tqdm = tqdm(total=self.total, desc=desc, file=self.file, unit="batch",
                                  leave=False, dynamic_ncols=True)

    @property
    def images_per_s(self):
        elapsed = time.perf_counter() - self.start
        return self.images / elapsed if elapsed > 0 else 0.0

    def update(self, n_batches=1, n_images=0, **postfix):
        self.count += n_batches
        self.images += n_images
        if not self.enabled:
            return
        self._postfix = postfix
        if self._tqdm is not None:
            self._tqdm.set_postfix(self._postfix_items(), refresh=False)
            self._tqdm.update(n_batches)
            return
        now = time.perf_counter()
        if self.lines:
            if self.total and self.count * 10 >= self._next_line * self.total:
                self._next_line = self.count * 10 // self.total + 1
                self._draw(now, end="\n")
            return
        if now - self._last_draw >= self.min_interval or self.count >= self.total:
            self._last_draw = now
            self._draw(now)

    def _postfix_items(self):
        items = {}
        for k, v in self._postfix.items():
            items[k] = f"{v:.4g}" if isinstance(v, float) else v
        items["img/s"] = f"{self.images_per_s:.0f}"
        return items

    def _draw(self, now, end=None):
        elapsed = now - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.count) / rate if rate > 0 else float("nan")
        frac = self.count / self.total if self.total else 1.0
        width = 20
        filled = int(frac * width)
        bar = "#" * filled + "." * (width - filled)
        post = " ".join(f"{k}={v}" for k, v in self._postfix_items().items())
        line = (f"{self.desc} {self.count}/{self.total} [{bar}] {post} "
                f"{format_time(elapsed)}<{format_time(eta)}")
        if end is not None:
            self.file.write(line + end)
        else:
            pad = max(0, self._width - len(line))
            self._width = len(line)
            self.file.write("\r" + line + " " * pad)
        self.file.flush()

    def close(self):
        if not self.enabled or self.lines:
            return
        if self._tqdm is not None:
            self._tqdm.close()
            return
        # Clear the line: the Trainer prints a summary in its place.
        self.file.write("\r" + " " * self._width + "\r")
        self.file.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

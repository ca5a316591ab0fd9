"""Classification metrics accumulated over batches: mean loss, top-1 and top-k accuracy.

Counts are exact integers and the loss is summed in float64 in batch order, so
the same batches give the same numbers bit for bit (what resume equivalence
compares).
"""
import numpy as np

__all__ = ["topk_correct", "accuracy", "MetricAccumulator"]


def topk_correct(logits, labels, ks=(1, 5)):
    """Number of rows whose label is among the k largest logits, for each k.

    ``logits`` (N, C), ``labels`` (N,). A row counts for k when fewer than k
    logits are strictly larger than the label's (ties go to the label; top-1
    uses argmax, whose ties go to the lowest index, as torch's ``topk``).
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"topk_correct: expected logits (N, C) and labels (N,), got "
                         f"{logits.shape} and {labels.shape}")
    n, c = logits.shape
    out = []
    for k in ks:
        if n == 0:
            out.append(0)
        elif k == 1:
            out.append(int(np.count_nonzero(logits.argmax(axis=1) == labels)))
        elif k >= c:
            out.append(n)
        else:
            # The label is in the top k iff fewer than k logits are strictly larger.
            target = logits[np.arange(n), labels]
            larger = np.count_nonzero(logits > target[:, None], axis=1)
            out.append(int(np.count_nonzero(larger < k)))
    return out


def accuracy(logits, labels, k=1):
    """Fraction of rows whose label is in the top ``k`` logits."""
    n = len(labels)
    return topk_correct(logits, labels, (k,))[0] / n if n else float("nan")


class MetricAccumulator:
    """Running loss / top-1 / top-5 over the batches of one pass.

    ``update(loss, logits, labels)`` with the batch's *mean* loss;
    ``result(prefix)`` gives ``{prefix+'loss', prefix+'acc', prefix+'top5'}``
    (accuracies as fractions in [0, 1]).
    """

    def __init__(self, topk=5):
        self.topk = int(topk)
        self.reset()

    def reset(self):
        self.loss_sum = 0.0
        self.correct1 = 0
        self.correctk = 0
        self.count = 0

    def update(self, loss, logits, labels):
        n = int(len(labels))
        c1, ck = topk_correct(logits, labels, (1, self.topk))
        if loss is not None:
            self.loss_sum += float(loss) * n
        self.correct1 += c1
        self.correctk += ck
        self.count += n
        return c1

    @property
    def loss(self):
        return self.loss_sum / self.count if self.count else float("nan")

    @property
    def acc(self):
        return self.correct1 / self.count if self.count else float("nan")

    @property
    def topk_acc(self):
        return self.correctk / self.count if self.count else float("nan")

    def result(self, prefix=""):
        return {f"{prefix}loss": self.loss, f"{prefix}acc": self.acc,
                f"{prefix}top{self.topk}": self.topk_acc}

    def state_dict(self):
        return {"loss_sum": self.loss_sum, "correct1": self.correct1,
                "correctk": self.correctk, "count": self.count}

    def load_state_dict(self, state):
        self.loss_sum = float(state["loss_sum"])
        self.correct1 = int(state["correct1"])
        self.correctk = int(state["correctk"])
        self.count = int(state["count"])

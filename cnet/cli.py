"""The ``cnet`` command: train, eval, info.

    cnet train                                 # LeNet-5 on the bundled MNIST
    cnet train --model resnet20 --epochs 4 --optimizer sgd --lr 0.1
    cnet train --resume runs/lenet5-mnist/last.npz --epochs 8
    cnet eval --checkpoint runs/lenet5-mnist/best.npz
    cnet info

Exit codes a script can test: 0 success, 1 training failed (e.g. the loss
diverged), 2 bad arguments, 3 missing or corrupt dataset, 4 bad checkpoint,
130 interrupted.
"""
import argparse
import inspect
import json
import os
import sys
import time

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DATA, EXIT_CHECKPOINT, EXIT_INTERRUPTED = \
    0, 1, 2, 3, 4, 130

DATASETS = ("mnist", "cifar10", "cifar100", "npz:PATH")
OPTIMIZERS = ("sgd", "adam", "adamw", "nadam", "rmsprop", "adagrad", "adadelta")
SCHEDULES = ("none", "step", "multistep", "cosine", "onecycle", "plateau")

# The defaults of `cnet train`: LeNet-5 on the bundled MNIST with Adam and a
# one-cycle schedule, which reaches >= 99.0% test accuracy in 6 epochs (see README).
TRAIN_DEFAULTS = dict(model="lenet5", dataset="mnist", epochs=6, batch_size=128,
                      optimizer="adam", schedule="onecycle", warmup_epochs=0.0,
                      label_smoothing=0.0, seed=0, nesterov=False, augment=None,
                      patience=0, grad_clip=None)
DEFAULT_LR = dict(sgd=0.1, adam=3e-3, adamw=3e-3, nadam=3e-3, rmsprop=1e-3, adagrad=1e-2,
                  adadelta=1.0)
DEFAULT_WEIGHT_DECAY = dict(sgd=5e-4, adamw=1e-2)


class CLIError(Exception):
    """A failure with its exit code and one-line message."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line (argparse prints the whole usage block): name the subcommand's help.
        raise CLIError(EXIT_USAGE, f"{message} (see '{self.prog} --help')")


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return v


def _positive_float(text):
    v = _nonneg_float(text)
    if v == 0:
        raise argparse.ArgumentTypeError("expected a number > 0, got 0")
    return v


def _dataset_name(text):
    if text in ("mnist", "cifar10", "cifar100") or (text.startswith("npz:") and len(text) > 4):
        return text
    raise argparse.ArgumentTypeError(f"unknown dataset {text!r}; choose from "
                                     f"{', '.join(DATASETS)}")


def build_parser():
    parser = _Parser(prog="cnet", description="cnet: train and evaluate convolutional "
                     "networks on the CPU.")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,info}", parser_class=_Parser)

    t = sub.add_parser("train", help="train a model (default: LeNet-5 on the bundled MNIST)",
                       description="Train a model from cnet.models on a dataset; the test "
                       "split is evaluated after every epoch.  Options not given on a "
                       "--resume run are taken from the checkpoint.")
    t.add_argument("--model", help="a name from cnet.models.list_models() (default lenet5)")
    t.add_argument("--dataset", type=_dataset_name,
                   help="mnist (bundled), cifar10, cifar100, or npz:PATH (default mnist)")
    t.add_argument("--data-root", help="dataset directory (default: bundled MNIST; "
                   "$CNET_DATA or ~/.cache/cnet/data for CIFAR)")
    t.add_argument("--download", action="store_true", default=None,
                   help="fetch missing dataset files (verified by SHA-256)")
    t.add_argument("--epochs", type=_positive_int, help="total epochs (default 6)")
    t.add_argument("--batch-size", type=_positive_int, help="default 128")
    t.add_argument("--optimizer", choices=OPTIMIZERS, help="default adam")
    t.add_argument("--lr", type=_positive_float,
                   help="learning rate (peak lr for onecycle); default "
                   + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()))
    t.add_argument("--momentum", type=_nonneg_float,
                   help="SGD/RMSprop momentum (default 0.9 for sgd, 0 for rmsprop)")
    t.add_argument("--weight-decay", type=_nonneg_float,
                   help="default 5e-4 for sgd, 1e-2 for adamw, 0 otherwise; never applied "
                   "to biases and batch-norm parameters")
    t.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum (sgd)")
    t.add_argument("--schedule", choices=SCHEDULES,
                   help="learning-rate schedule (default onecycle); step/multistep/cosine/"
                   "onecycle advance every batch, plateau every epoch on the test loss")
    t.add_argument("--warmup-epochs", type=_nonneg_float,
                   help="linear warm-up (for onecycle: the rising phase); default 0")
    t.add_argument("--label-smoothing", type=_nonneg_float, help="default 0")
    aug = t.add_mutually_exclusive_group()
    aug.add_argument("--augment", dest="augment", action="store_true", default=None,
                     help="random crops (and flips for CIFAR); default on for CIFAR, off "
                     "for MNIST")
    aug.add_argument("--no-augment", dest="augment", action="store_false")
    t.add_argument("--patience", type=int, help="early stopping on the test loss after this "
                   "many epochs without improvement (default 0: off)")
    t.add_argument("--grad-clip", type=_positive_float, help="clip the global gradient norm")
    t.add_argument("--threads", type=_positive_int, help="threads for kernels and BLAS "
                   "(default: all available cores)")
    t.add_argument("--seed", type=int, help="seed of initialisation, shuffling and "
                   "augmentation (default 0)")
    t.add_argument("--out", help="output directory for last.npz, best.npz, history.json/.csv"
                   "/.png (default runs/MODEL-DATASET)")
    t.add_argument("--resume", metavar="PATH", help="continue from a checkpoint (last.npz)")
    t.add_argument("--limit-train", type=_positive_int, metavar="N",
                   help="train on the first N training images only (smoke tests)")
    t.add_argument("--limit-test", type=_positive_int, metavar="N",
                   help="evaluate on the first N test images only")
    t.add_argument("--quiet", action="store_true", default=None,
                   help="print nothing but errors")
    t.add_argument("-v", "--verbose", action="store_true", default=None,
                   help="progress lines even when the output is not a terminal (logs)")

    e = sub.add_parser("eval", help="evaluate a saved checkpoint",
                       description="Evaluate a checkpoint written by 'cnet train' (or by a "
                       "Trainer with model_config) on a dataset's test split.")
    e.add_argument("--checkpoint", required=True, metavar="PATH")
    e.add_argument("--dataset", type=_dataset_name,
                   help="default: the dataset the checkpoint was trained on")
    e.add_argument("--data-root")
    e.add_argument("--download", action="store_true")
    e.add_argument("--batch-size", type=_positive_int, default=256)
    e.add_argument("--limit-test", type=_positive_int, metavar="N")
    e.add_argument("--train-split", action="store_true", help="evaluate the training split")
    e.add_argument("--threads", type=_positive_int)
    e.add_argument("--json", action="store_true", help="print the result as one JSON line")

    sub.add_parser("info", help="print how cnet was built and will run (show_config)",
                   description="Print cnet.show_config() and the available models.")
    return parser


# ------------------------------------------------------------------ data

def load_dataset(name, root=None, download=False, train=True, limit=None, seed=0):
    """The dataset for a --dataset value; DatasetError -> exit code 3."""
    from .data import CIFAR10, CIFAR100, MNIST, DatasetError
    try:
        if name == "mnist":
            ds = MNIST(root=root, train=train, download=bool(download))
        elif name == "cifar10":
            ds = CIFAR10(root=root, train=train, download=bool(download))
        elif name == "cifar100":
            ds = CIFAR100(root=root, train=train, download=bool(download))
        else:
            path = name[4:]
            if not os.path.exists(path):
                raise DatasetError(f"{path} does not exist")
            ds = _load_npz_split(path, train, seed)
    except DatasetError as e:
        raise CLIError(EXIT_DATA, f"dataset {name}: {e}") from e
    except OSError as e:  # a download that failed, a permission problem
        raise CLIError(EXIT_DATA, f"dataset {name}: {e}") from e
    if len(ds) == 0:
        raise CLIError(EXIT_DATA, f"dataset {name}: the {'training' if train else 'test'} "
                       f"split is empty")
    if limit is not None and limit < len(ds):
        import numpy as np
        ds = ds.subset(np.arange(limit))
    return ds


def _load_npz_split(path, train, seed):
    """x_train/x_test style files by split; one images/labels pair: hold out 10%."""
    import numpy as np

    from .data import DatasetError, NpzDataset
    try:
        return NpzDataset(path, split="train" if train else "test")
    except DatasetError:
        pass
    full = NpzDataset(path)
    n = len(full)
    order = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    n_test = max(1, n // 10)
    if n < 2:
        raise DatasetError(f"{path}: {n} samples are too few to split into train and test")
    idx = np.sort(order[n_test:] if train else order[:n_test])
    return full.subset(idx)


def _image_stats(ds):
    """Per-channel mean/std of the images in [0, 1] units for uint8 (Normalize's scale)."""
    import numpy as np
    x = ds.images
    scale = 1.0 / 255.0 if x.dtype == np.uint8 else 1.0
    flat = x.reshape(-1, x.shape[-1])
    step = max(1, flat.shape[0] // 2_000_000)        # a sample is plenty for the stats
    sample = flat[::step].astype(np.float64) * scale
    std = sample.std(axis=0)
    std[std == 0] = 1.0
    return sample.mean(axis=0).tolist(), std.tolist()


def data_config(name, train_ds):
    """How the command line preprocesses a dataset (recorded in checkpoints for eval)."""
    from .data import transforms as T
    h, w, c = train_ds.image_shape
    if name == "mnist":
        mean, std = list(T.MNIST_MEAN), list(T.MNIST_STD)
    elif name == "cifar10":
        mean, std = list(T.CIFAR10_MEAN), list(T.CIFAR10_STD)
    elif name == "cifar100":
        mean, std = list(T.CIFAR100_MEAN), list(T.CIFAR100_STD)
    else:
        mean, std = _image_stats(train_ds)
    # The 32x32 networks (LeNet-5, CIFAR ResNets, ...) get smaller images zero-padded.
    pad = (max(0, (32 - h) // 2), max(0, (32 - w) // 2))
    return {"dataset": name, "image_shape": [h, w, c], "pad": list(pad),
            "input_shape": [h + 2 * pad[0], w + 2 * pad[1], c], "mean": mean, "std": std,
            "num_classes": int(train_ds.num_classes), "flip": name.startswith("cifar")}


def make_transform(cfg, augment):
    from .data import transforms as T
    steps = []
    pad = tuple(cfg["pad"])
    if augment:
        # Random translation by up to 2 px (MNIST) or 4 px (CIFAR) around the padded image.
        shift = 4 if cfg["flip"] else 2
        out_h, out_w = cfg["input_shape"][:2]
        steps.append(T.RandomCrop((out_h, out_w), padding=(pad[0] + shift, pad[1] + shift)))
        if cfg["flip"]:
            steps.append(T.RandomHorizontalFlip())
    elif any(pad):
        steps.append(T.Pad(pad))
    steps.append(T.Normalize(cfg["mean"], cfg["std"]))
    return T.Compose(steps)


# ---------------------------------------------------------------- models

def model_kwargs(name, cfg):
    from . import models
    params = inspect.signature(getattr(models, name)).parameters
    kwargs = {"num_classes": cfg["num_classes"], "in_channels": cfg["input_shape"][2]}
    if "input_size" in params:
        kwargs["input_size"] = cfg["input_shape"][0]
    return {k: v for k, v in kwargs.items() if k in params}


def build_model(name, kwargs):
    from .models import get_model
    try:
        return get_model(name, **kwargs)
    except (TypeError, ValueError) as e:
        raise CLIError(EXIT_USAGE, f"cannot build {name} for this dataset: {e}") from e


# ------------------------------------------------------------- optimizer

def build_optimizer(args, model):
    from . import optim
    name = args.optimizer
    lr = args.lr
    wd = args.weight_decay
    params = optim.param_groups_no_decay(model, wd) if wd else model.parameters()
    if name == "sgd":
        return optim.SGD(params, lr=lr, momentum=args.momentum, nesterov=bool(args.nesterov),
                         weight_decay=wd)
    if name == "rmsprop":
        return optim.RMSprop(params, lr=lr, momentum=args.momentum, weight_decay=wd)
    cls = dict(adam=optim.Adam, adamw=optim.AdamW, nadam=optim.NAdam,
               adagrad=optim.Adagrad, adadelta=optim.Adadelta)[name]
    return cls(params, lr=lr, weight_decay=wd)


def build_scheduler(args, optimizer, steps_per_epoch):
    """(scheduler, interval): batch-level schedules except plateau (epoch-level)."""
    from .optim import lr_scheduler as S
    name, epochs = args.schedule, args.epochs
    total = epochs * steps_per_epoch
    warm = min(int(round(args.warmup_epochs * steps_per_epoch)), total - 1)
    if name == "onecycle":
        pct = warm / total if warm else 0.3
        return S.OneCycleLR(optimizer, max_lr=args.lr, total_steps=total, pct_start=pct), "step"
    if name == "plateau":
        return S.ReduceLROnPlateau(optimizer, mode="min", factor=0.1, patience=2), "epoch"
    rest = total - warm
    if name == "none":
        sched = S.LambdaLR(optimizer, lambda step: 1.0) if warm else None
    elif name == "step":
        sched = S.StepLR(optimizer, step_size=max(1, rest // 3), gamma=0.1)
    elif name == "multistep":
        sched = S.MultiStepLR(optimizer, milestones=[int(rest * 0.5), int(rest * 0.75)],
                              gamma=0.1)
    else:  # cosine
        sched = S.CosineAnnealingLR(optimizer, T_max=max(1, rest))
    if warm:
        sched = S.warmup(optimizer, sched, warm)
    return sched, "step"


# --------------------------------------------------------------- commands

def _resolve_train_args(args):
    """Fill unspecified options: from the checkpoint on --resume, then the defaults."""
    ckpt = None
    if args.resume:
        from .train import CheckpointError, load_checkpoint
        try:
            ckpt = load_checkpoint(args.resume)
        except CheckpointError as e:
            raise CLIError(EXIT_CHECKPOINT, str(e)) from e
        saved = (ckpt.get("metadata") or {}).get("args") or {}
        for k, v in saved.items():
            if getattr(args, k, None) is None and k not in ("resume", "quiet", "threads"):
                setattr(args, k, v)
    for k, v in TRAIN_DEFAULTS.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if ckpt is not None:
        saved_epochs = ((ckpt.get("metadata") or {}).get("args") or {}).get("epochs")
        if saved_epochs is not None and args.epochs != saved_epochs \
                and args.schedule not in ("none", "plateau"):
            raise CLIError(EXIT_USAGE, f"the {args.schedule} schedule of {args.resume} is "
                           f"laid out for {saved_epochs} epochs; resume it with --epochs "
                           f"{saved_epochs} (only 'none' and 'plateau' schedules extend)")
        model = ckpt.get("model") or {}
        if model.get("name") and args.model != model["name"]:
            raise CLIError(EXIT_CHECKPOINT, f"{args.resume} holds a {model['name']} model, "
                           f"not {args.model}")
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    if args.momentum is None:
        args.momentum = 0.9 if args.optimizer == "sgd" else 0.0
    if args.weight_decay is None:
        args.weight_decay = DEFAULT_WEIGHT_DECAY.get(args.optimizer, 0.0)
    if args.augment is None:
        args.augment = args.dataset.startswith("cifar")
    if args.out is None:
        ds = args.dataset if not args.dataset.startswith("npz:") else \
            os.path.splitext(os.path.basename(args.dataset[4:]))[0]
        args.out = os.path.join("runs", f"{args.model}-{ds}")
    from .models import list_models
    if args.model not in list_models():
        raise CLIError(EXIT_USAGE, f"unknown model {args.model!r}; choose from "
                       f"{', '.join(list_models())}")
    if args.nesterov and args.optimizer != "sgd":
        raise CLIError(EXIT_USAGE, f"--nesterov applies to --optimizer sgd, not "
                       f"{args.optimizer}")
    if args.nesterov and not args.momentum:
        raise CLIError(EXIT_USAGE, "--nesterov needs --momentum > 0")
    if args.schedule == "plateau" and args.warmup_epochs:
        raise CLIError(EXIT_USAGE, "--warmup-epochs does not combine with --schedule plateau")
    if args.warmup_epochs and args.warmup_epochs >= args.epochs:
        raise CLIError(EXIT_USAGE, f"--warmup-epochs {args.warmup_epochs:g} must be shorter "
                       f"than --epochs {args.epochs}")
    if args.patience < 0:
        raise CLIError(EXIT_USAGE, f"--patience must be >= 0, got {args.patience}")
    if args.label_smoothing > 1:
        raise CLIError(EXIT_USAGE, f"--label-smoothing must be in [0, 1], got "
                       f"{args.label_smoothing}")
    return ckpt


_SAVED_ARGS = ("model", "dataset", "data_root", "epochs", "batch_size", "optimizer", "lr",
               "momentum", "weight_decay", "nesterov", "schedule", "warmup_epochs",
               "label_smoothing", "augment", "patience", "grad_clip", "seed", "out",
               "limit_train", "limit_test")


def cmd_train(args):
    ckpt = _resolve_train_args(args)
    verbose = 0 if args.quiet else (2 if args.verbose else 1)
    import cnet
    from . import nn
    from .data import DataLoader
    from .train import CheckpointError, EarlyStopping, ModelCheckpoint, Trainer

    if args.threads:
        cnet.set_num_threads(args.threads)
    cnet.manual_seed(args.seed)
    train_ds = load_dataset(args.dataset, args.data_root, args.download, True,
                            args.limit_train, args.seed)
    test_ds = load_dataset(args.dataset, args.data_root, args.download, False,
                           args.limit_test, args.seed)
    cfg = data_config(args.dataset, train_ds)
    if tuple(test_ds.image_shape) != tuple(cfg["image_shape"]):
        raise CLIError(EXIT_DATA, f"dataset {args.dataset}: test images "
                       f"{test_ds.image_shape} differ from training images "
                       f"{tuple(cfg['image_shape'])}")
    kwargs = model_kwargs(args.model, cfg)
    model = build_model(args.model, kwargs)
    # Fixed loader seeds: the data order depends on --seed only, not on the model.
    train_loader = DataLoader(train_ds, args.batch_size, shuffle=True,
                              transform=make_transform(cfg, args.augment), seed=args.seed)
    test_loader = DataLoader(test_ds, 256, shuffle=False,
                             transform=make_transform(cfg, False), seed=args.seed + 1)
    optimizer = build_optimizer(args, model)
    scheduler, interval = build_scheduler(args, optimizer, len(train_loader))
    callbacks = [ModelCheckpoint(os.path.join(args.out, "best.npz"), monitor="val_acc")]
    if args.patience:
        callbacks.append(EarlyStopping(monitor="val_loss", patience=args.patience))
    metadata = {"data": cfg, "args": {k: getattr(args, k, None) for k in _SAVED_ARGS},
                "command": " ".join(["cnet"] + list(getattr(args, "argv", None) or ["train"]))}
    trainer = Trainer(model, optimizer, nn.CrossEntropyLoss(args.label_smoothing),
                      scheduler=scheduler, schedule_interval=interval if scheduler else None,
                      callbacks=callbacks, out_dir=args.out, verbose=verbose,
                      model_config={"name": args.model, "kwargs": kwargs}, metadata=metadata,
                      grad_clip=args.grad_clip)
    if verbose:
        trainer.log(f"{args.model} ({model.num_parameters():,} parameters) on "
                    f"{args.dataset}: {len(train_ds)} training / {len(test_ds)} test images "
                    f"{tuple(cfg['input_shape'])}, {args.optimizer} lr {args.lr:g}, schedule "
                    f"{args.schedule}, batch {args.batch_size}, "
                    f"{cnet.get_num_threads()} threads -> {args.out}")
    start = time.perf_counter()
    try:
        history = trainer.fit(train_loader, args.epochs, val_loader=test_loader,
                              resume=ckpt)
    except CheckpointError as e:
        raise CLIError(EXIT_CHECKPOINT, str(e)) from e
    except FloatingPointError as e:
        raise CLIError(EXIT_FAILED, str(e)) from e
    wall = time.perf_counter() - start
    if verbose and len(history):
        best = history.best("val_acc", "max")
        last = history.rows[-1]
        trainer.log(f"done: {trainer.epoch} epochs in {wall:.1f} s; test accuracy "
                    f"{100 * last['val_acc']:.2f}% (best {100 * best['val_acc']:.2f}% at "
                    f"epoch {best['epoch']}); saved {os.path.join(args.out, 'best.npz')}")
    return EXIT_OK


def cmd_eval(args):
    import cnet
    from .data import DataLoader
    from .train import CheckpointError, build_model as build_from_checkpoint
    from .train import evaluate, load_checkpoint

    if args.threads:
        cnet.set_num_threads(args.threads)
    try:
        ckpt = load_checkpoint(args.checkpoint)
        model = build_from_checkpoint(ckpt)
    except CheckpointError as e:
        raise CLIError(EXIT_CHECKPOINT, str(e)) from e
    meta = ckpt.get("metadata") or {}
    cfg = meta.get("data")
    saved_args = meta.get("args") or {}
    name = args.dataset or (cfg or {}).get("dataset")
    if name is None:
        raise CLIError(EXIT_USAGE, f"{args.checkpoint} does not record its dataset; pass "
                       f"--dataset")
    root = args.data_root if args.data_root is not None else (
        saved_args.get("data_root") if name == (cfg or {}).get("dataset") else None)
    ds = load_dataset(name, root, args.download, args.train_split, args.limit_test,
                      saved_args.get("seed") or 0)
    if cfg is None or name != cfg.get("dataset"):
        new = data_config(name, ds)
        if cfg is not None:
            new.update(mean=cfg["mean"], std=cfg["std"])   # the training normalisation
        cfg = new
    if list(ds.image_shape) != list(cfg["image_shape"]):
        raise CLIError(EXIT_DATA, f"dataset {name}: images {tuple(ds.image_shape)} do not "
                       f"match the {tuple(cfg['image_shape'])} the model was trained on")
    loader = DataLoader(ds, args.batch_size, transform=make_transform(cfg, False), seed=0)
    try:
        result = evaluate(model, loader, verbose=0 if args.json else 1)
    except ValueError as e:
        raise CLIError(EXIT_CHECKPOINT, f"{args.checkpoint} does not fit dataset {name}: "
                       f"{e}") from e
    result = dict(result, checkpoint=args.checkpoint, dataset=name,
                  model=(ckpt.get("model") or {}).get("name"),
                  split="train" if args.train_split else "test")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['model']} on {name} ({result['split']}, {result['n']} images): "
              f"loss {result['loss']:.4f}  top-1 {100 * result['acc']:.2f}%  "
              f"top-5 {100 * result['top5']:.2f}%  ({result['images_per_s']:.0f} img/s)")
    return EXIT_OK


def cmd_info(args):
    import cnet
    from .models import list_models
    cnet.show_config()
    print(f"models:          {', '.join(list_models())}")
    return EXIT_OK


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        return {"train": cmd_train, "eval": cmd_eval, "info": cmd_info}[args.command](args)
    except CLIError as e:
        print(f"cnet: error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("cnet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

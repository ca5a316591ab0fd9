"""cnet.data: datasets, the DataLoader and batch augmentation.

>>> from cnet.data import MNIST, DataLoader, transforms as T
>>> train = MNIST(train=True)                      # the bundled copy, offline
>>> loader = DataLoader(train, batch_size=128, shuffle=True,
...                     transform=T.Compose([T.RandomCrop(28, padding=2),
...                                          T.Normalize(T.MNIST_MEAN, T.MNIST_STD)]))
>>> for x, y in loader: ...                        # x (128, 28, 28, 1) float32, y int64
"""
from . import transforms
from ._io import DatasetError, read_idx
from .datasets import (CIFAR10, CIFAR100, MNIST, ArrayDataset, NpzDataset, default_root,
                       load_npz, random_split)
from .loader import DataLoader

__all__ = ["ArrayDataset", "NpzDataset", "load_npz", "random_split", "MNIST", "CIFAR10",
           "CIFAR100", "DataLoader", "DatasetError", "read_idx", "default_root", "transforms"]

"""Datasets: the IDX format, where the files come from, and loading them as tensors."""

from lenet.data.datasets import (
    DATASETS,
    Dataset,
    DatasetSpec,
    Split,
    fetch,
    get_spec,
    load_dataset,
    verify,
)
from lenet.data.idx import parse_idx, read_idx, write_idx

__all__ = [
    "DATASETS",
    "Dataset",
    "DatasetSpec",
    "Split",
    "fetch",
    "get_spec",
    "load_dataset",
    "parse_idx",
    "read_idx",
    "verify",
    "write_idx",
]

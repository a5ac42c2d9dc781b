"""Datasets, preprocessing to model space, and exact, resumable distributed loaders.

Every dataset is an in-memory :class:`ArrayDataset`. Images are stored as uint8 (N, C, H, W)
and mapped to float32 in [-1, 1] when fetched; 2-D toy points are stored as float32 (N, 2).
Builders live in the ``DATASETS`` registry; ``build_dataset(name, ...)`` picks one.

``InfiniteLoader`` walks one ``DistributedSampler`` permutation per epoch in fixed-size chunks,
so rank r's j-th sample of an epoch is the global position ``world_size * j + r`` of that
permutation, flips depend only on (seed, epoch, dataset index), and its position is a tiny
``{"epoch", "batch"}`` dict that resumes exactly.
"""

import codecs
import functools
import gzip
import importlib
import math
import pickle
import sys
import tarfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import utils

MNIST_URLS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_FILES = {True: tuple(f"data_batch_{i}" for i in range(1, 6)), False: ("test_batch",)}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DOWNLOAD_TIMEOUT_S = 10
MOONS_NOISE = 0.1
TEST_SEED_OFFSET = 1_000_003  # toy test split = an independent draw with seed + this offset


# --------------------------------------------------------------------------------------------
# The dataset container
# --------------------------------------------------------------------------------------------

_TO_MODEL = {
    "image": lambda x: x.float() / 127.5 - 1.0,
    "points": lambda x: x.float(),
}
_STORAGE_DTYPE = {"image": torch.uint8, "points": torch.float32}


class ArrayDataset(Dataset):
    """In-memory dataset.

    x: tensor (N, *shape), stored compactly (uint8 for images, float32 for points);
    y: long tensor (N,) (all zeros when unconditional). Fetching returns float32 in model
    space: images mapped from [0, 255] to [-1, 1], points as they are.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        num_classes: int = 0,
        kind: str = "image",
    ):
        if kind not in _TO_MODEL:
            raise ValueError(f"unknown kind {kind!r}; valid choices: {sorted(_TO_MODEL)}")
        if x.dtype != _STORAGE_DTYPE[kind]:
            raise ValueError(f"{kind} data must be stored as {_STORAGE_DTYPE[kind]}, got {x.dtype}")
        self.x = x
        self.y = torch.zeros(len(x), dtype=torch.long) if y is None else y.long()
        if len(self.y) != len(self.x):
            raise ValueError(f"{len(self.x)} samples but {len(self.y)} labels")
        self.shape = tuple(x.shape[1:])
        self.num_classes = num_classes
        self.kind = kind

    def __len__(self) -> int:
        return len(self.x)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched fetch: (x float32 in model space, y long) for the given indices."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return _TO_MODEL[self.kind](self.x[index]), self.y[index]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample (x of shape `self.shape`, scalar y), converted like `__getitems__`."""
        x, y = self.__getitems__([i])
        return x[0], y[0]


def _image_to_data(x: torch.Tensor) -> np.ndarray:
    hwc = ((x.detach().cpu().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return hwc.movedim(-3, -1).numpy()


def _points_to_data(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().float().numpy()


_TO_DATA = {"image": _image_to_data, "points": _points_to_data}


def likelihood_data(
    dataset: ArrayDataset, num: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `num` items as (x, y) for likelihood evaluation, in model space.

    Images are dequantised: pixel k in 0..255 becomes x = (k + u) / 128 - 1 with u ~ U[0, 1)
    (seeded), a continuous density on [-1, 1) whose NLL, plus D log 128, bounds the discrete
    NLL (see sampling.bits_per_dim). Points are returned as they are.
    """
    x, y = dataset.x[:num], dataset.y[:num]
    if dataset.kind != "image":
        return x.float(), y
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed))
    return (x.float() + u) / 128.0 - 1.0, y


def to_data_space(x: torch.Tensor, kind: str) -> np.ndarray:
    """Model space -> data space. Images: [-1, 1] (N, C, H, W) float -> uint8 (N, H, W, C),
    rounded and clipped (a single (C, H, W) image gives (H, W, C)); points: float32 as they are.
    """
    if kind not in _TO_DATA:
        raise ValueError(f"unknown kind {kind!r}; valid choices: {sorted(_TO_DATA)}")
    return _TO_DATA[kind](x)


# --------------------------------------------------------------------------------------------
# 2-D toy distributions (torch, driven by an explicit generator)
# --------------------------------------------------------------------------------------------


def _checkerboard(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform on the 8 unit squares of [-2, 2)^2 with floor(x) + floor(y) even, scaled by
    1 / 0.45 (Meta's flow_matching 2-D example). Built in float64 so no point rounds onto a
    neighbouring square before the final cast."""
    x = torch.rand(n, generator=generator, dtype=torch.float64) * 4 - 2
    shift = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2
    y = torch.rand(n, generator=generator, dtype=torch.float64) - shift + torch.floor(x) % 2
    return (torch.stack([x, y], dim=1) / 0.45).float()


def _moons(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Two interleaved half-moons (sklearn's make_moons shapes with uniform random angles and a
    fair coin per point for the moon), Gaussian noise MOONS_NOISE, then `* 3 - 1` (torchcfm)."""
    angle = torch.rand(n, generator=generator) * math.pi
    inner = torch.randint(0, 2, (n,), generator=generator).bool()
    outer_xy = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    inner_xy = torch.stack([1 - torch.cos(angle), 0.5 - torch.sin(angle)], dim=1)
    xy = torch.where(inner[:, None], inner_xy, outer_xy)
    xy = xy + MOONS_NOISE * torch.randn(n, 2, generator=generator)
    return xy * 3 - 1


def _gaussians8(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """torchcfm's "8gaussians" (scale 5, var 0.1): centres 5 * (cos k pi/4, sin k pi/4).
    torchcfm passes sqrt(var) as the covariance, so the per-coordinate std is var ** 0.25
    (about 0.56); kept so results compare with torchcfm's."""
    angles = torch.arange(8) * (math.pi / 4)
    centres = 5.0 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    which = torch.randint(0, 8, (n,), generator=generator)
    return centres[which] + 0.1**0.25 * torch.randn(n, 2, generator=generator)


TOY_SETS = {"checkerboard": _checkerboard, "moons": _moons, "gaussians8": _gaussians8}


def sample_toy(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fresh float32 points (n, 2) from the toy distribution `name` (TOY_SETS)."""
    if name not in TOY_SETS:
        raise ValueError(f"unknown toy set {name!r}; valid choices: {sorted(TOY_SETS)}")
    return TOY_SETS[name](n, generator).float()


# --------------------------------------------------------------------------------------------
# File formats
# --------------------------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    """An exception as one line: its type and message with whitespace runs collapsed."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}".rstrip(": ")


def _read_bytes(path: Path) -> bytes:
    """The file's bytes (gunzipped for .gz); ValueError naming the file when it cannot be read
    or is not a valid gzip stream (truncated, corrupt)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: cannot read ({_one_line(err)})") from err


def _find_file(base: Path) -> Path | None:
    """`base` or `base.gz`, whichever exists (the plain file first); None when neither does."""
    gz = base.with_name(base.name + ".gz")
    return next((p for p in (base, gz) if p.is_file()), None)


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (MNIST layout): big-endian magic, then one
    big-endian uint32 per dimension, then the data. Wrong magic -> ValueError naming the file."""
    data = _read_bytes(path)
    found = int.from_bytes(data[:4], "big")
    if len(data) < 4 or found != magic:
        raise ValueError(f"{path}: bad IDX magic number {found}, expected {magic}")
    ndim = magic & 0xFF
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if array.size != math.prod(dims):
        raise ValueError(f"{path}: header says {dims} but holds {array.size} bytes of data")
    return array.reshape(dims)


def _numpy_internal(name: str):
    """numpy._core.<name> (numpy >= 2), else numpy.core.<name>."""
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{name}")


def _pickle_allowlist() -> dict:
    """The only globals a CIFAR batch may name: what rebuilds numpy arrays (old and new
    numpy module paths, pickle protocols 2-5) and the codec Python 3 uses for bytes in
    protocol 2. None of them runs code of the file's choosing."""
    multiarray, numeric = _numpy_internal("multiarray"), _numpy_internal("numeric")
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    allowed[("_codecs", "encode")] = codecs.encode
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds plain containers and numpy arrays and refuses every other global
    (a crafted batch naming os.system, builtins.eval, ... raises UnpicklingError)."""

    def find_class(self, module: str, name: str):
        allowed = _pickle_allowlist()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name} (only numpy arrays are allowed)"
            )
        return allowed[(module, name)]


def safe_unpickle(path: Path, encoding: str = "bytes"):
    """pickle.load of `path` through _ArrayUnpickler: dicts, lists, strings, numbers and numpy
    arrays only; loading never runs code from the file."""
    with open(path, "rb") as f:
        return _ArrayUnpickler(f, encoding=encoding).load()


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> np.ndarray:
    if labels.size and not (0 <= labels.min() and labels.max() < num_classes):
        raise ValueError(
            f"{path}: labels must be in [0, {num_classes}), found {labels.min()}..{labels.max()}"
        )
    return labels


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) of one CIFAR-10 python batch, read
    with safe_unpickle. Anything else (truncated, corrupt, crafted) -> ValueError naming it."""
    try:
        batch = safe_unpickle(path)
        data, labels = batch[b"data"], batch[b"labels"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape[1:] != (3072,):
            found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data)
            raise ValueError(f"data is {found}, expected a uint8 (N, 3072) array")
        x = data.reshape(-1, 3, 32, 32)
        raw = np.asarray(labels).reshape(-1)
        if raw.size and raw.dtype.kind not in "iu":  # a cast would truncate 1.7 to 1
            raise ValueError(f"labels are {raw.dtype}, not integers")
        y = raw.astype(np.int64)
    except Exception as err:  # a bad pickle fails in many ways (EOF, key, type, value, ...)
        raise ValueError(
            f"cifar10: {path} is not a CIFAR-10 python batch ({_one_line(err)}); "
            f"extract {CIFAR10_URL} again"
        ) from err
    if len(x) != len(y):
        raise ValueError(f"cifar10: {path} holds {len(x)} images but {len(y)} labels")
    return x, _check_labels(y, 10, path)


def _resize_one(img: np.ndarray, size: int, resample: str) -> np.ndarray:
    from PIL import Image  # here: a slow import that only resizing and image folders need

    hwc = img.transpose(1, 2, 0)
    pil = Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)
    out = np.asarray(pil.resize((size, size), Image.Resampling[resample]))
    return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)


def resize_images(x: np.ndarray, size: int | None, resample: str = "BILINEAR") -> np.ndarray:
    """Resize uint8 images (N, C, H, W) to (N, C, size, size) with PIL (`resample`: a name of
    PIL.Image.Resampling); None/0/same size: as is."""
    if not size or x.shape[-2:] == (size, size):
        return x
    return np.stack([_resize_one(img, size, resample) for img in x])


def _load_folder_image(path: Path, size: int) -> np.ndarray:
    """PIL open, RGB, centre-crop to a square, resize to size x size (bicubic): uint8 (3, S, S).
    An unreadable, truncated or corrupt file -> ValueError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"imagefolder: cannot read image {path} ({_one_line(err)})") from err
    w, h = rgb.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    square = rgb.crop((left, top, left + s, top + s))
    return np.asarray(square.resize((size, size), Image.Resampling.BICUBIC)).transpose(2, 0, 1)


def _image_files(folder: Path) -> list[Path]:
    exts = IMAGE_EXTENSIONS
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in exts)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _labelled_files(folder: Path) -> tuple[list[Path], list[int], int]:
    """(files, labels, num_classes): one class per top-level subdirectory (sorted names), or
    one unlabelled set (num_classes 0) when there are none."""
    classes = _class_dirs(folder)
    if not classes:
        files = _image_files(folder)
        return files, [0] * len(files), 0
    per_class = [_image_files(d) for d in classes]
    labels = [k for k, files in enumerate(per_class) for _ in files]
    return [f for files in per_class for f in files], labels, len(classes)


# --------------------------------------------------------------------------------------------
# Dataset builders: builder(root, train, **options) -> ArrayDataset
# --------------------------------------------------------------------------------------------


def _image_dataset(x: np.ndarray, y: np.ndarray, num_classes: int) -> ArrayDataset:
    x_t = torch.from_numpy(np.array(x, dtype=np.uint8))  # a writable, contiguous copy
    return ArrayDataset(
        x_t, torch.from_numpy(np.asarray(y, dtype=np.int64)), num_classes=num_classes, kind="image"
    )


def build_digits(root: str, train: bool, *, image_size: int | None = None, **_) -> ArrayDataset:
    """scikit-learn's bundled 8x8 digits: 1797 images, values 0..16 stored as uint8
    round(v * 255 / 16), shape (1, 8, 8) (or image_size), 10 classes. The set is tiny, so
    train=True and train=False both return all 1797 images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return _image_dataset(resize_images(x, image_size), digits.target, 10)


def _mnist_paths(root: str, train: bool) -> tuple[Path, Path]:
    folder = Path(root) / "mnist"
    images, labels = MNIST_FILES[train]
    return folder / images, folder / labels


def build_mnist(root: str, train: bool, *, image_size: int | None = None, **_) -> ArrayDataset:
    """MNIST from its IDX files (plain or .gz) under root/mnist/: (1, 28, 28), 10 classes;
    optional image_size resizes with PIL bilinear."""
    missing = _mnist_missing(root, splits=(train,))
    if missing:
        raise FileNotFoundError(_mnist_message(missing))
    image_path, label_path = (_find_file(p) for p in _mnist_paths(root, train))
    x = read_idx(image_path, 2051)
    if x.shape[1:] != (28, 28):  # another IDX set would be silently resized
        raise ValueError(f"{image_path} holds {x.shape[1]}x{x.shape[2]} images, not MNIST's 28x28")
    y = _check_labels(read_idx(label_path, 2049), 10, label_path)
    if len(x) != len(y):
        raise ValueError(f"{image_path} has {len(x)} images but {label_path} {len(y)} labels")
    return _image_dataset(resize_images(x[:, None], image_size), y, 10)


def build_cifar10(root: str, train: bool, *, image_size: int | None = None, **_) -> ArrayDataset:
    """CIFAR-10 from the python pickle batches under root/cifar-10-batches-py/: (3, 32, 32),
    10 classes; optional image_size resizes with PIL bilinear."""
    missing = _cifar_missing(root, splits=(train,))
    if missing:
        raise FileNotFoundError(_cifar_message(missing, root))
    batches = [_load_cifar_batch(Path(root) / CIFAR10_DIR / f) for f in CIFAR10_FILES[train]]
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    return _image_dataset(resize_images(x, image_size), y, 10)


def build_imagefolder(
    root: str, train: bool, *, path: str | None = None, image_size: int | None = None, **_
) -> ArrayDataset:
    """Every image (png/jpg/jpeg/bmp/webp) under `path`, found recursively; one class per
    top-level subdirectory (sorted names), unconditional when there are none (loose top-level
    files are then ignored). Each image is centre-cropped to a square and resized to
    image_size (required). All images are decoded into memory as uint8 (N, 3, S, S): meant
    for small images. `root` and `train` are unused (the same images for both splits)."""
    if path is None or image_size is None:
        raise ValueError("imagefolder needs path=<directory> and image_size=<int>")
    _check_image_folder(path)
    files, labels, num_classes = _labelled_files(Path(path))
    if not files:
        raise ValueError(f"imagefolder: no images in the class folders under {path}")
    x = np.stack([_load_folder_image(f, image_size) for f in files])
    return _image_dataset(x, np.asarray(labels), num_classes)


def build_points(
    toy: str, root: str, train: bool, *, num_points: int = 100_000, seed: int = 0, **_
) -> ArrayDataset:
    """`num_points` draws from TOY_SETS[toy] with a generator seeded by `seed` (train) or
    `seed + TEST_SEED_OFFSET` (test): kind "points", shape (2,), unconditional."""
    generator = torch.Generator().manual_seed(seed + (0 if train else TEST_SEED_OFFSET))
    return ArrayDataset(sample_toy(toy, num_points, generator), kind="points")


DATASETS = {
    "digits": build_digits,
    "mnist": build_mnist,
    "cifar10": build_cifar10,
    "imagefolder": build_imagefolder,
    **{toy: functools.partial(build_points, toy) for toy in TOY_SETS},
}


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid choices: {sorted(DATASETS)}")


def build_dataset(
    name: str,
    root: str = "data",
    train: bool = True,
    *,
    image_size: int | None = None,
    path: str | None = None,
    num_points: int = 100_000,
    seed: int = 0,
) -> ArrayDataset:
    """Build dataset `name` (a DATASETS key); options a dataset has no use for are ignored."""
    _check_name(name)
    return DATASETS[name](
        root, train, image_size=image_size, path=path, num_points=num_points, seed=seed
    )


# --------------------------------------------------------------------------------------------
# Availability checks and downloads (rank 0 only)
# --------------------------------------------------------------------------------------------


def _download(url: str, dest: Path, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch `url` into `dest` via a temporary file, so a failed download leaves nothing."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    print(f"downloading {url} -> {dest}", file=sys.stderr, flush=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def _mnist_missing(root: str, splits: tuple[bool, ...] = (True, False)) -> list[Path]:
    paths = [p for train in splits for p in _mnist_paths(root, train)]
    return [p for p in paths if _find_file(p) is None]


def _mnist_message(missing: list[Path]) -> str:
    files = ", ".join(f"{p}(.gz)" for p in missing)
    return (
        f"mnist: missing {files}; download them from {MNIST_URLS[1]} (mirror: "
        f"{MNIST_URLS[0]}) and put them there"
    )


def _download_mnist_file(path: Path) -> None:
    """Try each mirror for `path`.gz; raise the last OSError when none works."""
    error = OSError("no MNIST mirror configured")
    for base in MNIST_URLS:
        try:
            _download(base + path.name + ".gz", path.with_name(path.name + ".gz"))
            return
        except OSError as err:
            error = err
    raise error


def _ensure_mnist(root: str, path: str | None = None, splits=(True, False)) -> None:
    missing = _mnist_missing(root, splits)
    try:
        for p in missing:
            _download_mnist_file(p)
    except OSError as err:
        raise FileNotFoundError(_mnist_message(_mnist_missing(root, splits))) from err


def _cifar_missing(root: str, splits: tuple[bool, ...] = (True, False)) -> list[Path]:
    paths = [Path(root) / CIFAR10_DIR / f for train in splits for f in CIFAR10_FILES[train]]
    return [p for p in paths if not p.is_file()]


def _cifar_message(missing: list[Path], root: str) -> str:
    files = ", ".join(str(p) for p in missing)
    return (
        f"cifar10: missing {files}; download {CIFAR10_URL} and extract it into {root}/ "
        f"(it unpacks to {CIFAR10_DIR}/)"
    )


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive into `dest`, refusing members that are not plain files or
    directories or that would land outside `dest`."""
    dest = Path(dest).resolve()
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for m in members:
            inside = (dest / m.name).resolve().is_relative_to(dest)
            if not (m.isfile() or m.isdir()) or not inside:
                raise ValueError(f"{archive}: refusing to extract unsafe member {m.name!r}")
        tar.extractall(dest, members=members, filter="data")


def _ensure_cifar10(root: str, path: str | None = None, splits=(True, False)) -> None:
    if not _cifar_missing(root, splits):
        return
    archive = Path(root) / Path(CIFAR10_URL).name
    try:
        _download(CIFAR10_URL, archive)
        safe_extract(archive, Path(root))
    except (OSError, tarfile.TarError, EOFError, ValueError) as err:
        raise FileNotFoundError(_cifar_message(_cifar_missing(root, splits), root)) from err
    finally:
        archive.unlink(missing_ok=True)
    if _cifar_missing(root, splits):
        raise FileNotFoundError(_cifar_message(_cifar_missing(root, splits), root))


def _check_image_folder(path: str | None) -> None:
    if path is None or not Path(path).is_dir():
        raise FileNotFoundError(
            f"imagefolder: data.path={path or ''!r} is not a directory of images; set "
            f"--config.data.path=DIR"
        )
    if not _image_files(Path(path)):
        exts = "/".join(IMAGE_EXTENSIONS)
        raise ValueError(f"imagefolder: no images ({exts}) found under {path}")


_WARNED: set[str] = set()  # warnings already printed by this process


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def image_folder_warnings(path: str) -> list[str]:
    """One-line warnings about a folder with class subfolders: images at its top level (which
    build_imagefolder ignores) and class folders without images (labels never trained)."""
    folder = Path(path)
    classes = _class_dirs(folder)
    if not classes:
        return []
    messages = []
    loose = sorted(
        p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if loose:
        messages.append(
            f"imagefolder: {len(loose)} image(s) at the top of {path} (e.g. {loose[0]}) are "
            f"ignored: with class subfolders only the images inside them are used"
        )
    empty = [d.name for d in classes if not _image_files(d)]
    if empty:
        messages.append(
            f"imagefolder: class folder(s) {empty} under {path} hold no images; those labels "
            f"are never trained"
        )
    return messages


def _ensure_imagefolder(root: str, path: str | None = None, splits=(True, False)) -> None:
    _check_image_folder(path)
    for message in image_folder_warnings(path):
        _warn_once(message)


def _nothing_to_do(root: str, path: str | None = None, splits=(True, False)) -> None:
    return None


_ENSURE = {"mnist": _ensure_mnist, "cifar10": _ensure_cifar10, "imagefolder": _ensure_imagefolder}


def ensure_available(name: str, root: str, path: str | None = None, splits=(True, False)) -> None:
    """Make sure dataset `name` can be built for `splits` (True: train, False: test; call on
    rank 0 before building). MNIST and CIFAR-10 are downloaded into `root` when files of those
    splits are missing; when that fails, FileNotFoundError says which files to put where.
    imagefolder: `path` must be a directory holding images (FileNotFoundError if not a
    directory, ValueError if it has no images); ignored images and empty class folders get a
    one-line warning on stderr (image_folder_warnings). Others: nothing."""
    _check_name(name)
    _ENSURE.get(name, _nothing_to_do)(root, path, tuple(splits))


# --------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------


def _as_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity collate (picklable, unlike a lambda): the dataset's __getitems__ already
    returns the whole (x, y) batch."""
    return batch


def flip_mask(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """Which dataset indices are flipped in `epoch`: bool (num_items,), independent of rank,
    world size and batch size."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)
    return torch.rand(num_items, generator=generator) < 0.5


def batches_per_epoch(num_items: int, batch_size: int, world_size: int = 1) -> int:
    """Full micro-batches of `batch_size` per rank in an epoch of `num_items` split over
    `world_size` ranks (DistributedSampler with drop_last); ValueError (one line) when 0."""
    count = num_items // world_size // batch_size
    if count == 0:
        raise ValueError(
            f"a micro-batch of {batch_size} (train.batch_size / train.grad_accum / processes) "
            f"x {world_size} process(es) exceeds the dataset size {num_items}: lower "
            f"train.batch_size or use more data (data.num_points for 2-D sets)"
        )
    return count


class InfiniteLoader:
    """Endless (x, y) batches of `batch_size` per rank, exact to resume and world-size invariant.

    Each epoch takes one DistributedSampler(shuffle=True, drop_last=True) permutation and yields
    its consecutive `batch_size` chunks, dropping the incomplete last one. Rank r's j-th sample
    of an epoch is the permutation's global position world_size * j + r. With flip=True, images
    are mirrored along the last dimension where `flip_mask(len(dataset), seed, epoch)` is set
    for their dataset index (ignored for points). `state_dict()` is {"epoch", "batch"} with
    "batch" the number of batches already consumed in the epoch; after `load_state_dict` the
    next batch is fetched directly, without loading the skipped ones. num_workers > 0 fetches
    the rest of each epoch through a DataLoader (workers restart every epoch).
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        flip: bool = False,
        num_workers: int = 0,
        device="cpu",
    ):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.flip = flip and getattr(dataset, "kind", "image") == "image"
        self.num_workers = num_workers
        self.device = torch.device(device)
        self.sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batches_per_epoch = batches_per_epoch(len(dataset), batch_size, world_size)
        self.epoch, self.batch = 0, 0
        self._chunks = None  # index chunks of self.epoch, built lazily
        self._flips = None  # this epoch's flip mask over dataset indices (flip=True only)
        self._worker_iter = None  # DataLoader iterator over the epoch's remaining chunks

    def __iter__(self):
        return self

    def _start_epoch(self) -> None:
        """Build this epoch's chunks (and flips, and a DataLoader over the remaining chunks)."""
        self.sampler.set_epoch(self.epoch)
        indices = list(iter(self.sampler))
        b = self.batch_size
        self._chunks = [indices[i * b : (i + 1) * b] for i in range(self.batches_per_epoch)]
        self._flips = flip_mask(len(self.dataset), self.seed, self.epoch) if self.flip else None
        self._worker_iter = None
        if self.num_workers > 0:
            # Its own generator: iter() draws the workers' base seed from it, not from the
            # global torch RNG that dropout uses, so workers leave the training stream alone.
            generator = torch.Generator().manual_seed(utils.mix_seed(self.seed, self.epoch, 2))
            loader = DataLoader(
                self.dataset,
                batch_sampler=self._chunks[self.batch :],
                num_workers=self.num_workers,
                collate_fn=_as_batch,
                persistent_workers=False,
                pin_memory=self.device.type == "cuda",
                generator=generator,
            )
            self._worker_iter = iter(loader)

    def _fetch(self, chunk: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch for `chunk` on `self.device`, before flips."""
        if self._worker_iter is not None:  # pinned by the DataLoader on CUDA
            x, y = next(self._worker_iter)
        else:
            x, y = self.dataset.__getitems__(chunk)
        return tuple(utils.to_device(t, self.device) for t in (x, y))

    def _apply_flips(self, x: torch.Tensor, chunk: list[int]) -> torch.Tensor:
        """Mirror the rows whose dataset index is set in this epoch's flip mask (on device)."""
        if self._flips is None:
            return x
        mask = utils.to_device(self._flips[torch.as_tensor(chunk)], x.device)
        return torch.where(mask.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch, self._chunks = self.epoch + 1, 0, None
        if self._chunks is None:
            self._start_epoch()
        chunk = self._chunks[self.batch]
        x, y = self._fetch(chunk)
        self.batch += 1
        return self._apply_flips(x, chunk), y

    def state_dict(self) -> dict:
        """{"epoch": int, "batch": int}: batches already consumed in the epoch."""
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state`; the next batch is the one after the saved position."""
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
        self._chunks, self._worker_iter = None, None

"""Tests for data_utils: datasets in their real file formats (tiny files), toy sets, loaders."""

import gzip
import io
import math
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import data_utils
from data_utils import (
    DATASETS,
    ArrayDataset,
    InfiniteLoader,
    build_dataset,
    ensure_available,
    sample_toy,
    to_data_space,
)

# --------------------------------------------------------------------------------------------
# Helpers that write tiny files in the real formats
# --------------------------------------------------------------------------------------------


def write_idx(path, array: np.ndarray, magic: int, gz: bool) -> None:
    """IDX layout: big-endian magic, big-endian uint32 per dimension, uint8 data."""
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)


def write_mnist(root, n: int = 5, gz: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder = root / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, 2051, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, 2049, gz)
        data[prefix] = (images, labels)
    return data


def cifar_rows(n: int, first_label: int) -> dict:
    """n rows of zeros; row i has value 10*c + i + 1 at pixel (c, h=2c+1, w=3c+2) of channel c."""
    data = np.zeros((n, 3072), dtype=np.uint8)
    for i in range(n):
        for c in range(3):
            data[i, c * 1024 + (2 * c + 1) * 32 + (3 * c + 2)] = 10 * c + i + 1
    return {b"data": data, b"labels": [(first_label + i) % 10 for i in range(n)]}


def write_cifar_labels(path, labels) -> None:
    """Overwrite the CIFAR-10 batch `path` with two zero-image rows carrying `labels`."""
    rows = cifar_rows(2, first_label=0)
    rows[b"labels"] = labels
    path.write_bytes(pickle.dumps(rows))


def write_cifar(root, n: int = 2) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        with open(folder / name, "wb") as f:
            pickle.dump(cifar_rows(n, first_label=k), f)


def write_png(path, size, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def fail_download(url, dest, timeout=None):
    raise OSError(f"network disabled in tests: {url}")


@pytest.fixture(scope="module")
def digits():
    return build_dataset("digits")


# --------------------------------------------------------------------------------------------
# Built-in data
# --------------------------------------------------------------------------------------------


def test_digits(digits):
    assert len(digits) == 1797
    assert digits.shape == (1, 8, 8) and digits.num_classes == 10 and digits.kind == "image"
    assert digits.x.dtype == torch.uint8
    x, y = digits.__getitems__(list(range(len(digits))))
    assert x.dtype == torch.float32 and x.shape == (1797, 1, 8, 8)
    assert x.min() == -1 and x.max() == 1
    assert sorted(y.unique().tolist()) == list(range(10))
    back = to_data_space(x, "image")
    assert back.dtype == np.uint8 and back.shape == (1797, 8, 8, 1)
    np.testing.assert_array_equal(back, digits.x.permute(0, 2, 3, 1).numpy())
    from sklearn.datasets import load_digits

    expected = np.round(load_digits().images * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(digits.x[:, 0].numpy(), expected)
    x0, y0 = digits[3]
    assert x0.shape == (1, 8, 8) and y0.item() == y[3].item()


def test_to_data_space_clips_and_rounds():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.5]).view(1, 1, 1, 5)
    np.testing.assert_array_equal(to_data_space(x, "image")[0, 0, :, 0], [0, 0, 128, 255, 255])
    pts = torch.randn(4, 2)
    np.testing.assert_array_equal(to_data_space(pts, "points"), pts.numpy())


def test_checkerboard_definition():
    pts = sample_toy("checkerboard", 40_000, torch.Generator().manual_seed(0))
    assert pts.shape == (40_000, 2) and pts.dtype == torch.float32
    z = pts.double() * 0.45
    eps = 1e-5
    assert (z >= -2 - eps).all() and (z < 2 + eps).all()
    # points a rounding error away from a grid line cannot be assigned a square reliably
    clear = ((z - z.round()).abs() > eps).all(dim=1)
    assert clear.float().mean() > 0.999
    cells = torch.floor(z[clear]).long()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    counts = torch.bincount((cells[:, 0] + 2) * 4 + (cells[:, 1] + 2), minlength=16)
    counts = counts[counts > 0].double()
    assert len(counts) == 8
    expected = counts.sum() / 8
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 30  # 7 degrees of freedom: P(chi2 > 30) ~ 1e-4


def test_moons_statistics():
    pts = sample_toy("moons", 40_000, torch.Generator().manual_seed(1))
    assert pts.shape == (40_000, 2)
    # mean of the unit moons is (0.5, 0.25); `* 3 - 1` maps it to (0.5, -0.25)
    torch.testing.assert_close(pts.mean(0), torch.tensor([0.5, -0.25]), atol=0.05, rtol=0)
    u = (pts + 1) / 3  # back to the unit moons: each point is near one of the two arcs
    outer = (u.norm(dim=1) - 1).abs()
    inner = ((u - torch.tensor([1.0, 0.5])).norm(dim=1) - 1).abs()
    dist = torch.minimum(outer, inner)
    assert dist.max() < 6 * data_utils.MOONS_NOISE
    assert abs(dist.pow(2).mean().sqrt().item() - data_utils.MOONS_NOISE) < 0.05


def test_gaussians8_statistics():
    pts = sample_toy("gaussians8", 40_000, torch.Generator().manual_seed(2))
    assert pts.shape == (40_000, 2)
    angles = torch.arange(8) * (math.pi / 4)
    centres = 5 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    dist = torch.cdist(pts, centres)
    nearest = dist.argmin(dim=1)
    std = 0.1**0.25  # torchcfm's 8gaussians: covariance sqrt(0.1) * I
    assert dist.min(dim=1).values.max() < 6 * std
    counts = torch.bincount(nearest, minlength=8).double()
    assert ((counts / counts.sum() - 1 / 8).abs() < 0.01).all()
    resid = pts - centres[nearest]
    torch.testing.assert_close(resid.std(0), torch.full((2,), std), atol=0.02, rtol=0)
    torch.testing.assert_close(pts.mean(0), torch.zeros(2), atol=0.1, rtol=0)


def test_toy_generator_reproducible_and_datasets():
    a = sample_toy("moons", 100, torch.Generator().manual_seed(5))
    b = sample_toy("moons", 100, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)
    for name in data_utils.TOY_SETS:
        ds = build_dataset(name, num_points=1000, seed=3)
        assert len(ds) == 1000 and ds.shape == (2,) and ds.kind == "points"
        assert ds.num_classes == 0 and ds.x.dtype == torch.float32
        x, y = ds.__getitems__([0, 5])
        assert x.shape == (2, 2) and (y == 0).all()
        again = build_dataset(name, num_points=1000, seed=3)
        torch.testing.assert_close(ds.x, again.x)
        test = build_dataset(name, train=False, num_points=1000, seed=3)
        assert not torch.equal(ds.x, test.x)
    with pytest.raises(ValueError, match="checkerboard"):
        sample_toy("spirals", 10)


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError) as info:
        build_dataset("imagenet")
    message = str(info.value)
    assert "\n" not in message and str(sorted(DATASETS)) in message
    with pytest.raises(ValueError, match="digits"):
        ensure_available("imagenet", "data")


# --------------------------------------------------------------------------------------------
# MNIST
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path, gz):
    data = write_mnist(tmp_path, n=5, gz=gz)
    ensure_available("mnist", str(tmp_path))  # present: no download attempted
    for train, prefix in ((True, "train"), (False, "t10k")):
        ds = build_dataset("mnist", str(tmp_path), train=train)
        images, labels = data[prefix]
        assert len(ds) == 5 and ds.shape == (1, 28, 28) and ds.num_classes == 10
        np.testing.assert_array_equal(ds.x[:, 0].numpy(), images)
        np.testing.assert_array_equal(ds.y.numpy(), labels)
    big = build_dataset("mnist", str(tmp_path), image_size=32)
    assert big.shape == (1, 32, 32) and big.x.dtype == torch.uint8


def test_mnist_bad_magic(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    write_idx(path, np.zeros((2, 28, 28), np.uint8), 2049, gz=False)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        build_dataset("mnist", str(tmp_path))


@pytest.mark.parametrize(
    "name,damage,expected",
    [
        (
            "train-images-idx3-ubyte",
            lambda b: b[: len(b) - 100],
            "header says (5, 28, 28) but holds 3820 bytes",
        ),
        ("train-images-idx3-ubyte", lambda b: b[:6], "truncated IDX header (6 bytes)"),
        ("train-images-idx3-ubyte", lambda b: b"", "bad IDX magic number 0"),
        ("train-images-idx3-ubyte.gz", lambda b: b[: len(b) // 2], "cannot read (EOFError"),
        ("train-images-idx3-ubyte.gz", lambda b: b"not gzip at all", "cannot read (BadGzip"),
        ("train-labels-idx1-ubyte", lambda b: b[:8] + bytes([3, 200, 1, 0, 9]), "labels must"),
    ],
)
def test_mnist_damaged_files_are_one_line_naming_the_file(tmp_path, name, damage, expected):
    write_mnist(tmp_path, n=5, gz=name.endswith(".gz"))
    path = tmp_path / "mnist" / name
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError) as info:
        build_dataset("mnist", str(tmp_path))
    message = str(info.value)
    assert str(path) in message and expected in message and "\n" not in message


def test_mnist_missing_files(tmp_path, monkeypatch):
    monkeypatch.setattr(data_utils, "_download", fail_download)
    write_mnist(tmp_path)
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError) as info:
        ensure_available("mnist", str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "mnist" / "t10k-labels-idx1-ubyte") in message
    assert "train-images" not in message and "\n" not in message
    build_dataset("mnist", str(tmp_path), train=True)  # the train split is complete
    ensure_available("mnist", str(tmp_path), splits=(True,))  # training needs no test split
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        build_dataset("mnist", str(tmp_path), train=False)


def test_mnist_download_fills_missing(tmp_path, monkeypatch):
    source = tmp_path / "source"
    data = write_mnist(source, gz=True)

    def fake_download(url, dest, timeout=None):
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((source / "mnist" / dest.name).read_bytes())

    monkeypatch.setattr(data_utils, "_download", fake_download)
    root = tmp_path / "root"
    ensure_available("mnist", str(root))
    ds = build_dataset("mnist", str(root), train=False)
    np.testing.assert_array_equal(ds.y.numpy(), data["t10k"][1])


# --------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------


def test_download_via_file_url(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"payload" * 1000)
    dest = tmp_path / "out" / "copy.bin"
    data_utils._download(source.as_uri(), dest)
    assert dest.read_bytes() == source.read_bytes()
    with pytest.raises(OSError):
        data_utils._download((tmp_path / "absent").as_uri(), tmp_path / "out" / "absent")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["copy.bin"]


def test_cifar10_layout(tmp_path):
    write_cifar(tmp_path, n=2)
    ensure_available("cifar10", str(tmp_path))
    train = build_dataset("cifar10", str(tmp_path), train=True)
    test = build_dataset("cifar10", str(tmp_path), train=False)
    assert len(train) == 10 and len(test) == 2
    assert train.shape == (3, 32, 32) and train.num_classes == 10
    assert train.y.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert test.y.tolist() == [5, 6]
    for i in range(2):
        for c in range(3):
            assert train.x[i, c, 2 * c + 1, 3 * c + 2] == 10 * c + i + 1
        assert int(train.x[i].sum()) == sum(10 * c + i + 1 for c in range(3))
    x, _ = test.__getitems__([1])
    assert x[0, 2, 5, 8] == pytest.approx(22 / 127.5 - 1)  # row 1, channel 2


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_batch_from_any_pickle_protocol(tmp_path, protocol):
    write_cifar(tmp_path, n=2)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps(cifar_rows(3, first_label=4), protocol=protocol))
    test = build_dataset("cifar10", str(tmp_path), train=False)
    assert test.y.tolist() == [4, 5, 6] and test.x[2, 1, 3, 5] == 10 + 2 + 1


def test_cifar10_old_numpy_module_path(tmp_path):
    """Batches pickled by numpy 1 (the real CIFAR files) name numpy.core.multiarray."""
    write_cifar(tmp_path, n=2)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    payload = pickle.dumps(cifar_rows(2, first_label=0), protocol=2)
    path.write_bytes(payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert b"numpy.core.multiarray" in path.read_bytes()
    assert build_dataset("cifar10", str(tmp_path), train=False).y.tolist() == [0, 1]


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


class _WritesFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('x')",))


@pytest.mark.parametrize("payload", [_RunsShell, _WritesFile])
def test_crafted_cifar_pickle_does_not_run(tmp_path, payload):
    write_cifar(tmp_path, n=2)
    marker = tmp_path / "PWNED"
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(pickle.dumps({b"data": payload(marker), b"labels": [0]}))
    with pytest.raises(ValueError) as info:
        build_dataset("cifar10", str(tmp_path))
    message = str(info.value)
    assert str(path) in message and "refusing to load" in message and "\n" not in message
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload,expected",
    [
        (lambda good: good[: len(good) // 2], "pickle data was truncated"),
        (lambda good: b"", "EOFError"),
        (lambda good: b"garbage" * 10, "UnpicklingError"),
        (lambda good: pickle.dumps({b"labels": [0]}), "KeyError"),
        (
            lambda good: pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
            "expected a uint8 (N, 3072) array",
        ),
        (lambda good: pickle.dumps([1, 2, 3]), "TypeError"),
    ],
)
def test_cifar10_corrupt_batch_is_one_line_naming_it(tmp_path, payload, expected):
    write_cifar(tmp_path, n=2)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(payload(path.read_bytes()))
    with pytest.raises(ValueError) as info:
        build_dataset("cifar10", str(tmp_path))
    message = str(info.value)
    assert str(path) in message and expected in message and "\n" not in message


def test_cifar10_labels_out_of_range(tmp_path):
    write_cifar(tmp_path, n=2)
    write_cifar_labels(tmp_path / "cifar-10-batches-py" / "test_batch", [3, 10])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\), found 3..10"):
        build_dataset("cifar10", str(tmp_path), train=False)


def test_cifar10_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(data_utils, "_download", fail_download)
    with pytest.raises(FileNotFoundError) as info:
        ensure_available("cifar10", str(tmp_path))
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in message
    assert data_utils.CIFAR10_URL in message and "\n" not in message


def _tar_gz(members: dict) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def test_cifar10_download_extracts(tmp_path, monkeypatch):
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    members = {f"cifar-10-batches-py/{n}": pickle.dumps(cifar_rows(1, 0)) for n in names}
    monkeypatch.setattr(
        data_utils, "_download", lambda u, d, timeout=None: d.write_bytes(_tar_gz(members))
    )
    ensure_available("cifar10", str(tmp_path))
    assert len(build_dataset("cifar10", str(tmp_path))) == 5
    assert not (tmp_path / "cifar-10-python.tar.gz").exists()


def test_safe_extract_rejects_traversal(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(_tar_gz({"../evil.txt": b"x"}))
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="evil"):
        data_utils.safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def test_imagefolder_classes(tmp_path):
    write_png(tmp_path / "zebra" / "a.png", (20, 30), (255, 0, 0))
    write_png(tmp_path / "zebra" / "nested" / "b.PNG", (40, 24), (255, 0, 0))
    write_png(tmp_path / "ant" / "c.png", (16, 16), (0, 0, 255))
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    ensure_available("imagefolder", "data", path=str(tmp_path))
    ds = build_dataset("imagefolder", path=str(tmp_path), image_size=16)
    assert len(ds) == 3 and ds.shape == (3, 16, 16) and ds.num_classes == 2
    assert ds.x.shape == (3, 3, 16, 16) and ds.x.dtype == torch.uint8
    assert ds.y.tolist() == [0, 1, 1]  # "ant" < "zebra"
    assert (ds.x[0, 2] == 255).all() and (ds.x[0, 0] == 0).all()  # blue ant
    assert (ds.x[1:, 0] == 255).all() and (ds.x[1:, 2] == 0).all()  # red zebras


def test_imagefolder_flat_and_errors(tmp_path):
    write_png(tmp_path / "flat" / "a.png", (10, 12), (0, 255, 0))
    write_png(tmp_path / "flat" / "b.jpg", (12, 10), (0, 255, 0))
    ds = build_dataset("imagefolder", path=str(tmp_path / "flat"), image_size=8)
    assert len(ds) == 2 and ds.num_classes == 0 and (ds.y == 0).all()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        build_dataset("imagefolder", path=str(tmp_path / "empty"), image_size=8)
    with pytest.raises(ValueError):
        ensure_available("imagefolder", "data", path=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):
        ensure_available("imagefolder", "data", path=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="image_size"):
        build_dataset("imagefolder", path=str(tmp_path / "flat"))


@pytest.mark.parametrize(
    "content,expected",
    [
        (b"this is not a PNG", "UnidentifiedImageError"),
        ("truncated", "OSError"),
    ],
)
def test_imagefolder_corrupt_image_is_named(tmp_path, content, expected):
    write_png(tmp_path / "cat" / "good.png", (8, 8), (1, 2, 3))
    bad = tmp_path / "cat" / "bad.png"
    if content == "truncated":
        write_png(bad, (64, 64), (9, 9, 9))
        content = bad.read_bytes()[:60]
    bad.write_bytes(content)
    with pytest.raises(ValueError) as info:
        build_dataset("imagefolder", path=str(tmp_path), image_size=8)
    message = str(info.value)
    assert message.startswith(f"imagefolder: cannot read image {bad} (") and "\n" not in message
    assert expected in message


def test_imagefolder_warns_once_about_ignored_images(tmp_path, capsys):
    write_png(tmp_path / "cat" / "a.png", (8, 8), (1, 2, 3))
    write_png(tmp_path / "loose.png", (8, 8), (1, 2, 3))
    write_png(tmp_path / "also_loose.jpg", (8, 8), (1, 2, 3))
    (tmp_path / "dog").mkdir()  # a class with no images
    for _ in range(2):
        ensure_available("imagefolder", "data", path=str(tmp_path))
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"warning: imagefolder: 2 image(s) at the top of {tmp_path} (e.g. also_loose.jpg) are "
        "ignored: with class subfolders only the images inside them are used",
        f"warning: imagefolder: class folder(s) ['dog'] under {tmp_path} hold no images; those "
        "labels are never trained",
    ]
    ds = build_dataset("imagefolder", path=str(tmp_path), image_size=8)
    assert len(ds) == 1 and ds.num_classes == 2  # the loose images were indeed ignored
    flat = tmp_path / "cat"
    assert data_utils.image_folder_warnings(str(flat)) == []  # no class folders: all are used


def test_flip_mask_accepts_the_largest_seed():
    mask = data_utils.flip_mask(10, 2**63 - 1, epoch=3)
    assert mask.shape == (10,) and mask.dtype == torch.bool
    assert torch.equal(data_utils.flip_mask(10, 5, 3), data_utils.flip_mask(10, 5, 3))


# --------------------------------------------------------------------------------------------
# InfiniteLoader
# --------------------------------------------------------------------------------------------


def take(loader, k):
    return [next(loader) for _ in range(k)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
        assert torch.equal(ya, yb)


def small_digits(digits, n=50):
    return ArrayDataset(digits.x[:n].clone(), digits.y[:n].clone(), num_classes=10)


def test_loader_exact_resume_across_epochs(digits):
    ds = small_digits(digits)  # 50 items, batch 8 -> 6 batches per epoch
    loader = InfiniteLoader(ds, batch_size=8, seed=7, flip=True)
    take(loader, 3)
    state = loader.state_dict()
    assert state == {"epoch": 0, "batch": 3}
    expected = take(loader, 5)  # crosses into epoch 1
    assert loader.state_dict() == {"epoch": 1, "batch": 2}
    restored = InfiniteLoader(ds, batch_size=8, seed=7, flip=True)
    restored.load_state_dict(state)
    assert_same_batches(take(restored, 5), expected)
    assert restored.state_dict() == loader.state_dict()


def test_loader_resume_does_not_load_skipped(digits):
    ds = small_digits(digits)
    fetched = []
    original = ds.__getitems__
    ds.__getitems__ = lambda idx: fetched.append(list(idx)) or original(idx)
    loader = InfiniteLoader(ds, batch_size=8)
    loader.load_state_dict({"epoch": 2, "batch": 4})
    next(loader)
    assert len(fetched) == 1


def test_loader_world_size_invariant(digits):
    ds = small_digits(digits, n=51)
    b = 4
    single = take(InfiniteLoader(ds, batch_size=2 * b, seed=3, flip=True), 9)
    ranks = [
        take(InfiniteLoader(ds, 4, rank=r, world_size=2, seed=3, flip=True), 9) for r in range(2)
    ]
    for step in range(9):
        x = torch.empty_like(single[step][0])
        y = torch.empty_like(single[step][1])
        for r in range(2):
            x[r::2], y[r::2] = ranks[r][step]
        torch.testing.assert_close(x, single[step][0], rtol=0, atol=0)
        assert torch.equal(y, single[step][1])


def test_loader_flips_are_per_epoch_and_index(digits):
    ds = small_digits(digits, n=48)
    loader = InfiniteLoader(ds, batch_size=48, seed=1, flip=True)
    plain = InfiniteLoader(ds, batch_size=48, seed=1, flip=False)
    for epoch in range(2):
        (xf, yf), (xp, yp) = next(loader), next(plain)
        assert torch.equal(yf, yp)
        mask = data_utils.flip_mask(48, seed=1, epoch=epoch)
        order = list(iter(_sampler(ds, epoch, seed=1)))
        flipped = mask[order]
        assert 0 < flipped.sum() < 48
        torch.testing.assert_close(xf[flipped], xp[flipped].flip(-1), rtol=0, atol=0)
        torch.testing.assert_close(xf[~flipped], xp[~flipped], rtol=0, atol=0)


def _sampler(ds, epoch, seed, world_size=1, rank=0):
    sampler = torch.utils.data.DistributedSampler(
        ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    return sampler


def test_loader_each_sample_once_per_epoch():
    n = 103
    ds = ArrayDataset(torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 2), kind="points")
    seen_all = []
    for rank in range(2):
        loader = InfiniteLoader(ds, batch_size=10, rank=rank, world_size=2, seed=4)
        assert loader.batches_per_epoch == 5  # 51 per rank -> 5 full batches
        for epoch in range(2):
            seen = torch.cat([next(loader)[0][:, 0] for _ in range(5)]).long()
            assert len(seen.unique()) == 50
            if epoch == 0:
                seen_all.append(seen)
    both = torch.cat(seen_all)
    assert len(both.unique()) == 100  # the two ranks never share a sample


def test_loader_points_ignore_flip_and_workers_match(digits):
    pts = build_dataset("moons", num_points=64, seed=0)
    a = take(InfiniteLoader(pts, 16, seed=2, flip=True), 3)
    b = take(InfiniteLoader(pts, 16, seed=2, flip=False), 3)
    assert_same_batches(a, b)
    ds = small_digits(digits, n=40)
    reference = InfiniteLoader(ds, 8, seed=5, flip=True)
    expected = take(reference, 8)
    workers = InfiniteLoader(ds, 8, seed=5, flip=True, num_workers=1)
    rng_before = torch.get_rng_state()
    first = take(workers, 2)  # starts the DataLoader mid-run, as a resume does
    # dropout's stream: a worker start must not draw from it (resume with workers is exact)
    assert torch.equal(torch.get_rng_state(), rng_before)
    state = workers.state_dict()
    assert_same_batches(first + take(workers, 6), expected)
    resumed = InfiniteLoader(ds, 8, seed=5, flip=True, num_workers=1)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 6), expected[2:])


def test_loader_batch_too_large(digits):
    with pytest.raises(ValueError, match="batch_size"):
        InfiniteLoader(small_digits(digits, n=10), batch_size=6, world_size=2)


def test_mnist_of_another_size_and_cifar_with_fractional_labels_are_refused(tmp_path):
    """Files in the right format with the wrong contents: 16x16 IDX images were resized to
    28x28 without a word, float CIFAR-10 labels truncated (1.7 -> 1)."""
    write_mnist(tmp_path)
    images = tmp_path / "mnist" / "train-images-idx3-ubyte"
    write_idx(images, np.zeros((5, 16, 16), np.uint8), 2051, False)
    with pytest.raises(ValueError) as info:
        build_dataset("mnist", str(tmp_path), train=True)
    assert str(info.value) == f"{images} holds 16x16 images, not MNIST's 28x28"
    write_cifar(tmp_path)
    write_cifar_labels(tmp_path / "cifar-10-batches-py" / "data_batch_1", [0.5, 1.7])
    with pytest.raises(ValueError, match=r"batch \(ValueError: labels are float64, not integers\)"):
        build_dataset("cifar10", str(tmp_path), train=True)

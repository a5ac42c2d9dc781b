"""Sample-quality metrics: Frechet distance of features (images), sliced Wasserstein and MMD
(2-D points).

Images: features come from a registered extractor (``FEATURE_EXTRACTORS``): ``classifier`` is a
small CNN trained here on the dataset's train split (works offline, cached under
``{root}/classifiers/``), ``inception`` is Inception-v3 through torch-fidelity or clean-fid when
one of them and its weights are already on disk (nothing is downloaded). Reference statistics of
the train split are cached under ``{root}/fid_stats/``. Points: fresh reference draws from the
toy distribution. Everything is computed in float64 on CPU. Nothing here is distributed: the
caller gathers samples from all ranks and calls these functions on one of them.
"""

import contextlib
import hashlib
import importlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data_utils
import utils

FD_EPS = 1e-6  # added to both covariances when sqrtm(S1 S2) fails (as pytorch-fid does)
MEDIAN_MAX_POINTS = 2048  # points used for the median-distance bandwidth heuristic
KERNEL_CHUNK = 2048  # rows per block of a kernel matrix
TOY_REFERENCE_SEED_OFFSET = 12345
CLEANFID_WEIGHTS_DIR = "./" if sys.platform.startswith("win") else "/tmp"  # clean-fid's choice
CLEANFID_WEIGHTS_FILE = "inception-2015-12-05.pt"
CLASSIFIER_VERSION = 1  # bump when SmallCNN changes: older cached classifiers are retrained


# --------------------------------------------------------------------------------------------
# Statistics (float64 throughout)
# --------------------------------------------------------------------------------------------


def _as_float64(x) -> np.ndarray:
    """A float64 numpy array from a tensor (any device) or an array-like."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of features f_1..f_N (N, D), in float64:
    mu = (1/N) sum_i f_i,  sigma = 1/(N-1) sum_i (f_i - mu)(f_i - mu)^T."""
    f = _as_float64(features)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _streaming_statistics(feature_batches) -> tuple[np.ndarray, np.ndarray]:
    """feature_statistics over batches without holding them all. With c the first batch's mean
    (a shift that avoids cancellation), s1 = sum_i (f_i - c), s2 = sum_i (f_i - c)(f_i - c)^T:
    mu = c + s1 / N,  sigma = (s2 - s1 s1^T / N) / (N - 1)."""
    n, c, s1, s2 = 0, None, 0.0, 0.0
    for batch in feature_batches:
        f = _as_float64(batch)
        c = f.mean(axis=0) if c is None else c
        g = f - c
        n, s1, s2 = n + len(f), s1 + g.sum(axis=0), s2 + g.T @ g
    if n < 2:
        raise ValueError(f"need at least 2 feature vectors, got {n}")
    return c + s1 / n, (s2 - np.outer(s1, s1) / n) / (n - 1)


def _sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray) -> tuple[np.ndarray, bool]:
    """(sqrtm(S1 S2), ok): ok is False when the result is not finite or has a non-negligible
    imaginary part on its diagonal. scipy's "singular matrix" warning is silenced: these checks
    decide (as pytorch-fid's sqrtm(..., disp=False) does)."""
    import scipy.linalg  # here: a slow import that only Frechet distances need

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    ok = bool(np.isfinite(root).all()) and np.allclose(np.diagonal(root).imag, 0, atol=1e-3)
    return root, ok


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = FD_EPS) -> float:
    """Frechet distance between N(mu1, S1) and N(mu2, S2):

        ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}).

    (S1 S2)^{1/2} comes from scipy.linalg.sqrtm. When it is not finite or clearly complex (a
    singular product), eps * I is added to both covariances and it is recomputed (pytorch-fid's
    fix); the tiny imaginary part round-off leaves is dropped. Raises ValueError if a clearly
    complex root remains."""
    mu1, mu2 = np.atleast_1d(_as_float64(mu1)), np.atleast_1d(_as_float64(mu2))
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != 2 * mu1.shape:
        raise ValueError(
            f"shape mismatch: mu {mu1.shape}, {mu2.shape}; sigma {sigma1.shape}, {sigma2.shape}"
        )
    root, ok = _sqrtm_product(sigma1, sigma2)
    if not ok:
        offset = eps * np.eye(len(mu1))
        root, ok = _sqrtm_product(sigma1 + offset, sigma2 + offset)
    if not ok:
        raise ValueError("frechet_distance: sqrtm(S1 S2) is not finite or clearly complex")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root.real))


def random_directions(num: int, dim: int, seed: int = 0) -> np.ndarray:
    """`num` unit vectors (num, dim), uniform on the sphere: normalised standard Gaussians drawn
    from np.random.default_rng(seed)."""
    theta = np.random.default_rng(seed).standard_normal((num, dim))
    return theta / np.linalg.norm(theta, axis=1, keepdims=True)


def _equal_size(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Subsample the larger cloud to the smaller one's size (seeded, without replacement)."""
    n = min(len(x), len(y))
    rng = np.random.default_rng(seed)
    pick = lambda z: z if len(z) == n else z[np.sort(rng.choice(len(z), n, replace=False))]
    return pick(x), pick(y)


def sliced_wasserstein(x, y, num_projections: int = 512, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between point clouds x, y (N, D):

        SW_2 = sqrt( mean_p (1/N) sum_i (sort(X theta_p)_i - sort(Y theta_p)_i)^2 ),

    theta_p = random_directions(num_projections, D, seed). In 1-D, W_2 between two empirical
    measures of N points pairs the sorted values. Clouds of different sizes: the larger one is
    subsampled (seeded) to the smaller size."""
    x, y = _equal_size(_as_float64(x), _as_float64(y), seed)
    if x.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need two (N, D) clouds of one D, got {x.shape} and {y.shape}")
    theta = random_directions(num_projections, x.shape[1], seed)
    px, py = np.sort(x @ theta.T, axis=0), np.sort(y @ theta.T, axis=0)
    return float(np.sqrt(np.mean((px - py) ** 2)))


def median_distance(z, max_points: int = MEDIAN_MAX_POINTS) -> float:
    """Median of ||z_i - z_j|| over pairs i < j, on at most `max_points` evenly spaced rows."""
    z = torch.as_tensor(_as_float64(z))
    if len(z) > max_points:
        z = z[torch.linspace(0, len(z) - 1, max_points).round().long()]
    return float(np.median(torch.pdist(z).numpy()))


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, bandwidths) -> float:
    """sum_{i, j} sum_h exp(-||a_i - b_j||^2 / (2 h^2)), in row blocks of KERNEL_CHUNK."""
    total = 0.0
    for start in range(0, len(a), KERNEL_CHUNK):
        sq = torch.cdist(a[start : start + KERNEL_CHUNK], b).square_()
        total += sum(float(sq.mul(-0.5 / (h * h)).exp_().sum()) for h in bandwidths)
    return total


def mmd_rbf(x, y, bandwidths=None) -> float:
    """Unbiased squared MMD between samples x (m, D) and y (n, D) with the kernel
    k(a, b) = sum_h exp(-||a - b||^2 / (2 h^2)):

        MMD^2 = 1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j)
                - 2/(mn) sum_{i, j} k(x_i, y_j).

    Default bandwidths: d * (0.5, 1, 2), with d the median pairwise distance of the pooled
    sample (median_distance: at most MEDIAN_MAX_POINTS evenly spaced pooled points). float64;
    kernel matrices are summed in blocks, so N of 10k or more fits in memory. It can be slightly
    negative for two samples of one distribution (it is unbiased)."""
    x, y = torch.as_tensor(_as_float64(x)), torch.as_tensor(_as_float64(y))
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"need at least 2 points in each sample, got {m} and {n}")
    if bandwidths is None:
        d = median_distance(torch.cat([x, y]))
        if d <= 0:
            raise ValueError("mmd_rbf: median pairwise distance is 0; pass bandwidths")
        bandwidths = (0.5 * d, d, 2.0 * d)
    k = len(bandwidths)  # k(a, a): the diagonal terms removed below
    kxx = (_kernel_sum(x, x, bandwidths) - m * k) / (m * (m - 1))
    kyy = (_kernel_sum(y, y, bandwidths) - n * k) / (n * (n - 1))
    kxy = _kernel_sum(x, y, bandwidths) / (m * n)
    return float(kxx + kyy - 2 * kxy)


# --------------------------------------------------------------------------------------------
# Feature extractors: builder(dataset_name, root, device, image_size=None, path=None) -> callable
# extractor(x (N, C, H, W) in [-1, 1]) -> features (N, D)
# --------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Classifier for small images: conv-BN-ReLU, 2x2 max-pool, conv-BN-ReLU, adaptive average
    pooling to 4x4, then Linear -> GELU (the `features`: the penultimate layer) and a linear
    head to the class logits."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim),
            nn.GELU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass(frozen=True)
class ClassifierRecipe:
    """How the feature classifier of one dataset is trained. holdout > 0: that seeded fraction
    of the train split measures accuracy (and is not trained on); 0: the test split does.
    cpu_threads=1 suits tiny images, whose ops are too small to gain from more threads (on a
    2-core CPU, two threads made 8x8 digits training 3x slower)."""

    epochs: int
    batch_size: int
    lr: float = 2e-3
    weight_decay: float = 1e-4
    holdout: float = 0.0
    seed: int = 0
    cpu_threads: int | None = None  # intra-op CPU threads while training (None: as set)


CLASSIFIER_RECIPES = {
    "digits": ClassifierRecipe(epochs=15, batch_size=128, lr=3e-3, holdout=0.2, cpu_threads=1),
    "mnist": ClassifierRecipe(epochs=2, batch_size=256),
}


@contextlib.contextmanager
def _cpu_threads(n: int | None):
    """Run the block with `n` intra-op CPU threads (None: unchanged), then restore."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n or previous)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class ClassifierFeatures:
    """Extractor: penultimate features of a trained SmallCNN. Attributes: net, accuracy (on the
    held-out images), path (the cache file), fingerprint (hash of that file), image_shape,
    cpu_threads (intra-op CPU threads while extracting; None: as set)."""

    def __init__(self, net: SmallCNN, accuracy, path, image_shape, device="cpu", cpu_threads=None):
        self.net = net.to(device).eval()
        self.cpu_threads = cpu_threads
        self.accuracy = accuracy
        self.path = path
        self.image_shape = tuple(image_shape)
        self.device = torch.device(device)
        with open(path, "rb") as f:
            self.fingerprint = "classifier:" + hashlib.sha256(f.read()).hexdigest()[:16]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"classifier expects images {self.image_shape}, got {x.shape[1:]}")
        with _cpu_threads(self.cpu_threads):
            return self.net.features(x.to(self.device, torch.float32)).float()


def _batches(n: int, batch_size: int, order: torch.Tensor | None = None):
    """Index tensors of consecutive chunks of range(n) (or of `order`)."""
    order = torch.arange(n) if order is None else order
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


@torch.no_grad()
def classifier_accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size=1000):
    """Fraction of (x, y) the net labels correctly (eval mode)."""
    net.eval()
    device = next(net.parameters()).device
    correct = sum(
        int((net(x[i].to(device)).argmax(1).cpu() == y[i]).sum())
        for i in _batches(len(x), batch_size)
    )
    return correct / len(x)


def _fit(net, x, y, recipe: ClassifierRecipe, generator: torch.Generator, device) -> None:
    """recipe.epochs of minibatch cross-entropy with AdamW and a cosine learning-rate decay."""
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * math.ceil(len(x) / recipe.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    net.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(len(x), generator=generator)
        for index in _batches(len(x), recipe.batch_size, order):
            loss = F.cross_entropy(net(x[index].to(device)), y[index].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()


def train_classifier(x_train, y_train, x_test, y_test, num_classes, recipe, device="cpu"):
    """Train a SmallCNN on model-space images, seeded by recipe.seed without touching the
    caller's RNG. Returns (net on CPU, accuracy on (x_test, y_test))."""
    with torch.random.fork_rng(devices=[]), _cpu_threads(recipe.cpu_threads):
        torch.manual_seed(recipe.seed)
        net = SmallCNN(x_train.shape[1], num_classes).float().to(device)
        generator = torch.Generator().manual_seed(recipe.seed)
        _fit(net, x_train, y_train, recipe, generator, device)
        return net.cpu(), classifier_accuracy(net, x_test, y_test)


def _classifier_data(dataset_name, root, recipe, image_size, path):
    """(x_train, y_train, x_test, y_test) in model space: a seeded holdout of the train split,
    or the train and test splits."""
    build = lambda train: data_utils.build_dataset(
        dataset_name, root, train, image_size=image_size, path=path
    )
    train = build(True)
    x, y = train.__getitems__(list(range(len(train))))
    if recipe.holdout > 0:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(recipe.seed))
        n_test = round(recipe.holdout * len(x))
        test_idx, train_idx = order[:n_test], order[n_test:]
        return x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    test = build(False)
    return (x, y, *test.__getitems__(list(range(len(test)))))


def _train_and_cache(dataset_name, root, recipe, image_size, path, cache, device) -> None:
    """Train the feature classifier and write {arch, state_dict, accuracy, ...} atomically."""
    print(
        f"training the {dataset_name} feature classifier (one-off); caching it at {cache}",
        file=sys.stderr,
        flush=True,
    )
    x_train, y_train, x_test, y_test = _classifier_data(
        dataset_name, root, recipe, image_size, path
    )
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    start = time.perf_counter()
    net, accuracy = train_classifier(x_train, y_train, x_test, y_test, num_classes, recipe, device)
    state = {
        "version": CLASSIFIER_VERSION,
        "arch": {"in_channels": x_train.shape[1], "num_classes": num_classes},
        "state_dict": net.state_dict(),
        "accuracy": accuracy,
        "image_shape": list(x_train.shape[1:]),
        "recipe": asdict(recipe),
        "train_seconds": time.perf_counter() - start,
    }
    utils.atomic_torch_save(state, cache)


def _image_hw(dataset_name, root, image_size, path) -> tuple[int, int]:
    """(H, W) of the dataset's images: image_size when given, else from building the dataset."""
    if image_size:
        return image_size, image_size
    dataset = data_utils.build_dataset(dataset_name, root, True, path=path)
    return tuple(dataset.shape[-2:])


def classifier_path(root: str, dataset_name: str, h: int, w: int) -> str:
    return os.path.join(root, "classifiers", f"{dataset_name}_{h}x{w}.pt")


def _load_classifier_state(cache: str, recipe: ClassifierRecipe) -> dict | None:
    """The cached classifier's state when the file exists and was written by this
    CLASSIFIER_VERSION with this recipe, else None."""
    if not os.path.isfile(cache):
        return None
    state = torch.load(cache, map_location="cpu", weights_only=True)
    current = state.get("version") == CLASSIFIER_VERSION and state.get("recipe") == asdict(recipe)
    return state if current else None


def build_classifier_extractor(
    dataset_name, root="data", device="cpu", image_size=None, path=None
) -> ClassifierFeatures:
    """The dataset's SmallCNN feature classifier, loaded from
    {root}/classifiers/{dataset_name}_{h}x{w}.pt, or trained (CLASSIFIER_RECIPES) and cached
    there first (also when the cache is from another CLASSIFIER_VERSION or recipe). Concurrent
    builders would each train and write the same file: build it on one rank first."""
    if dataset_name not in CLASSIFIER_RECIPES:
        raise ValueError(
            f"no feature classifier for {dataset_name!r}; valid choices: "
            f"{sorted(CLASSIFIER_RECIPES)} (other datasets: eval.feature_extractor=inception)"
        )
    h, w = _image_hw(dataset_name, root, image_size, path)
    cache = classifier_path(root, dataset_name, h, w)
    recipe = CLASSIFIER_RECIPES[dataset_name]
    state = _load_classifier_state(cache, recipe)
    if state is None:
        _train_and_cache(dataset_name, root, recipe, image_size, path, cache, device)
        state = _load_classifier_state(cache, recipe)
    net = SmallCNN(**state["arch"]).float()
    net.load_state_dict(state["state_dict"])
    shape = state["image_shape"]
    return ClassifierFeatures(net, state["accuracy"], cache, shape, device, recipe.cpu_threads)


class _Unavailable(Exception):
    """An Inception backend's package or weight file is missing."""


def _import(module: str):
    try:
        return importlib.import_module(module)
    except Exception as err:  # a broken dependency (e.g. torchvision) need not be ImportError
        raise _Unavailable(f"package {module.split('.')[0]} not importable ({err!r})") from err


def _require_file(path: str) -> None:
    if not os.path.isfile(path):
        raise _Unavailable(f"weight file {path} not found")


def _torch_fidelity_requirements():
    """(module, weights path) of torch-fidelity's Inception; _Unavailable when either is
    missing. Builds nothing."""
    module = _import("torch_fidelity.feature_extractor_inceptionv3")
    name = os.path.basename(module.URL_INCEPTION_V3)
    weights = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    _require_file(weights)
    return module, weights


def _torch_fidelity_inception(device):
    """torch-fidelity's FeatureExtractorInceptionV3 ('2048' pool features): uint8 in, its own
    bilinear resize to 299 and scaling inside. Weights from torch.hub's checkpoint folder."""
    module, weights = _torch_fidelity_requirements()
    net = module.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=weights
    ).to(device)
    return lambda images: net(images.to(device))[0]


def _clean_fid_requirements():
    """(inception_torchscript, resize) modules of clean-fid; _Unavailable when a module or the
    weight file is missing. Builds nothing."""
    torchscript = _import("cleanfid.inception_torchscript")
    resize = _import("cleanfid.resize")
    _require_file(os.path.join(CLEANFID_WEIGHTS_DIR, CLEANFID_WEIGHTS_FILE))
    return torchscript, resize


def _clean_fid_inception(device):
    """clean-fid's TorchScript Inception: each image PIL-bicubic resized to 299 in float
    ("clean" mode), then the network on [0, 255] floats. Weights in CLEANFID_WEIGHTS_DIR."""
    torchscript, resize = _clean_fid_requirements()
    net = torchscript.InceptionV3W(CLEANFID_WEIGHTS_DIR, download=False).to(device)
    resizer = resize.build_resizer("clean")

    def features(images: torch.Tensor) -> torch.Tensor:
        hwc = images.permute(0, 2, 3, 1).cpu().numpy()
        resized = np.stack([resizer(img) for img in hwc])
        return net(torch.from_numpy(resized).permute(0, 3, 1, 2).to(device))

    return features


INCEPTION_BACKENDS = {
    "torch-fidelity": _torch_fidelity_inception,
    "clean-fid": _clean_fid_inception,
}
# What each backend needs on disk, checkable without building it (a backend not listed here
# needs nothing beyond its builder).
INCEPTION_REQUIREMENTS = {
    "torch-fidelity": _torch_fidelity_requirements,
    "clean-fid": _clean_fid_requirements,
}


def inception_unavailable_reason() -> str | None:
    """None when some INCEPTION_BACKENDS entry has its package and weights on disk; else one
    line saying what each backend lacks. Imports packages but builds no network."""
    missing = []
    for backend in INCEPTION_BACKENDS:
        try:
            INCEPTION_REQUIREMENTS.get(backend, lambda: None)()
            return None
        except _Unavailable as err:
            missing.append(f"{backend}: {err}")
    return "; ".join(missing).replace("\n", " ")


def to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    """Model-space images [-1, 1] (N, C, H, W) -> uint8 [0, 255] with 3 channels (1 repeated)."""
    images = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class InceptionFeatures:
    """Extractor: 2048-d Inception-v3 pool features through one of INCEPTION_BACKENDS."""

    def __init__(self, features_fn, backend: str):
        self.features_fn = features_fn
        self.fingerprint = f"inception:{backend}"

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_fn(to_uint8_rgb(x)).float()


def build_inception_extractor(
    dataset_name=None, root="data", device="cpu", image_size=None, path=None
) -> InceptionFeatures:
    """The first INCEPTION_BACKENDS entry whose package imports and whose weights are already
    on disk (nothing is downloaded); else ValueError, one line naming what is missing."""
    missing = []
    for backend, build in INCEPTION_BACKENDS.items():
        try:
            return InceptionFeatures(build(device), backend)
        except _Unavailable as err:
            missing.append(f"{backend}: {err}")
    message = (
        f"inception features unavailable ({'; '.join(missing)}); nothing is downloaded here; "
        "--config.eval.feature_extractor=classifier works offline for digits/mnist"
    )
    raise ValueError(message.replace("\n", " "))


FEATURE_EXTRACTORS = {
    "classifier": build_classifier_extractor,
    "inception": build_inception_extractor,
}


def build_feature_extractor(
    name, dataset_name, root="data", device="cpu", image_size=None, path=None
):
    """FEATURE_EXTRACTORS[name](dataset_name, root, device, image_size=, path=)."""
    if name not in FEATURE_EXTRACTORS:
        raise ValueError(
            f"unknown feature extractor {name!r}; valid choices: {sorted(FEATURE_EXTRACTORS)}"
        )
    return FEATURE_EXTRACTORS[name](dataset_name, root, device, image_size=image_size, path=path)


def _classifier_problem(dataset_name: str) -> str | None:
    if dataset_name in CLASSIFIER_RECIPES:
        return None
    return (
        f"eval.feature_extractor=classifier has no classifier for data.name={dataset_name} "
        f"(classifiers exist for {sorted(CLASSIFIER_RECIPES)}): use "
        f"eval.feature_extractor=inception (torch-fidelity or clean-fid with its weights on "
        f"disk); when training, train.eval_every=0 trains without evaluating"
    )


def _inception_problem(dataset_name: str) -> str | None:
    reason = inception_unavailable_reason()
    if reason is None:
        return None
    return (
        f"eval.feature_extractor=inception is unavailable ({reason}); nothing is downloaded "
        f"here: install torch-fidelity or clean-fid with its weights, or use "
        f"eval.feature_extractor=classifier (for {sorted(CLASSIFIER_RECIPES)}); "
        f"when training, train.eval_every=0 trains without evaluating"
    )


# name -> problem(dataset_name): one line saying why the extractor cannot work, or None.
FEATURE_EXTRACTOR_PROBLEMS = {"classifier": _classifier_problem, "inception": _inception_problem}


def check_feature_extractor(name, dataset_name, num_samples=None) -> None:
    """Raise ValueError (one line) when evaluating `dataset_name` with extractor `name` cannot
    work, before any training or sampling: an unknown extractor, no classifier for the dataset,
    Inception without a backend on disk, or fewer than 2 samples (`num_samples`, when given).
    2-D point sets use no extractor (their metrics need only the samples). Builds nothing and
    trains nothing (the classifier of a known dataset is trained when first built)."""
    if num_samples is not None and num_samples < 2:
        raise ValueError(
            f"sample.num={num_samples} must be >= 2 to evaluate (sample statistics need at "
            f"least two samples)"
        )
    if dataset_name in data_utils.TOY_SETS:
        return
    if name not in FEATURE_EXTRACTORS:
        raise ValueError(
            f"eval.feature_extractor={name!r} is unknown; valid choices: "
            f"{sorted(FEATURE_EXTRACTORS)}"
        )
    problem = FEATURE_EXTRACTOR_PROBLEMS.get(name, lambda _: None)(dataset_name)
    if problem:
        raise ValueError(problem)


PROGRESS_MIN_BATCHES = 4  # feature extraction over fewer batches shows no progress bar


def _is_main_process() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _progress(iterable, total: int, desc: str):
    """tqdm over `iterable` on the main process when there are at least PROGRESS_MIN_BATCHES
    items; the iterable as it is otherwise."""
    show = _is_main_process() and total >= PROGRESS_MIN_BATCHES
    return tqdm(iterable, total=total, desc=desc, unit="batch", disable=not show, leave=False)


@torch.no_grad()
def compute_features(extractor, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """extractor over x in batches: features (N, D), float64 on CPU (a progress bar on the
    main process when there are many batches)."""
    starts = range(0, len(x), batch_size)
    out = [
        extractor(x[i : i + batch_size]).to("cpu", torch.float64)
        for i in _progress(starts, len(starts), "sample features")
    ]
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# Reference statistics, cached
# --------------------------------------------------------------------------------------------


def _load_stats(cache: str, key: str):
    """(mu, sigma) from `cache` when it exists and was written for `key`, else None."""
    if not os.path.isfile(cache):
        return None
    with np.load(cache) as stats:
        if str(stats["key"]) != key:
            return None
        return stats["mu"], stats["sigma"]


def reference_statistics(
    dataset_name,
    extractor_name,
    extractor,
    root="data",
    image_size=None,
    path=None,
    max_items=50_000,
    batch_size=500,
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the extractor's features on the first `max_items` images of the train
    split, cached in {root}/fid_stats/{dataset_name}_{extractor_name}_{h}x{w}.npz. The file
    also records max_items, path and the extractor's fingerprint; if they differ the
    statistics are recomputed (e.g. after the feature classifier was retrained)."""
    h, w = _image_hw(dataset_name, root, image_size, path)
    cache = os.path.join(root, "fid_stats", f"{dataset_name}_{extractor_name}_{h}x{w}.npz")
    fingerprint = getattr(extractor, "fingerprint", None)
    key = json.dumps({"max_items": max_items, "path": path, "extractor": fingerprint})
    cached = _load_stats(cache, key)
    if cached is not None:
        return cached
    dataset = data_utils.build_dataset(dataset_name, root, True, image_size=image_size, path=path)
    n = min(max_items, len(dataset))
    chunks = _batches(n, batch_size)
    batches = (
        compute_features(extractor, dataset.__getitems__(index.tolist())[0], batch_size)
        for index in _progress(chunks, len(chunks), "reference features")
    )
    mu, sigma = _streaming_statistics(batches)
    utils.atomic_save_npz({"mu": mu, "sigma": sigma, "key": np.array(key), "num_items": n}, cache)
    return mu, sigma


# --------------------------------------------------------------------------------------------
# One call for the caller
# --------------------------------------------------------------------------------------------


def quantize_images(x: torch.Tensor) -> torch.Tensor:
    """Model-space images as they would be saved: rounded to uint8 levels and clipped to
    [-1, 1] (so samples are scored like the uint8 reference images)."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255) / 127.5 - 1.0


def image_metrics(
    samples,
    dataset_name,
    extractor_name="classifier",
    root="data",
    device="cpu",
    image_size=None,
    path=None,
) -> dict:
    """{"fd_<extractor_name>": Frechet distance between the features of `samples` (model
    space (N, C, H, W), quantized first) and of the train split, "num_samples": N}.
    image_size defaults to the samples' height."""
    samples = quantize_images(torch.as_tensor(samples))
    image_size = image_size or samples.shape[-2]
    extractor = build_feature_extractor(
        extractor_name, dataset_name, root, device, image_size=image_size, path=path
    )
    mu_ref, sigma_ref = reference_statistics(
        dataset_name, extractor_name, extractor, root, image_size, path
    )
    mu, sigma = feature_statistics(compute_features(extractor, samples))
    fd = frechet_distance(mu, sigma, mu_ref, sigma_ref)
    return {f"fd_{extractor_name}": fd, "num_samples": len(samples)}


def points_metrics(samples, dataset_name, num_reference=None, seed=0) -> dict:
    """Sliced W_2 and unbiased MMD^2 (mmd_rbf) between 2-D `samples` (N, 2) and
    `num_reference` (default N) fresh draws of data_utils.sample_toy(dataset_name) seeded with
    seed + TOY_REFERENCE_SEED_OFFSET."""
    x = _as_float64(samples)
    n = num_reference or len(x)
    generator = torch.Generator().manual_seed(seed + TOY_REFERENCE_SEED_OFFSET)
    reference = _as_float64(data_utils.sample_toy(dataset_name, n, generator))
    return {
        "sliced_wasserstein": sliced_wasserstein(x, reference, seed=seed),
        "mmd": mmd_rbf(x, reference),
        "num_samples": len(x),
    }


METRICS = {"image": image_metrics, "points": points_metrics}

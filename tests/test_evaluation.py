"""Sample-quality metrics against closed forms; the digits feature classifier and its caches."""

import os
import sys
import types

import numpy as np
import pytest
import torch

import data_utils
import evaluation as ev


def _random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _psd_sqrt(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def test_feature_statistics_match_numpy():
    f = np.random.default_rng(0).standard_normal((300, 5)) * 3 + 1
    mu, sigma = ev.feature_statistics(torch.from_numpy(f).float())
    f32 = f.astype(np.float32).astype(np.float64)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, f32.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f32, rowvar=False), rtol=1e-12)


def test_streaming_statistics_match_feature_statistics():
    f = np.random.default_rng(1).standard_normal((1000, 4)) + 100.0  # large mean: no cancellation
    mu, sigma = ev._streaming_statistics(np.array_split(f, 7))
    mu_ref, sigma_ref = ev.feature_statistics(f)
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-9, atol=1e-12)


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(2)
    m1, m2 = rng.standard_normal(6), rng.standard_normal(6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((m1 - m2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert ev.frechet_distance(m1, np.diag(s1), m2, np.diag(s2)) == pytest.approx(expected, 1e-10)


def test_frechet_distance_full_covariances_match_eigh():
    rng = np.random.default_rng(3)
    d = 8
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    root1 = _psd_sqrt(s1)  # tr (S1 S2)^1/2 = tr (S1^1/2 S2 S1^1/2)^1/2, a symmetric PSD root
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))
    assert ev.frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)
    assert ev.frechet_distance(m2, s2, m1, s1) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_identical_and_singular():
    rng = np.random.default_rng(4)
    mu, sigma = rng.standard_normal(5), _random_spd(rng, 5)
    assert abs(ev.frechet_distance(mu, sigma, mu, sigma)) < 1e-9
    few = rng.standard_normal((4, 10))  # 4 samples in 10-D: rank-3 covariance
    mu, sigma = ev.feature_statistics(few)
    fd = ev.frechet_distance(mu, sigma, mu, sigma)
    assert np.isfinite(fd) and abs(fd) < 1e-3
    with pytest.raises(ValueError, match="shape"):
        ev.frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


# --------------------------------------------------------------------------------------------
# Sliced Wasserstein and MMD
# --------------------------------------------------------------------------------------------


def test_sliced_wasserstein_closed_forms():
    rng = np.random.default_rng(5)
    d, n = 16, 500
    x = rng.standard_normal((n, d))
    v = rng.standard_normal(d)
    assert ev.sliced_wasserstein(x, x) == 0.0
    # each sorted projection of x + v is the sorted projection of x shifted by theta . v
    theta = ev.random_directions(4096, d, seed=7)
    exact = np.sqrt(np.mean((theta @ v) ** 2))
    sw = ev.sliced_wasserstein(x, x + v, num_projections=4096, seed=7)
    assert sw == pytest.approx(exact, rel=1e-9)
    assert sw == pytest.approx(np.linalg.norm(v) / np.sqrt(d), rel=0.05)  # E (theta.v)^2 = |v|^2/D
    assert ev.sliced_wasserstein(x + v, x, 4096, seed=7) == pytest.approx(sw, rel=1e-12)


def test_sliced_wasserstein_subsamples_the_larger_cloud():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((300, 2)), rng.standard_normal((500, 2))
    first = ev.sliced_wasserstein(x, y, seed=3)
    assert first == ev.sliced_wasserstein(x, y, seed=3)  # deterministic
    assert 0 < first < 0.3


def test_mmd_rbf_matches_brute_force_in_blocks(monkeypatch):
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((40, 3)), rng.standard_normal((30, 3)) + 0.5
    bandwidths = (0.5, 1.0, 2.0)
    k = lambda a, b: sum(
        np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * h * h)) for h in bandwidths
    )
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    expected = (
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
        - 2 * kxy.mean()
    )
    monkeypatch.setattr(ev, "KERNEL_CHUNK", 7)
    assert ev.mmd_rbf(x, y, bandwidths) == pytest.approx(expected, rel=1e-9)


def test_mmd_rbf_same_vs_shifted_gaussians():
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((1000, 2)), rng.standard_normal((1000, 2))
    same = ev.mmd_rbf(x, y)
    shifted = ev.mmd_rbf(x, y + np.array([1.0, 0.0]))
    assert abs(same) < 0.01
    assert shifted > 0.1
    assert ev.median_distance(x) == pytest.approx(np.sqrt(np.pi), rel=0.1)  # Rayleigh(sqrt 2)


# --------------------------------------------------------------------------------------------
# Points
# --------------------------------------------------------------------------------------------


def test_points_metrics_same_vs_different_toy_sets():
    g = torch.Generator().manual_seed(0)
    moons = data_utils.sample_toy("moons", 1000, g)
    same = ev.points_metrics(moons, "moons")
    other = ev.points_metrics(data_utils.sample_toy("checkerboard", 1000, g), "moons")
    assert same["num_samples"] == 1000 and set(same) == {"sliced_wasserstein", "mmd", "num_samples"}
    assert same["sliced_wasserstein"] < 0.15 and abs(same["mmd"]) < 0.01
    assert other["sliced_wasserstein"] > 3 * same["sliced_wasserstein"] + 0.3
    assert other["mmd"] > 0.1
    assert ev.points_metrics(moons, "moons", num_reference=2000)["num_samples"] == 1000
    assert ev.METRICS["points"] is ev.points_metrics


# --------------------------------------------------------------------------------------------
# Feature extractors and cached statistics on digits
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    """A data root holding the trained digits classifier (trained once for this module)."""
    root = str(tmp_path_factory.mktemp("data"))
    ev.build_feature_extractor("classifier", "digits", root)
    return root


def _digits():
    dataset = data_utils.build_dataset("digits")
    return dataset.__getitems__(list(range(len(dataset))))[0]


def test_classifier_is_cached_accurate_and_reused(digits_root, monkeypatch):
    path = os.path.join(digits_root, "classifiers", "digits_8x8.pt")
    assert os.path.isfile(path)
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".tmp")]

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although cached")

    monkeypatch.setattr(ev, "train_classifier", no_training)
    extractor = ev.build_feature_extractor("classifier", "digits", digits_root)
    assert extractor.accuracy > 0.9 and extractor.path == path
    x = _digits()
    features = ev.compute_features(extractor, x[:123], batch_size=50)
    assert features.shape == (123, 128) and features.dtype == torch.float64
    torch.testing.assert_close(features[:50], ev.compute_features(extractor, x[:50]))


def test_classifier_fd_separates_real_from_noise(digits_root):
    extractor = ev.build_feature_extractor("classifier", "digits", digits_root)
    x = _digits()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    half_a, half_b = x[order[: len(x) // 2]], x[order[len(x) // 2 :]]
    noise = torch.rand(len(half_b), *x.shape[1:], generator=torch.Generator().manual_seed(1))
    stats = lambda images: ev.feature_statistics(ev.compute_features(extractor, images))
    fd_real = ev.frechet_distance(*stats(half_a), *stats(half_b))
    fd_noise = ev.frechet_distance(*stats(half_a), *stats(noise * 2 - 1))
    assert 0 <= fd_real < 0.05 * fd_noise


def test_image_metrics_and_reference_cache(digits_root):
    x = _digits()
    real = ev.image_metrics(x[:600], "digits", root=digits_root)
    noise = ev.image_metrics(torch.rand(600, 1, 8, 8) * 2 - 1, "digits", root=digits_root)
    assert set(real) == {"fd_classifier", "num_samples"} and real["num_samples"] == 600
    assert real["fd_classifier"] < 0.05 * noise["fd_classifier"]
    assert os.path.isfile(os.path.join(digits_root, "fid_stats", "digits_classifier_8x8.npz"))
    assert ev.METRICS["image"] is ev.image_metrics


def _write_idx(path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def test_mnist_classifier_uses_the_test_split(tmp_path, monkeypatch):
    """MNIST-format files (digits upscaled to 28x28): no holdout, accuracy on the t10k files,
    caches named by the image size, image_metrics infers the size from the samples."""
    digits = data_utils.build_dataset("digits", image_size=28)
    x, y = digits.x[:, 0].numpy(), digits.y.numpy()
    (tmp_path / "mnist").mkdir()
    for prefix, part in (("train", slice(0, 500)), ("t10k", slice(500, 700))):
        _write_idx(tmp_path / "mnist" / f"{prefix}-images-idx3-ubyte", x[part], 2051)
        _write_idx(tmp_path / "mnist" / f"{prefix}-labels-idx1-ubyte", y[part], 2049)
    recipe = ev.ClassifierRecipe(epochs=2, batch_size=64, cpu_threads=1)
    monkeypatch.setitem(ev.CLASSIFIER_RECIPES, "mnist", recipe)
    root = str(tmp_path)
    extractor = ev.build_feature_extractor("classifier", "mnist", root)
    assert extractor.path == os.path.join(root, "classifiers", "mnist_28x28.pt")
    assert 0.5 < extractor.accuracy <= 1.0
    test = data_utils.build_dataset("mnist", root, train=False)
    samples = test.__getitems__(list(range(len(test))))[0]
    metrics = ev.image_metrics(samples, "mnist", root=root)
    assert metrics["num_samples"] == 200 and np.isfinite(metrics["fd_classifier"])
    assert (tmp_path / "fid_stats" / "mnist_classifier_28x28.npz").is_file()


class FlatPixels:
    """A cheap extractor: the pixels themselves."""

    fingerprint = "flat"

    def __init__(self):
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return x.flatten(1)


def test_reference_statistics_cached_and_reused(tmp_path):
    extractor = FlatPixels()
    root = str(tmp_path)
    mu, sigma = ev.reference_statistics("digits", "flat", extractor, root, max_items=1000)
    path = tmp_path / "fid_stats" / "digits_flat_8x8.npz"
    assert path.is_file() and extractor.calls > 0
    expected = ev.feature_statistics(_digits()[:1000].flatten(1))
    np.testing.assert_allclose(mu, expected[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sigma, expected[1], rtol=1e-9, atol=1e-12)
    calls = extractor.calls
    mu2, sigma2 = ev.reference_statistics("digits", "flat", extractor, root, max_items=1000)
    assert extractor.calls == calls  # loaded, not recomputed
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    with np.load(path) as stats:
        np.testing.assert_array_equal(stats["mu"], mu)
    extractor.fingerprint = "flat-v2"  # another extractor under the same name: recomputed
    ev.reference_statistics("digits", "flat", extractor, root, max_items=1000)
    assert extractor.calls > calls


# --------------------------------------------------------------------------------------------
# Errors and the Inception path (never downloads)
# --------------------------------------------------------------------------------------------


def test_unknown_extractor_and_dataset():
    with pytest.raises(ValueError, match="valid choices") as err:
        ev.build_feature_extractor("vgg", "digits")
    assert "classifier" in str(err.value) and "inception" in str(err.value)
    with pytest.raises(ValueError, match="digits"):
        ev.build_feature_extractor("classifier", "moons")


def _block_inception_packages(monkeypatch, tmp_path):
    for name in ("torch_fidelity", "torch_fidelity.feature_extractor_inceptionv3"):
        monkeypatch.setitem(sys.modules, name, None)  # import -> ImportError
    for name in ("cleanfid", "cleanfid.inception_torchscript", "cleanfid.resize"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(ev, "CLEANFID_WEIGHTS_DIR", str(tmp_path / "cleanfid"))


def test_inception_without_packages_is_one_line_error(monkeypatch, tmp_path):
    _block_inception_packages(monkeypatch, tmp_path)
    with pytest.raises(ValueError) as err:
        ev.build_feature_extractor("inception", "digits")
    message = str(err.value)
    assert "\n" not in message
    assert "torch_fidelity" in message and "cleanfid" in message
    assert "eval.feature_extractor=classifier" in message


def test_inception_without_weights_names_the_file(monkeypatch, tmp_path):
    _block_inception_packages(monkeypatch, tmp_path)
    fake = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    fake.URL_INCEPTION_V3 = "https://example.invalid/weights-inception-2015-12-05-6726825d.pth"

    def construct(*args, **kwargs):
        raise AssertionError("must not build (it would download)")

    fake.FeatureExtractorInceptionV3 = construct
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", fake)
    with pytest.raises(ValueError) as err:
        ev.build_feature_extractor("inception", "digits")
    weights = os.path.join(
        str(tmp_path / "hub"), "checkpoints", os.path.basename(fake.URL_INCEPTION_V3)
    )
    assert weights in str(err.value) and "\n" not in str(err.value)


def test_inception_extractor_feeds_uint8_rgb(monkeypatch):
    seen = {}

    def fake_backend(device):
        def features(images):
            seen["images"] = images
            return images.float().mean(dim=(2, 3))

        return features

    monkeypatch.setattr(ev, "INCEPTION_BACKENDS", {"fake": fake_backend})
    extractor = ev.build_feature_extractor("inception", "digits")
    x = torch.tensor([-1.0, 1.0, 0.0, 0.3]).view(1, 1, 2, 2)
    features = ev.compute_features(extractor, x)
    assert seen["images"].dtype == torch.uint8 and seen["images"].shape == (1, 3, 2, 2)
    assert seen["images"][0, :, 0, 0].tolist() == [0, 0, 0]
    assert seen["images"][0, 2].flatten().tolist() == [0, 255, 128, 166]
    assert features.shape == (1, 3) and extractor.fingerprint == "inception:fake"


# --------------------------------------------------------------------------------------------
# Checked at start: extractors that cannot work; progress bars
# --------------------------------------------------------------------------------------------


def test_check_feature_extractor_rejects_what_cannot_work(monkeypatch, tmp_path):
    ev.check_feature_extractor("classifier", "digits", num_samples=64)  # works offline
    ev.check_feature_extractor("inception", "moons")  # 2-D sets use no extractor
    with pytest.raises(ValueError) as err:
        ev.check_feature_extractor("classifier", "imagefolder")
    message = str(err.value)
    assert "\n" not in message and "data.name=imagefolder" in message
    assert "['digits', 'mnist']" in message and "eval.feature_extractor=inception" in message
    with pytest.raises(ValueError, match=r"sample.num=1 must be >= 2"):
        ev.check_feature_extractor("classifier", "digits", num_samples=1)
    with pytest.raises(ValueError, match=r"eval.feature_extractor='vgg' is unknown"):
        ev.check_feature_extractor("vgg", "digits")
    _block_inception_packages(monkeypatch, tmp_path)
    with pytest.raises(ValueError) as err:
        ev.check_feature_extractor("inception", "cifar10")
    message = str(err.value)
    assert "\n" not in message and message.startswith("eval.feature_extractor=inception is")
    assert "torch_fidelity" in message and "cleanfid" in message


def test_check_inception_accepts_a_backend_with_its_weights(monkeypatch, tmp_path):
    _block_inception_packages(monkeypatch, tmp_path)
    for name in ("cleanfid", "cleanfid.inception_torchscript", "cleanfid.resize"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    with pytest.raises(ValueError, match="inception-2015-12-05.pt not found"):
        ev.check_feature_extractor("inception", "cifar10")
    (tmp_path / "cleanfid").mkdir()
    (tmp_path / "cleanfid" / ev.CLEANFID_WEIGHTS_FILE).write_bytes(b"weights")
    ev.check_feature_extractor("inception", "cifar10")  # clean-fid is usable: no error
    assert ev.inception_unavailable_reason() is None


def test_feature_extraction_shows_progress_only_when_long(monkeypatch):
    bars = []
    real_tqdm = ev.tqdm

    def recording_tqdm(iterable, **kwargs):
        bars.append((kwargs["desc"], kwargs["total"], kwargs["disable"]))
        return real_tqdm(iterable, **kwargs)

    monkeypatch.setattr(ev, "tqdm", recording_tqdm)
    extractor = lambda x: x.flatten(1)
    x = torch.arange(24.0).view(12, 2)
    features = ev.compute_features(extractor, x, batch_size=2)
    torch.testing.assert_close(features, x.double())  # same result through the bar
    ev.compute_features(extractor, x, batch_size=6)
    assert bars == [("sample features", 6, False), ("sample features", 2, True)]

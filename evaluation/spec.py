"""What a batch evaluation is (strategy specs, run settings) and every check on it, before anything runs.

Light on purpose: no torch import at module level, so the command line answers `--help` and bad flags fast.
Every refusal is an `InputError` naming the input, the value and what is allowed; the CLI exits 2 on it.
"""

from __future__ import annotations

import json
import math
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

METRIC_NAMES = ("fid", "kid", "pr", "saturation", "class_accuracy", "clip_score")
STATS_DIR = Path(__file__).resolve().parent / "stats"
# Shipped statistics by name (our FID code, legacy_tf preset): the test split is the embedded
# model's default; the train split is the usual CIFAR-10 reference of papers (ADM, EDM: 50k train).
SHIPPED_REFERENCES = {
    "cifar10-test": STATS_DIR / "cifar10_test_legacy_tf.npz",
    "cifar10-train": STATS_DIR / "cifar10_train_legacy_tf.npz",
}
EMBEDDED_DEFAULT_REFERENCE = "cifar10-test"
SPEC_KEYS = ("label", "strategy", "scales")
SPEC_EXAMPLE = '{"label": "APG", "strategy": {"name": "APG", "params": {"norm_threshold": 8}}, "scales": [2, 3]}'
# KID's unbiased MMD needs 2 samples; precision/recall a k-th neighbour (k = 3) among the generated ones.
MIN_IMAGES = {"fid": 2, "kid": 2, "pr": 4}
# The runner keeps one index per image in memory; 10M is 200x a 50k FID evaluation.
MAX_IMAGES = 10_000_000
# Checkpoint file names are '<label>@<scale>.rank<r>-of-<n>.pt'; 255 bytes is the usual file-name limit.
MAX_LABEL_BYTES = 160


class InputError(ValueError):
    """A bad input (flag, spec, file): the message names it, its value and the fix."""


def check_metrics(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    names = [str(n).strip() for n in names]
    unknown = [n for n in names if n not in METRIC_NAMES]
    if unknown or not names:
        raise InputError(f"metrics={list(names)!r}: unknown {unknown}; allowed: {', '.join(METRIC_NAMES)}")
    return tuple(dict.fromkeys(names))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def safe_name(key: str) -> str:
    """A setting's file name: letters, digits and -_.@ kept, anything else (/, spaces, ...) as _."""
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in key)


def scale_text(scale: float) -> str:
    """A scale as a setting's name shows it: '%g' (3, 7.5: the names of earlier run folders), or the shortest
    exact form where '%g' would round (2.0000001, 1234567.0), so that two scales never share a name."""
    short = f"{scale:g}"
    return short if float(short) == float(scale) else repr(float(scale))


def _looks(label: str) -> str:
    """What a label looks like in a table: Unicode-normalised, case-folded, spaces collapsed."""
    return " ".join(unicodedata.normalize("NFKC", label).casefold().split())


@dataclass
class StrategySpec:
    label: str
    strategy: dict | None  # a guidance config (to_config() form), or None for the native pipeline
    scales: list[float]

    @classmethod
    def parse(cls, item: Any, where: str = "strategy spec") -> "StrategySpec":
        if not isinstance(item, dict):
            raise InputError(f"{where} {item!r} is not an object; allowed: {SPEC_EXAMPLE}")
        unknown, missing = sorted(set(item) - set(SPEC_KEYS)), [k for k in SPEC_KEYS if k not in item]
        if unknown or missing:
            raise InputError(f"{where} {item!r} is malformed (missing {missing}, unknown {unknown}); "
                             f"allowed keys: {', '.join(SPEC_KEYS)}, e.g. {SPEC_EXAMPLE}")
        label = item["label"]
        if not isinstance(label, str) or not label.strip():
            raise InputError(f"{where}: label={label!r}; allowed: a non-empty string")
        if any(not c.isprintable() for c in label):  # a newline or tab would break table.md and results.csv
            raise InputError(f"{where}: label={label!r} holds a control character; allowed: printable text")
        if len(safe_name(label).encode("utf-8")) > MAX_LABEL_BYTES:  # file names are limited to 255 bytes
            raise InputError(f"{where}: label={label[:40]!r}... is {len(label)} characters long; allowed: a label "
                             f"whose file name takes at most {MAX_LABEL_BYTES} bytes (about {MAX_LABEL_BYTES} "
                             "ASCII characters)")
        where = f"strategy spec {label!r}"
        config = item["strategy"]
        if config is not None:
            if not isinstance(config, dict) or not isinstance(config.get("name"), str):
                raise InputError(f"{where}: strategy={config!r}; allowed: null (the pipeline's own CFG) or "
                                 '{"name": "CFG", "params": {...}}')
            if "params" in config and not isinstance(config["params"], (dict, type(None))):
                raise InputError(f"{where}: params={config['params']!r} is a {type(config['params']).__name__}; "
                                 'allowed: an object of keyword arguments, e.g. {"eta": 0.0}')
        scales = item["scales"] if isinstance(item["scales"], list) else [item["scales"]]
        if not scales or not all(_is_number(s) for s in scales):
            raise InputError(f"{where}: scales={item['scales']!r}; allowed: a non-empty list of finite numbers")
        scales = [float(s) for s in scales]
        if config is None:
            if any(s < 1 for s in scales):
                raise InputError(f"{where}: scales={item['scales']!r}; the native pipeline (strategy null) skips "
                                 "CFG for every scale <= 1, so they all give the unguided model: use 1 for it, "
                                 "or scales > 1")
        else:
            strategy = _build(config, where)
            low = [s for s in scales if s <= 1]
            if low and getattr(strategy, "requires_uncond", True):
                raise InputError(f"{where}: scales {low} turn the pipeline's CFG off (no unconditional branch), "
                                 f"so {config['name']} cannot guide; allowed: scales > 1 (for the unguided model "
                                 'use {"strategy": null, "scales": [1]})')
        return cls(label, config, scales)


def _build(config: dict, where: str):
    import pipelines  # noqa: F401  (registers the names configs may use: embedded classifiers and evaluators)
    from guidance import from_config

    try:
        return from_config(config)  # fail now on a malformed configuration, not after hours of sampling
    except Exception as e:  # a strategy may also read files (LinearAG's coefficients): any failure is the spec's
        text = " ".join(str(e).split())
        if not isinstance(e, (TypeError, ValueError, KeyError)):  # an unexpected failure names its type
            text = f"{type(e).__name__}: {text}"
        raise InputError(f"{where}: {text}") from None


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _no_duplicates(pairs: list[tuple[str, Any]], source: str) -> dict:
    """json's default keeps the last of two equal keys without a word; a spec must say what it means once."""
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise InputError(f"{source}: key(s) {twice} appear twice in one JSON object; allowed: each key once")
    return dict(pairs)


def read_strategies(value: str) -> list[StrategySpec]:
    """--strategies: a JSON file, or the JSON itself (a list of specs, or one spec)."""
    text, source = value, "--strategies (inline JSON)"
    if not value.strip():
        raise InputError(f"--strategies {value!r} is empty; pass a JSON file or the JSON itself, e.g. "
                         f"'[{SPEC_EXAMPLE}]'")
    if not value.strip().startswith(("[", "{")):
        path = Path(value)
        if path.is_dir():
            raise InputError(f"--strategies {value!r} is a folder; pass a JSON file or the JSON itself")
        if not path.is_file() and _is_json(value):
            raise InputError(f"--strategies {value!r} is JSON but neither a list nor an object; allowed: a list of "
                             f"specs like '[{SPEC_EXAMPLE}]'")
        if not path.is_file():
            raise InputError(f"--strategies {value!r}: no such file; pass a JSON file or the JSON itself, "
                             f"e.g. '[{SPEC_EXAMPLE}]'")
        source = f"--strategies {value}"
        try:
            text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Windows editors) is not JSON
        except UnicodeDecodeError:
            raise InputError(f"{source} is not a UTF-8 text file; pass a JSON file") from None
    try:
        data = json.loads(text, object_pairs_hook=lambda pairs: _no_duplicates(pairs, source))
    except json.JSONDecodeError as e:
        raise InputError(f"{source}: not valid JSON ({e})") from None
    items = data if isinstance(data, list) else [data]
    if not items:
        raise InputError(f"{source}: the list is empty; allowed: one or more specs like {SPEC_EXAMPLE}")
    return [StrategySpec.parse(item, f"{source}: spec #{i + 1}") for i, item in enumerate(items)]


def canonical_reference(reference: str | None, pipeline: str) -> str | None:
    """A shipped name for the shipped files (so naming the default explicitly changes nothing), else an
    absolute path; None where no reference is given and the pipeline has no default."""
    if reference is None:
        return EMBEDDED_DEFAULT_REFERENCE if pipeline == "embedded" else None
    if reference in SHIPPED_REFERENCES:
        return reference
    path = Path(reference).expanduser().resolve()
    for name, shipped in SHIPPED_REFERENCES.items():
        if path == shipped.resolve():
            return name
    return str(path)


def reference_path(reference: str) -> Path:
    return SHIPPED_REFERENCES.get(reference, Path(reference))


def check_local_pipeline(name: str) -> Path | None:
    """A local pipeline folder (checked), or None for a hub id (owner/name)."""
    path = Path(name).expanduser()
    if not (name.startswith((".", "/", "~")) or path.exists() or name.count("/") > 1):
        return None
    if not path.is_dir():
        raise InputError(f"--pipeline {name!r}: no such folder; allowed: 'embedded', a hub id (owner/name) "
                         "or a local diffusers pipeline folder")
    if not (path / "model_index.json").is_file():
        raise InputError(f"--pipeline {name!r} is not a diffusers pipeline folder (no model_index.json)")
    return path


def check_device(device: str) -> str:
    """The device name, refused with the fix when torch cannot use it here."""
    import torch

    allowed = "cpu, cuda, cuda:N, mps"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"--device {device!r} is not a device name; allowed: {allowed}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device!r}: torch sees no CUDA GPU here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"--device {device!r}: MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise InputError(f"--device {device!r}: not supported; allowed: {allowed}")
    return device


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class RunSpec:
    strategies: list[StrategySpec]
    pipeline: str = "embedded"
    class_labels: list[int] | None = None
    prompts: list[str] | None = None
    num_images: int = 100
    batch_size: int = 50
    seed: int = 0
    steps: int = 50
    scheduler: str | None = None
    metrics: tuple[str, ...] = ("fid", "saturation", "class_accuracy")
    reference: str | None = None
    device: str = field(default_factory=default_device)
    grid_size: int = 64
    clip_model: str | None = None  # open_clip model name (or a local transformers CLIP folder)
    clip_pretrained: str | None = None  # open_clip pretrained tag, or a local weights file

    def __post_init__(self) -> None:
        self.metrics = check_metrics(self.metrics)
        if not isinstance(self.strategies, list) or not self.strategies:
            raise InputError(f"strategies={self.strategies!r}; allowed: a non-empty list of StrategySpec")
        for name in ("num_images", "batch_size", "steps"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise InputError(f"{name}={value!r} is invalid; allowed: an integer >= 1")
        for name in ("seed", "grid_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise InputError(f"{name}={value!r} is invalid; allowed: an integer >= 0")
        if self.num_images > MAX_IMAGES:
            raise InputError(f"num_images={self.num_images} is too many; allowed: at most {MAX_IMAGES:,} per run")
        if self.steps > 10_000:
            raise InputError(f"steps={self.steps} is too many; allowed: at most 10000 (and at most the scheduler's "
                             "training timesteps)")
        for metric, n in MIN_IMAGES.items():
            if metric in self.metrics and self.num_images < n:
                raise InputError(f"num_images={self.num_images} is too few for {metric}; allowed: >= {n}")
        if self.class_labels is not None and (not self.class_labels
                                              or not all(_is_int(c) and c >= 0 for c in self.class_labels)):
            raise InputError(f"class_labels={self.class_labels!r}; allowed: a non-empty list of class ids >= 0")
        if self.prompts is not None and self.class_labels is not None:
            raise InputError("--prompts and --class-labels were both given; a pipeline is conditioned on one")
        if not isinstance(self.pipeline, str) or not self.pipeline.strip():
            raise InputError(f"--pipeline {self.pipeline!r} is empty; allowed: 'embedded', a hub id (owner/name) or a "
                             "local diffusers pipeline folder")
        if self.pipeline != "embedded":
            check_local_pipeline(self.pipeline)
        if self.pipeline != "embedded" and self.prompts is None and self.class_labels is None:
            raise InputError(f"--pipeline {self.pipeline!r} needs --prompts FILE (text-to-image) or --class-labels "
                             "(class-conditional)")
        if self.pipeline == "embedded" and self.prompts is not None:
            raise InputError("--prompts: the embedded pipeline is class-conditional and takes no prompts; "
                             "use --class-labels (or a text-to-image --pipeline)")
        self.reference = canonical_reference(self.reference, self.pipeline)
        labels = [s.label for s in self.strategies]
        twice = sorted({label for label in labels if labels.count(label) > 1})
        if twice:
            raise InputError(f"label(s) {twice} are used by more than one strategy spec; give each spec its own "
                             "label (one spec may list several scales)")
        alike: dict[str, str] = {}
        for label in labels:  # rows that would look the same in a table, though the labels differ
            if _looks(label) in alike:
                raise InputError(f"labels {alike[_looks(label)]!r} and {label!r} differ only in case, spaces or "
                                 "Unicode form, so their rows would look identical; give them labels that differ "
                                 "in a letter or digit")
            alike[_looks(label)] = label
        seen: dict[str, tuple[str, float]] = {}
        for key, _, scale in self.settings():
            # Settings share nothing but their file name: equal names (also up to case, for macOS and
            # Windows file systems) would share one checkpoint and report one setting's numbers twice.
            name = safe_name(key).lower()
            if name in seen:
                other, other_scale = seen[name]
                if other.rsplit("@", 1)[0] == key.rsplit("@", 1)[0]:
                    raise InputError(f"strategy spec {key.rsplit('@', 1)[0]!r} lists the scale {scale_text(scale)} "
                                     "twice (equal numbers are one setting); list each scale once")
                raise InputError(f"settings {other!r} and {key!r} would share the checkpoint file "
                                 f"{safe_name(key)!r}; give them labels that differ in a letter or digit")
            seen[name] = (key, scale)

    def settings(self) -> list[tuple[str, dict | None, float]]:
        return [(f"{s.label}@{scale_text(scale)}", s.strategy, scale) for s in self.strategies for scale in s.scales]

    def identity(self) -> dict:
        """What must match for a run folder to be resumed: everything but the settings (a folder may gain
        settings) and the device. Checkpoints count batches, so the batch size must match too."""
        d = asdict(self)
        for key in ("device", "strategies", "grid_size"):
            d.pop(key)
        d["metrics"] = list(self.metrics)
        return json.loads(json.dumps(d))

    def settings_record(self) -> dict:
        return {key: {"strategy": config, "scale": scale} for key, config, scale in self.settings()}

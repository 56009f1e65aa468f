"""The Python API with inputs a hurried user types (session 5 campaign, inputs not listed in issue 16).

Each case: the call, the error type, and words of the message that name the parameter and the value.
Comments say what the previous code did where this session changed it ("before: ...")."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

import guidance
from guidance import (APG, CFG, GFCG, AdaptiveGuidance, CalibratedClassifierGuidance, ClassifierGuidance, DynamicCFG,
                      Interval, LinearAG, Rescale, Schedule, from_config)
from pipelines import apply_guidance, load_embedded
from pipelines.embedded import WEIGHTS_DIR


def _nested(depth: int) -> dict:
    config = {"name": "CFG", "params": {}}
    for _ in range(depth):
        config = {"name": "Interval", "params": {"inner": config}}
    return config

REFUSED = {
    # --- strategies' constructors
    # before: silently accepted; failed at the first sampling step
    "GFCG unknown classifier name": (lambda: GFCG(classifier="resnet50"), ValueError, "classifier='resnet50'"),
    "EluCD unknown classifier name": (lambda: CalibratedClassifierGuidance(classifier="nope"), ValueError,
                                      "classifier='nope' is not a registered"),
    "ClassifierGuidance unknown name": (lambda: ClassifierGuidance(classifier="x"), ValueError, "classifier='x'"),
    # before: "LinearAG coefficients file '/…' does not exist"
    "LinearAG coefficients a folder": (lambda: LinearAG(str(WEIGHTS_DIR / "linear_ag")), IsADirectoryError,
                                       "linear_ag' is a folder"),
    # unchanged, clear
    "CFG scale a string": (lambda: CFG(scale="3"), ValueError, "scale='3' is invalid"),
    "CFG scale a bool": (lambda: CFG(scale=True), ValueError, "scale=True is invalid"),
    "CFG scale list with a string": (lambda: CFG(scale=[3, "a"]), ValueError, "scale[1]='a'"),
    "CFG scale a 2-D array": (lambda: CFG(scale=np.ones((2, 2))), ValueError, "scale=array("),
    "CFG guidance_rescale a string": (lambda: CFG(guidance_rescale="0.5"), ValueError, "guidance_rescale='0.5'"),
    "APG eta a string": (lambda: APG(eta="0"), ValueError, "eta='0' is invalid"),
    "APG mode None": (lambda: APG(mode=None), ValueError, "mode=None is unknown"),
    "Interval start > stop": (lambda: Interval(CFG(), 0.8, 0.2), ValueError, "stop=0.2 is not above start=0.8"),
    "Interval inner a string": (lambda: Interval("CFG", 0, 0.5), ValueError, "inner='CFG'"),
    "Interval inner the class": (lambda: Interval(CFG, 0, 0.5), ValueError, "inner=<class 'guidance.cfg.CFG'>"),
    "Interval start a string": (lambda: Interval(CFG(), "0", 0.5), ValueError, "start='0'"),
    "Interval sigma_max < sigma_min": (lambda: Interval(CFG(), sigma_min=5, sigma_max=1), ValueError,
                                       "sigma_max=1 is below sigma_min=5"),
    "Rescale phi 1.5": (lambda: Rescale(CFG(), phi=1.5), ValueError, "phi=1.5 is out of range"),
    # before: OverflowError (int too large to convert to float), RecursionError
    "CFG scale a 402-digit integer": (lambda: CFG(scale=10**401), ValueError,
                                      "scale=<an integer of 402 digits> is invalid"),
    "config nested 2000 deep": (lambda: guidance.from_config(_nested(2000)), ValueError,
                                "strategies nested more than 32 deep"),
    "config JSON nested 5000 deep": (lambda: guidance.from_config(
        '{"name": "Interval", "params": {"inner": ' * 5000 + '{"name": "CFG"}' + "}}" * 5000), ValueError,
        "nested too deep to read"),
    "Rescale inner None": (lambda: Rescale(None), ValueError, "inner=None"),
    "AG threshold a bool": (lambda: AdaptiveGuidance(threshold=True), ValueError, "threshold=True"),
    "AG unknown space": (lambda: AdaptiveGuidance(similarity_space="pixel"), ValueError, "similarity_space='pixel'"),
    "GFCG classifier None": (lambda: GFCG(classifier=None), TypeError, "classifier=NoneType"),
    "EluCD scale a string": (lambda: CalibratedClassifierGuidance(classifier="embedded-guidance", scale="x"),
                             ValueError, "scale='x'"),
    "EluCD unknown preset": (lambda: CalibratedClassifierGuidance.preset("sde", "embedded-guidance"), ValueError,
                             "name='sde'"),
    "DynamicCFG NaN candidate": (lambda: DynamicCFG(scales=[float("nan")]), ValueError, "scales[0]=nan"),
    "DynamicCFG unknown evaluator": (lambda: DynamicCFG(evaluators=["nope"]), ValueError, "evaluators[0]='nope'"),
    "LinearAG coefficients an int": (lambda: LinearAG(3), ValueError, "coefficients=3"),
    "Schedule unknown kind": (lambda: Schedule("cubic", 9, 3), ValueError, "kind='cubic'"),
    "Schedule start a string": (lambda: Schedule("linear", "a", 3), ValueError, "start='a'"),
    # --- from_config
    # before: TypeError "unhashable type: 'list'"
    "from_config name a list": (lambda: from_config({"name": ["CFG"]}), ValueError, "name=['CFG'] is not a known"),
    # before: silently accepted (the key was dropped)
    "from_config unknown key": (lambda: from_config({"name": "CFG", "params": {}, "junk": 1}), ValueError,
                                "unknown keys ['junk']"),
    # before: TypeError "cannot convert dictionary update sequence element #0 to a sequence"
    "from_config params a list": (lambda: from_config({"name": "CFG", "params": [1]}), ValueError,
                                  "params=[1] is a list"),
    # before: ValueError "dictionary update sequence element #0 has length 1; 2 is required"
    "from_config params a string": (lambda: from_config({"name": "CFG", "params": "x"}), ValueError,
                                    "params='x' is a str"),
    # before: "inner={'name': 'Nope'} is not a guidance strategy"
    "from_config nested unknown name": (lambda: from_config({"name": "Interval", "params": {"inner": {"name": "Nope"}}}),
                                        ValueError, "params.inner name='Nope' is not a known strategy"),
    # before: KeyError 'kind'
    "from_config schedule without keys": (lambda: from_config({"name": "CFG", "params": {"scale": {"schedule": True}}}),
                                          ValueError, "params.scale={'schedule': True}"),
    "from_config None": (lambda: from_config(None), ValueError, "config=None is malformed"),
    "from_config not JSON": (lambda: from_config("CFG"), ValueError, "config='CFG' is not valid JSON"),
    "from_config a list": (lambda: from_config([{"name": "CFG"}]), ValueError, "config=[{'name': 'CFG'}]"),
    "from_config bytes": (lambda: from_config(b'{"name":"CFG"}'), ValueError, "config=b'"),
    "from_config module path": (lambda: from_config({"name": "os.system"}), ValueError, "name='os.system'"),
    "from_config base class": (lambda: from_config({"name": "GuidanceStrategy"}), ValueError,
                               "name='GuidanceStrategy'"),
    # --- load_embedded
    # before: torch's RuntimeError "Expected one of cpu, cuda, ipu, xpu, ... device type at start of device string"
    "load_embedded device 'gpu'": (lambda: load_embedded(device="gpu"), ValueError, "device='gpu' is not a device"),
    # before: RuntimeError "Found no NVIDIA driver on your system"
    "load_embedded device 5": (lambda: load_embedded(device=5), TypeError, "device=5 is a int"),
    # before: TypeError "attribute name must be string, not 'int'"
    "load_embedded scheduler 3": (lambda: load_embedded("cpu", scheduler=3), ValueError, "scheduler=3"),
    "load_embedded scheduler base class": (lambda: load_embedded("cpu", scheduler="SchedulerMixin"), ValueError,
                                           "scheduler='SchedulerMixin'"),
    # before: TypeError "expected str, bytes or os.PathLike object, not int"
    "load_embedded weights_dir 3": (lambda: load_embedded("cpu", weights_dir=3), TypeError, "weights_dir=3"),
    "load_embedded weights_dir missing": (lambda: load_embedded("cpu", weights_dir="/nonexistent"), FileNotFoundError,
                                          "/nonexistent/pipeline"),
}


@pytest.mark.parametrize("make, error, message", REFUSED.values(), ids=REFUSED.keys())
def test_bad_api_inputs_are_refused_naming_them(make, error, message):
    with pytest.raises(error) as info:
        make()
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize("value, expected", [
    (np.float32(3), 3.0), (np.int64(3), 3.0), (torch.tensor(3.0), 3.0), (np.array(2.5), 2.5),
    (np.array([3.0, 4.0]), [3.0, 4.0]), (torch.tensor([3.0, 4.0]), [3.0, 4.0]),
])
def test_numpy_scalars_and_tensors_are_numbers(value, expected):
    """before: "scale=np.float32(3.0) is invalid; allowed: a finite number" (a finite number)."""
    strategy = CFG(scale=value)
    assert strategy.scale == expected and type(strategy.scale) is type(expected)
    assert from_config(json.loads(json.dumps(strategy.to_config()))).scale == expected  # stays JSON
    assert APG(momentum=np.float32(-0.5)).momentum == -0.5
    schedule = Schedule("linear", np.float32(9), np.int64(3))
    assert json.loads(json.dumps(schedule.to_config()))["start"] == 9.0


@pytest.fixture(scope="module")
def pipe():
    return load_embedded("cpu").pipe


def _call(pipe, **kw):
    with apply_guidance(pipe, APG()):
        return pipe(**{"class_labels": [1, 2], "guidance_scale": 3.0, "num_inference_steps": 1, "output_type": "pt",
                       **kw})


CALL_REFUSED = {
    # before: silently used the first two of three generators
    "three generators for two images": ({"generator": [torch.Generator()] * 3}, "a list of 3 generators for 2 images"),
    "guidance_scale a string": ({"guidance_scale": "3"}, "guidance_scale='3'"),
    "guidance_scale None": ({"guidance_scale": None}, "guidance_scale=None"),
    "class label 11": ({"class_labels": [11]}, "11 is out of range"),
    "class label 1.5": ({"class_labels": [1.5]}, "1.5 is out of range"),
    "no class labels": ({"class_labels": []}, "class_labels=[] is empty"),
    "steps a string": ({"num_inference_steps": "2"}, "num_inference_steps='2'"),
    "steps 0": ({"num_inference_steps": 0}, "num_inference_steps=0"),
    "unknown output_type": ({"output_type": "bogus"}, "output_type='bogus'"),
    "latents of another size": ({"latents": torch.randn(2, 3, 16, 16)}, "latents has shape (2, 3, 16, 16)"),
}


@pytest.mark.parametrize("kw, message", CALL_REFUSED.values(), ids=CALL_REFUSED.keys())
def test_bad_call_arguments_under_the_hook(pipe, kw, message):
    with pytest.raises(ValueError) as info:
        _call(pipe, **kw)
    assert message in str(info.value), str(info.value)


def test_one_generator_for_all_images_is_diffusers_semantics(pipe):
    # diffusers' randn_tensor treats a one-element list as one generator: accepted, and equal to it
    a = _call(pipe, generator=[torch.Generator().manual_seed(0)]).images
    b = _call(pipe, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(a, b)


@pytest.mark.parametrize("strategy, pipe_arg, error, message", [
    ("CFG", "PIPE", TypeError, "strategy='CFG' is not a guidance.GuidanceStrategy"),
    (CFG, "PIPE", TypeError, "strategy=<class 'guidance.cfg.CFG'>"),
    (None, "PIPE", TypeError, "strategy=None"),
    ({"name": "CFG"}, "PIPE", TypeError, "strategy={'name': 'CFG'}"),
    (CFG(), "pipe", TypeError, "pipe=str is not in guidance-kit's pipeline table (not a diffusers pipeline)"),
    (CFG(), "UNET", TypeError, "pipe=UNet2DModel is not in guidance-kit's pipeline table (not a diffusers pipeline)"),
])
def test_apply_guidance_with_wrong_types(pipe, strategy, pipe_arg, error, message):
    target = {"PIPE": pipe, "UNET": pipe.unet}.get(pipe_arg, pipe_arg)
    with pytest.raises(error) as info:
        apply_guidance(target, strategy)
    assert message in str(info.value)


def test_applying_twice_is_refused(pipe):
    with apply_guidance(pipe, CFG()):
        with pytest.raises(RuntimeError, match="already has a guidance strategy applied; remove"):
            apply_guidance(pipe, CFG())


@pytest.mark.parametrize("case", ["nested class_labels", "2-D class_labels tensor", "meta latents",
                                  "callback returns other shape"])
def test_pipeline_inputs_that_only_show_at_run_time_are_named(case):
    """Before: TypeError int() argument..., Tensor.item() on meta tensors, a size mismatch deep in the step."""
    pipe = load_embedded("cpu").pipe
    kwargs = dict(class_labels=[0, 1], num_inference_steps=3, output_type="pt")
    if case == "nested class_labels":
        kwargs["class_labels"], message = [[0, 1], [2, 3]], "is a sequence inside class_labels"
    elif case == "2-D class_labels tensor":
        kwargs["class_labels"], message = torch.tensor([[0, 1], [2, 3]]), "is a sequence inside class_labels"
    elif case == "meta latents":
        kwargs["latents"], message = torch.empty(2, 3, 32, 32, device="meta"), "latents are on the meta device"
    else:
        kwargs["callback_on_step_end"] = lambda p, i, t, tensors: {"latents": tensors["latents"][:1]}
        message = r"callback_on_step_end returned latents of shape \(1, 3, 32, 32\) at step 0"
    for hooked in (False, True):
        with (apply_guidance(pipe, CFG()) if hooked else contextlib.nullcontext()):
            with pytest.raises(ValueError, match=message):
                pipe(**kwargs)


def test_a_guider_used_before_prepare_inputs_says_so():
    from pipelines.guider import StrategyGuider

    guider = StrategyGuider(CFG(), guidance_scale=3.0)
    with pytest.raises(RuntimeError, match="forward was called before prepare_inputs"):
        guider.forward(torch.zeros(2, 4), torch.ones(2, 4))


@pytest.mark.parametrize("where", ["parameter", "environment"])
def test_inception_weights_of_another_network_are_named(tmp_path, monkeypatch, where):
    """Before: a state-dict error listing dozens of missing keys, naming neither the setting nor the file."""
    from evaluation import INCEPTION_ENV, InceptionFeatures

    other = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, other)
    if where == "environment":
        monkeypatch.setenv(INCEPTION_ENV, str(other))
        with pytest.raises(ValueError, match=rf"{INCEPTION_ENV}='.*other.pt' holds another network's weights"):
            InceptionFeatures(device="cpu")
    else:
        with pytest.raises(ValueError, match=r"inception='.*other.pt' holds another network's weights"):
            InceptionFeatures(other, device="cpu")

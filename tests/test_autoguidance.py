"""Autoguidance (Karras et al. 2024): the GUIDE branch of the hook, the strategy, and GFCG on top of it.

The guide models here are tiny random copies of the pipelines' denoisers with fewer channels / layers
(the interface of the family, the capacity of a "bad version"); the embedded model's trained guide is
not needed to test the plumbing.
"""

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from test_classifier_guidance import Constant
from test_hook import count_rows
from test_strategies import make_ctx, random_preds
from tiny_pipelines import build, call_kwargs, denoiser

from guidance import CFG, COND, GFCG, GUIDE, REF, UNCOND, Autoguidance, Interval, from_config
from pipelines import apply_guidance, load_embedded, register_guide_model
from pipelines.guide import GUIDE_MODELS

STEPS = 4


def smaller(model: torch.nn.Module, seed: int = 0, **changes) -> torch.nn.Module:
    """A random model of the same class and interface as `model`, with the config `changes` (capacity)."""
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return type(model).from_config({**config, **changes}).eval()


@pytest.fixture(scope="module")
def embedded():
    return load_embedded("cpu")


@pytest.fixture(scope="module")
def guide(embedded):
    return smaller(embedded.pipe.unet, block_out_channels=[16, 32, 32])


def sample(pipe, strategy=None, guide_model=None, labels=(0, 1), seeds=(3, 4), scale=3.0, steps=STEPS):
    """Images and the handle (None for the native pipeline)."""
    kw = dict(class_labels=list(labels), guidance_scale=scale, num_inference_steps=steps, output_type="pt",
              generator=[torch.Generator().manual_seed(s) for s in seeds])
    if strategy is None:
        return pipe(**kw).images, None
    with apply_guidance(pipe, strategy, guide_model=guide_model) as handle:
        images = pipe(**kw).images
    return images, handle


def counted(pipe, strategy, guide_model, **kw):
    """Images, handle and the rows each model really evaluated (counted at its own forward)."""
    main, other = count_rows(pipe.unet), count_rows(guide_model)
    try:
        images, handle = sample(pipe, strategy, guide_model, **kw)
    finally:
        del pipe.unet.forward, guide_model.forward
    return images, handle, main["rows"], other["rows"]


# --- the rule ------------------------------------------------------------------------------------------

def test_rule_is_the_papers_lerp_and_mix_splits_the_total_weight_with_cfg():
    ctx = make_ctx(scale=2.5)
    preds = random_preds() | {GUIDE: random_preds(seed=7)[COND]}
    c, u, d0 = preds[COND], preds[UNCOND], preds[GUIDE]
    assert torch.equal(Autoguidance().combine(ctx, preds), d0 + 2.5 * (c - d0))
    torch.testing.assert_close(Autoguidance(scale=4.0).combine(ctx, preds), torch.lerp(d0, c, 4.0))
    assert torch.equal(Autoguidance(mix=0.0).combine(ctx, preds), CFG().combine(ctx, preds))
    w, a = 3.0, 0.25
    mixed = Autoguidance(scale=w, mix=a).combine(ctx, preds)
    torch.testing.assert_close(mixed, c + (w - 1) * (a * (c - d0) + (1 - a) * (c - u)))
    # only the branches the mix needs
    assert set(Autoguidance().branches(ctx)) == {COND, GUIDE}
    assert set(Autoguidance(mix=0.5).branches(ctx)) == {COND, GUIDE, UNCOND}
    assert set(Autoguidance(mix=0.0).branches(ctx)) == {COND, UNCOND}


def test_parameters_are_checked_and_configs_round_trip():
    s = Autoguidance(scale=2.0, mix=0.75, guide_model="embedded")
    assert from_config(s.to_config()).to_config() == s.to_config()
    wrapped = GFCG("embedded-guidance", scale=1.5, inner=Interval(Autoguidance(scale=2.0), start=0.2))
    assert from_config(wrapped.to_config()).to_config() == wrapped.to_config()
    with pytest.raises(ValueError, match=r"Autoguidance: mix=1.5 is out of range; allowed: a finite number in \[0, 1"):
        Autoguidance(mix=1.5)
    with pytest.raises(ValueError, match=r"guide_model=UNet2DModel object; allowed: None \(then pass the model to"):
        Autoguidance(guide_model=UNet2DModel(block_out_channels=(8,), down_block_types=("DownBlock2D",),
                                             up_block_types=("UpBlock2D",), norm_num_groups=8))
    assert "embedded" in GUIDE_MODELS  # the embedded package registers its guide model's name


# --- the hook, batched layout (the embedded pipeline) ---------------------------------------------------

@pytest.mark.parametrize("scale", [3.0, 7.5])
def test_the_main_model_as_its_own_guide_is_the_conditional_model(embedded, scale):
    pipe = embedded.pipe
    cond, _ = sample(pipe, scale=1.0)  # the pipeline without CFG: its conditional model
    images, handle = sample(pipe, Autoguidance(), guide_model=pipe.unet, scale=scale)
    assert torch.equal(images, cond)
    assert handle.nfe.tolist() == [STEPS, STEPS] and handle.guide_nfe.tolist() == [STEPS, STEPS]


def test_nfe_counts_each_model_at_its_own_forward_and_removal_is_bit_identical(embedded, guide):
    pipe = embedded.pipe
    native, _ = sample(pipe)
    images, handle, main_rows, guide_rows = counted(pipe, Autoguidance(), guide)
    assert handle.nfe.tolist() == [STEPS, STEPS] and main_rows == 2 * STEPS  # the unconditional rows are skipped
    assert handle.guide_nfe.tolist() == [STEPS, STEPS] and guide_rows == 2 * STEPS
    assert handle.guide_nfe_per_sample == STEPS
    assert not torch.equal(images, native) and not torch.equal(images, sample(pipe, scale=1.0)[0])
    _, handle, main_rows, guide_rows = counted(pipe, Autoguidance(mix=0.5), guide)  # + CFG: 3 rows a step
    assert handle.nfe.tolist() == [2 * STEPS] * 2 and main_rows == 4 * STEPS
    assert handle.guide_nfe.tolist() == [STEPS] * 2 and guide_rows == 2 * STEPS
    with apply_guidance(pipe, CFG()) as handle:  # no guide model: nothing reported for it
        pipe(class_labels=[0], num_inference_steps=1, output_type="pt")
    assert handle.guide_nfe is None and handle.guide_nfe_per_sample is None
    after, _ = sample(pipe)
    assert torch.equal(after, native) and "forward" not in vars(guide)


def test_the_guide_runs_at_the_conditional_inputs(embedded, guide):
    pipe = embedded.pipe
    s = Autoguidance(scale=2.0)
    seen = []
    original = s.combine

    def spy(ctx, preds):
        seen.append((ctx.x.clone(), ctx.timestep, {k: v.clone() for k, v in preds.items()}, original(ctx, preds)))
        return seen[-1][-1]

    s.combine = spy
    sample(pipe, s, guide, labels=(2, 9))
    x, t, preds, out = seen[1]
    direct = guide(x, int(t), class_labels=torch.tensor([2, 9])).sample
    torch.testing.assert_close(preds[GUIDE], direct, atol=1e-5, rtol=0)
    assert torch.isnan(preds[UNCOND]).all()  # not evaluated: NaN, so misuse is loud
    torch.testing.assert_close(out, direct + 2.0 * (preds[COND] - direct), atol=1e-5, rtol=0)


def test_a_batch_is_its_samples_alone(embedded, guide):
    pipe = embedded.pipe
    for strategy in (Autoguidance(), Autoguidance(mix=0.5)):
        both, _ = sample(pipe, strategy, guide, labels=(0, 1), seeds=(3, 4))
        alone = torch.cat([sample(pipe, strategy, guide, labels=(lab,), seeds=(seed,))[0]
                           for lab, seed in ((0, 3), (1, 4))])
        torch.testing.assert_close(both, alone, atol=1e-5, rtol=0)


def test_interval_runs_the_guide_only_inside_it(embedded, guide):
    pipe = embedded.pipe
    images, handle, main_rows, guide_rows = counted(pipe, Interval(Autoguidance(), start=0.5), guide)
    assert handle.guide_nfe.tolist() == [STEPS // 2] * 2 and guide_rows == STEPS
    assert handle.nfe.tolist() == [STEPS] * 2 and main_rows == 2 * STEPS
    assert not torch.equal(images, sample(pipe, scale=1.0)[0])


def test_incompatible_guide_models_are_refused_up_front(embedded, guide):
    pipe = embedded.pipe
    native, _ = sample(pipe, steps=1)
    cases = [
        (smaller(pipe.unet, in_channels=4, out_channels=4), ValueError,
         r"has in_channels=4 but ClassConditionalPipeline's denoiser UNet2DModel has in_channels=3"),
        (smaller(pipe.unet, num_class_embeds=5), ValueError, r"num_class_embeds=5 .* num_class_embeds=11"),
        (smaller(pipe.unet, sample_size=16), ValueError, r"sample_size=16"),
        (lambda x: x, TypeError, r"guide_model=function is not a torch.nn.Module"),
    ]
    for bad, error, message in cases:
        with pytest.raises(error, match=message):
            apply_guidance(pipe, Autoguidance(), guide_model=bad)
    v_guide = smaller(pipe.unet)
    v_guide.register_to_config(prediction_type="v_prediction")
    with pytest.raises(ValueError, match=r"guide_model predicts 'v_prediction' but .* scheduler expects 'epsilon'"):
        apply_guidance(pipe, Autoguidance(), guide_model=v_guide)
    with pytest.raises(ValueError, match=r"Autoguidance needs a guide model and none was given"):
        apply_guidance(pipe, Autoguidance())
    with pytest.raises(ValueError, match=r"guide_model='nowhere' is not a registered guide model"):
        apply_guidance(pipe, Autoguidance(guide_model="nowhere"))
    with pytest.raises(ValueError, match=r"given to apply_guidance and Autoguidance also names"):
        apply_guidance(pipe, Autoguidance(guide_model="embedded"), guide_model=guide)
    # device / dtype: refused at the call with the fix, the pipeline left as it was
    with pytest.raises(ValueError, match=r"guide_model is on cpu in torch.float64 but .* runs on cpu in torch.float32; "
                                         r"move it first: guide_model.to\('cpu', torch.float32\)"):
        sample(pipe, Autoguidance(), smaller(pipe.unet).double())
    assert torch.equal(sample(pipe, steps=1)[0], native)  # the refused call left the pipeline as it was
    for unused in (CFG(), Autoguidance(mix=0.0)):
        with pytest.raises(ValueError, match=r"guide_model was given but (CFG|Autoguidance) never asks for"):
            apply_guidance(pipe, unused, guide_model=guide)
    with apply_guidance(pipe, Autoguidance(mix=0.0)) as handle:  # mix=0 is CFG: no guide model needed
        pipe(class_labels=[0], num_inference_steps=1, output_type="pt")
    assert handle.guide_nfe is None


def test_a_registered_guide_model_is_loaded_by_name_and_placed(embedded, guide):
    pipe = embedded.pipe
    loads = []
    loaded = smaller(pipe.unet, block_out_channels=[16, 32, 32]).double()  # ours to move: loaded by name
    register_guide_model("test-tiny-guide", lambda: loads.append(1) or loaded)
    try:
        by_name, handle = sample(pipe, Autoguidance(guide_model="test-tiny-guide"))
        sample(pipe, Autoguidance(guide_model="test-tiny-guide"), steps=1)
    finally:
        del GUIDE_MODELS["test-tiny-guide"]
    assert loaded.dtype == torch.float32 and handle.guide_nfe.tolist() == [STEPS, STEPS]
    assert len(loads) == 1  # loaded once, reused by later strategies that name it
    torch.testing.assert_close(by_name, sample(pipe, Autoguidance(), guide)[0], atol=1e-6, rtol=0)


# --- GFCG on top of autoguidance ---------------------------------------------------------------------

def test_gfcg_with_autoguidance_pushes_from_the_reference_class(embedded, guide):
    pipe = embedded.pipe
    atg, _ = sample(pipe, Autoguidance(), guide, labels=(0, 5))
    s = GFCG(Constant(5), scale=1.5, adaptive="constant", inner=Autoguidance())  # always "sure" it is class 5
    seen = []
    original = s.combine

    def spy(ctx, preds):
        seen.append(({k: v.clone() for k, v in preds.items()}, original(ctx, preds)))
        return seen[-1][-1]

    s.combine = spy
    images, handle, main_rows, guide_rows = counted(pipe, s, guide, labels=(0, 5))
    # main model: cond every step + the reference from step 1 on; the guide: every step; no unconditional row
    assert handle.nfe.tolist() == [STEPS + STEPS - 1] * 2 and main_rows == 2 * (2 * STEPS - 1)
    assert handle.guide_nfe.tolist() == [STEPS] * 2 and guide_rows == 2 * STEPS
    preds, out = seen[2]
    c, d0, r = preds[COND], preds[GUIDE], preds[REF]
    torch.testing.assert_close(out, d0 + 3.0 * (c - d0) + 1.5 * (c - r), atol=1e-5, rtol=1e-5)
    assert not torch.equal(images, atg)
    # with the real guidance classifier too: a different result from ATG alone
    real, _ = sample(pipe, GFCG(embedded.guidance_classifier, scale=2.0, inner=Autoguidance()), guide, labels=(0, 5))
    assert torch.isfinite(real).all() and not torch.equal(real, atg)


# --- other layouts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, capacity", [("sd", dict(block_out_channels=(4, 8), attention_head_dim=2,
                                                        norm_num_groups=2)),
                                            ("dit", dict(num_layers=1)),
                                            ("flux", dict(num_layers=1, num_single_layers=0))])
def test_batched_sd_and_dit_and_sequential_flux(name, capacity):
    """[uncond; cond] (SD), [cond; uncond] with learned sigma (DiT), two calls per step (Flux true CFG)."""
    pipe = build(name)
    model = denoiser(pipe)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    cond = pipe(**call_kwargs(name, cfg=False), generator=gen()).images
    kw = call_kwargs(name)
    with apply_guidance(pipe, Autoguidance(scale=4.0), guide_model=model) as handle:
        self_guided = pipe(**kw, generator=gen()).images
    torch.testing.assert_close(self_guided, cond, atol=1e-6, rtol=0)  # the main model guiding itself: cond
    assert handle.nfe.tolist() == [3, 3] and handle.guide_nfe.tolist() == [3, 3]
    other = smaller(model, seed=1, **capacity)
    main_rows, guide_rows = count_rows(model), count_rows(other)
    try:
        with apply_guidance(pipe, Autoguidance(scale=4.0), guide_model=other) as handle:
            guided = pipe(**kw, generator=gen()).images
    finally:
        del model.forward, other.forward
    assert handle.nfe.tolist() == [3, 3] and main_rows["rows"] == 6
    assert handle.guide_nfe.tolist() == [3, 3] and guide_rows["rows"] == 6
    assert torch.isfinite(guided).all() and not torch.allclose(guided, cond, atol=1e-3)
    rows = count_rows(other)
    try:
        with apply_guidance(pipe, Interval(Autoguidance(scale=4.0), start=0.5), guide_model=other) as handle:
            pipe(**kw, generator=gen())
    finally:
        del other.forward
    assert handle.guide_nfe.tolist() == [2, 2] and rows["rows"] == 4  # steps 1 and 2 of 3
    assert isinstance(model, UNet2DConditionModel) == (name == "sd")
    if name == "sd":  # a guide that cannot take the text embeddings is refused at the call, by name
        unconditional = UNet2DModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8,),
                                    down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4)
        with apply_guidance(pipe, Autoguidance(), guide_model=unconditional.eval()):
            with pytest.raises(ValueError, match=r"UNet2DModel.forward takes no .*encoder_hidden_states.*, which "
                                                 r"StableDiffusionPipeline passes to its denoiser"):
                pipe(**kw, generator=gen())
    if name == "dit":  # a class-embedding table of another size is refused
        with pytest.raises(ValueError, match=r"num_embeds_ada_norm=10 but DiTPipeline's denoiser"):
            apply_guidance(pipe, Autoguidance(), guide_model=smaller(model, num_embeds_ada_norm=10))

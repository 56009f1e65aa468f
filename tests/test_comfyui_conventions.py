"""Settings brought from ComfyUI give ComfyUI's result: each node's math re-implemented here from reading its
source (file and function cited), against our strategy with the documented knob, on random predictions.

ComfyUI's sampler hands these hooks the *denoised* predictions D (x0) and its unscaled VE input x = x0 + sigma
eps; our strategies see an epsilon model's prediction at the VP-scaled input alpha x. Each test builds both views
of the same numbers.
"""

from __future__ import annotations

import pytest
import torch

from guidance import APG, CFG, COND, UNCOND, Parametrization, Rescale, StepContext

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

B, SHAPE = 3, (4, 8, 8)


def views(sigma: float, seed: int):
    """(ComfyUI's x, D_c, D_u) and (our StepContext, eps predictions) of the same sample at VE noise `sigma`."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, *SHAPE, generator=g, dtype=torch.float64)
    x = x0 + sigma * torch.randn(B, *SHAPE, generator=g, dtype=torch.float64)  # ComfyUI's input
    d_c = x0 + 0.3 * torch.randn(B, *SHAPE, generator=g, dtype=torch.float64)
    d_u = 0.7 * d_c + 0.4 * torch.randn(B, *SHAPE, generator=g, dtype=torch.float64)
    alpha, sig_vp = (1 + sigma**2) ** -0.5, sigma * (1 + sigma**2) ** -0.5
    full = lambda v: torch.full((B, 1, 1, 1), v, dtype=torch.float64)  # noqa: E731
    ctx = StepContext(0, 10, 500.0, Parametrization("epsilon", alpha * x, full(alpha), full(sig_vp)))
    eps = lambda d: (x - d) / sigma  # noqa: E731  eps of the VP model at input alpha x
    return (x, d_c, d_u), ctx, {COND: eps(d_c), UNCOND: eps(d_u)}


def comfyui_apg(d_c, d_u, cond_scale, eta, norm_threshold, momentum, state):
    """comfy_extras/nodes_apg.py, APG.patch.pre_cfg_function, then ComfyUI's CFG on its output
    (uncond + cond_scale * (modified_cond - uncond))."""
    guidance = d_c - d_u
    if momentum > 0:
        state["avg"] = guidance if state.get("avg") is None else momentum * state["avg"] + guidance
        guidance = state["avg"]
    if norm_threshold > 0:
        norm = guidance.norm(p=2, dim=[-1, -2, -3], keepdim=True)
        guidance = guidance * torch.minimum(torch.ones_like(norm), norm_threshold / norm)
    unit = torch.nn.functional.normalize(d_c, dim=[-1, -2, -3])
    parallel = (guidance * unit).sum(dim=[-1, -2, -3], keepdim=True) * unit
    modified = (guidance - parallel) + eta * parallel
    modified_cond = (d_u + modified) + (d_c - d_u) / cond_scale
    return d_u + cond_scale * (modified_cond - d_u)


@pytest.mark.parametrize("eta, r, momentum", [(1.0, 5.0, 0.0), (0.0, 2.0, 0.5), (0.3, 0.0, 0.2)])
def test_apg_from_comfyui_equals_the_node(eta, r, momentum):
    cfg, state = 4.0, {}
    ours = APG.from_comfyui(cfg, eta=eta, norm_threshold=r, momentum=momentum)
    assert ours.to_config()["params"]["scale"] == cfg + 1  # the node's cfg counts one lower than the paper's w
    for step, sigma in enumerate([8.0, 3.0, 1.0, 0.3]):
        (x, d_c, d_u), ctx, preds = views(sigma, seed=step)
        expected = comfyui_apg(d_c, d_u, cfg, eta, r, momentum, state)
        got = ctx.to_x0(ours.combine(ctx, preds))
        # 1e-6: our norm threshold is taken in float32 (fp16 norms of whole latents overflow)
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max())), step
    paper_at_cfg = APG(scale=cfg, eta=eta, norm_threshold=r, momentum=momentum)
    assert not torch.allclose(ctx.to_x0(paper_at_cfg.combine(ctx, preds)), expected, atol=1e-3)


def comfyui_rescale_cfg(x_orig, cond, uncond, cond_scale, sigma, multiplier):
    """comfy_extras/nodes_model_advanced.py, RescaleCFG.patch.rescale_cfg: `cond`/`uncond` are x - D (what
    ComfyUI's sampler_cfg_function receives), the result is x - D_final."""
    x = x_orig / (sigma * sigma + 1.0)
    cond = (x - (x_orig - cond)) * (sigma**2 + 1.0) ** 0.5 / sigma  # v-prediction
    uncond = (x - (x_orig - uncond)) * (sigma**2 + 1.0) ** 0.5 / sigma
    x_cfg = uncond + cond_scale * (cond - uncond)
    ratio = torch.std(cond, dim=(1, 2, 3), keepdim=True) / torch.std(x_cfg, dim=(1, 2, 3), keepdim=True)
    x_final = multiplier * (x_cfg * ratio) + (1.0 - multiplier) * x_cfg
    return x_orig - (x - x_final * sigma / (sigma * sigma + 1.0) ** 0.5)


@pytest.mark.parametrize("sigma", [10.0, 1.5, 0.2])
def test_rescale_in_v_space_equals_comfyuis_rescale_cfg(sigma):
    (x, d_c, d_u), ctx, preds = views(sigma, seed=7)
    phi, w = 0.7, 6.0
    returned = comfyui_rescale_cfg(x, x - d_c, x - d_u, w, sigma, phi)
    expected = x - returned  # ComfyUI's cfg_function: denoised = x - sampler_cfg_function(args)
    ours = ctx.to_x0(Rescale(CFG(w), phi, rescale_space="v").combine(ctx, preds))
    assert torch.allclose(ours, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))
    model_space = ctx.to_x0(Rescale(CFG(w), phi).combine(ctx, preds))  # diffusers' convention: another result
    assert not torch.allclose(model_space, expected, atol=1e-3)


def test_rescale_v_space_refuses_flow_models_and_unknown_spaces():
    x = torch.randn(2, 4, 4, 4)
    s = torch.full((2, 1, 1, 1), 0.5, dtype=torch.float64)
    ctx = StepContext(0, 10, 500.0, Parametrization("flow", x, 1 - s, s))
    preds = {COND: torch.randn_like(x), UNCOND: torch.randn_like(x)}
    with pytest.raises(ValueError, match="rescale_space='v' rescales the v-prediction of a VP model"):
        Rescale(CFG(3.0), 0.7, rescale_space="v").combine(ctx, preds)
    with pytest.raises(ValueError, match=r"Rescale: rescale_space='eps' is unknown; allowed: model, v"):
        Rescale(CFG(), rescale_space="eps")
    with pytest.raises(ValueError, match=r"APG.from_comfyui: cfg=nan is invalid"):
        APG.from_comfyui(float("nan"))


def comfyui_cfg_norm(d_c, denoised, strength):
    """comfy_extras/nodes_cfg.py, CFGNorm.execute.cfg_norm (a post-CFG function on denoised predictions)."""
    norm_full_cond = torch.norm(d_c, dim=1, keepdim=True)
    norm_pred_text = torch.norm(denoised, dim=1, keepdim=True)
    return denoised * (norm_full_cond / (norm_pred_text + 1e-8)).clamp(min=0.0, max=1.0) * strength


def comfyui_mahiro(d_c, d_u, denoised, scale):
    """comfy_extras/nodes_mahiro.py, Mahiro.patch.mahiro_normd (a post-CFG function on denoised predictions)."""
    leap, u_leap = d_c * scale, d_u * scale
    merge = (leap + denoised) / 2
    normu = torch.sqrt(u_leap.abs()) * u_leap.sign()
    normm = torch.sqrt(merge.abs()) * merge.sign()
    simsc = 2 * (torch.nn.functional.cosine_similarity(normu, normm).mean() + 1)
    return (simsc * denoised + (4 - simsc) * leap) / 4


@pytest.mark.parametrize("strength", [1.0, 0.8])
def test_cfg_norm_equals_the_node(strength):
    from guidance import CFGNorm

    (x, d_c, d_u), ctx, preds = views(2.0, seed=3)
    w = 7.0
    expected = comfyui_cfg_norm(d_c, d_u + w * (d_c - d_u), strength)
    ours = ctx.to_x0(CFGNorm(w, strength).combine(ctx, preds))
    assert torch.allclose(ours, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))
    assert not torch.allclose(ours, ctx.to_x0(CFG(w).combine(ctx, preds)), atol=1e-3)  # the norm cap binds here


def test_mahiro_equals_the_node_on_its_batch_and_is_per_sample_by_default():
    from guidance import Mahiro

    (x, d_c, d_u), ctx, preds = views(1.0, seed=4)
    w = 5.0
    expected = comfyui_mahiro(d_c, d_u, d_u + w * (d_c - d_u), w)
    batch_mean = ctx.to_x0(Mahiro(w, per_sample=False).combine(ctx, preds))
    assert torch.allclose(batch_mean, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))
    ours = ctx.to_x0(Mahiro(w).combine(ctx, preds))
    alone = comfyui_mahiro(d_c[:1], d_u[:1], d_u[:1] + w * (d_c[:1] - d_u[:1]), w)  # the node on sample 0 alone
    assert torch.allclose(ours[:1], alone, rtol=1e-9, atol=1e-9 * float(alone.abs().max()))
    assert not torch.allclose(ours, batch_mean, atol=1e-6)


def test_channel_norm_rules_refuse_packed_latents():
    from guidance import CFGNorm, Mahiro

    x = torch.randn(2, 16, 8)
    s = torch.full((2, 1, 1), 0.5, dtype=torch.float64)
    ctx = StepContext(0, 10, 500.0, Parametrization("epsilon", x, s, s))
    preds = {COND: torch.randn_like(x), UNCOND: torch.randn_like(x)}
    for rule in (CFGNorm(3.0), Mahiro(3.0)):
        with pytest.raises(ValueError, match=r"over the channels of \(B, C, H, W\) latents.*\(2, 16, 8\)"):
            rule.combine(ctx, preds)


def comfyui_cfg_zero_star(x, d_c, d_u, cond_scale):
    """comfy_extras/nodes_cfg.py, CFGZeroStar.execute.cfg_zero_star (a post-CFG function on denoised predictions;
    `out` is ComfyUI's CFG of them, optimized_scale the per-sample <a, b> / (||b||^2 + 1e-8))."""
    pos, neg = (x - d_c).flatten(1), (x - d_u).flatten(1)
    alpha = ((pos * neg).sum(1) / ((neg**2).sum(1) + 1e-8)).view(-1, 1, 1, 1)
    out = d_u + cond_scale * (d_c - d_u)
    return out + d_u * (alpha - 1.0) + cond_scale * d_u * (1.0 - alpha)


def flow_views(sigma: float, seed: int):
    """ComfyUI's CONST (flow) model: x = (1 - sigma) x0 + sigma eps and D = x - sigma v; our flow context."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *SHAPE, generator=g, dtype=torch.float64)
    v_c = torch.randn(B, *SHAPE, generator=g, dtype=torch.float64)
    v_u = 0.6 * v_c + 0.5 * torch.randn(B, *SHAPE, generator=g, dtype=torch.float64)
    s = torch.full((B, 1, 1, 1), sigma, dtype=torch.float64)
    ctx = StepContext(0, 10, 500.0, Parametrization("flow", x, 1 - s, s))
    return (x, x - sigma * v_c, x - sigma * v_u), ctx, {COND: v_c, UNCOND: v_u}


@pytest.mark.parametrize("make_views, sigma", [(views, 4.0), (views, 0.5), (flow_views, 0.8), (flow_views, 0.2)])
def test_cfg_zero_star_from_comfyui_equals_the_node(make_views, sigma):
    from guidance import CFGZeroStar

    (x, d_c, d_u), ctx, preds = make_views(sigma, seed=11)
    w = 5.0
    expected = comfyui_cfg_zero_star(x, d_c, d_u, w)
    ours = CFGZeroStar.from_comfyui(w)
    assert ours.zero_init_steps == 0 and ours.x0_space
    got = ctx.to_x0(ours.combine(ctx, preds))
    # 1e-6: s* is fitted in float32, as diffusers' guider does (the node fits in the input's dtype)
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
    paper = ctx.to_x0(CFGZeroStar(w, zero_init_steps=0).combine(ctx, preds))  # s* on the prediction itself
    assert not torch.allclose(paper, expected, atol=1e-3)


def webui_mimic(cond, uncond, cfg_scale, mimic_scale, percentile, sep_feat_channels, startpoint, measure, phi):
    """sd-dynamic-thresholding (mcmonkeyprojects), dynthres_core.py, DynThresh.dynthresh with constant modes, one
    cond per uncond and no weights; cond / uncond are the denoised predictions (WebUI's combine_denoised, the
    ComfyUI node's input - args["cond"])."""
    relative = cond - uncond
    mim_target, cfg_target = uncond + relative * mimic_scale, uncond + relative * cfg_scale
    mim_flat, cfg_flat = mim_target.flatten(2), cfg_target.flatten(2)
    mim_centered = mim_flat - mim_flat.mean(dim=2).unsqueeze(2)
    cfg_means = cfg_flat.mean(dim=2).unsqueeze(2)
    cfg_centered = cfg_flat - cfg_means
    if sep_feat_channels:
        if measure == "STD":
            mim_ref, cfg_ref = mim_centered.std(dim=2).unsqueeze(2), cfg_centered.std(dim=2).unsqueeze(2)
        else:
            mim_ref = mim_centered.abs().max(dim=2).values.unsqueeze(2)
            cfg_ref = torch.quantile(cfg_centered.abs(), percentile, dim=2).unsqueeze(2)
    elif measure == "STD":
        mim_ref, cfg_ref = mim_centered.std(), cfg_centered.std()
    else:
        mim_ref, cfg_ref = mim_centered.abs().max(), torch.quantile(cfg_centered.abs(), percentile)
    if startpoint == "ZERO":
        result = cfg_flat * (mim_ref / cfg_ref)
    elif measure == "STD":
        result = (cfg_centered / cfg_ref) * mim_ref + cfg_means
    else:
        top = torch.maximum(mim_ref, cfg_ref)
        result = (cfg_centered.clamp(-top, top) / top) * mim_ref + cfg_means
    out = result.unflatten(2, mim_target.shape[2:])
    return out * phi + cfg_target * (1.0 - phi) if phi != 1.0 else out


MIMIC_SETTINGS = [dict(), dict(threshold_percentile=0.9), dict(variability_measure="STD"),
                  dict(scaling_startpoint="ZERO", threshold_percentile=0.95), dict(interpolate_phi=0.7),
                  dict(separate_feature_channels=False, threshold_percentile=0.99)]


@pytest.mark.parametrize("settings", MIMIC_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_mimic_scale_thresholding_equals_the_webui_extension(settings):
    from guidance import MimicScaleThresholding

    (x, d_c, d_u), ctx, preds = views(2.0, seed=12)
    w, mimic = 15.0, 5.0
    rows = slice(None) if settings.get("separate_feature_channels", True) else slice(0, 1)  # it pools the batch
    ours = MimicScaleThresholding(w, mimic_scale=mimic, **settings)
    got = ctx.to_x0(ours.combine(ctx, preds))[rows]
    expected = webui_mimic(d_c[rows], d_u[rows], w, mimic, settings.get("threshold_percentile", 1.0),
                           settings.get("separate_feature_channels", True), settings.get("scaling_startpoint", "MEAN"),
                           settings.get("variability_measure", "AD"), settings.get("interpolate_phi", 1.0))
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))
    assert not torch.allclose(got, ctx.to_x0(CFG(w).combine(ctx, preds))[rows], atol=1e-2)  # it changes CFG here


def test_mimic_scale_modes_follow_the_step_and_bad_settings_are_refused():
    from guidance import MimicScaleThresholding

    (x, d_c, d_u), ctx, preds = views(2.0, seed=13)
    last = StepContext(9, 10, 20.0, ctx.param, scheduler_step=9, num_scheduler_steps=10)
    down = MimicScaleThresholding(15.0, mimic_scale=5.0, cfg_mode="Linear Down", cfg_scale_min=3.0,
                                  mimic_mode="Cosine Down", mimic_scale_min=2.0)
    # at the last step "Linear Down" reaches its minimum and "Cosine Down" cos(1.5707) ~ 8e-5 of the way above it
    expected = webui_mimic(d_c, d_u, 3.0, 2.0 + 3.0 * torch.cos(torch.tensor(1.5707, dtype=torch.float64)).item(),
                           1.0, True, "MEAN", "AD", 1.0)
    got = last.to_x0(down.combine(last, preds))
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))
    with pytest.raises(ValueError, match=r"MimicScaleThresholding: mimic_mode='Linear' is invalid; allowed: 'Constant'"):
        MimicScaleThresholding(mimic_mode="Linear")
    with pytest.raises(ValueError, match=r"MimicScaleThresholding: threshold_percentile=1.5 is out of range"):
        MimicScaleThresholding(threshold_percentile=1.5)


def comfyui_perp_neg(noise_pred_pos, noise_pred_neg, noise_pred_nocond, neg_scale, cond_scale):
    """comfy_extras/nodes_perpneg.py, perp_neg (its projection sums over the whole batch)."""
    pos = noise_pred_pos - noise_pred_nocond
    neg = noise_pred_neg - noise_pred_nocond
    perp = neg - ((torch.mul(neg, pos).sum()) / (torch.norm(pos) ** 2)) * pos
    return noise_pred_nocond + cond_scale * (pos - perp * neg_scale)


@pytest.mark.parametrize("neg_scale", [1.0, 0.5])
def test_perp_neg_equals_the_node_at_batch_one_and_projects_per_sample(neg_scale):
    from guidance import REF, PerpNeg

    (x, d_c, d_u), ctx, preds = views(1.5, seed=14)
    g = torch.Generator().manual_seed(15)
    preds[REF] = preds[UNCOND] + 0.5 * (preds[COND] - preds[UNCOND]) + torch.randn(preds[COND].shape, generator=g,
                                                                                  dtype=torch.float64)
    w = 6.0
    ours = PerpNeg(w, negative_prompt="blurry", neg_scale=neg_scale).combine(ctx, preds)
    for i in range(B):  # per sample: each row equals the node run on that row alone
        row = slice(i, i + 1)
        expected = comfyui_perp_neg(preds[COND][row], preds[REF][row], preds[UNCOND][row], neg_scale, w)
        assert torch.allclose(ours[row], expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))
    pooled = comfyui_perp_neg(preds[COND], preds[REF], preds[UNCOND], neg_scale, w)
    assert not torch.allclose(ours, pooled, atol=1e-6)  # the node pools the projection over the batch
    assert torch.allclose(PerpNeg(w, "blurry", neg_scale=0.0).combine(ctx, preds), CFG(w).combine(ctx, preds))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_carried_over_rules_in_half_precision_stay_near_their_float64_result(dtype):
    """Users run these in bf16 / fp16: each rule computes its statistics in float32 at least, so the half-precision
    result is the float64 one up to the rounding of its inputs and output."""
    from guidance import REF, CFGZeroStar, MimicScaleThresholding, PerpNeg

    (x, d_c, d_u), ctx, preds = views(2.0, seed=16)
    preds[REF] = preds[UNCOND] + 0.3 * (preds[COND] - preds[UNCOND]) + 0.1
    half = {k: v.to(dtype) for k, v in preds.items()}
    half_ctx = StepContext(0, 10, 500.0, Parametrization("epsilon", ctx.x.to(dtype), ctx.param.alpha, ctx.param.sigma))
    for rule in (MimicScaleThresholding(10.0, mimic_scale=4.0), CFGZeroStar.from_comfyui(5.0),
                 PerpNeg(6.0, "blurry")):
        exact = rule.combine(ctx, preds)
        got = rule.combine(half_ctx, half)
        assert got.dtype == dtype and torch.isfinite(got).all(), type(rule).__name__
        # 2e-2 relative: a few units of the half-precision mantissa (bf16: 2^-8) on inputs and output
        assert relative(got.double(), exact) <= 2e-2, (type(rule).__name__, relative(got.double(), exact))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())

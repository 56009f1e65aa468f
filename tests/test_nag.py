"""NAG (guidance/nag.py, pipelines/branches/nag.py): the attention math against the authors' code, and the whole
guided pipeline against an independent NAG run of the same tiny Flux / SD3 pipeline made the authors' way (their
attention processors set with `set_attn_processor`, their truncated AdaLN norms, the negative prompt's rows
appended to the denoiser's inputs), with and without the pipeline's own CFG.

The authors' code read: github.com/ChenDarYen/Normalized-Attention-Guidance (mirror Stars1233/Normalized-Attention-
Guidance @ 8bb34a1): `nag/attention_joint_nag.py` `NAGJointAttnProcessor2_0.__call__` (SD3: L1 norms, 1e-7 guards),
`nag/attention_flux_nag.py` `NAGFluxAttnProcessor2_0.__call__` (Flux: L2 norms, no guard), `nag/normalization.py`
(`TruncAdaLayerNormZero` / `TruncAdaLayerNormContinuous`: the image stream's AdaLN takes the first rows of the time
embedding), `nag/transformer_flux.py` `NAGFluxTransformer2DModel.forward` (the joint stream tiled before the
single blocks), `nag/pipeline_sd3_nag.py` / `nag/pipeline_flux_nag.py` `__call__` (the rows appended: negative
text embeddings; pooled embeddings: the prompt's on SD3, the negative prompt's on Flux).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero

import tiny_pipelines as tp
from guidance import CFG, NAG, REGISTRY, Interval, from_config
from guidance.nag import nag_attention
from pipelines import StrategyGuider, apply_guidance

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread_per_module")]

NEGATIVE = "a blurry photo"
KNOBS = dict(nag_scale=10.0, nag_tau=2.5, nag_alpha=0.5)  # large, so that tau clips and the effect is visible


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@functools.cache
def pipeline(name: str):
    return tp.build(name)


def run(pipe, kwargs) -> torch.Tensor:
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0]


# --- (a) the attention math -------------------------------------------------------------------------------------
def authors_joint(pos, neg, s, tau, alpha):
    """NAGJointAttnProcessor2_0.__call__, its `if apply_guidance:` block (nag/attention_joint_nag.py)."""
    guided = pos * s - neg * (s - 1)
    norm_pos = torch.norm(pos, p=1, dim=-1, keepdim=True).expand(*pos.shape)
    norm_guided = torch.norm(guided, p=1, dim=-1, keepdim=True).expand(*guided.shape)
    scale = norm_guided / (norm_pos + 1e-7)
    guided = guided * torch.minimum(scale, scale.new_ones(1) * tau) / (scale + 1e-7)
    return guided * alpha + pos * (1 - alpha)


def authors_flux(pos, neg, s, tau, alpha):
    """NAGFluxAttnProcessor2_0.__call__, its `if apply_guidance:` blocks (nag/attention_flux_nag.py)."""
    guided = pos * s - neg * (s - 1)
    norm_pos = torch.norm(pos, p=2, dim=-1, keepdim=True).expand(*pos.shape)
    norm_guided = torch.norm(guided, p=2, dim=-1, keepdim=True).expand(*pos.shape)
    scale = norm_guided / norm_pos
    guided = guided * torch.minimum(scale, scale.new_ones(1) * tau) / scale
    return guided * alpha + pos * (1 - alpha)


@pytest.mark.parametrize("norm, authors", [("l1", authors_joint), ("l2", authors_flux)])
@pytest.mark.parametrize("s, tau, alpha", [(5.0, 2.5, 0.25), (3.0, 1.2, 0.125), (1.5, 10.0, 1.0)])
def test_nag_attention_equals_the_authors_math(norm, authors, s, tau, alpha):
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(3, 64, 24, generator=g)
    spread = torch.rand(3, 64, 1, generator=g) * 2  # negative outputs near and far from the positive ones
    neg = pos + spread * torch.randn(3, 64, 24, generator=g)
    ours = nag_attention(pos, neg, s, tau, alpha, norm)
    assert ours.dtype == torch.float32
    assert rel(ours, authors(pos, neg, s, tau, alpha)) <= 1e-6
    order = 1 if norm == "l1" else 2
    ratio = (pos * s - neg * (s - 1)).norm(p=order, dim=-1) / pos.norm(p=order, dim=-1)
    if tau < 10:
        assert bool((ratio > tau).any() and (ratio < tau).any())  # both branches of the clip are exercised
    half = nag_attention(pos.bfloat16(), neg.bfloat16(), s, tau, alpha, norm)
    assert half.dtype == torch.bfloat16 and rel(half, ours) <= 2e-2


# --- (b) the authors' way of running NAG, on the same tiny pipelines ------------------------------------------
class AuthorsJointProcessor:
    """SD3: NAGJointAttnProcessor2_0 (its 2-row and 3-row batches: [pos; neg] and [uncond; pos; neg] contexts)."""

    def __init__(self, s, tau, alpha):
        self.s, self.tau, self.alpha = s, tau, alpha

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        image_len = hidden_states.shape[1]
        b = hidden_states.shape[0]
        guide = self.s > 1 and encoder_hidden_states is not None
        q, k, v = (f(hidden_states).view(b, -1, attn.heads, attn.to_q.out_features // attn.heads).transpose(1, 2)
                   for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if guide:
            ob = len(encoder_hidden_states) - b  # rows of the negative context
            total = b + ob
            extra = slice(0, ob) if total == 2 * ob else slice(ob, 2 * ob)  # the positive rows, repeated
            q, k, v = (torch.cat([t, t[extra]]) for t in (q, k, v))
            b = total
        heads, hd = attn.heads, attn.to_q.out_features // attn.heads
        if encoder_hidden_states is not None:
            cq, ck, cv = (f(encoder_hidden_states).view(b, -1, heads, hd).transpose(1, 2)
                          for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, heads * hd).to(q.dtype)
        context = None
        if encoder_hidden_states is not None:
            out, context = out[:, :image_len], out[:, image_len:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        if guide:
            neg = out[-ob:]
            pos = out[:ob] if b == 2 * ob else out[ob:2 * ob]
            mixed = authors_joint(pos, neg, self.s, self.tau, self.alpha)
            out = mixed if b == 2 * ob else torch.cat([out[:ob], mixed])
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, context) if encoder_hidden_states is not None else out


class AuthorsFluxProcessor:
    """Flux: NAGFluxAttnProcessor2_0 (dual blocks: image q / k / v tiled to the [pos; neg] contexts; single blocks:
    the tiled joint stream, the guided image tokens written to both halves)."""

    def __init__(self, s, tau, alpha, text_len):
        self.s, self.tau, self.alpha, self.text_len = s, tau, alpha, text_len

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        b = (encoder_hidden_states if encoder_hidden_states is not None else hidden_states).shape[0]
        heads, hd = attn.heads, attn.head_dim
        q, k, v = (f(hidden_states) for f in (attn.to_q, attn.to_k, attn.to_v))
        if encoder_hidden_states is not None:
            q, k, v = (t.tile(2, 1, 1) for t in (q, k, v))
        q, k, v = (t.view(b, -1, heads, hd).transpose(1, 2) for t in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        text_len = self.text_len
        if encoder_hidden_states is not None:
            cq, ck, cv = (f(encoder_hidden_states).view(b, -1, heads, hd).transpose(1, 2)
                          for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([cq, q], 2), torch.cat([ck, k], 2), torch.cat([cv, v], 2)
            text_len = encoder_hidden_states.shape[1]
        q, k = apply_rotary_emb(q, image_rotary_emb), apply_rotary_emb(k, image_rotary_emb)
        halves = [F.scaled_dot_product_attention(*(t.chunk(2)[i] for t in (q, k, v))) for i in (0, 1)]
        pos, neg = (h.transpose(1, 2).reshape(b // 2, -1, heads * hd).to(q.dtype) for h in halves)
        mixed = authors_flux(pos[:, text_len:], neg[:, text_len:], self.s, self.tau, self.alpha)
        if encoder_hidden_states is not None:
            context = attn.to_add_out(torch.cat([pos[:, :text_len], neg[:, :text_len]]))
            return attn.to_out[1](attn.to_out[0](mixed)), context
        return torch.cat([torch.cat([pos[:, :text_len], mixed], 1), torch.cat([neg[:, :text_len], mixed], 1)])


def negative_inputs(pipe, name: str, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        if name == "flux":
            embeds, pooled, _ = pipe.encode_prompt(NEGATIVE, None, torch.device("cpu"), 1,
                                                   max_sequence_length=kwargs["max_sequence_length"])
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(NEGATIVE, None, None, torch.device("cpu"), 1, False,
                                                      max_sequence_length=kwargs["max_sequence_length"])
    return embeds, pooled


@contextmanager
def authors_nag(pipe, name: str, kwargs: dict, guided_calls=lambda i: True):
    """The pipeline's own call with NAG made the authors' way, on the transformer calls `guided_calls(i)` picks."""
    model = pipe.transformer
    embeds, neg_pooled = negative_inputs(pipe, name, kwargs)
    text_len = embeds.shape[1]
    calls = [0]

    def append_rows(module, args, kw):
        i, calls[0] = calls[0], calls[0] + 1
        if not guided_calls(i):
            model.set_attn_processor(dict(originals))  # it pops what it sets
            return args, kw
        model.set_attn_processor(authors)
        ehs, pooled = kw["encoder_hidden_states"], kw["pooled_projections"]
        b = kw["hidden_states"].shape[0]
        ob = len(ehs) if name == "flux" else b // 2 if ehs.shape[0] == b and b > len(kwargs["prompt"]) else b
        if name == "sd3" and ob != b:  # CFG: [uncond; pos] -> contexts [uncond; pos; neg], pooled [.., pos]
            kw = {**kw, "encoder_hidden_states": torch.cat([ehs, embeds.expand(ob, -1, -1)]),
                  "pooled_projections": torch.cat([pooled, pooled[ob:]]),
                  "timestep": torch.cat([kw["timestep"], kw["timestep"][ob:]])}
            return args, kw
        new = {"encoder_hidden_states": torch.cat([ehs, embeds.expand(ob, -1, -1)]),
               "pooled_projections": torch.cat([pooled, neg_pooled.expand(ob, -1) if name == "flux" else pooled]),
               "timestep": torch.cat([kw["timestep"]] * 2)}
        if kw.get("guidance") is not None:
            new["guidance"] = torch.cat([kw["guidance"]] * 2)
        return args, {**kw, **new}

    def keep_rows(module, args, kw, output):
        b = kw["hidden_states"].shape[0]
        return (output[0][:b],) + tuple(output[1:])

    def truncate(module, args, kw):  # TruncAdaLayerNormZero / TruncAdaLayerNormContinuous
        x = args[0] if args else kw.get("x", kw.get("hidden_states"))
        if "emb" in kw:
            return args, {**kw, "emb": kw["emb"][:x.shape[0]]}
        if "conditioning_embedding" in kw:
            return args, {**kw, "conditioning_embedding": kw["conditioning_embedding"][:x.shape[0]]}
        return (args[0], args[1][:x.shape[0]]) + tuple(args[2:]), kw

    def tile_joint_stream(module, args, kw):  # NAGFluxTransformer2DModel: hidden_states.tile(2, 1, 1)
        h, ehs = kw["hidden_states"], kw["encoder_hidden_states"]
        return args, ({**kw, "hidden_states": h.tile(2, 1, 1)} if h.shape[0] * 2 == ehs.shape[0] else kw)

    originals = model.attn_processors
    if name == "flux":
        authors = AuthorsFluxProcessor(KNOBS["nag_scale"], KNOBS["nag_tau"], KNOBS["nag_alpha"], text_len)
    else:
        authors = AuthorsJointProcessor(KNOBS["nag_scale"], KNOBS["nag_tau"], KNOBS["nag_alpha"])
    handles = [model.register_forward_pre_hook(append_rows, with_kwargs=True),
               model.register_forward_hook(keep_rows, with_kwargs=True)]
    handles += [m.register_forward_pre_hook(truncate, with_kwargs=True) for m in model.modules()
                if isinstance(m, (AdaLayerNormZero, AdaLayerNormContinuous))]
    if name == "flux":
        handles.append(model.single_transformer_blocks[0].register_forward_pre_hook(tile_joint_stream,
                                                                                   with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        model.set_attn_processor(dict(originals))  # it pops what it sets


CASES = [("flux", "l2", False), ("sd3", "l1", False), ("sd3", "l1", True), ("flux", "l2", True)]


@pytest.mark.parametrize("name, norm, cfg", CASES, ids=lambda v: str(v))
def test_nag_through_the_hook_equals_the_authors_way(name, norm, cfg):
    """Flux without true CFG and SD3 at guidance_scale 1 (no unconditional pass: one call per step); with the
    pipeline's CFG, NAG(inner=CFG()) on the conditional rows (SD3: one [uncond; cond] call; Flux: the cond call of
    two, the authors' 3-row SD3 layout and a plain negative call respectively)."""
    pipe = pipeline(name)
    kwargs = tp.call_kwargs(name, cfg=cfg)
    plain = run(pipe, kwargs)
    strategy = NAG(**KNOBS, negative_prompt=NEGATIVE, norm=norm, inner=CFG() if cfg else None)
    with apply_guidance(pipe, strategy) as handle:
        ours = run(pipe, kwargs)
    guided_calls = (lambda i: i % 2 == 0) if name == "flux" and cfg else (lambda i: True)
    with authors_nag(pipe, name, kwargs, guided_calls):
        theirs = run(pipe, kwargs)
    steps = kwargs["num_inference_steps"]
    assert rel(theirs, plain) > 1e-3, "NAG changes the output here"
    assert rel(ours, theirs) <= 1e-5
    assert handle.nfe.tolist() == [steps * (2 if cfg else 1)] * 2  # one pass per row: the negative costs no call
    assert handle.conditional.rows_run.tolist() == [steps] * 2 and handle.perturbed_nfe is None
    assert torch.equal(run(pipe, kwargs), plain), "removal is bit-identical"


# --- (c), (d) and the rest --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_nag_off_is_the_plain_conditional_call(name):
    pipe = pipeline(name)
    kwargs = tp.call_kwargs(name, cfg=False)
    plain = run(pipe, kwargs)
    for off in (NAG(nag_scale=1.0, negative_prompt=NEGATIVE), NAG(nag_alpha=0.0, negative_prompt=NEGATIVE)):
        with apply_guidance(pipe, off) as handle:
            assert torch.equal(run(pipe, kwargs), plain)
        assert handle.conditional.rows_run.tolist() == [0, 0] and handle.nfe.tolist() == [3, 3]


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_nag_batch_rows_equal_each_sample_alone(name):
    pipe = pipeline(name)
    kwargs = tp.call_kwargs(name, cfg=False)
    with apply_guidance(pipe, NAG(**KNOBS, negative_prompt=NEGATIVE)):
        both = run(pipe, kwargs)
        first = run(pipe, {**kwargs, "prompt": kwargs["prompt"][:1]})  # the generator draws its latents first
    assert rel(both[:1], first) <= 1e-5


def test_nag_end_window_counts_the_steps_it_guides():
    pipe = pipeline("flux")
    kwargs = tp.call_kwargs("flux", cfg=False)
    with apply_guidance(pipe, NAG(**KNOBS, negative_prompt=NEGATIVE, nag_end=0.4)) as handle:
        windowed = run(pipe, kwargs)
    sigmas = pipe.scheduler.sigmas[:-1]
    expected = int((sigmas >= 1 - 0.4).sum())
    assert 0 < expected < 3 and handle.conditional.rows_run.tolist() == [expected] * 2
    with apply_guidance(pipe, NAG(**KNOBS, negative_prompt=NEGATIVE)):
        assert rel(windowed, run(pipe, kwargs)) > 1e-4


def test_nag_runs_in_bf16():
    pipe = tp.build("sd3").to(torch.bfloat16)
    kwargs = tp.call_kwargs("sd3", cfg=False)
    with apply_guidance(pipe, NAG(**KNOBS, negative_prompt=NEGATIVE)):
        half = run(pipe, kwargs)
    with apply_guidance(pipeline("sd3"), NAG(**KNOBS, negative_prompt=NEGATIVE)):
        full = run(pipeline("sd3"), kwargs)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all() and rel(half, full) <= 5e-2


def test_nag_config_registry_and_bad_knobs():
    rule = NAG(nag_scale=4.0, nag_tau=3.0, nag_alpha=0.125, nag_end=0.5, negative_prompt="blur",
               layers=["transformer_blocks.0"], norm="l2", inner=CFG())
    again = from_config(rule.to_config())
    assert REGISTRY["NAG"] is NAG and again.to_config() == rule.to_config()
    for bad, match in [(dict(nag_scale=0.5), r"NAG: nag_scale=0.5 is out of range; allowed: a finite number in "
                                             r"\[1, inf\)"),
                       (dict(nag_tau=0.9), r"NAG: nag_tau=0.9 is out of range"),
                       (dict(nag_alpha=1.5), r"NAG: nag_alpha=1.5 is out of range; allowed: a finite number in \[0, 1\]"),
                       (dict(nag_end=-0.1), r"NAG: nag_end=-0.1 is out of range"),
                       (dict(norm="l3"), r"NAG: norm='l3' is invalid; allowed: 'l1', 'l2'"),
                       (dict(layers=[]), r"NAG: layers=\[\] is invalid"),
                       (dict(negative_prompt=None), r"NAG: negative_prompt=None is invalid"),
                       (dict(inner="CFG"), r"NAG: inner='CFG' is invalid")]:
        with pytest.raises(ValueError, match=match):
            NAG(**bad)


def test_nag_refusals():
    with pytest.raises(NotImplementedError, match=r"NAG runs on FluxPipeline, StableDiffusion3Pipeline \(Flux and SD3 "
                                                  r"joint-attention transformers\); StableDiffusionPipeline is not"):
        apply_guidance(tp.build("sd"), NAG())
    with pytest.raises(ValueError, match=r"layers=\['nowhere'\] match no joint-attention module of FluxPipeline"):
        apply_guidance(pipeline("flux"), NAG(layers=["nowhere"]))
    with pytest.raises(ValueError, match=r"NAG must be the outermost strategy"):
        apply_guidance(pipeline("flux"), Interval(NAG(), start=0.0, stop=0.5))
    with pytest.raises(ValueError, match=r"StrategyGuider: .*needs the negative prompt's text stream"):
        StrategyGuider(NAG())
    pipe = pipeline("sd3")
    with apply_guidance(pipe, NAG(inner=CFG())), pytest.raises(ValueError, match=r"runs no unconditional branch"):
        run(pipe, tp.call_kwargs("sd3", cfg=False))  # CFG inside needs the pipeline's unconditional pass
    assert torch.equal(run(pipe, tp.call_kwargs("sd3", cfg=False)), run(tp.build("sd3"), tp.call_kwargs("sd3", cfg=False)))

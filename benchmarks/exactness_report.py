"""Measured agreement with the references the tests assert against, as a table.

    python benchmarks/exactness_report.py

Per tiny offline pipeline: max |CFG through the hook - native CFG| over batch 2, 2 images per prompt and
negative prompts, and max |APG(eta=1, r=0, beta=0) - native CFG|; then, for every class of the
adapter table (tests/pipeline_zoo.py), the same two as relative errors (max |diff| / max |native|);
then APG against diffusers' guider and against an independent float64 implementation of the paper,
on random tensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_hook import run, variants  # noqa: E402
from test_strategies import apg_reference, make_ctx, random_preds  # noqa: E402
from tiny_pipelines import PIPELINE_NAMES, build  # noqa: E402
import pipeline_zoo  # noqa: E402

from guidance import APG, CFG, COND, UNCOND  # noqa: E402
from pipelines import apply_guidance  # noqa: E402


def max_diff(pipe, name, strategy, **kw) -> float:
    native = run(pipe, name, **kw)
    with apply_guidance(pipe, strategy):
        return (run(pipe, name, **kw) - native).abs().max().item()


def main() -> None:
    torch.set_num_threads(1)
    print(f"{'pipeline':<14} {'CFG hook vs native':>20} {'APG(1,0,0) vs native':>22}")
    for name in PIPELINE_NAMES:
        pipe = build(name)
        cfg = max(max_diff(pipe, name, CFG(), **kw) for kw in variants(name))
        apg = max_diff(pipe, name, APG(eta=1.0, norm_threshold=0.0, momentum=0.0))
        print(f"{name:<14} {cfg:20.2e} {apg:22.2e}")

    print(f"\n{'class (tiny pipeline)':<48} {'layout':<26} {'CFG rel. err':>12} {'APG(1,0,0) rel. err':>20}")
    for name in sorted(pipeline_zoo.ALL_CASES):
        pipe, kw = pipeline_zoo.build(name), pipeline_zoo.call_kwargs(name)
        errors = []
        for strategy in (CFG(), APG(eta=1.0, norm_threshold=0.0, momentum=0.0)):
            torch.manual_seed(0)
            native = pipe(**kw, generator=torch.Generator().manual_seed(0))[0]
            with apply_guidance(pipe, strategy) as handle:
                torch.manual_seed(0)
                hooked = pipe(**kw, generator=torch.Generator().manual_seed(0))[0]
            errors.append(((hooked - native).abs().max() / native.abs().max()).item())
        print(f"{name:<48} {handle.adapter.layout:<26} {errors[0]:12.2e} {errors[1]:20.2e}")

    from diffusers.guiders import AdaptiveProjectedGuidance
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

    ref = AdaptiveProjectedGuidance(guidance_scale=4.0, adaptive_projected_guidance_momentum=-0.5,
                                    adaptive_projected_guidance_rescale=10.0, eta=0.4)
    ours = APG(scale=4.0, eta=0.4, norm_threshold=10.0, momentum=-0.5, mode="diffusers")
    paper = APG(scale=6.0, eta=0.3, norm_threshold=4.0, momentum=-0.6)
    worst_guider, ours_x0, cond_x0, uncond_x0 = 0.0, [], [], []
    for step in range(5):
        ctx, p = make_ctx(step=step, seed=step), random_preds(seed=20 + step)
        ref.set_state(step=step, num_inference_steps=5, timestep=torch.tensor(999 - step))
        if step == 0:
            ref.momentum_buffer = MomentumBuffer(-0.5)
        expected = ref.forward(p[COND], p[UNCOND]).pred
        worst_guider = max(worst_guider, (ours.combine(ctx, p) - expected).abs().max().item())
        ours_x0.append(ctx.to_x0(paper.combine(ctx, p)).double())
        cond_x0.append(ctx.to_x0(p[COND]).numpy())
        uncond_x0.append(ctx.to_x0(p[UNCOND]).numpy())
    reference = apg_reference(cond_x0, uncond_x0, w=6.0, eta=0.3, r=4.0, beta=-0.6)
    worst_paper = max((a - torch.from_numpy(b)).abs().max().item() for a, b in zip(ours_x0, reference))
    print(f"APG mode='diffusers' vs diffusers AdaptiveProjectedGuidance, 5 steps with momentum: {worst_guider:.2e}")
    print(f"APG paper rule vs independent float64 NumPy implementation, 5 steps:           {worst_paper:.2e}")


if __name__ == "__main__":
    main()

"""Fit LinearAG coefficients for a diffusers pipeline: record full-CFG trajectories through the
guidance hook, then solve one least-squares problem per estimate step (`guidance.fit_linear_ag`).

    python -m pipelines.linear_ag_fit --pipeline embedded --steps 20 --scale 3 --num-samples 64 \\
        --out embedded-20.safetensors
    python -m pipelines.linear_ag_fit --pipeline PATH_OR_HUB_ID --prompts prompts.txt --steps 20 --scale 5 \\
        --num-samples 200 --out sdxl-20.safetensors

The file is tied to the pipeline class, scheduler class and step count (checked when sampling);
the fit uses the empty negative prompt, so LinearAG refuses negative prompts.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from typing import Any, Mapping, Sequence

import torch

from guidance.base import COND, UNCOND, GuidanceStrategy, StepContext
from guidance.cfg import CFG
from guidance.linear_ag import SPACES, LinearAGCoefficients, default_plan, fit_linear_ag

from .adapters import adapter_for
from .hook import apply_guidance


class LinearAGRecorder(GuidanceStrategy):
    """Guide with `inner` (CFG) unchanged and record, per step, cond and uncond predictions in `space`
    ("eps" or "model"), as float32 on the CPU. `trajectories()` -> (eps_c, eps_u), each (N, K, ...)."""

    config_fields = ("inner", "space")

    def __init__(self, inner: GuidanceStrategy | None = None, space: str = "eps"):
        self.inner = CFG() if inner is None else inner
        if space not in SPACES:
            raise ValueError(f"LinearAGRecorder: space={space!r} is unknown; allowed: {', '.join(SPACES)}")
        self.space = space
        self.timesteps: list[float] | None = None  # of the first recorded call
        self.prediction_type: str | None = None
        self._calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # per finished call: (B, K, ...) pairs
        self._steps: list[tuple[torch.Tensor, torch.Tensor]] = []  # per step of the call in progress
        self._times: list[float] = []

    def reset(self) -> None:
        self.inner.reset()
        self._flush()

    def _flush(self) -> None:
        if not self._steps:
            return
        if self.timesteps is None:
            self.timesteps = list(self._times)
        elif len(self._times) != len(self.timesteps):
            raise ValueError(f"LinearAGRecorder: a call made {len(self._times)} evaluations, an earlier one "
                             f"{len(self.timesteps)}; record one step count at a time")
        self._calls.append(tuple(torch.stack(t, dim=1) for t in zip(*self._steps)))
        self._steps, self._times = [], []

    def branches(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {**self.inner.branches(ctx), COND: ctx.all(), UNCOND: ctx.all()}

    def combine(self, ctx: StepContext, preds: Mapping[str, torch.Tensor]) -> torch.Tensor:
        convert = ctx.param.to_eps if self.space == "eps" else (lambda p: p)
        self._steps.append(tuple(convert(preds[b]).float().cpu() for b in (COND, UNCOND)))
        self._times.append(float(ctx.timestep))
        self.prediction_type = ctx.param.prediction_type
        return self.inner.combine(ctx, preds)

    def trajectories(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._flush()
        if not self._calls:
            raise ValueError("LinearAGRecorder: nothing recorded yet; call the pipeline inside apply_guidance first")
        return tuple(torch.cat(t) for t in zip(*self._calls))


def _condition_keyword(pipe) -> str:
    params = inspect.signature(type(pipe).__call__).parameters
    return "class_labels" if "class_labels" in params and "prompt" not in params else "prompt"


def fit_pipeline(pipe, conditions: Sequence[str | int], num_inference_steps: int, guidance_scale: float, *,
                 plan: Sequence[str] | None = None, guided_fraction: float = 0.5, history: int = 2,
                 intercept: bool = False, space: str = "eps", batch_size: int = 16, seed: int = 0,
                 progress: bool = True, call_kwargs: Mapping[str, Any] | None = None) -> LinearAGCoefficients:
    """Sample `conditions` (prompts, or class labels for class-conditional pipelines) with full CFG,
    the empty negative prompt and per-sample seeds seed, seed + 1, ..., and fit the coefficients.

    plan: one of "cfg" / "estimate" / "cond" per model evaluation; default `default_plan(K,
    guided_fraction)`. call_kwargs: extra pipeline call arguments (height, width, ...).
    """
    from tqdm.auto import tqdm

    if not conditions:
        raise ValueError("fit_pipeline: conditions=[] is empty; allowed: one prompt or class label per sample")
    adapter = adapter_for(pipe)
    keyword = _condition_keyword(pipe)
    output_type = "np" if keyword == "class_labels" else "latent"  # skip the VAE where the pipeline can
    recorder = LinearAGRecorder(space=space)
    with apply_guidance(pipe, recorder), tqdm(total=len(conditions), desc="LinearAG fit: sampling",
                                              unit="sample", disable=not progress) as bar:
        for start in range(0, len(conditions), batch_size):
            batch = list(conditions[start:start + batch_size])
            kwargs = {keyword: batch, "num_inference_steps": num_inference_steps, adapter.scale_kw: guidance_scale,
                      "output_type": output_type,
                      "generator": [torch.Generator().manual_seed(seed + start + i) for i in range(len(batch))]}
            # Flux runs its unconditional branch only with a negative prompt
            if adapter.layout.startswith("sequential"):
                kwargs["negative_prompt"] = [""] * len(batch)
            pipe(**{**kwargs, **(call_kwargs or {})})
            bar.update(len(batch))
    eps_c, eps_u = recorder.trajectories()
    num_steps = eps_c.shape[1]
    # Two-stage solvers (Heun, KDPM2: scheduler.order 2) get one plan entry kind per scheduler step.
    per_step = 2 if getattr(pipe.scheduler, "order", 1) == 2 else 1
    return fit_linear_ag(
        eps_c, eps_u, default_plan(num_steps, guided_fraction, per_step) if plan is None else plan, history=history,
        intercept=intercept,
        space=space, pipeline=type(pipe).__name__, scheduler=type(pipe.scheduler).__name__,
        num_inference_steps=int(num_inference_steps), guidance_scale=float(guidance_scale),
        prediction_type=recorder.prediction_type, timesteps=recorder.timesteps,
    )


def _load_pipeline(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.pipeline == "embedded":
        from .embedded import load_embedded

        return load_embedded(device, scheduler=args.scheduler).pipe
    import diffusers

    dtype = getattr(torch, args.dtype)
    pipe = diffusers.DiffusionPipeline.from_pretrained(args.pipeline, torch_dtype=dtype)
    if args.scheduler:
        cls = getattr(diffusers, args.scheduler, None)
        if cls is None or "Scheduler" not in args.scheduler:
            raise ValueError(f"--scheduler {args.scheduler!r} is not a diffusers scheduler class name")
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return pipe.to(device)


def _conditions(args, pipe) -> list[str | int]:
    if args.prompts:
        with open(args.prompts, encoding="utf-8") as f:
            items: list = [line.strip() for line in f if line.strip()]
        if _condition_keyword(pipe) == "class_labels":
            items = [int(i) if i.lstrip("-").isdigit() else i for i in items]
    else:  # the embedded model: every class in turn
        items = list(range(pipe.num_classes))
    if not items:
        raise ValueError(f"--prompts {args.prompts}: the file has no prompts")
    return [items[i % len(items)] for i in range(args.num_samples)]  # cycled to --num-samples


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.linear_ag_fit", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True,
                        help='"embedded" (pipelines.load_embedded) or a diffusers folder / hub id')
    parser.add_argument("--prompts", help="text file, one prompt (or class label) per line, cycled to --num-samples")
    parser.add_argument("--steps", type=int, default=20, help="num_inference_steps (default 20)")
    parser.add_argument("--scale", type=float, required=True, help="the guidance scale to fit at")
    parser.add_argument("--num-samples", type=int, default=64, help="trajectories to fit on (default 64; paper: 200)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--history", type=int, default=2, help="previous steps in the regression (default 2)")
    parser.add_argument("--intercept", action="store_true", help="fit a constant per step too")
    parser.add_argument("--space", choices=SPACES, default="eps", help="eps (default) or model (flow models)")
    parser.add_argument("--guided-fraction", type=float, default=0.5,
                        help="fraction of steps alternating cfg/estimate; the rest are conditional only (default 0.5)")
    parser.add_argument("--plan", help="explicit comma-separated plan (cfg,estimate,cond per evaluation)")
    parser.add_argument("--scheduler", help="a diffusers scheduler class name to swap in")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="default: cuda when available")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--out", required=True, help="output .safetensors file")
    args = parser.parse_args(argv)
    try:
        if args.num_samples < 1 or args.batch_size < 1 or args.steps < 1:
            raise ValueError("--num-samples, --batch-size and --steps must be >= 1")
        if args.pipeline != "embedded" and not args.prompts:
            raise ValueError("--prompts FILE is required for a diffusers pipeline (one prompt or class label per line)")
        pipe = _load_pipeline(args)
        pipe.set_progress_bar_config(disable=True)
        plan = [p.strip() for p in args.plan.split(",")] if args.plan else None
        coefficients = fit_pipeline(pipe, _conditions(args, pipe), args.steps, args.scale, plan=plan,
                                    guided_fraction=args.guided_fraction, history=args.history,
                                    intercept=args.intercept, space=args.space,
                                    batch_size=args.batch_size, seed=args.seed)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    coefficients.save(args.out)
    stats = [f"{k}: R^2={r:.6f} guidance-direction R^2={d:.4f}"
             for k, (r, d) in enumerate(zip(coefficients.r2, coefficients.delta_r2)) if r is not None]
    print(f"{coefficients!r}\nper estimate step:\n  " + "\n  ".join(stats or ["-"]) + f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

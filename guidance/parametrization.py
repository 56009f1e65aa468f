"""Conversions between a model's native output and the denoised estimate x0.

Every diffusers scheduler we support feeds the model an input of the form

    x = alpha * x0 + sigma * eps

(VP models: alpha = sqrt(alphabar), sigma = sqrt(1 - alphabar), including Euler-type schedulers
once their model-input scaling 1/sqrt(sigma_ve^2 + 1) is applied; flow matching: alpha = 1 - s,
sigma = s). Relative to that *model input*, every prediction type is affine in the prediction, so
x0 <-> prediction conversions need only (alpha, sigma) per sample. The pipelines side reads them
from the scheduler's own state; this module is pure math.

"preconditioned" (Karras EDM: the scheduler or the pipeline itself turns the raw output F into
x0 = c_skip x_ve + c_out F, x_ve = x0 + sigma_ve eps the unscaled sample): x is the VP-scaled sample
x_ve / sqrt(sigma_ve^2 + 1) (the model input itself where c_in is that factor), alpha and sigma as for
VP models, and x0 = skip * x + out * F with skip = c_skip sqrt(sigma_ve^2 + 1), out = c_out per sample (or per
position, 0 where the pipeline sets x0 itself).

Precision: every conversion computes and returns at least float32, whatever the model's dtype.
x0 = (x - sigma eps) / alpha amplifies the rounding of a half-precision prediction by 1/alpha, so
x0-space rules (APG, GFCG, EluCD, Dynamic CFG) must do their math on the float32 result; only the
guided prediction a strategy returns is cast back to the model's dtype (`GuidanceStrategy.combine`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow", "sample", "preconditioned")


@dataclass
class Parametrization:
    """How a model output relates to x0 at one evaluation: x = alpha * x0 + sigma * eps.

    `alpha` and `sigma` are per-sample tensors shaped (B, 1, ..., 1) so they broadcast over the
    prediction; `x` is the model input of those B samples ("preconditioned": the VP-scaled sample,
    see the module docstring). `unavailable`: why the noise level of
    this evaluation is unknown (an unsupported scheduler); every conversion then raises it, so
    rules that never convert (CFG) still run.
    """

    prediction_type: str
    x: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    unavailable: str | None = None
    # "preconditioned" only: x0 = skip * x + out * F, per-sample tensors shaped like alpha (see the module docstring);
    # out may also vary per position (broadcasting over the prediction), 0 where the pipeline sets x0 itself.
    skip: torch.Tensor | None = None
    out: torch.Tensor | None = None
    # (x, alpha, sigma) in each compute dtype, made once: an x0-space rule converts two or three predictions
    # per step, and each cast is a tensor operation.
    _promoted: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type={self.prediction_type!r} is not supported; allowed: {', '.join(PREDICTION_TYPES)}"
            )
        if (self.prediction_type == "preconditioned") != (self.skip is not None and self.out is not None):
            raise ValueError(f"prediction_type={self.prediction_type!r} with skip={self.skip is not None} and "
                             f"out={self.out is not None}; allowed: both skip and out for 'preconditioned' only")

    @property
    def noise_level(self) -> torch.Tensor:
        """The scheduler-facing sigma, shape (B,): sigma/alpha (VE / Karras sigma) for VP models,
        the flow time s in [0, 1] for flow matching."""
        self._check_available()
        sigma, alpha = self.sigma.flatten(), self.alpha.flatten()
        return sigma if self.prediction_type == "flow" else sigma / alpha

    def select(self, rows: torch.Tensor) -> "Parametrization":
        """The same parametrization restricted to some samples (a sub-batch)."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return Parametrization(self.prediction_type, self.x[rows], self.alpha[rows], self.sigma[rows], self.unavailable,
                               pick(self.skip), pick(self.out))

    def to_x0(self, pred: torch.Tensor) -> torch.Tensor:
        """x0 of a prediction, in at least float32 (never cast back to a half-precision input)."""
        x, a, s = self._promote(pred)
        p = pred.to(x.dtype)
        if self.prediction_type == "epsilon":
            x0 = (x - s * p) / a
        elif self.prediction_type == "v_prediction":
            x0 = a * x - s * p  # VP: alpha^2 + sigma^2 = 1 for the model input
        elif self.prediction_type == "flow":
            x0 = x - s * p  # v = eps - x0 and alpha = 1 - sigma
        elif self.prediction_type == "preconditioned":
            skip, out = self._preconditioning(pred)
            x0 = skip * x + out * p
        else:
            x0 = p
        return x0

    def from_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """The prediction whose x0 is `x0`, in at least float32; the caller casts it to the model's dtype."""
        x, a, s = self._promote(x0)
        d = x0.to(x.dtype)
        if self.prediction_type == "epsilon":
            pred = (x - a * d) / s
        elif self.prediction_type == "v_prediction":
            pred = (a * x - d) / s
        elif self.prediction_type == "flow":
            pred = (x - d) / s
        elif self.prediction_type == "preconditioned":
            skip, out = self._preconditioning(x0)
            # out = 0 where the pipeline sets x0 itself, whatever the output (Cosmos 2 video-to-world's conditioning
            # frames): every prediction gives that x0 there, and 0 stands for them
            pred = torch.where(out == 0, 0.0, (d - skip * x) / out)
        else:
            pred = d
        return pred

    def to_eps(self, pred: torch.Tensor) -> torch.Tensor:
        """The noise estimate of a prediction (the space Adaptive Guidance measures similarity in)."""
        x, a, s = self._promote(pred)
        if self.prediction_type == "epsilon":
            return pred.to(x.dtype)
        return (x - a * self.to_x0(pred)) / s

    def from_eps(self, eps: torch.Tensor) -> torch.Tensor:
        """The prediction whose noise estimate is `eps` (inverse of `to_eps`; LinearAG estimates
        the unconditional branch in eps space). Undefined where alpha = 0 (flow matching at s = 1)."""
        x, a, s = self._promote(eps)
        if self.prediction_type == "epsilon":
            return eps.to(x.dtype)
        return self.from_x0((x - s * eps.to(x.dtype)) / a)

    def _promote(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # At least float32 (float64 stays float64): see the module docstring.
        self._check_available()
        dtype = torch.promote_types(like.dtype, torch.float32)
        source = (self.x, self.alpha, self.sigma)
        cached = self._promoted.get(dtype)
        if cached is None or any(a is not b for a, b in zip(cached[0], source)):  # a field reassigned: again
            cached = self._promoted[dtype] = (source, tuple(t.to(dtype) for t in source))
        return cached[1]

    def _preconditioning(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(skip, out) in the compute dtype of `like` (at least float32), made once per dtype."""
        dtype = torch.promote_types(like.dtype, torch.float32)
        source = (self.skip, self.out)
        cached = self._promoted.get(("preconditioned", dtype))
        if cached is None or any(a is not b for a, b in zip(cached[0], source)):
            cached = self._promoted[("preconditioned", dtype)] = (source, tuple(t.to(dtype) for t in source))
        return cached[1]

    def _check_available(self) -> None:
        if self.unavailable is not None:
            raise ValueError(self.unavailable)

"""A class-conditional pixel-space diffusion pipeline following diffusers conventions.

Classifier-free guidance runs as one batched call on [uncond; cond], like Stable Diffusion, with
the null class (the last class embedding) as the unconditional input. Any diffusers scheduler
works (`ClassConditionalPipeline.from_pretrained(path, scheduler=...)` or `pipe.scheduler = ...`).
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from guidance.base import is_finite_number

OUTPUT_TYPES = ("pil", "np", "pt")


class ClassConditionalPipeline(DiffusionPipeline):
    """unet: a UNet2DModel with `num_class_embeds = num_classes + 1` (the last id is the null class).
    class_names: optional names, so class labels can be given as strings."""

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin, class_names: list[str] | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(class_names=list(class_names) if class_names is not None else None)

    @property
    def null_class(self) -> int:
        return self.unet.config.num_class_embeds - 1

    @property
    def num_classes(self) -> int:
        return self.null_class

    def class_ids(self, class_labels) -> torch.Tensor:
        """Class labels as ids: ints, a tensor, or names from `class_names`."""
        labels = [class_labels] if isinstance(class_labels, (int, str)) else list(
            class_labels.tolist() if torch.is_tensor(class_labels) else class_labels
        )
        if not labels:
            raise ValueError("class_labels=[] is empty; allowed: one or more class ids or names")
        names = self.config.class_names or []
        ids = []
        for label in labels:
            if isinstance(label, (list, tuple)):  # a nested list or a 2-D tensor
                raise ValueError(f"class_labels: {label!r} is a sequence inside class_labels; allowed: one class id "
                                 "or name per image (a flat list, or a 1-D tensor)")
            if isinstance(label, str):
                if label not in names:
                    raise ValueError(f"class_labels: {label!r} is not a class name; allowed: {', '.join(names)}")
                label = names.index(label)
            if isinstance(label, bool) or int(label) != label or not 0 <= int(label) < self.num_classes:
                raise ValueError(
                    f"class_labels: {label!r} is out of range; allowed: integers in [0, {self.num_classes - 1}]"
                )
            ids.append(int(label))
        return torch.tensor(ids, dtype=torch.long, device=self._execution_device)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | Sequence | torch.Tensor,
        guidance_scale: float = 3.0,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is unknown; allowed: {', '.join(OUTPUT_TYPES)}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r} is invalid; allowed: an integer >= 1")
        for name in callback_on_step_end_tensor_inputs:
            if name not in self._callback_tensor_inputs:
                raise ValueError(f"callback_on_step_end_tensor_inputs: {name!r} is not one of "
                                 f"{self._callback_tensor_inputs}")
        if not is_finite_number(guidance_scale):
            raise ValueError(f"guidance_scale={guidance_scale!r} is invalid; allowed: a finite number (> 1 runs CFG)")
        self._guidance_scale = float(guidance_scale)
        do_cfg = guidance_scale > 1.0
        labels = self.class_ids(class_labels)
        batch = labels.shape[0]
        size = self.unet.config.sample_size
        shape = (batch, self.unet.config.in_channels, size, size)
        device, dtype = self._execution_device, self.unet.dtype
        if isinstance(generator, list) and len(generator) not in (1, batch):  # as diffusers' own pipelines check
            raise ValueError(f"generator: a list of {len(generator)} generators for {batch} images; allowed: one "
                             "generator, or one per image")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents has shape {tuple(latents.shape)}; allowed: {shape}")
        elif latents.is_meta:
            raise ValueError("latents are on the meta device (shapes without data); allowed: a tensor with values, on "
                             "the CPU or an accelerator")
        elif not bool(torch.isfinite(latents).all()):  # one check per call, not per step
            raise ValueError("latents contains NaN or inf values; allowed: finite starting noise")
        # set_timesteps first: Euler-type schedulers' init_noise_sigma depends on this call's sigmas.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma
        model_labels = torch.cat([torch.full_like(labels, self.null_class), labels]) if do_cfg else labels
        step_kwargs = self._step_kwargs(generator, eta)
        self._num_timesteps = len(self.scheduler.timesteps)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise_pred = self.unet(model_input, t, class_labels=model_labels).sample
            if do_cfg:
                noise_uncond, noise_cond = noise_pred.chunk(2)
                noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                step_tensors = {"latents": latents}  # (a comprehension cannot read this function's locals())
                requested = {k: step_tensors[k] for k in callback_on_step_end_tensor_inputs}
                outputs = callback_on_step_end(self, i, t, requested)
                returned = outputs.pop("latents", latents)
                if not torch.is_tensor(returned) or returned.shape != latents.shape:
                    raise ValueError(f"callback_on_step_end returned latents of shape "
                                     f"{tuple(getattr(returned, 'shape', ()))} at step {i}; allowed: the shape it was "
                                     f"given, {tuple(latents.shape)}")
                latents = returned

        images = (latents / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _step_kwargs(self, generator, eta: float) -> dict:
        # Only pass what this scheduler's step() accepts (DDIM takes eta, ancestral ones a generator).
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "generator" in params:
            kwargs["generator"] = generator
        if "eta" in params:
            kwargs["eta"] = eta
        return kwargs


def to_uint8(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Pipeline output in [0, 1] (pt NCHW or np NHWC) -> uint8 NCHW, rounded like a PNG write."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8)

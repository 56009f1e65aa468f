"""Train the embedded class-conditional CIFAR-10 diffusion model (a diffusers UNet2DModel).

    python -m pipelines.embedded.training.train_unet --config pipelines/embedded/training/configs/unet.json \
        --data ../shared/data/cifar10 --out runs/unet [--max-minutes 120] [--device cuda]

Epsilon prediction on a cosine DDPM schedule, 10% label dropout to the null class (label 10) for
classifier-free guidance, EMA weights for sampling. Rerunning the same command resumes from
`<out>/checkpoint.pt`. `--export DIR` writes the EMA model as a ready pipeline folder
(e.g. pipelines/embedded/weights/pipeline), or, when the config says `"export_layout": "unet"`, as a
bare `UNet2DModel` folder (the autoguidance guide, `configs/guide_unet.json`, exported to
pipelines/embedded/weights/guide: it samples with the main pipeline's scheduler).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..loading import CIFAR10_CLASSES
from ..pipeline import ClassConditionalPipeline
from .common import (
    BatchSampler,
    augment,
    load_checkpoint,
    load_cifar10,
    load_config,
    save_checkpoint,
    to_model_range,
    training_parser,
)


def build_unet(cfg: dict) -> UNet2DModel:
    return UNet2DModel(**cfg["unet"])


def build_scheduler(cfg: dict) -> DDPMScheduler:
    return DDPMScheduler(**cfg["scheduler"])


def drop_labels(labels: torch.Tensor, p: float, null_class: int, generator: torch.Generator) -> torch.Tensor:
    """Classifier-free guidance training: replace a fraction p of the labels by the null class."""
    drop = torch.rand(labels.shape[0], generator=generator) < p
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def train(cfg: dict, data_dir: Path, out: Path, device: str, max_minutes: float | None, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg["seed"])
    unet = build_unet(cfg).to(device)
    scheduler = build_scheduler(cfg)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg["lr"], weight_decay=cfg.get("weight_decay", 0.0))
    ema = EMAModel(unet.parameters(), decay=cfg["ema_decay"], use_ema_warmup=True, inv_gamma=1.0, power=0.75)

    images, labels = load_cifar10(data_dir, "train")
    sampler = BatchSampler(len(images), cfg["batch_size"], cfg["seed"])
    ckpt_path = out / "checkpoint.pt"
    state = load_checkpoint(ckpt_path)
    step, seconds = 0, 0.0
    if state is not None:
        unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["opt"])
        ema.load_state_dict(state["ema"])
        step, seconds = int(state["step"]), float(state["seconds"])
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    null_class = cfg["unet"]["num_class_embeds"] - 1
    total = cfg["steps"]
    deadline = time.time() + 60 * max_minutes if max_minutes else None
    log = open(out / "log.jsonl", "a")
    bar = tqdm(total=total, initial=step, desc="unet", dynamic_ncols=True)
    unet.train()
    t0, losses = time.time(), []
    stop = _stop_on_signals()
    while step < total and (deadline is None or time.time() < deadline) and not stop:
        g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + step)
        idx = sampler.indices(step)
        x0 = augment(to_model_range(images[idx]), g).to(device)
        y = drop_labels(labels[idx], cfg["label_dropout"], null_class, g).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=g).to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        # bf16 autocast roughly halves the step time on CPUs with bf16 units; weights, optimiser
        # state, EMA and the loss stay float32.
        bf16 = cfg.get("autocast_bf16", False)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            pred = unet(xt, t, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.step(unet.parameters())
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if step % cfg["checkpoint_every"] == 0 or step == total:
            seconds += time.time() - t0
            t0 = time.time()
            log.write(json.dumps({"step": step, "loss": sum(losses) / len(losses), "seconds": seconds}) + "\n")
            log.flush()
            losses = []
            save_checkpoint(
                ckpt_path,
                {"unet": unet.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict(), "step": step,
                 "seconds": seconds},
            )
    seconds += time.time() - t0
    save_checkpoint(
        ckpt_path,
        {"unet": unet.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict(), "step": step, "seconds": seconds},
    )
    bar.close()
    print(f"stopped at step {step}/{total} after {seconds / 60:.1f} min of training")


def _stop_on_signals() -> list:
    """SIGTERM / SIGINT end the loop after the current step, so the final checkpoint is written."""
    stop: list = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    return stop


def export(cfg: dict, out: Path, dest: Path) -> None:
    """Write the EMA weights as a ClassConditionalPipeline folder (unet/, scheduler/, model_index.json),
    or as a bare UNet2DModel folder when cfg["export_layout"] == "unet"."""
    state = load_checkpoint(out / "checkpoint.pt")
    if state is None:
        raise FileNotFoundError(f"out={str(out)!r} holds no checkpoint.pt to export")
    unet = build_unet(cfg)
    ema = EMAModel(unet.parameters(), decay=cfg["ema_decay"])
    ema.load_state_dict(state["ema"])
    ema.copy_to(unet.parameters())
    info = {"steps": int(state["step"]), "train_seconds": float(state["seconds"]), "config": cfg,
            "hardware": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"}
    layout = cfg.get("export_layout", "pipeline")
    if layout == "unet":
        unet.save_pretrained(dest, safe_serialization=True)
        (dest / "training.json").write_text(json.dumps(info, indent=2))
        print(f"exported EMA UNet of step {state['step']} to {dest}")
        return
    if layout != "pipeline":
        raise ValueError(f"export_layout={layout!r} in the config; allowed: 'pipeline', 'unet'")
    # Sampling uses DDIM on the training schedule (any diffusers scheduler can replace it).
    scheduler = DDIMScheduler.from_config(build_scheduler(cfg).config)
    pipe = ClassConditionalPipeline(unet, scheduler, class_names=CIFAR10_CLASSES)
    pipe.save_pretrained(dest, safe_serialization=True)
    (dest / "unet" / "training.json").write_text(json.dumps(info, indent=2))
    print(f"exported EMA weights of step {state['step']} to {dest}")


def main() -> None:
    args = training_parser(__doc__, "unet.json", "runs/unet").parse_args()
    cfg = load_config(args.config)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.export:
        export(cfg, args.out, args.export)
    else:
        train(cfg, args.data, args.out, args.device, args.max_minutes, args.threads)


if __name__ == "__main__":
    main()

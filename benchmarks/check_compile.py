"""The guidance hook under torch.compile with a chosen backend (default: inductor), on the tiny SD pipeline.

    python benchmarks/check_compile.py [--backend inductor] [--device cpu]

Prints, with the time since compiling started: the compiled pipeline against the eager one, CFG and
APG(eta=1, r=0, beta=0) through the hook against the compiled native pipeline, and whether removing the
hook gives the compiled output back bit for bit. tests/test_composition.py runs the same check with the
"eager" backend (inductor's C++ compilation takes minutes on a shared CPU: 191 s for the first call here).
Each new `apply_guidance` handle makes dynamo trace the UNet call again (its guards see new hook objects).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny_pipelines as tp  # noqa: E402

from guidance import APG, CFG  # noqa: E402
from pipelines import apply_guidance  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe, kwargs = tp.build("sd").to(args.device), tp.call_kwargs("sd")

    def run() -> torch.Tensor:
        torch.manual_seed(0)
        return pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0]

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max() / b.abs().max())

    plain = run()
    start = time.perf_counter()
    pipe.unet.compile(backend=args.backend)
    native = run()
    print(f"backend={args.backend} device={args.device}")
    print(f"compiled native vs eager: {rel(native, plain):.2e} ({time.perf_counter() - start:.0f} s)", flush=True)
    for name, strategy in (("CFG", CFG()), ("APG(1,0,0)", APG(eta=1.0, norm_threshold=0.0, momentum=0.0))):
        with apply_guidance(pipe, strategy):
            guided = run()
        print(f"hook {name} vs compiled native: {rel(guided, native):.2e} ({time.perf_counter() - start:.0f} s)",
              flush=True)
    print(f"removal bit-identical: {torch.equal(run(), native)} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()

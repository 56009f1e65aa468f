"""The README's pipeline-support table, generated from the adapter rows.

    python -m pipelines.support_table README.md     # rewrites the table between the markers

`tests/test_pipeline_zoo.py` checks that the README holds exactly this table.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .adapters import DIFFUSERS_ADAPTERS, REFUSED, Adapter
from .layouts import LAYOUTS

TABLE_START, TABLE_END = "<!-- pipeline-support:start -->", "<!-- pipeline-support:end -->"


def _notes(a: Adapter) -> str:
    notes = [a.note] if a.note else []
    if a.guide_channels_of_input:
        notes.append("learned sigma: guides the first in_channels output channels")
    if a.extra_input_channels:
        notes.append("conditioning channels appended to the input: x0 from the latent channels only")
    if a.negated_output:
        notes.append("predicts the negated velocity")
    for kw in a.off_kws:
        notes.append(f"with {kw}=0 (PAG on is refused)")
    if a.needs_negative:
        notes.append("true CFG: needs a negative prompt")
    return "; ".join(notes)


def support_table_markdown() -> str:
    """Supported classes grouped by layout, then the refused ones and why."""
    lines = []
    for layout, cls in LAYOUTS.items():
        names = sorted(n for n, a in DIFFUSERS_ADAPTERS.items() if a.layout == layout)
        if not names:
            continue
        lines += [f"**`{layout}`**: {cls.description} ({len(names)} classes)", "",
                  "| class | denoiser | scale keyword | notes |", "|---|---|---|---|"]
        for n in names:
            a = DIFFUSERS_ADAPTERS[n]
            scale = " / ".join(f"`{k}`" for k in (a.scale_kw,) + a.expert_scale_kws)
            denoisers = " / ".join(f"`{d}`" for d in a.denoisers)
            lines.append(f"| `{n}` | {denoisers} | {scale} | {_notes(a)} |")
        lines.append("")
    by_reason: dict[str, list[str]] = {}
    for name, why in sorted(REFUSED.items()):
        by_reason.setdefault(why, []).append(f"`{name}`")
    lines += ["**Refused** with a `TypeError` that says why (never a silent pass-through):", "",
              "| classes | why |", "|---|---|"]
    lines += [f"| {', '.join(names)} | {why} |" for why, names in by_reason.items()]
    lines += ["", "Any other class is refused too, since its layout is not verified by a test; a custom pipeline "
              "that follows one of the layouts can be registered with `pipelines.register_adapter`."]
    return "\n".join(lines)


def rewrite(text: str) -> str:
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    return f"{head}{TABLE_START}\n{support_table_markdown()}\n{TABLE_END}{tail}"


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(rewrite(path.read_text()))

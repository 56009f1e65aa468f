"""The documentation site builds with no warning (a broken link, page or API reference fails), and its pages say
what the code holds (the generated ones are checked where they are generated)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_site_builds_strictly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert (tmp_path / "site" / "rules" / "perturbed" / "index.html").is_file()
    api = (tmp_path / "site" / "api" / "guidance" / "index.html").read_text()
    assert "CFGZeroStar" in api and "perturbation" in api  # the API reference is built from the docstrings


def test_the_readme_stays_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; the details belong in docs/"
    assert lines[3].startswith("bash .ci/env guidance-eval demo") and lines[4].startswith("bash .ci/env python -m pytest")


def test_every_rule_of_the_registry_has_a_page():
    from guidance import REGISTRY

    pages = "\n".join(p.read_text() for p in (ROOT / "docs" / "rules").glob("*.md"))
    missing = [name for name in REGISTRY if f"`{name}`" not in pages and f".{name}\n" not in pages
               and f"({name}" not in pages and f"{name}(" not in pages]
    assert not missing, f"rules without a page in docs/rules/: {missing}"

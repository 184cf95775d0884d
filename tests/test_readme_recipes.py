"""The README's two recipes run as written: the Quickstart from a clone of this repository in a fresh venv, and
"Your layouts on SD3.5 (GPU)" up to the point where weights are needed, with tiny stand-ins for the weights.

Each test reads its block from README.md, so editing the README edits what runs. What is substituted, and why:
- Quickstart: the clone's URL is this repository; the venv sees the installed packages (``--system-site-packages``,
  so pip resolves the dependencies from this machine instead of downloading CUDA torch); `diffrl train` gets a
  one-iteration budget appended (the full default is the README's 7-minute run); the test line runs one test file.
- SD3.5: `pip` installs are skipped (a CUDA build; diffrl is installed); `hf download` copies tiny folders built
  from configs (a random SD3 and Grounding DINO, as in tests/test_sd3.py and conftest.py); `--device cuda` is
  dropped where there is no GPU; `diffrl train` gets a tiny budget appended. Every `diffrl` command runs.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from tests.test_sd3 import build_tiny_sd3

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def readme_block(heading: str) -> str:
    """The first ```bash block under ``## heading``."""
    section = README.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"^```bash\n(.*?)^```", section, re.MULTILINE | re.DOTALL).group(1)


def run_bash(script: str, cwd: Path, timeout: int = 900) -> str:
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(["bash", "-c", f"set -euo pipefail\n{script}"], cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env={**env, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def test_the_quickstart_runs_from_a_clone_in_a_fresh_venv(tmp_path):
    block = readme_block("Quickstart")
    assert block.startswith("git clone <this repository's URL> diffrl && cd diffrl\npython -m venv .venv")
    assert "diffrl train " in block and "python -m pytest -q " in block
    script = (block.replace("<this repository's URL>", str(REPO))
              .replace("python -m venv .venv", f"{sys.executable} -m venv --system-site-packages .venv")
              .replace("python -m pytest -q ", "python -m pytest -q tests/test_code_shape.py "))
    budget = ("--iterations 1 --out runs/quick env.layouts_per_iter=4 env.group_size=2 env.num_steps=3 eval.layouts=10 "
              "eval.grid=2")
    shim = f'diffrl() {{ if [ "$1" = train ]; then command diffrl "$@" {budget}; else command diffrl "$@"; fi; }}\n'
    run_bash(shim + script + '\npython -c "import diffrl; print(diffrl.__file__)" > where.txt', tmp_path)
    clone = tmp_path / "diffrl"
    assert (clone / ".venv" / "bin" / "diffrl").is_file()
    assert Path((clone / "where.txt").read_text().strip()).is_relative_to(clone)  # the venv runs the clone's code
    summary = json.loads((clone / "runs" / "quick" / "summary.json").read_text())
    assert summary["base"]["isr"] is not None and summary["final"]["isr"] is not None


def test_the_sd35_recipe_runs_with_tiny_stand_ins_for_the_weights(tmp_path, tiny_gdino):
    block = readme_block("Your layouts on SD3.5 (GPU)")
    example = re.search(r'^`(\{"prompt".*\})`$', README.split("## Your layouts on SD3.5 (GPU)", 1)[1], re.MULTILINE)
    layout = json.loads(example.group(1))  # the README's own example line, as the user's data
    (tmp_path / "layouts.jsonl").write_text("".join(json.dumps(layout) + "\n" for _ in range(4)))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(layout) + "\n" for _ in range(2)))
    sd3 = build_tiny_sd3(tmp_path / "tiny-sd3")
    assert "hf download stabilityai/stable-diffusion-3.5-medium --local-dir models/sd35" in block
    assert "hf download IDEA-Research/grounding-dino-tiny --local-dir models/gdino" in block
    device = "" if torch.cuda.is_available() else '[ "$a" = --device ] && { skip=1; continue; }; '
    budget = ("env.layouts_per_iter=2 env.group_size=2 env.num_steps=2 eval.batch_size=2 eval.grid=2 "
              "model.lora_rank=4 --iterations 1 --quiet")
    shims = f"""
pip() {{ echo "skipped: pip $*"; }}
hf() {{
  mkdir -p "$(dirname "$4")"
  case "$2" in stabilityai/*) cp -r {sd3} "$4";; IDEA-Research/*) cp -r {tiny_gdino} "$4";; *) return 1;; esac
}}
diffrl() {{
  local args=() skip=0
  for a in "$@"; do
    if [ $skip = 1 ]; then skip=0; continue; fi
    {device}args+=("$a")
  done
  if [ "${{args[0]}}" = train ]; then args+=({budget}); fi
  PYTHONPATH="{REPO}" "{sys.executable}" -m diffrl.cli "${{args[@]}}"
}}
"""
    out = run_bash(shims + block, tmp_path)
    assert out.count("skipped: pip") == 2
    summary = json.loads((tmp_path / "runs" / "sd35" / "summary.json").read_text())
    assert "eval.jsonl" in json.dumps(summary)  # the before/after is on the user's eval set
    assert (tmp_path / "sd35-layout-lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "sd35-layout-lora" / "layout_adapter" / "config.json").is_file()

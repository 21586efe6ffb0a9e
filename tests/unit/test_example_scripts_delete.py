"""The example scripts never delete a user's data: the demos replace their previous run with
`tcli loop --overwrite` (only what tcli wrote), and the GSM8K pipeline drops an old checkpoint only
when it is one (tcli_state.json in it)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "examples").rglob("*.sh"))
PIPELINE = ROOT / "examples" / "gsm8k" / "pipeline.sh"
RECURSIVE_RM = re.compile(r"\brm\s+(-\w*[rR]|--recursive)")


def test_no_script_removes_a_directory_outside_the_checked_helper():
    assert SCRIPTS
    for path in SCRIPTS:
        text = path.read_text()
        helper = re.search(r"^drop_checkpoint\(\) \{.*?^\}", text, re.M | re.S)
        rest = text.replace(helper.group(), "") if helper else text
        assert not RECURSIVE_RM.search(rest), path


def test_the_demos_replace_their_previous_run_with_overwrite():
    for rel in ("examples/demo.sh", "examples/tools/demo.sh"):
        loops = [ln for ln in (ROOT / rel).read_text().splitlines() if " loop --config " in ln]
        assert loops and all("--overwrite" in ln for ln in loops), rel


def _drop(path: Path) -> None:
    helper = re.search(r"^drop_checkpoint\(\) \{.*?^\}", PIPELINE.read_text(), re.M | re.S)
    subprocess.run(["bash", "-c", f'{helper.group()}\ndrop_checkpoint "$1"', "_", str(path)],
                   check=True)


def test_the_pipeline_drops_only_a_tcli_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt_1"
    ckpt.mkdir()
    (ckpt / "tcli_state.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"x")
    _drop(ckpt)
    assert not ckpt.exists()

    mine = tmp_path / "ckpt_2"  # a directory of the same name that tcli did not write
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    _drop(mine)
    assert (mine / "notes.txt").read_text() == "keep me"

    target = tmp_path / "real"
    target.mkdir()
    (target / "tcli_state.json").write_text("{}")
    link = tmp_path / "ckpt_3"
    link.symlink_to(target)
    _drop(link)
    assert link.is_symlink() and (target / "tcli_state.json").exists()
    _drop(tmp_path / "absent")  # nothing there: nothing to do

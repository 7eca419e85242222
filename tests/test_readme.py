"""The README's commands: the quickstart's `qpass run` is executed here; CI (.ci/run) executes the test command."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.builders import REPO


def _bash_blocks() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    blocks = _bash_blocks()
    assert len(blocks) >= 2
    install_and_run, install_and_test = blocks[0], blocks[1]
    assert "pip install ." in install_and_run and "qpass run models/" in install_and_run
    assert "pip install -e '.[test]'" in install_and_test and "pytest" in install_and_test
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert install_and_test in ci.splitlines()


def test_readme_quickstart_writes_an_accurate_int8_model(tmp_path):
    run_part = _bash_blocks()[0].split("&&")[-1].strip()
    args = run_part.split()
    assert args[:2] == ["qpass", "run"]
    shutil.copytree(REPO / "models", tmp_path / "models")
    proc = subprocess.run([sys.executable, "-m", "qpass", *args[1:]], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "models" / "digits_cnn.qpass.onnx"
    report = json.loads((tmp_path / "models" / "digits_cnn.qpass.report.json").read_text())
    assert out.exists()
    logits = report["validation"]["outputs"][0]
    assert logits["labelled_samples"] == 340
    # acceptance: int8 accuracy within 1 point of fp32 and top-1 agreement >= 99 %
    assert logits["accuracy_quantized"] >= logits["accuracy_fp32"] - 0.01
    assert logits["top1_agreement"] >= 0.99
    assert report["quantized_nodes"] == {"Conv": 2, "Gemm": 2}
    assert Path(REPO / "models" / "digits_cnn.onnx").read_bytes() == (tmp_path / "models" / "digits_cnn.onnx").read_bytes()


def test_readme_synopsis_names_every_command_line_option():
    """Every long option of `qpass run` and `qpass validate` appears in the README (the synopsis), so the docs
    cannot drift from the CLI silently."""
    import argparse

    from qpass.cli import build_parser

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, parser in sub.choices.items():
        missing = [o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"
                   and o not in readme]
        assert not missing, f"qpass {command}: {missing} not in README.md"

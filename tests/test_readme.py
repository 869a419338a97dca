"""README.md's Python examples run, and print what their comments say."""

import contextlib
import io
import os
import re

import pytest

from conftest import ROOT


def _python_blocks():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_has_examples():
    assert len(_python_blocks()) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_example(index, tmp_path, monkeypatch):
    code = _python_blocks()[index]
    # run where the example's relative paths resolve, writing its outputs to a temporary folder
    os.symlink(os.path.join(ROOT, "tests"), tmp_path / "tests")
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"README.md example {index}", "exec"), {})
    expected = [m.strip() for m in re.findall(r"^\s*print\(.*?\)\s*# (.*)$", code, flags=re.M)]
    assert printed.getvalue().strip().splitlines() == expected

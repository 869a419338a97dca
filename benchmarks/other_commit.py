"""Runs a benchmark script with the elmojax of another checkout (a `git worktree` of an older
commit) instead of the installed one, for side-by-side runs:

  git worktree add --detach /tmp/before 144c12b
  python benchmarks/other_commit.py /tmp/before /tmp/before/benchmarks/train.py --config small_char

PYTHONPATH alone is not enough in every case: an editable install's import hook can come first.
"""

import os
import runpy
import sys

if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: other_commit.py CHECKOUT SCRIPT [ARGS...]")
    tree, script = os.path.abspath(sys.argv[1]), sys.argv[2]
    sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path[:0] = [os.path.dirname(os.path.abspath(script)), tree]
    sys.argv = sys.argv[2:]
    runpy.run_path(script, run_name="__main__")

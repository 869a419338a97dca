"""elmojax installed as a user installs it: a wheel built from the repository carries the
top-level configs/ as elmojax.configs, the main job runs on its bundled quickstart from any
directory, configs are found by name or by path, and a config whose data is not there says which
field and the `prepare` command that makes it, in one line."""

import glob
import importlib.util
import os
import shutil
import site
import subprocess
import sys

import pytest

from conftest import CONFIGS, ROOT, in_process
import elmojax.main as main

NAMES = ["billion_word", "bilm_options", "quickstart", "small", "tiny"]


def test_every_folder_of_the_package_is_in_the_wheel():
    """pyproject lists the packages (to map elmojax.configs onto configs/): none may be left out."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11's
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    folders = {os.path.relpath(d, ROOT).replace(os.sep, ".") for d, _, _ in os.walk(os.path.join(ROOT, "elmojax"))
               if os.path.basename(d) != "__pycache__"}
    assert set(setuptools["packages"]) == folders | {"elmojax.configs"}
    assert setuptools["package-dir"] == {"elmojax.configs": "configs"}


def test_configs_by_name_are_the_checkouts_configs():
    assert main.configs_dir() == CONFIGS
    assert main.config_names() == NAMES
    assert main.resolve_config("quickstart") == os.path.join(CONFIGS, "quickstart.py")
    assert main.resolve_config("tiny:words") == os.path.join(CONFIGS, "tiny.py") + ":words"
    assert main.resolve_config("bilm_options:/x/options.json") == os.path.join(CONFIGS, "bilm_options.py") + ":/x/options.json"


def test_configs_by_path_are_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main.resolve_config("configs/billion_word.py") == "configs/billion_word.py"
    assert main.resolve_config("configs/tiny.py:words") == "configs/tiny.py:words"
    mine = tmp_path / "small"  # a file of the user's that has a bundled config's name: the file
    mine.write_text("", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert main.resolve_config("small") == "small"


def test_an_unknown_config_lists_the_names():
    run = in_process("main", "--config=billion_words", "--workdir=unused")
    assert run.returncode == 2
    assert run.stderr == (f"error: --config=billion_words: no such config file or name "
                          f"(the bundled configs by name: {', '.join(NAMES)})\n")


def test_a_config_by_name_and_its_overrides(tmp_path):
    """--config=NAME and --config NAME both name a bundled config; its overrides apply to it."""
    for config in (["--config=billion_word"], ["--config", "billion_word"]):
        run = in_process("main", *config, f"--config.data.vocab_file={tmp_path}/data/1b/vocab.txt",
                         f"--workdir={tmp_path}/w")
        assert run.returncode == 1
        assert run.stderr == (f"error: --config.data.vocab_file={tmp_path}/data/1b/vocab.txt: no such file; "
                              f"`python -m elmojax.prepare --input CORPUS.txt --output {tmp_path}/data/1b` makes it "
                              f"from a tokenized corpus (or set the field to your data)\n")
        assert not os.path.exists(tmp_path / "w")  # before any work


def _billion_word():
    spec = importlib.util.spec_from_file_location("billion_word", os.path.join(CONFIGS, "billion_word.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("present, field, line", [
    ([], "vocab_file", "--config.data.vocab_file=data/1b/vocab.txt: no such file; "
                       "`python -m elmojax.prepare --input CORPUS.txt --output data/1b` makes it"),
    (["data/1b/vocab.txt"], "train_prefix", "--config.data.train_prefix=data/1b/train/*: no files match; "
                                            "`python -m elmojax.prepare --input CORPUS.txt --output data/1b` makes them"),
    (["data/1b/vocab.txt", "data/1b/train/a.txt"], "heldout_prefix",
     "--config.data.heldout_prefix=data/1b/heldout/*: no files match; "
     "`python -m elmojax.prepare --input CORPUS.txt --output data/1b` makes them"),
    (["data/1b/vocab.txt", "data/1b/train/a.txt", "data/1b/heldout/a.txt"], None, None),
])
def test_missing_data_names_the_field_and_prepare(tmp_path, monkeypatch, present, field, line):
    monkeypatch.chdir(tmp_path)
    for path in present:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()
    message = main.missing_data(_billion_word(), "train")
    assert (message is None) if line is None else message.startswith(line)
    evaluate = main.missing_data(_billion_word(), "evaluate")  # evaluation reads the heldout data only
    assert (evaluate is None) == ("data/1b/heldout/a.txt" in present)
    assert main.missing_data(_billion_word(), "export") is None


def test_missing_data_in_a_folder_of_another_form(tmp_path):
    config = _billion_word()
    config.data.update(vocab_file="", train_prefix=f"{tmp_path}/shards-*.txt")
    assert main.missing_data(config, "train") == (
        f"--config.data.train_prefix={tmp_path}/shards-*.txt: no files match; `python -m elmojax.prepare --input "
        f"CORPUS.txt --output DIR` makes them (as DIR/train/...) from a tokenized corpus (or set the field to your data)")


def _fresh_venv(directory: str) -> str:
    """A new virtual environment's python that sees this interpreter's packages (jax and the rest,
    nothing downloaded) but not the checkout: elmojax must come from what is installed into it."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", directory], check=True)
    python = os.path.join(directory, "bin", "python")
    own = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                         capture_output=True, text=True).stdout.strip()
    # this interpreter's site-packages (where it is a virtual environment itself), as plain paths:
    # their .pth files (an editable elmojax's) are not read
    with open(os.path.join(own, "zz_parent.pth"), "w", encoding="utf-8") as f:
        f.write("\n".join(p for p in site.getsitepackages() if p != own) + "\n")
    return python


def _wheel(directory: str) -> str:
    """A wheel built from a copy of the repository's package files (no build folder left in it)."""
    source = os.path.join(directory, "source")
    os.makedirs(source)
    for name in os.listdir(ROOT):
        if os.path.isfile(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), source)
    for name in ("elmojax", "configs"):
        shutil.copytree(os.path.join(ROOT, name), os.path.join(source, name),
                        ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", directory, source],
                           capture_output=True, text=True)
    if build.returncode != 0 and "No matching distribution found for setuptools" in build.stdout + build.stderr:
        pytest.skip("pip cannot get setuptools to build the wheel (offline, no index)")
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    return glob.glob(os.path.join(directory, "elmojax-*.whl"))[0]


@pytest.mark.slow  # builds a wheel, makes a virtual environment, trains a few steps
def test_an_installed_wheel_runs_anywhere(tmp_path):
    wheel = _wheel(str(tmp_path / "dist"))
    python = _fresh_venv(str(tmp_path / "venv"))
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], check=True)
    empty = tmp_path / "anywhere"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"

    def run(*args):
        return subprocess.run([python, *args], cwd=empty, env=env, capture_output=True, text=True, timeout=600)

    where = run("-c", "import elmojax.main as m; print(m.__file__); print(m.configs_dir())").stdout.split()
    assert where[0].startswith(str(tmp_path / "venv")), where  # the installed package, not the checkout
    assert {f"{name}.py" for name in NAMES} <= set(os.listdir(where[1]))
    trained = run("-m", "elmojax.main", "--workdir=w", "--config.train.max_steps=3")  # no --config: quickstart
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert os.listdir(empty / "w" / "checkpoints")
    assert "heldout perplexity" in trained.stdout
    no_data = run("-m", "elmojax.main", "--config=billion_word", "--workdir=w1b")
    assert no_data.returncode == 1
    assert no_data.stderr.startswith("error: --config.data.vocab_file=data/1b/vocab.txt: no such file; "
                                     "`python -m elmojax.prepare --input CORPUS.txt --output data/1b`")
    assert len(no_data.stderr.splitlines()) == 1 and not os.path.exists(empty / "w1b")

    # the console script the wheel installs: its subcommands, the same run and the same line
    command = os.path.join(os.path.dirname(python), "elmojax")
    listed = subprocess.run([command, "--help"], cwd=empty, env=env, capture_output=True, text=True)
    assert listed.returncode == 0 and all(name in listed.stdout for name in
                                          ("train", "evaluate", "export", "prepare", "dump"))
    trained = subprocess.run([command, "train", "--workdir=w2", "--config.train.max_steps=2"], cwd=empty, env=env,
                             capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert os.listdir(empty / "w2" / "checkpoints")
    no_data = subprocess.run([command, "train", "--config=billion_word", "--workdir=w1b"], cwd=empty, env=env,
                             capture_output=True, text=True)
    assert no_data.returncode == 1 and len(no_data.stderr.splitlines()) == 1 and "data.vocab_file" in no_data.stderr

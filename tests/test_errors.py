"""Bad input through the command line: every case ends with ``error: <what to do>`` on stderr and exit status 2,
never a traceback, and nothing is written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helmlm.cli import main

ROOT_HELP = "Hyperbolic large language models."


def bad_inputs(tmp):
    """(argv, a phrase the message must contain) for every subcommand's typical mistakes."""
    yaml_bad = tmp / "bad.yaml"
    yaml_bad.write_text("train: [unclosed\n")
    run = ["data.source=local", f"data.paths={tmp / 'missing.jsonl'}", f"data.dir={tmp / 'data'}",
           f"out_dir={tmp / 'run'}"]
    return [
        (["train", "tiny", "train.lrr=1"], "did you mean train.lr?"),
        (["train", "tiny", "train.learning_rate=1e-3"], "did you mean train.lr?"),
        (["train", "tiny", "train.steps=many"], "train.steps must be of type int"),
        (["train", str(yaml_bad)], "not valid YAML"),
        (["train", str(tmp / "nope.yaml")], "no training config"),
        (["train", "tiny", "data.source=local", f"out_dir={tmp / 'run'}"], "data.source=local needs data.paths"),
        (["train", "tiny", *run], "no files match"),
        (["train", "tiny", f"out_dir={tmp / 'run'}", "--resume"], "no checkpoint"),
        (["train", "tiny", f"out_dir={tmp / 'run'}", "--extend"], "together with --resume"),
        (["train", "tiny", f"out_dir={tmp / 'run'}", "train.init_from=" + str(tmp / "nowhere")], "does not exist"),
        (["prepare", "tiny", *run], "no files match"),
        (["prepare", "tiny", "data.val_fraction=2"], "data.val_fraction must be in [0, 1)"),
        (["export", str(tmp / "nothing"), str(tmp / "out")], "neither a checkpoint"),
        (["generate", str(tmp / "nothing"), "--prompt", "hi"], "not a model directory"),
        (["generate", str(tmp), "--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
        (["generate", str(tmp), "--prompt", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["generate", str(tmp), "--prompts-file", str(tmp / "absent.txt")], "cannot read --prompts-file"),
        (["smoke", "--config", "no_such_preset"], "no config file or preset named 'no_such_preset'"),
        (["smoke", "--steps", "0"], "must be >= 1"),
        (["params", "no_such_preset"], "no config file or preset"),
    ]


def test_every_bad_input_exits_2_with_a_message(tmp_path, capsys):
    for argv, phrase in bad_inputs(tmp_path):
        code = main(argv)  # an exception escaping here would be a traceback for the user
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert err.startswith("error: ") and phrase in err, (argv, err)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


def test_a_bad_input_from_a_real_process_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "helmlm", "train", "tiny", "train.lrr=1",
                             f"out_dir={tmp_path / 'run'}"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["generate", "--help"]])
def test_help_works(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0 and "usage: helmlm" in capsys.readouterr().out


BLOCKING_RUN = """
import importlib.abc, sys
blocked = sys.argv[1].split(",")

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Blocked())
from helmlm.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("blocked, argv, extra", [
    ("gguf", ["convert", "{tmp}/model.gguf", "{tmp}/out"], "convert"),
    ("lm_eval", ["eval", "{tmp}", "--tasks", "helm_local_mc"], "eval"),
])
def test_a_missing_optional_extra_names_the_pip_install_that_adds_it(tmp_path, blocked, argv, extra):
    (tmp_path / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    argv = [a.format(tmp=tmp_path) for a in argv]
    result = subprocess.run([sys.executable, "-c", BLOCKING_RUN, blocked, *argv], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"pip install 'helmlm[{extra}]'" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()

"""cli.py: the one rule every command line ends with. A user's mistake (ValueError, OSError) is one line
``<prog>: error: ...`` on standard error and exit status 2; a bug keeps its traceback. Checked on
``cli.run`` itself, on the one argument parser ``cli.ArgumentParser`` and on ``python experiments.py`` in a
subprocess (a bad option value, an unknown option, a missing path, a folder with one class, the commands that
moved out of it)."""

import os
import subprocess
import sys

import pytest
from PIL import Image

import cli

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_users_error_is_one_line_and_status_2(capsys):
    def main(argv):
        raise ValueError(f"--epochs must be at least 1,\n   got {argv[0]}")

    assert cli.run(main, "prog.py", ["-3"]) == cli.USAGE_ERROR_STATUS == 2
    assert capsys.readouterr().err == "prog.py: error: --epochs must be at least 1, got -3\n"


def test_an_oserror_without_a_message_names_its_file(capsys):
    def main(argv):
        return open(os.path.join("no", "such", "file.txt"))

    assert cli.run(main, "prog.py") == 2
    path = os.path.join("no", "such", "file.txt")
    assert capsys.readouterr().err == f"prog.py: error: No such file or directory: {path}\n"


def test_a_bug_keeps_its_traceback_and_the_variable_shows_a_users_error_too(monkeypatch):
    def bug(argv):
        raise KeyError("bug")

    with pytest.raises(KeyError):
        cli.run(bug, "prog.py")
    monkeypatch.setenv(cli.TRACEBACK_VARIABLE, "1")
    with pytest.raises(ValueError):
        cli.run(lambda argv: (_ for _ in ()).throw(ValueError("user")), "prog.py")


@pytest.mark.parametrize("result, status", [([{"row": 1}], 0), ([], 1), (None, 1), (True, 0), (3, 3), (0, 0)])
def test_the_status_follows_mains_result(result, status):
    assert cli.run(lambda argv: result, "prog.py") == status


def experiments_py(work, *arguments):
    """``python experiments.py ARGUMENTS`` in ``work``: the completed process."""
    return subprocess.run([sys.executable, os.path.join(REPOSITORY, "experiments.py"), *arguments], cwd=work,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)


def one_line_error(done):
    """The one error line of a finished process that failed with a user's error."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("experiments.py: error: ")
    return done.stderr


def test_experiments_py_answers_a_negative_epoch_count_with_one_line(tmp_path):
    assert "epochs" in one_line_error(experiments_py(tmp_path, "--dataset", "mnist", "--epochs", "-3"))
    assert os.listdir(tmp_path) == []  # refused before any data loads or any output is written


def test_experiments_py_answers_a_missing_path_with_one_line(tmp_path):
    assert "no/such/folder" in one_line_error(experiments_py(tmp_path, "--dataset", "no/such/folder"))


def test_experiments_py_answers_a_folder_with_one_class_with_one_line(tmp_path):
    (tmp_path / "one" / "cats").mkdir(parents=True)
    for k in range(4):
        Image.new("RGB", (8, 8), (k * 40, 0, 0)).save(tmp_path / "one" / "cats" / f"{k}.png")
    message = one_line_error(experiments_py(tmp_path, "--dataset", str(tmp_path / "one"), "--epochs", "1"))
    assert "class" in message
    assert sorted(os.listdir(tmp_path)) == ["one"]


def test_experiments_py_names_the_new_command_of_omniglot_and_of_the_autoencoders(tmp_path):
    assert "python omniglot.py" in one_line_error(experiments_py(tmp_path, "--dataset", "omniglot"))
    message = one_line_error(experiments_py(tmp_path, "autoencoders", "--iterations", "60"))
    assert "python autoencoders.py --iterations 60" in message


def test_the_one_argument_parser_raises_a_users_error_and_keeps_help(capsys):
    parser = cli.ArgumentParser(prog="prog.py")
    parser.add_argument("--count", type=int, default=1)
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("go").add_argument("--speed", type=float)
    with pytest.raises(ValueError, match="argument --count: invalid int value: 'x'"):
        parser.parse_args(["--count", "x"])
    with pytest.raises(ValueError, match="unrecognized arguments: --bogus"):
        parser.parse_args(["--bogus"])
    with pytest.raises(ValueError, match="argument --speed: invalid float value: 'fast'"):  # a subcommand's too
        parser.parse_args(["go", "--speed", "fast"])
    assert cli.run(lambda argv: parser.parse_args(argv), "prog.py", ["--count", "x"]) == 2
    assert capsys.readouterr().err == "prog.py: error: argument --count: invalid int value: 'x'\n"
    with pytest.raises(SystemExit) as exit:
        parser.parse_args(["--help"])
    assert exit.value.code == 0 and "--count" in capsys.readouterr().out


def test_a_whole_number_option_takes_whole_numbers_from_its_smallest_on():
    parser = cli.ArgumentParser(prog="prog.py")
    parser.add_argument("--count", type=cli.whole_number(), default=None)
    parser.add_argument("--steps", type=cli.whole_number(0), default=None)
    arguments = parser.parse_args(["--count", "1", "--steps", "0"])
    assert (arguments.count, arguments.steps) == (1, 0)
    assert parser.parse_args(["--count", "4096"]).count == 4096
    for option, text, smallest in (("--count", "0", 1), ("--count", "1.5", 1), ("--count", "two", 1),
                                   ("--steps", "-1", 0), ("--steps", "", 0)):
        with pytest.raises(ValueError, match=f"argument {option}: expected a whole number of at least {smallest}, "
                                             f"got '{text}'"):
            parser.parse_args([option, text])


@pytest.mark.parametrize("arguments, message", [(["--lr-step", "0"], "argument --lr-step"),
                                                (["--bogus"], "unrecognized arguments: --bogus"),
                                                (["--network", "vgg"], "argument --network: invalid choice"),
                                                (["--classic", "--margin", "2"], "--classic")])
def test_experiments_py_answers_a_bad_option_with_one_line_and_no_usage(tmp_path, arguments, message):
    assert message in one_line_error(experiments_py(tmp_path, "--dataset", "mnist", *arguments))
    assert os.listdir(tmp_path) == []


def test_experiments_py_help_exits_0(tmp_path):
    done = experiments_py(tmp_path, "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: experiments.py") and done.stderr == ""

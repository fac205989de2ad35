"""Starting local processes for the tests and benchmarks: for torch.distributed a free TCP port on
127.0.0.1, an environment without any launcher's variables, the torchrun command line, and a clean end
for spawned workers that passed (``leave_passed_worker``); and many command lines of one script run in a
single fresh interpreter (``command_lines``)."""

import json
import os
import socket
import subprocess
import sys

# What torchrun (or any launcher) sets for each process; a child must not inherit them from us.
LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port():
    """A TCP port on 127.0.0.1 that no process listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def leave_passed_worker():
    """End a spawned worker whose checks all passed and whose process group is closed: flush its output
    and exit with status 0 at once, skipping the interpreter's teardown, in which gloo's threads were seen
    to abort a process now and then ("terminate called without an active exception", SIGABRT) after
    everything had passed. A worker that fails raises instead, and torch's spawn reports its error."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def clean_environment(*python_path, **variables):
    """This process's environment for a child: one thread per process, ``python_path`` (folders) as
    PYTHONPATH, none of LAUNCHER_VARIABLES, then ``variables`` (str values) on top."""
    env = {name: value for name, value in os.environ.items() if name not in LAUNCHER_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(map(str, python_path)))
    env.update(variables)
    return env


def launcher(processes=2):
    """The command that starts a Python script on ``processes`` local processes: torchrun on 127.0.0.1
    with a free port, or plain Python for one process."""
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-addr",
            "127.0.0.1", "--master-port", str(free_port())]


# Runs in a fresh interpreter: each argv of the JSON list on stdin through cli.run(main, ...), as the script's
# last line does, its stdout and stderr captured apart; prints the list of [status, stdout, stderr] as JSON.
_COMMAND_LINES = """
import contextlib, importlib, io, json, os, sys
script = sys.argv[1]
sys.path.insert(0, os.path.dirname(script))
import cli
main = importlib.import_module(os.path.basename(script)[:-3]).main
results = []
for argv in json.load(sys.stdin):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.run(main, os.path.basename(script), argv)
    results.append([status, out.getvalue(), err.getvalue()])
sys.__stdout__.write(json.dumps(results))
"""


def command_lines(script, argvs, cwd, timeout=600):
    """Each of ``argvs`` (lists of arguments) run as ``python script ARGV`` ends (``cli.run`` of the script's
    ``main``), all in one fresh interpreter with one thread, so that torch is imported once: returns a list of
    ``(exit status, stdout, stderr)``. For many refused command lines; a run that trains belongs in its own
    process."""
    done = subprocess.run([sys.executable, "-c", _COMMAND_LINES, os.fspath(script)], cwd=cwd, text=True,
                          input=json.dumps([[str(argument) for argument in argv] for argv in argvs]),
                          capture_output=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise AssertionError(f"the command lines of {script} stopped: {done.stderr[-2000:]}")
    return [tuple(result) for result in json.loads(done.stdout)]

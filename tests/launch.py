"""Starting several local processes for the torch.distributed tests and benchmarks: a free TCP port
on 127.0.0.1, an environment without any launcher's variables, and the torchrun command line."""

import os
import socket
import sys

# What torchrun (or any launcher) sets for each process; a child must not inherit them from us.
LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port():
    """A TCP port on 127.0.0.1 that no process listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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

"""
Run a command that ends when the process that started it dies, however it dies:

    python end_with_parent.py PARENT_PID COMMAND [ARG ...]

On Linux the kernel sends this process SIGTERM when its parent dies (prctl's
PR_SET_PDEATHSIG, which outlives the exec below), then the process becomes COMMAND. A
tool killed outright (SIGKILL: nothing of it runs) would otherwise leave its train_net.py
training, unseen, its console output going nowhere. Elsewhere COMMAND just runs.

A script run by path, not a module of the package: importing vipa_d2 (torch, detectron2)
would cost seconds before every train_net.py, and nothing of it is needed here.
"""
import ctypes
import os
import signal
import sys

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
# Exit status when the parent died before the signal was arranged: COMMAND never starts.
PARENT_GONE_STATUS = 3


def main(argv) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        sys.stderr.write(f"usage: {os.path.basename(__file__)} PARENT_PID COMMAND [ARG ...]\n")
        return 2
    parent, command = int(argv[0]), argv[1:]
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        # A parent that died before prctl sent nothing: this process has a new parent by now.
        if os.getppid() != parent:
            return PARENT_GONE_STATUS
    os.execvp(command[0], command)  # file descriptors passed to this process stay open


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

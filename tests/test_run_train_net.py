"""
run_train_net (vipa_d2/utils/runs.py), which tools/main_job.py and tools/study.py start
train_net.py with: the process it starts ends with the tool, when the tool alone gets a
SIGTERM (``kill <pid>``) or a SIGINT. A stand-in script takes train_net.py's place: what is
tested is the process handling, not the training.
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from common import REPO_ROOT
from vipa_d2.utils.end_with_parent import PARENT_GONE_STATUS
from vipa_d2.utils.runs import END_WITH_PARENT

# The stand-in says its pid, then outlives any test: only being stopped ends it early.
CHILD = textwrap.dedent("""
    import os, sys, time
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    print("started", flush=True)
    time.sleep(600)
""")
# The tool: run_train_net on the stand-in, its progress lines to stdout; with "own-handler",
# a SIGTERM handler of its own first, which run_train_net must leave in place.
OWN_HANDLER_STATUS = 99
TOOL = textwrap.dedent(f"""
    import os, signal, sys
    from vipa_d2.utils.runs import run_train_net
    if sys.argv[4:] == ["own-handler"]:
        def finish(signum, frame):
            raise SystemExit({OWN_HANDLER_STATUS})
        signal.signal(signal.SIGTERM, finish)
    run_train_net(sys.argv[1], [sys.argv[2]], sys.argv[3], os.environ, print)
""")
# Generous: the tool imports torch and detectron2 beside other test workers.
START_SECONDS = 120
STOP_SECONDS = 60


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (ended, not yet reaped by whoever adopted it) does not.
    Without /proc (not Linux) a zombie cannot be told apart, and counts as running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:  # its /proc entry went with it, or there is no /proc
        return not os.path.isdir("/proc")


def _ends_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _wait_for_file(path: str, tool: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_SECONDS
    while not os.path.exists(path):
        assert tool.poll() is None, f"the tool ended before its child started: {tool.communicate()}"
        assert time.monotonic() < deadline, f"no child pid in {START_SECONDS} s"
        time.sleep(0.1)


@pytest.mark.parametrize("signum, returncode, own_handler", [
    (signal.SIGTERM, 128 + signal.SIGTERM, False),
    (signal.SIGINT, None, False),
    (signal.SIGTERM, OWN_HANDLER_STATUS, True),  # the tool's handler runs, and the child still ends
    # Nothing of the tool runs: the kernel ends the child (end_with_parent.py, Linux).
    pytest.param(signal.SIGKILL, -signal.SIGKILL, False,
                 marks=pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")),
])
def test_child_ends_with_the_tool(tmp_path, signum, returncode, own_handler):
    child_script = tmp_path / "train_net_stand_in.py"
    child_script.write_text(CHILD)
    pid_file = str(tmp_path / "child.pid")
    tool = subprocess.Popen(
        [sys.executable, "-c", TOOL, str(child_script), pid_file, str(tmp_path / "log.txt")]
        + (["own-handler"] if own_handler else []),
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    child_pid = None
    try:
        _wait_for_file(pid_file, tool)
        with open(pid_file) as f:
            child_pid = int(f.read())
        assert _alive(child_pid)
        tool.send_signal(signum)  # the tool alone, as `kill <pid>` does
        output, _ = tool.communicate(timeout=STOP_SECONDS)
        if returncode is not None:
            assert tool.returncode == returncode, output
        else:  # KeyboardInterrupt: a traceback and a non-zero status
            assert tool.returncode != 0 and "KeyboardInterrupt" in output, output
        # SIGKILL: the kernel signals the child as the tool dies, not before communicate() returns.
        assert _ends_within(child_pid, STOP_SECONDS), "train_net.py's stand-in still runs after its tool ended"
    finally:
        if tool.poll() is None:
            tool.kill()
        if child_pid is not None and _alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def test_end_with_parent_runs_the_command_for_its_parent_only(tmp_path):
    """The command runs when the pid named is the launcher's parent; when it is not (the
    tool died before the launcher arranged the signal) the command never starts."""
    marker = tmp_path / "ran"
    command = [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"]
    done = subprocess.run([sys.executable, END_WITH_PARENT, str(os.getpid()), *command])
    assert done.returncode == 0 and marker.exists()
    marker.unlink()
    if sys.platform.startswith("linux"):
        gone = subprocess.run([sys.executable, END_WITH_PARENT, str(os.getppid()), *command])
        assert gone.returncode == PARENT_GONE_STATUS and not marker.exists()
    usage = subprocess.run([sys.executable, END_WITH_PARENT, "not-a-pid"], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: end_with_parent.py PARENT_PID COMMAND" in usage.stderr

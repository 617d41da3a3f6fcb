"""Real child processes without a fresh interpreter: ``os.fork`` of the test process.

A forked child shares the modules the tests already imported (torch, basicsr, dtkd_*), so starting
one costs milliseconds instead of the ~10 s an interpreter needs to import them on a small machine.
It is a separate process: its global changes (patched runners, loggers, the working directory,
environment variables) stay in it, it can be killed with SIGKILL at any moment, and its exit status
is its own.

Crash tests make the child kill itself at a named point of the product code instead of killing it
from outside after a sleep: ``env={'DTKD_FAULT_INJECT': '<point>[@<n>]'}`` (see
``dtkd_compat.fault_point``); :func:`wait` then returns -9.
"""
import logging
import os
import signal
import sys
import time
import traceback


def _reset_logging():
    """The child writes its own log: forget the BasicSR loggers the parent process set up."""
    from basicsr.utils import logger as basicsr_logger

    basicsr_logger.initialized_logger.clear()
    for name in ('basicsr', 'py.warnings'):
        logging.getLogger(name).handlers.clear()


def _default_sigchld():
    """No SIGCHLD handler in the test process while its children live.

    A DataLoader with workers leaves torch's Python SIGCHLD handler installed in the test process, and
    OpenVINO's CPU plugin gives the compiling thread an alternate signal stack; with both, the SIGCHLD
    of a killed child was seen to end the test process with SIGSEGV on a CPU with AMX. The handler
    only watches DataLoader workers, none of which runs while a forked child does."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def start(fn, log_path, cwd=None, argv=None, env=None):
    """Run ``fn()`` in a forked child; its stdout/stderr go to ``log_path``. Returns the pid.

    ``env``: environment variables set in the child only (e.g. ``dtkd_compat.FAULT_ENV``).

    The child exits with ``fn``'s return value (0 for None), the code of a ``SystemExit``, or 1
    after printing the traceback of any other exception.
    """
    _default_sigchld()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = open(1, 'w', buffering=1, closefd=False)
        sys.stderr = open(2, 'w', buffering=1, closefd=False)
        import torch

        torch.set_num_threads(1)
        _reset_logging()
        if cwd is not None:
            os.chdir(cwd)
        if argv is not None:
            sys.argv = list(argv)
        os.environ.update(env or {})
        result = fn()
        code = result if isinstance(result, int) else 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: B036  (report anything, then exit)
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def wait(pid, timeout=120):
    """Exit code of child ``pid`` (negative: killed by that signal); SIGKILLs it after ``timeout`` s."""
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.time() > deadline:
            kill(pid)
            raise TimeoutError(f'child {pid} did not finish within {timeout} s')
        time.sleep(0.01)


def kill(pid):
    """SIGKILL child ``pid`` and reap it; returns its exit code (-9 when the kill ended it)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def run(fn, log_path, cwd=None, argv=None, timeout=120, env=None):
    """Run ``fn()`` in a forked child to the end (or to its death); returns (exit code, its output)."""
    code = wait(start(fn, log_path, cwd=cwd, argv=argv, env=env), timeout)
    with open(log_path, errors='replace') as f:
        return code, f.read()


def run_entry_point(module, argv, log_path, cwd, env=None):
    """``module.main()`` of an entry point (dtkd.train / test / infer) with ``sys.argv = argv``."""
    return run(module.main, log_path, cwd=cwd, argv=argv, env=env)

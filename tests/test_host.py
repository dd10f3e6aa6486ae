"""metalora.host: the entry points' restart with glibc's malloc tunables."""

import os
import platform
import subprocess
import sys

import pytest

from metalora import host

OURS = ":".join(f"{k}={v}" for k, v in host.MALLOC_TUNABLES.items())


def test_tunables_are_added_to_the_environment():
    assert host.tuned_environment({"PATH": "/bin"}, libc="glibc") == {"PATH": "/bin", "GLIBC_TUNABLES": OURS}
    other = {"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}
    assert host.tuned_environment(other, libc="glibc")["GLIBC_TUNABLES"] == f"glibc.pthread.rseq=0:{OURS}"


@pytest.mark.parametrize("environ, libc", [
    ({}, "musl"),  # not glibc: the variable means nothing
    ({}, ""),
    ({host.OPT_OUT: "0"}, "glibc"),
    ({"GLIBC_TUNABLES": OURS}, "glibc"),  # already restarted
    ({"GLIBC_TUNABLES": f"{next(iter(host.MALLOC_TUNABLES))}=4"}, "glibc"),  # the user's own choice wins
])
def test_no_restart_when_not_needed(environ, libc):
    assert host.tuned_environment(environ, libc=libc) is None


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
@pytest.mark.parametrize("opt_out", [False, True])
def test_the_restarted_process_runs_the_same_command_with_the_tunables(opt_out):
    code = ("import os, sys; from metalora import host; print('start', flush=True); "
            "host.reexec_with_malloc_tunables(); print(sys.argv[1:], os.environ.get('GLIBC_TUNABLES'))")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host.OPT_OUT)}
    if opt_out:
        env[host.OPT_OUT] = "0"
    out = subprocess.run([sys.executable, "-c", code, "a", "--b=1"], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    if opt_out:
        assert out == ["start", "['a', '--b=1'] None"]
    else:  # printed once before the restart, once after it; the arguments survive
        assert out == ["start", "start", f"['a', '--b=1'] {OURS}"]

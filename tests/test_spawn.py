"""start_method="spawn": a fresh interpreter; the job travels by cloudpickle through a pipe.

What every way of running a task promises (secrets off argv and the environment, cancel, an
unpicklable argument refused before starting, ...) is in test_contract.py, run with spawn too;
this file keeps what only a spawn from a script's ``__main__`` shows."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

MAIN = textwrap.dedent("""
    import os, sys, time
    import nbbgtask as bg
    bg.configure(home=sys.argv[1], start_method="spawn")
    factor = 3
    scale = lambda x: x * factor          # a lambda closing over __main__'s globals

    def make_adder(n):
        return lambda x: x + n            # a closure

    class Doubler(bg.BackgroundTask):     # a task class defined in __main__
        def execute(self, status):
            status.update(50, "halfway")
            return status.settings["x"] * 2, len(status.secrets["token"]), os.getpid()

    print(bg.run(scale, 14).result(timeout=60))
    print(bg.run(make_adder(5), 1).result(timeout=60))
    value, size, pid = Doubler.initiate(settings={"x": 21}, secrets={"token": sys.argv[2]}).result(timeout=60)
    print(value, size == len(sys.argv[2]), pid != os.getpid())
    failing = bg.run(lambda: 1 / 0)
    failing.wait(60)
    print(failing.error)
""")


def test_spawn_runs_main_lambdas_closures_and_classes(home, tmp_path):
    script = tmp_path / "notebook_like.py"
    script.write_text(MAIN)
    secret = "tok-" + os.urandom(6).hex()
    out = subprocess.run(
        [sys.executable, str(script), str(home), secret], capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["42", "6", "42 True True", "ZeroDivisionError: division by zero"]
    for path in home.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes()


LONG = (
    textwrap.dedent("""
        import sys
        import nbbgtask as bg
        from nbbgtask.core import sources as _sources
        bg.configure(home=sys.argv[1], start_method="spawn")
    """)
    + "".join(f"# padding line {i}: not the task's code\n" for i in range(2000))
    + textwrap.dedent("""
        def inner(x):
            return x / 0  # the failing line

        def task():
            return inner(1)

        print(min(_sources.collect(task)["lines"][__file__]), len(_sources.collect(task)["lines"][__file__]))
        failing = bg.run(task)
        failing.wait(60)
        print("the failing line" in failing.traceback, "padding" in failing.traceback)
    """)
)


def test_a_task_from_a_long_script_carries_only_its_own_lines_and_its_traceback_shows_them(home, tmp_path):
    script = tmp_path / "long_script.py"
    script.write_text(LONG)
    out = subprocess.run([sys.executable, str(script), str(home)], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    first, count = map(int, out.stdout.splitlines()[0].split())
    assert first > 2000 and count <= 6  # task's and inner's lines, not the 2,000 above them
    assert out.stdout.splitlines()[1] == "True False"

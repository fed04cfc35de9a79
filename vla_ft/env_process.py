"""An environment in its own process, so that several step at the same time (``rollout.env_processes``).

Why: batched rollouts (:func:`vla_ft.rollout.run_episodes`) predict every env's chunk in one
forward, but a simulator's ``step`` (physics and rendering, tens of milliseconds) still ran one env
after another in the trainer's process. :class:`EnvProcess` builds the env in another process
from the same ``module:callable`` spec and keyword arguments, and splits
``step`` into :meth:`~EnvProcess.step_async` and :meth:`~EnvProcess.step_wait`, so a caller sends
every env its action before waiting for any. Observations come back pickled through a pipe.
The processes are forks of multiprocessing's fork server (a fresh process, so safe next to CUDA),
which imports the modules a synthetic env needs once; a script that builds them must guard its
top level with ``if __name__ == "__main__":``, as every multiprocessing program.
An exception inside the env is raised again here with its type (ValueError for a bad action)
and message; one while building it is a RecipeError naming the recipe key, as in-process.
Ctrl-C reaches the whole process group: the children ignore it and are closed by the parent, whose
interrupt is the one reported (each child's KeyboardInterrupt traceback buried it).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
from multiprocessing.connection import Connection
from typing import Any, NoReturn

from vla_ft.config import RecipeError

RAISED_AGAIN = {"ValueError": ValueError, "TypeError": TypeError, "KeyError": KeyError}
# Imported once by the fork server, whose forks then start without importing them again (torch among them).
PRELOAD = ["__main__", "vla_ft.rollout", "robot_data"]


def _serve(conn: Connection, spec: str | None, kwargs: dict[str, Any], recipe: dict, max_steps: int, key: str):
    """The child: build the env, then answer reset/step/close until close."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what a Ctrl-C ends, and closes this
    from vla_ft.rollout import close_envs, make_env

    try:
        env, first = make_env(spec, kwargs, recipe, max_steps, key)
    except Exception as err:  # noqa: BLE001 - sent to the parent, raised there
        message = "; ".join(err.problems) if isinstance(err, RecipeError) else str(err)
        conn.send(("error", (type(err).__name__, message)))
        return
    conn.send(("ok", (first, dict(getattr(env, "metadata", None) or {}))))
    while True:
        command, arg = conn.recv()
        try:
            if command == "reset":
                out = env.reset(seed=arg)
            elif command == "step":
                out = env.step(arg)
            else:
                close_envs([env])
                conn.send(("closed", None))
                return
        except Exception as err:  # noqa: BLE001 - sent to the parent, raised there
            conn.send(("error", (type(err).__name__, str(err))))
            continue
        conn.send(("ok", out))


class EnvProcess:
    """The env of ``make_env(spec, kwargs, recipe, max_steps, key)`` in its own process, with the
    gymnasium calls ``reset``/``step``/``close`` and ``step_async``/``step_wait``."""

    def __init__(self, spec: str | None, kwargs: dict[str, Any], recipe: dict, max_steps: int, key: str = "--env"):
        context = mp.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, spec, kwargs, recipe, max_steps, key), daemon=True)
        self._process.start()
        child.close()
        status, payload = self._receive()
        if status == "error":
            self._process.join()
            message = payload[1] if payload[0] == "RecipeError" else f"{payload[0]}: {payload[1]}"
            from vla_ft.rollout import key_source

            raise RecipeError(message if message.startswith(key) else f"{key}: {message}", key_source(key))
        self.first_seed, self.metadata = payload

    def reset(self, seed: int | None = None) -> tuple[dict, dict]:
        self._send("reset", seed)
        return self._answer()

    def step_async(self, action: Any) -> None:
        self._send("step", action)

    def step_wait(self) -> tuple[dict, float, bool, bool, dict]:
        return self._answer()

    def step(self, action: Any) -> tuple[dict, float, bool, bool, dict]:
        self.step_async(action)
        return self.step_wait()

    def close(self, timeout: float = 30.0) -> None:
        """Close the env and end its process. Never raises for a process already gone (crashed,
        killed) or one interrupted mid-step: it runs in ``finally`` blocks, where a raise would
        replace the error (or the Ctrl-C) that got there; one that does not end in ``timeout`` s is killed."""
        if self._process.is_alive():
            # it ended meanwhile (_ended's RuntimeError), or an interrupted recv left half a message in the
            # pipe (whatever unpickling it raises): the answers are discarded, and the process ends below
            with contextlib.suppress(Exception):
                self._send("close", None)
                while self._conn.poll(timeout) and self._receive()[0] != "closed":
                    pass  # the answer to a step the caller stopped waiting for (interrupted)
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()

    def _answer(self) -> Any:
        status, payload = self._receive()
        if status == "error":
            name, message = payload
            raise RAISED_AGAIN.get(name, RuntimeError)(message if name in RAISED_AGAIN else f"{name}: {message}")
        return payload

    def _send(self, command: str, arg: Any) -> None:
        try:
            self._conn.send((command, arg))
        except (BrokenPipeError, ConnectionResetError):
            self._ended()

    def _receive(self) -> tuple[str, Any]:
        try:
            return self._conn.recv()
        except (EOFError, ConnectionResetError):  # the simulator crashed the process (a segfault sends nothing)
            self._ended()

    def _ended(self) -> NoReturn:
        self._process.join(timeout=5)
        raise RuntimeError(f"env process ended unexpectedly (exit code {self._process.exitcode})") from None

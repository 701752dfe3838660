"""`seg-fast serve`: one control process and N gateway workers.

The control process runs the admin API and watches the workers; each worker is
its own process with its own trio loop and its own SO_REUSEPORT listener on the
same address (trio runs on one core, so one process per core). Signals:
SIGTERM/SIGINT drain (stop accepting, answer parked Pings, finish in-flight
requests, exit), SIGHUP reloads the config file without dropping connections.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys

import trio

from seg_fast.config import load_config
from seg_fast.errors import ConfigError

WORKER_FLAG = "--worker"


def _say(text: str) -> None:
    print(f"seg-fast[{os.getpid()}]: {text}", file=sys.stderr, flush=True)


def cli(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="seg-fast serve", description="Run the ActiveSync gateway.")
    ap.add_argument("--config", help="TOML config file (default: built-in demo defaults)")
    ap.add_argument("--workers", type=int, help="worker processes (overrides the config; 0 = one per core)")
    ap.add_argument(WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"seg-fast: {exc}", file=sys.stderr)
        return 2
    if args.worker:
        return run_worker(config, args.config)
    workers = args.workers if args.workers is not None else config.workers
    return run_control(config, args.config, workers or os.cpu_count() or 1)


# -- worker -----------------------------------------------------------------

def _die_with_parent() -> None:
    # Linux: if the control process is killed outright, its workers get SIGTERM and drain.
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_worker(config, config_path: str | None) -> int:
    from seg_fast.proxy.gateway import Gateway

    _die_with_parent()
    gw = Gateway(config, config_path=config_path)

    async def main():
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:

                async def serve_then_stop(task_status=trio.TASK_STATUS_IGNORED):
                    await gw.serve(task_status=task_status)      # returns once drained
                    nursery.cancel_scope.cancel()

                await nursery.start(serve_then_stop)
                _say(f"worker listening on {config.listener.host}:{gw.port}")
                nursery.start_soon(_worker_signals, gw, signals, config_path)

    trio.run(main)
    _say("worker stopped")
    return 0


async def _worker_signals(gw, signals, config_path) -> None:
    async for signum in signals:
        if signum == signal.SIGHUP:
            try:
                config = load_config(config_path)
            except ConfigError as exc:
                _say(f"reload refused, keeping the running config: {exc}")
                continue
            await gw.reload(config)
            _say("config reloaded")
        else:
            _say("draining")
            gw.drain()


# -- control process --------------------------------------------------------

def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run_control(config, config_path: str | None, workers: int) -> int:
    env = dict(os.environ)
    if config.listener.port == 0:
        # Every worker must bind the same port: pick it here.
        env["SEG_FAST_LISTENER_PORT"] = str(_free_port(config.listener.host))
    cmd = [sys.executable, "-m", "seg_fast", "serve", WORKER_FLAG]
    if config_path:
        cmd += ["--config", str(config_path)]
    procs: list[subprocess.Popen] = []
    state = {"stopping": False, "grace": config.timeouts.shutdown_grace}

    def spawn() -> subprocess.Popen:
        return subprocess.Popen(cmd, env=env)

    async def main():
        from seg_fast.admin import server as admin

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                for _ in range(workers):
                    procs.append(spawn())
                _say(f"control process: {workers} worker(s)")
                if config.admin.enabled:
                    nursery.start_soon(_admin, admin, config)     # with the policy API pull
                elif config.policy.api_url:
                    nursery.start_soon(_pull, config)
                nursery.start_soon(_control_signals, signals, procs, state, config_path)
                while True:
                    await trio.sleep(0.5)
                    for i, proc in enumerate(procs):
                        if proc.poll() is not None and not state["stopping"]:
                            _say(f"worker {proc.pid} exited with {proc.returncode}; starting another")
                            procs[i] = spawn()
                    if state["stopping"]:
                        if all(p.poll() is not None for p in procs):
                            break
                        if trio.current_time() > state["kill_at"]:
                            for proc in procs:
                                if proc.poll() is None:
                                    proc.kill()
                nursery.cancel_scope.cancel()

    trio.run(main)
    _say("stopped")
    return 0


async def _admin(admin, config) -> None:
    try:
        await admin.run(config)
    except Exception as exc:          # the admin API failing must not take the gateway down
        _say(f"admin API stopped: {type(exc).__name__}: {exc}")


async def _pull(config) -> None:
    from seg_fast.policy.source import run_pull

    try:
        await run_pull(config.policy)
    except Exception as exc:          # like the admin API: never takes the gateway down
        _say(f"policy API pull stopped: {type(exc).__name__}: {exc}")


async def _control_signals(signals, procs, state, config_path) -> None:
    async for signum in signals:
        if signum == signal.SIGHUP:
            try:
                load_config(config_path)
            except ConfigError as exc:
                _say(f"reload refused: {exc}")
                continue
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGHUP)
        else:
            state["stopping"] = True
            state["kill_at"] = trio.current_time() + state["grace"] + 10
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)

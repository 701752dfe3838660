"""`seg-fast serve`: one control process and N gateway workers.

The control process runs the admin API and watches the workers; each worker is
its own process with its own trio loop and its own SO_REUSEPORT listener on the
same address (trio runs on one core, so one process per core). Signals:
SIGTERM/SIGINT drain (stop accepting, answer parked Pings, finish in-flight
requests, exit), SIGHUP reloads the config file without dropping connections.

Start-up refuses, with one line naming the key and the cause, rather than run half
a gateway: a listener address another serve (or its orphaned workers) holds, an
admin or push port that cannot be bound. Workers are forked, once the start-up has
succeeded, from a template process the control forked before it entered trio
(proxy/forked.py: they share the modules' pages), the first ones and those that replace
a worker that died alike; without the template, through ``seg_fast.proxy.worker``, which
ties a new interpreter to the control process first thing.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import ssl
import subprocess
import sys

import trio

from seg_fast import logsetup, stats
from seg_fast.config import load_config, unknown_env_vars
from seg_fast.errors import ConfigError, StartupError
from seg_fast.proxy.worker import ENV_CONTROL_PID
from seg_fast.proxy.console import say

WORKER_FLAG = "--worker"


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
    for var in unknown_env_vars():
        say(f"warning: environment variable {var} names no setting; ignored")
    if args.config:
        say(f"config: {args.config}")
    else:
        say(f"config: none given, the embedded defaults (listener {config.listener.host}:{config.listener.port} "
             f"plain HTTP, mail server {config.upstream.url}, state in {config.state_dir}); "
             "use --config FILE (examples/gateway.toml)")
    from seg_fast.oslimits import ephemeral_ports, raise_nofile_limit, source_ports_short, workers_for
    # Workers inherit this process's (raised) descriptor limit.
    want = config.limits.max_descriptors
    nofile = raise_nofile_limit(want)
    if nofile < want:
        say(f"WARNING: limits.max_descriptors {want}: the descriptor limit stays {nofile} (raising it "
            "needs root, CAP_SYS_RESOURCE, or the kernel's fs.nr_open is lower); "
            "more workers per core carry devices_per_core")
    cores = os.cpu_count() or 1
    node_devices = config.devices_per_core * cores
    sources, ports = len(config.upstream.source_addresses), ephemeral_ports()
    if source_ports_short(node_devices, sources, ports):
        say(f"WARNING: devices_per_core {config.devices_per_core} on {cores} core(s): "
            f"{node_devices} parked Pings hold as many mail-server connections, and "
            f"{max(1, sources)} source address(es) have {ports} ports each toward one mail server "
            "address (net.ipv4.ip_local_port_range); list more in upstream.source_addresses")
    workers = args.workers if args.workers is not None else config.workers
    if not workers:
        workers = workers_for(config.devices_per_core, cores, nofile,
                              config.upstream.idle_pool_size)
    return run_control(config, args.config, workers)


def _warn_without_policies(config) -> None:
    from seg_fast.checkconfig import check_store

    for finding in trio.run(check_store, config):
        if not finding.ok:
            say(f"WARNING: {finding.text}")


# -- worker -----------------------------------------------------------------

def worker_cli(argv: list[str]) -> int:
    """The worker's entry (seg_fast.proxy.worker has tied it to the control process)."""
    return cli([*argv, WORKER_FLAG])


def run_worker(config, config_path: str | None) -> int:
    from seg_fast import refshare
    from seg_fast.proxy import channel, gcpause, slowsteps, tickets
    from seg_fast.proxy.gateway import Gateway
    from seg_fast.proxy.worker import die_with_parent

    die_with_parent()     # again for `serve --worker` started by hand or a benchmark (idempotent)
    logsetup.configure(config)
    if config.limits.realtime_priority:
        from seg_fast.oslimits import set_realtime

        # before trio's run: the threads it starts inherit the policy
        why = set_realtime(config.limits.realtime_priority)
        if why:
            say(f"WARNING: limits.realtime_priority {config.limits.realtime_priority}: {why} "
                "(needs root or CAP_SYS_NICE); this worker runs time-shared")
    # The control process's line (proxy/channel.py): the session ticket keys (the first ring is
    # already waiting in it) before the gateway's TLS context exists; attachment names other
    # workers learnt (refshare.py) once the gateway has set up the content pipeline's cache.
    channel.handle(tickets.MAGIC, tickets.received)
    control_line = channel.open_from_env()
    gw = Gateway(config, config_path=config_path)
    channel.handle(refshare.MAGIC, refshare.received)
    channel.handle(refshare.BATCH, refshare.received_batch)

    async def main():
        slowsteps.install_from_env()     # debug: log task steps over SEG_FAST_SLOW_STEP_MS
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1) as signals:
            async with trio.open_nursery() as nursery:

                async def serve_then_stop(task_status=trio.TASK_STATUS_IGNORED):
                    await gw.serve(task_status=task_status)      # returns once drained
                    nursery.cancel_scope.cancel()

                await nursery.start(serve_then_stop)
                say(f"worker listening on {config.listener.host}:{gw.port}")
                # Start-up is done: no full GC pass over what it built, nor over long-lived connections.
                gcpause.tune()
                nursery.start_soon(gcpause.refreeze_on_ramp, gw)
                nursery.start_soon(gcpause.collect_young)    # young collections on a timer, short ones
                nursery.start_soon(_worker_signals, gw, signals, config_path)
                if control_line is not None:
                    nursery.start_soon(channel.follow, control_line)
                # Counters for the control process's /metrics and console, once a second.
                nursery.start_soon(stats.write_loop, gw, stats.stats_dir(config))

    trio.run(main)
    stats.remove_snapshot(stats.stats_dir(config), os.getpid())
    say("worker stopped")
    return 0


async def _worker_signals(gw, signals, config_path) -> None:
    async for signum in signals:
        if signum == signal.SIGUSR1:
            gw.log.reopen()
            logsetup.reopen()
        elif signum == signal.SIGHUP:
            try:
                config = load_config(config_path)
                await gw.reload(config)
            except (ConfigError, OSError, ssl.SSLError) as exc:
                # A certificate that does not load (a rotated PFX with another password, a PEM
                # key that does not match) keeps the running one: the worker must not die of it.
                say(f"reload refused, keeping the running config: {exc}")
                continue
            say("config reloaded")
        else:
            say("draining")
            gw.drain()


# -- control process --------------------------------------------------------

# A worker that exits this many times within this many seconds stops the gateway.
CRASH_LIMIT = 5
CRASH_WINDOW = 60.0


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run_control(config, config_path: str | None, workers: int) -> int:
    from seg_fast import refshare
    from seg_fast.proxy import channel, tickets
    from seg_fast.proxy.instance import lock_listener, probe_bind
    from seg_fast.statedir import exposure_warnings

    env = dict(os.environ)
    env[ENV_CONTROL_PID] = str(os.getpid())
    host, port = config.listener.host, config.listener.port
    if port == 0:
        # Every worker must bind the same port: pick it here.
        port = _free_port(host)
        env["SEG_FAST_LISTENER_PORT"] = str(port)
    for warning in exposure_warnings(config.state_dir):
        say(f"warning: {warning}")
    from seg_fast.checkconfig import startup_problem
    problem = startup_problem(config)         # would crash every worker: refuse before any starts
    if problem is not None:
        print(f"seg-fast: {config_path or '(defaults)'}: key {problem.what}: {problem.text}", file=sys.stderr,
              flush=True)
        return 1
    try:
        logsetup.configure(config)
    except OSError as exc:
        print(f"seg-fast: {config_path or '(defaults)'}: key log.file: {config.log.file}: {exc.strerror}",
              file=sys.stderr, flush=True)
        return 1
    try:
        # Held for the life of this serve, and of every worker (they inherit it).
        lock_fd = lock_listener(config.state_dir, host, port)
        probe_bind(host, port)
    except StartupError as exc:
        print(f"seg-fast: {config_path or '(defaults)'}: {exc}", file=sys.stderr, flush=True)
        return 1
    if lock_fd < 0:
        say(f"warning: state_dir {config.state_dir} is read-only: no listener lock for {host}:{port}")
    stats.clear(stats.stats_dir(config))          # an earlier run's workers' counters
    worker_argv = ["--config", str(config_path)] if config_path else []
    cmd = [sys.executable, "-m", "seg_fast.proxy.worker", *worker_argv]
    procs: list = []                 # forked.Forked, or subprocess.Popen with the same face
    # A socketpair per worker (proxy/channel.py): the session ticket keys every worker shares
    # (proxy/tickets.py), and attachment names one worker learnt passed to the others (refshare.py).
    hub = channel.Hub(relayed=frozenset({refshare.MAGIC}),
                      kept=refshare.Table(2 * config.security.file_reference_cache))     # names and kinds
    keeper = tickets.Keeper(config.listener.tls_ticket_key_rotation, hub)
    state = {"stopping": False, "grace": config.timeouts.shutdown_grace, "failed": "", "tickets": keeper}
    # Workers are forked from a template process, itself forked before trio (proxy/forked.py).
    from seg_fast.proxy import forked

    forked.preload(config.limits.huge_pages)
    template = forked.Template.start(env, worker_argv)

    async def spawn():
        # From the main thread only: PR_SET_PDEATHSIG fires when the *thread* that forked exits.
        ours, theirs = hub.pair(keeper.first())
        try:
            proc = None
            if template is not None and template.alive():
                try:
                    proc = await template.fork(theirs.fileno())
                except OSError as exc:
                    say(f"warning: {exc}; workers start as new interpreters from now on")
            if proc is None:
                proc = subprocess.Popen(cmd, env={**env, channel.ENV_FD: str(theirs.fileno())},
                                        pass_fds=(theirs.fileno(), *((lock_fd,) if lock_fd >= 0 else ())))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        hub.started(proc.pid, ours)
        if state["stopping"]:
            # SIGTERM came while the template forked it: the others were told to drain without it.
            proc.send_signal(signal.SIGTERM)
        return proc

    async def main():
        from seg_fast.admin import server as admin

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1) as signals:
            async with trio.open_nursery() as nursery:
                if config.admin.enabled:
                    try:
                        # Bound before any worker starts: a taken admin port fails the start.
                        await nursery.start(_admin, admin, config)     # with the policy API pull
                    except StartupError as exc:
                        state["failed"] = str(exc)
                        nursery.cancel_scope.cancel()
                        return
                elif config.policy.api_url:
                    nursery.start_soon(_pull, config)
                if config.health.port:
                    from seg_fast import health
                    try:
                        port = await nursery.start(health.run, config, lambda: sum(p.poll() is None for p in procs))
                    except StartupError as exc:
                        state["failed"] = str(exc)
                        nursery.cancel_scope.cancel()
                        return
                    say(f"health checks on http://{config.health.host}:{port}/healthz and /readyz")
                if config.policy.store == "redis":
                    from seg_fast.policy.store import keep_local_copy
                    nursery.start_soon(keep_local_copy, config.policy)
                try:
                    for _ in range(workers):
                        procs.append(await spawn())
                except OSError as exc:
                    state["failed"] = f"cannot start a worker: {exc}"     # (those started: stopped below)
                    nursery.cancel_scope.cancel()
                    return
                say(f"control process: {workers} worker(s)")
                nursery.start_soon(hub.run)
                nursery.start_soon(keeper.run)
                nursery.start_soon(_control_signals, signals, procs, state, config_path)
                crashes: list[float] = []
                unstarted: dict[int, int] = {}     # a worker's place -> failed starts of its replacement
                while True:
                    await trio.sleep(0.5)
                    if template is not None:         # a subreaper: what it adopted is its to reap
                        forked.reap_adopted({template.pid, *(p.pid for p in procs)})
                    for i, proc in enumerate(procs):
                        if i in unstarted and not state["stopping"]:
                            await _restart(spawn, procs, i, unstarted)
                        elif proc.poll() is not None and not state["stopping"]:
                            now = trio.current_time()
                            crashes = [t for t in crashes if now - t < CRASH_WINDOW] + [now]
                            if len(crashes) >= CRASH_LIMIT:
                                # A worker that cannot stay up will not be fixed by restarting it.
                                state["failed"] = (f"workers exited {len(crashes)} times within {CRASH_WINDOW:.0f} s "
                                                   f"(last: exit code {proc.returncode}); stopping")
                                state["stopping"] = True
                                state["kill_at"] = now + state["grace"]
                                for other in procs:
                                    if other.poll() is None:
                                        other.send_signal(signal.SIGTERM)
                                break
                            say(f"worker {proc.pid} exited with {proc.returncode}; starting another")
                            stats.remove_snapshot(stats.stats_dir(config), proc.pid)
                            hub.gone(proc.pid)
                            unstarted[i] = 0
                            await _restart(spawn, procs, i, unstarted)
                    if state["stopping"]:
                        if all(p.poll() is not None for p in procs):
                            break
                        if trio.current_time() > state["kill_at"]:
                            for proc in procs:
                                if proc.poll() is None:
                                    proc.kill()
                nursery.cancel_scope.cancel()

    try:
        # After the template's fork: the store check runs trio, whose worker threads a forked
        # child would inherit as idle-but-absent (the child's first thread job would wait forever).
        _warn_without_policies(config)
        trio.run(main)
    finally:
        for proc in procs:                # none left but after an error out of the run
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if template is not None:
            template.reap()
    hub.close()
    if state["failed"]:
        print(f"seg-fast: {config_path or '(defaults)'}: {state['failed']}", file=sys.stderr, flush=True)
        return 1
    say("stopped")
    return 0


async def _restart(spawn, procs: list, i: int, unstarted: dict[int, int]) -> None:
    """Start the worker in place ``i``. A start that fails (descriptors or processes short, the
    interpreter gone from disk) is said once and tried again at each turn of the control's loop;
    the place's last worker stays there, exited, so health checks count one worker fewer."""
    try:
        procs[i] = await spawn()
    except OSError as exc:
        if not unstarted[i]:
            say(f"cannot start a worker: {exc}; trying again every 0.5 s")
        unstarted[i] += 1
        return
    if unstarted.pop(i):
        say(f"worker {procs[i].pid} started")


async def _admin(admin, config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    started = False

    class _Status:
        def started(self, value=None):
            nonlocal started
            started = True
            task_status.started(value)

    try:
        await admin.run(config, task_status=_Status())
    except Exception as exc:
        if not started:
            if isinstance(exc, StartupError):
                raise
            raise StartupError(f"admin API: {type(exc).__name__}: {exc}") from None
        # Once up, the admin API failing must not take the gateway down.
        say(f"admin API stopped: {type(exc).__name__}: {exc}")


async def _pull(config) -> None:
    from seg_fast.policy.source import run_pull

    try:
        await run_pull(config.policy)
    except Exception as exc:          # like the admin API: never takes the gateway down
        say(f"policy API pull stopped: {type(exc).__name__}: {exc}")


def _reload_problem(config) -> str | None:
    """What would make the workers' reload fail, checked once here: the same checks as at
    start (certificates, CA files, client-certificate CRL, the KCD keytab)."""
    from seg_fast.checkconfig import startup_problem

    bad = startup_problem(config)
    return f"key {bad.what}: {bad.text}" if bad else None


async def _control_signals(signals, procs, state, config_path) -> None:
    async for signum in signals:
        if signum == signal.SIGUSR1:          # logrotate: every process reopens its files
            logsetup.reopen()
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGUSR1)
        elif signum == signal.SIGHUP:
            try:
                new = load_config(config_path)
                problem = _reload_problem(new)
            except ConfigError as exc:
                problem = str(exc)
            if problem:
                say(f"reload refused: {problem}")
                continue
            state["tickets"].rotation = new.listener.tls_ticket_key_rotation     # from the next rotation
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGHUP)
        else:
            state["stopping"] = True
            state["kill_at"] = trio.current_time() + state["grace"] + 10
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)

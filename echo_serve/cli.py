"""`echo-serve`: an engine folder on Triton Inference Server (PyTriton), torch-free.

    echo-serve --engine-dir engines/echo [--precision fp32] [--instances 2] [--port 8000]
               [--grpc-port 8001] [--metrics-port 8002] [--host 127.0.0.1] [--ui --ui-port 8080]

Loads N runtimes of the folder (every graph's sha256 checked against its manifest, every built
batch size decoded once) before Triton starts, so the KServe v2 readiness endpoints
(/v2/health/ready, /v2/models/echo/ready) answer 200 only once the engines are loaded and
verified. Then serves models `echo` (dynamic batching) and `echo_stream` (decoupled, one
response per block; gRPC streaming) over HTTP and gRPC, Prometheus metrics on --metrics-port,
and with --ui the report page. Binds 127.0.0.1 unless --host says otherwise. Prints one
"echo-serve: ready ..." line when it serves (on stderr, like its other messages; Triton logs to
stdout); SIGINT or SIGTERM stop it, and Triton with it, within --stop-timeout seconds (then by
SIGKILL: stop_within). When a model instance (a Triton Python-backend stub) dies while serving,
it stops and starts again (restart_if_a_stub_dies). Exit status: 0 after a stop; 2 when the
engine folder, the options or a port are unusable.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from typing import NoReturn, Optional

import click

from runtime.errors import EchoRuntimeError
from runtime.precisions import NAMES as PRECISION_NAMES


def _err(msg: str) -> None:
    """echo-serve's own lines go to stderr, whole: stdout carries Triton's log, which PyTriton
    relays in unbuffered chunks that may end mid-line."""
    click.echo(f"echo-serve: {msg}", err=True)
    sys.stderr.flush()


def libpython_first() -> Optional[str]:
    """Put this interpreter's libpython first on LD_LIBRARY_PATH, for Triton's Python-backend stub.

    The stub loads libpython3.X.so from the library path; under an interpreter whose standard
    library is another patch release than the system's libpython (pyenv 3.11.7 beside Debian's
    3.11.2) the model then fails to load ("'_thread.RLock' object has no attribute
    '_recursion_count'"). Returns the folder put first, or None when there is no shared libpython."""
    libdir = sysconfig.get_config_var("LIBDIR")
    ldlib = sysconfig.get_config_var("LDLIBRARY") or ""
    if not libdir or not ldlib.endswith(".so") and ".so." not in ldlib or not (Path(libdir) / ldlib).exists():
        return None
    parts = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p and p != libdir]
    os.environ["LD_LIBRARY_PATH"] = ":".join([libdir] + parts)
    return libdir


START_ATTEMPTS = 3
_ATTEMPT_ENV = "ECHO_SERVE_START_ATTEMPT"


def _children(name: str, parent: Optional[int] = None) -> set[int]:
    """PIDs of the children called `name` (Linux /proc, comm: at most 15 characters) of `parent`
    (default: this process). Zombies do not count."""
    me, out = parent or os.getpid(), set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        if comm == name and int(rest[1]) == me and rest[0] != "Z":
            out.add(int(d.name))
    return out


def restart_if_triton_dies_starting(ready: threading.Event, workspace: Path) -> threading.Thread:
    """Start this command again if the Triton server exits before it is ready (at most
    START_ATTEMPTS starts in all).

    PyTriton 0.7's proxy model has a start-up race between the instances of one model: instance
    0 opens a handshake socket that the others connect to as soon as its file exists, which can
    be before it listens (ConnectionRefusedError in get_config_from_handshake_server; with two
    instances, 3 of 27 starts failed here, none with one). The model then fails to load, Triton
    exits, and PyTriton waits 120 s before it says so. Triton's own --model-load-retry-count does
    not help (the retries find the first attempt's socket file and fail at once), so the whole
    start is redone: the engines load again (their hashes checked again), in a fresh workspace."""

    def watch() -> None:
        seen: set[int] = set()
        while not ready.wait(0.25):
            now = _children("tritonserver")
            if seen and not now:  # it was there and is gone, and we are not ready
                break
            seen |= now
        else:
            return
        attempt = int(os.environ.get(_ATTEMPT_ENV, "1"))
        if attempt >= START_ATTEMPTS:
            _err(f"error: Triton exited while loading the models, {attempt} times; its log is above")
            os._exit(1)
        _err(f"Triton exited while loading the models (start {attempt} of {START_ATTEMPTS}); starting again")
        shutil.rmtree(workspace, ignore_errors=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os.environ[_ATTEMPT_ENV] = str(attempt + 1)
        os.execv(sys.executable, [sys.executable, "-m", "echo_serve", *sys.argv[1:]])

    t = threading.Thread(target=watch, name="echo-serve-start-watch", daemon=True)
    t.start()
    return t


STUB = "triton_python_backend_stub"[:15]  # its /proc comm
MAX_RESTARTS = 5
_RESTARTS_ENV = "ECHO_SERVE_RESTARTS"


def restart_if_a_stub_dies(ready: threading.Event, stopping: threading.Event,
                           restart: threading.Event) -> threading.Thread:
    """Once serving: when a Python-backend stub of Triton dies, stop and start again (at most
    MAX_RESTARTS times in the life of the command), rather than serve errors while ready.

    Measured (benchmarks/results/serve/load.md): Triton does not restart a model instance whose
    stub died (SIGKILL, out of memory); it keeps the model and the server ready (200) and keeps
    sending batches to that instance, which fail at once ("Stub process 'echo_0_1' is not
    healthy", HTTP 500), so the dead instance takes most of the traffic; requests that were in it
    never get an answer; and the stub of instance 0 also holds PyTriton's shared tensor store,
    so when that one dies the other instances fail too (BrokenPipeError). Reloading the model
    through the repository API is refused (403). So the whole command starts again: SIGTERM to
    itself (the normal stop: Triton stopped, the workspace removed), then main() execs itself."""

    def watch() -> None:
        ready.wait()
        triton = _children("tritonserver")
        stubs = {pid for t in triton for pid in _children(STUB, t)}
        while not stopping.wait(0.5):
            alive = {pid for t in triton for pid in _children(STUB, t)}
            gone = stubs - alive
            if not gone:
                continue
            if stopping.wait(1.0):  # a stop under way (Ctrl-C reaches the stubs too): not a failure
                return
            n = int(os.environ.get(_RESTARTS_ENV, "0"))
            if n >= MAX_RESTARTS:
                _err(f"error: a Triton model instance (stub pid {sorted(gone)}) died and echo-serve has restarted "
                     f"{n} times already; stopping")
            else:
                _err(f"a Triton model instance died (stub pid {sorted(gone)}); Triton neither restarts nor "
                     f"retires it, so echo-serve stops and starts again (restart {n + 1} of {MAX_RESTARTS})")
                restart.set()
            os.kill(os.getpid(), signal.SIGTERM)
            return

    t = threading.Thread(target=watch, name="echo-serve-stub-watch", daemon=True)
    t.start()
    return t


def _descendants() -> list[int]:
    """PIDs of every process below this one (Triton, its stubs), children last."""
    parent_of = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            parent_of[int(d.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    out, frontier = [], [os.getpid()]
    while frontier:
        frontier = [pid for pid, pp in parent_of.items() if pp in frontier]
        out = frontier + out
    return out


def stop_within(seconds: float, workspace: Path, restart: threading.Event) -> threading.Thread:
    """Once a stop began: if this process is still here `seconds` later, SIGKILL Triton and its
    stubs, remove the workspace and exit 0 (or start again, for a restart).

    A normal stop takes about 7 s here, but PyTriton's stop joins its proxy threads with no
    timeout, and once in a CI run (2 loaded cores, right after a restart) echo-serve was still
    there 60 s after SIGTERM. An operator's SIGTERM must end the server, leaving no process behind."""

    def watch() -> None:
        time.sleep(seconds)
        _err(f"the stop did not finish within {seconds:g} s; killing Triton and its model instances")
        for pid in _descendants():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(workspace, ignore_errors=True)
        if restart.is_set():
            _run_again()
        sys.stderr.flush()
        os._exit(0)

    t = threading.Thread(target=watch, name="echo-serve-stop-watch", daemon=True)
    t.start()
    return t


def _stop_on_signals(stopping: threading.Event, workspace: Path, restart: threading.Event,
                     stop_timeout: float) -> None:
    def handler(signum, _frame):
        if not stopping.is_set():
            stop_within(stop_timeout, workspace, restart)
        stopping.set()
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engine-dir", required=True, type=click.Path(), help="engine folder built by `echo-export build`")
@click.option("--precision", type=click.Choice(list(PRECISION_NAMES)), default="fp32", show_default=True)
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="model instances: runtimes decoding in parallel")
@click.option("--host", default="127.0.0.1", show_default=True, help="address HTTP, gRPC, metrics and the UI bind to")
@click.option("--port", "http_port", type=click.IntRange(1, 65535), default=8000, show_default=True, help="HTTP port")
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="onnxruntime threads per instance (default: CPU cores / instances)")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=2000, show_default=True,
              help="how long Triton's dynamic batcher may hold a request to fill a batch")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="default: the model's max_response_tokens")
@click.option("--allow-unverified", is_flag=True, help="serve an engine whose manifest says verified=false")
@click.option("--ui", is_flag=True, help="also serve the report page (a browser front that talks to Triton)")
@click.option("--ui-port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--stop-timeout", type=click.FloatRange(min=1), default=45.0, show_default=True,
              help="seconds a stop (SIGTERM, Ctrl-C, a restart) may take before Triton and its model instances "
                   "are killed")
def main(engine_dir, precision, instances, host, http_port, grpc_port, metrics_port, threads, max_queue_delay_us,
         max_new_tokens, allow_unverified, ui, ui_port, stop_timeout) -> None:
    """Serve ENGINE_DIR's reports on Triton Inference Server (KServe v2 HTTP/gRPC)."""
    pytriton = _pytriton()
    from .pool import EnginePool
    from .triton_models import STREAM, UNARY

    ui_srv = _report_page_server(host, ui_port, http_port) if ui else None
    threads = threads or max(1, (os.cpu_count() or 1) // instances)
    try:
        pool = EnginePool(engine_dir, precision=precision, instances=instances, threads=threads,
                          allow_unverified=allow_unverified, max_new_tokens=max_new_tokens)
    except EchoRuntimeError as e:
        _exit_refused(f"error: {e}")
    _err(f"engines loaded and verified in {pool.load_seconds:.1f} s ({engine_dir}, {precision}, "
         f"{instances} instance(s), batch sizes {pool.built}); starting Triton")
    libpython_first()
    stopping, restart = threading.Event(), threading.Event()
    triton, workspace = _triton(pytriton, host, http_port, grpc_port, metrics_port)
    _stop_on_signals(stopping, workspace, restart, stop_timeout)
    ready = threading.Event()
    restart_if_triton_dies_starting(ready, workspace)
    restart_if_a_stub_dies(ready, stopping, restart)
    banner = (f"ready http://{host}:{http_port} grpc {host}:{grpc_port} metrics http://{host}:{metrics_port}/metrics"
              + (f" ui http://{host}:{ui_port}/" if ui_srv else "")
              + f"; models {UNARY} (batch sizes {pool.built}) {STREAM}; {instances} instance(s), "
              f"{threads} thread(s) each")
    _serve(triton, workspace, pool, ready, ui_srv, max_queue_delay_us, banner)
    if restart.is_set():  # a model instance died (restart_if_a_stub_dies): the whole command again
        _run_again()


def _exit_refused(message: str) -> NoReturn:
    _err(message)
    sys.exit(2)


def _pytriton() -> tuple[type, type, type]:
    """PyTriton's Triton, TritonConfig, TritonLifecyclePolicy (exit 2 without the [serve] extra)."""
    try:
        from pytriton.triton import Triton, TritonConfig, TritonLifecyclePolicy
    except ImportError as e:
        _exit_refused(f"error: echo-serve needs the [serve] extra (pip install 'echo-cxr[serve]'): {e}")
    return Triton, TritonConfig, TritonLifecyclePolicy


def _report_page_server(host: str, ui_port: int, http_port: int):
    """The report page's server, its port taken now: a busy port is an error, not a half-started server."""
    from .ui import ui_server

    try:
        return ui_server(host, ui_port, f"http://{host}:{http_port}")
    except OSError as e:
        _exit_refused(f"error: cannot serve the report page on {host}:{ui_port}: {e.strerror or e}")


def _triton(pytriton: tuple[type, type, type], host: str, http_port: int, grpc_port: int, metrics_port: int):
    """(Triton, its workspace): the server not started yet. The models go into the server's own
    repository and load at its start: the server is not ready (nor even listening) before they are."""
    Triton, TritonConfig, TritonLifecyclePolicy = pytriton
    config = TritonConfig(http_address=host, http_port=http_port, grpc_address=host, grpc_port=grpc_port,
                          allow_metrics=True, allow_cpu_metrics=True, allow_gpu_metrics=False,
                          metrics_address=host, metrics_port=metrics_port, exit_timeout_secs=10, log_verbose=0)
    workspace = Path(tempfile.mkdtemp(prefix="echo-serve-"))  # PyTriton's model store and sockets, in triton/
    policy = TritonLifecyclePolicy(launch_triton_on_startup=False, local_model_store=True)
    return Triton(config=config, workspace=workspace / "triton", triton_lifecycle_policy=policy), workspace


def _serve(triton, workspace: Path, pool, ready: threading.Event, ui_srv, max_queue_delay_us: int, banner: str) -> None:
    """Bind the models, start Triton (and the report page), serve until stopped; then stop both
    and remove the workspace."""
    from .triton_models import STREAM, UNARY, bind, per_request_errors

    ui_thread = None
    try:
        bind(triton, pool, max_queue_delay_us=max_queue_delay_us)
        try:
            # a bad image fails its own request (400), not its batch; a stream ends with the message alone
            for name in (UNARY, STREAM):
                per_request_errors(workspace, name)
        except RuntimeError as e:
            _exit_refused(f"error: {e}")
        triton.run()
        ready.set()
        if ui_srv is not None:
            from .ui import serve_in_thread

            ui_thread = serve_in_thread(ui_srv)
        _err(banner)
        triton.serve()
    except KeyboardInterrupt:
        pass
    finally:
        if ui_thread is not None:
            ui_srv.shutdown()  # waits for serve_forever: only once it runs
        if ui_srv is not None:
            ui_srv.server_close()
        triton.stop()
        shutil.rmtree(workspace, ignore_errors=True)


def _run_again() -> None:
    """The whole command again, in this process (a Triton stub died while serving)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[_RESTARTS_ENV] = str(int(os.environ.get(_RESTARTS_ENV, "0")) + 1)
    os.environ[_ATTEMPT_ENV] = "1"
    os.execv(sys.executable, [sys.executable, "-m", "echo_serve", *sys.argv[1:]])


if __name__ == "__main__":
    main()

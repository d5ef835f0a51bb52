"""Omni's Ray launcher: starts a pipeline's stage processes on a Ray cluster.

The orchestrator runs `python3 ray_launcher.py` and talks to it with one JSON
object per line, each with an "op", on stdin and stdout:

  in:  {"op":"place","stages":[{"stage_id":0,"resources":{"CPU":1}}],
        "strategy":"PACK","timeout_s":60}
  out: {"op":"placed","driver":{"ip":..,"host":..},
        "stages":[{"stage_id":0,"ip":..,"port":..,"host":..,"node_id":..}]}
       One placement group, one bundle per stage, and one StageActor per
       bundle, which reserves a listening TCP port on its node for the
       stage's input.
  in:  {"op":"launch","binary":"/abs/omni-stage","env":[["K","V"]],
        "specs":{"0":{...launch spec...}}}
  out: {"op":"launched","stages":[{"stage_id":0,"pid":1234}]}
       Each actor runs `binary --launch SPEC` as its child; the stage
       inherits the reserved socket and dies with its actor.
  out: {"op":"exited","stage_id":0,"status":"exit status 3","log":[...]}
       Whenever a stage process exits, or its actor (or node) dies.
  in:  {"op":"kill","stage_id":0,"reason":"..."}   SIGKILL that stage.
  in:  {"op":"stop","grace_ms":10000,"terminate":true}
  out: {"op":"stopped"}
       SIGTERM every stage ("terminate": false: the orchestrator has told
       them to shut down itself; no signal), SIGKILL after the grace, report
       their exits,
       then remove the placement group and the actors. EOF on stdin (the
       orchestrator died), SIGTERM and SIGINT stop with a 5 s grace.
  out: {"op":"error","message":"..."}   Anything failing before "launched";
       the launcher then cleans up and exits 1.

Only protocol lines go to stdout; everything else (Ray's output, the
stages' stderr forwarded by Ray as "[stage N] ...") goes to stderr. Should
the launcher itself die, Ray removes the actors and the placement group of
its job, and the stages die with their actors (PR_SET_PDEATHSIG).
"""
import collections
import fcntl
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

# Ray prints to stdout now and then (and so could anything it starts): keep a
# private copy of the real stdout for the protocol (not inherited by
# children), send fd 1 to stderr.
_PROTOCOL_FD = os.dup(1)
os.dup2(2, 1)
sys.stdout = sys.stderr
# Every stage line matters when diagnosing a failure: no "[repeated Nx]";
# and the lines go to a log, not a terminal: no colour codes.
os.environ["RAY_DEDUP_LOGS"] = "0"
os.environ.setdefault("RAY_COLOR_PREFIX", "0")

LOG_TAIL_LINES = 25  # as the Rust supervisor keeps
STAGE_DIR_PREFIX = "omni-ray-stage-"
OWNER_LOCK = "owner.lock"  # held (flock) by the actor that owns a stage directory
EOF_GRACE_S = 5.0  # stop grace on EOF or a signal
STOP_SLACK_S = 10.0  # beyond the grace, for actors to kill and report
POLL_S = 0.05
SIGNAL_NAMES = {getattr(signal, n): n for n in (
    "SIGKILL", "SIGTERM", "SIGSEGV", "SIGABRT", "SIGINT",
    "SIGBUS", "SIGILL", "SIGFPE", "SIGHUP", "SIGPIPE")}


def send(obj: dict) -> None:
    """Writes one protocol line (unbuffered: nothing is left to flush at exit)."""
    data = (json.dumps(obj) + "\n").encode()
    try:
        while data:
            data = data[os.write(_PROTOCOL_FD, data):]
    except OSError as e:  # the orchestrator is gone: go on cleaning up
        log(f"cannot send {obj.get('op')!r}: {e}")


def log(msg: str) -> None:
    print(f"ray_launcher: {msg}", file=sys.stderr, flush=True)


def host_id() -> str:
    """Names this machine (boot), as the Rust side does: equal ids mean shared /dev/shm."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}/{boot}"


def describe(returncode: int) -> str:
    """Popen.returncode as the Rust side words an ExitStatus."""
    if returncode >= 0:
        return f"exit status {returncode}"
    sig = -returncode
    return f"killed by signal {sig} ({SIGNAL_NAMES.get(sig, 'signal')})"


# Lines of Ray's actor errors that only identify the actor.
_NOISE = re.compile(r"(class_name|actor_id|namespace|pid):")


def one_line(e: BaseException) -> str:
    parts = (p.strip() for p in str(e).splitlines())
    text = "; ".join(p for p in parts if p and not _NOISE.match(p))
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


try:
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
except ImportError as e:
    send({"op": "error", "message": f"cannot import ray ({sys.executable}): {e}"})
    sys.exit(1)


def reads_probe(probe) -> bool:
    """Whether this process reads the orchestrator's shared-memory probe
    file (`{"path", "nonce"}`): the same host, user and /dev/shm, checked
    rather than guessed from names."""
    if not isinstance(probe, dict):
        return False
    try:
        with open(probe.get("path", ""), encoding="utf-8") as f:
            return f.read().strip() == probe.get("nonce")
    except (OSError, TypeError, ValueError):
        return False


def sweep_stale_stage_dirs() -> None:
    """Removes this user's stage directories on this node whose owner is
    gone: a stage whose actor or node was killed (Ray SIGKILLs a dead
    worker's children) had no chance to remove its own. The owner's flock
    says whether it lives, as for the orchestrator's run directories."""
    tmp = tempfile.gettempdir()
    try:
        names = os.listdir(tmp)
    except OSError:
        return
    for name in names:
        if not name.startswith(STAGE_DIR_PREFIX):
            continue
        path = os.path.join(tmp, name)
        try:
            st = os.lstat(path)
            if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != os.geteuid():
                continue
            fd = os.open(os.path.join(path, OWNER_LOCK), os.O_RDONLY)
        except OSError:
            continue  # no lock to judge by: not ours to remove
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its owner lives
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


# max_concurrency: wait() blocks for the stage's whole life, while kill()
# and terminate() must still get through.
@ray.remote(max_concurrency=4)
class StageActor:
    """Owns one stage process on its node: reserves its port, starts it, reaps it."""

    def __init__(self, stage_id: int):
        self.stage_id = stage_id
        self.listener = None
        self.proc = None
        self.run_dir = None
        self.tail = collections.deque(maxlen=LOG_TAIL_LINES)
        self.pump = None
        self.lock_fd = None

    def reserve(self, shm_probe) -> dict:
        # The stage's input port, bound now so the orchestrator can tell every
        # stage its downstream addresses before any of them starts.
        ip = ray.util.get_node_ip_address()
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind((ip, 0))
        self.listener.listen(128)
        self.listener.set_inheritable(True)
        return {"ip": ip, "port": self.listener.getsockname()[1], "host": host_id(),
                "node_id": ray.get_runtime_context().get_node_id(), "actor_pid": os.getpid(),
                "shares_shm": reads_probe(shm_probe)}

    def launch(self, binary: str, env: list, spec: dict) -> dict:
        """Starts the stage; {"pid": N} or {"error": why}."""
        n = self.stage_id
        where = f"stage {n} on {ray.util.get_node_ip_address()}"
        try:
            sweep_stale_stage_dirs()
            # Built under a name the sweep ignores and renamed once locked, so
            # no sweep ever sees it without its lock held.
            building = tempfile.mkdtemp(prefix=f".{STAGE_DIR_PREFIX}{n}-")  # mode 0700
            # Held for the actor's life; the kernel lets go when it dies.
            self.lock_fd = os.open(os.path.join(building, OWNER_LOCK),
                                   os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
            self.run_dir = os.path.join(os.path.dirname(building),
                                        os.path.basename(building)[1:])
            os.rename(building, self.run_dir)
            fd = self.listener.fileno()
            spec = dict(spec, parent_pid=os.getpid(), run_dir=self.run_dir, input_listener_fd=fd)
            path = os.path.join(self.run_dir, f"stage-{n}.json")
            # 0600: the spec holds the run's token.
            with os.fdopen(os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                           "w", encoding="utf-8") as f:
                json.dump(spec, f)
            os.replace(path + ".tmp", path)
            # No preexec_fn: Python code between fork and exec is unsafe in
            # this many-threaded process. `omni-stage` itself asks for a
            # parent-death signal, clears the signal mask it inherits (Ray's
            # threads block some) and exits if its parent (`parent_pid`, us)
            # is already gone.
            self.proc = subprocess.Popen(
                [binary, "--launch", path], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                env={**os.environ, **dict(env)}, pass_fds=(fd,), close_fds=True)
        except OSError as e:
            return {"error": f"cannot start {where}: {binary}: {e}"}
        finally:
            # The stage holds its own copy now; ours would keep the port open.
            if self.listener is not None:
                self.listener.close()
        self.pump = threading.Thread(target=self._pump, daemon=True)
        self.pump.start()
        return {"pid": self.proc.pid}

    def _pump(self):
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.tail.append(line)
            print(f"[stage {self.stage_id}] {line}", file=sys.stderr, flush=True)

    def wait(self) -> dict:
        code = self.proc.wait()
        if self.pump is not None:
            self.pump.join(timeout=1.0)  # its last lines belong in the report
        return {"status": describe(code), "log": list(self.tail)}

    def kill(self, reason: str = "") -> None:
        if self.proc is not None and self.proc.poll() is None:
            print(f"[stage {self.stage_id}] killing it: {reason}", file=sys.stderr, flush=True)
            self.proc.kill()  # wait() reports the exit

    def terminate(self, grace_s: float, signal_now: bool = True) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if signal_now:
                self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._clean()

    def _clean(self):
        if self.listener is not None:
            self.listener.close()
        if self.run_dir is not None:
            # The stage may have removed it already.
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def __del__(self):
        # Only on an orderly actor exit; ray.kill ends the process outright.
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
            self._clean()
        except Exception:
            pass


class LaunchError(Exception):
    """A failure before "launched": reported as {"op":"error"}."""


class StopRequested(Exception):
    """Stop, EOF or a signal before the stages run: nothing to report but "stopped"."""


class Launcher:
    def __init__(self):
        self.inbox = queue.Queue()  # stdin lines; None at EOF
        self.held = collections.deque()  # lines read by _check_stop, not yet handled
        self.signalled = None
        self.pg = None
        self.actors = {}  # stage_id -> StageActor handle, in stage order

    def run(self) -> int:
        threading.Thread(target=self._read_stdin, daemon=True).start()
        try:
            self._connect()
            self._place(self._next_request("place"))
            self._launch(self._next_request("launch"))
            self._supervise()
            self._release()
            send({"op": "stopped"})
            return 0
        except (StopRequested, KeyboardInterrupt, SystemExit) as e:
            # (SystemExit: Ray's SIGTERM handler, in place during ray.init.)
            log(f"stopping before launch: {e!r}")
            self._release(grace_s=1.0)
            send({"op": "stopped"})
            return 0
        except Exception as e:
            message = str(e) if isinstance(e, LaunchError) else one_line(e)
            send({"op": "error", "message": message})
            self._release(grace_s=1.0)
            return 1
        finally:
            if ray.is_initialized():
                ray.shutdown()

    def _connect(self) -> None:
        address = os.environ.get("RAY_ADDRESS") or "auto"
        try:
            probe_gcs(address)
            ray.init(address=address, log_to_driver=True, namespace=None)
        except Exception as e:
            raise LaunchError(f"cannot connect to the Ray cluster at {address}: {one_line(e)}")
        # After ray.init, which installs a SIGTERM handler of its own.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    # -- input -------------------------------------------------------------

    def _read_stdin(self):
        for line in sys.stdin:
            if line.strip():
                self.inbox.put(line)
        self.inbox.put(None)

    def _on_signal(self, signum, _frame):
        # Only a flag: the loops poll it (a handler must not touch the queue,
        # whose lock the interrupted main thread may hold).
        self.signalled = signal.Signals(signum).name

    def _check_stop(self) -> None:
        """Raises StopRequested if a signal, a stop or EOF came while placing or
        launching; other lines wait for `_next_request`."""
        if self.signalled:
            raise StopRequested(f"received {self.signalled}")
        while True:
            try:
                line = self.inbox.get_nowait()
            except queue.Empty:
                return
            if line is None:
                raise StopRequested("stdin closed")
            req = parse(line)
            if req is not None and req["op"] == "stop":
                raise StopRequested("asked to")
            self.held.append(line)

    def _next_request(self, expected: str) -> dict:
        """The next request before launch, which must be `expected` (or stop)."""
        while True:
            if self.signalled:
                raise StopRequested(f"received {self.signalled}")
            try:
                line = self.held.popleft() if self.held else self.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                raise StopRequested("stdin closed")
            req = parse(line)
            if req is None:
                raise LaunchError(f"bad request line (expected {expected!r}): {line.strip()[:200]}")
            if req["op"] == "stop":
                raise StopRequested("asked to")
            if req["op"] != expected:
                raise LaunchError(f"expected op {expected!r}, got {req['op']!r}")
            return req

    def _await(self, refs: list, timeout_s: float, what: str) -> list:
        """ray.get(refs) that gives way to a signal and gives up after timeout_s."""
        deadline = time.monotonic() + timeout_s
        pending = list(refs)
        while pending:
            self._check_stop()
            if time.monotonic() > deadline:
                raise LaunchError(f"timed out after {timeout_s:g} s waiting for {what}")
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.1)
        return ray.get(refs)

    # -- place and launch ---------------------------------------------------

    def _place(self, req: dict) -> None:
        stages, strategy = req.get("stages"), req.get("strategy", "PACK")
        timeout_s = req.get("timeout_s", 60)
        if not isinstance(stages, list) or not stages:
            raise LaunchError(f"place: 'stages' must be a non-empty list, got {stages!r}")
        if strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise LaunchError(f"place: unknown strategy {strategy!r}")
        if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise LaunchError(f"place: 'timeout_s' must be a positive number, got {timeout_s!r}")
        ids, bundles = [], []
        for s in stages:
            sid, res = (s.get("stage_id"), s.get("resources", {})) if isinstance(s, dict) else (None, None)
            if not isinstance(sid, int) or sid < 0 or sid in ids:
                raise LaunchError(f"place: bad or repeated stage_id in {s!r}")
            if not isinstance(res, dict) or not all(
                    isinstance(k, str) and isinstance(v, (int, float)) and v >= 0 for k, v in res.items()):
                raise LaunchError(f"place: stage {sid}: resources must map names to "
                                  f"non-negative numbers, got {res!r}")
            ids.append(sid)
            bundles.append(dict(res) or {"CPU": 1})
        try:
            self.pg = ray.util.placement_group(bundles, strategy=strategy)
        except Exception as e:
            raise LaunchError(f"cannot create a placement group of {bundles} ({strategy}): {one_line(e)}")
        deadline = time.monotonic() + timeout_s
        while not self.pg.wait(1):  # slices: a stop must not wait for the timeout
            self._check_stop()
            if time.monotonic() > deadline:
                raise LaunchError(self._unplaceable(ids, bundles, strategy, timeout_s))
        for i, (sid, b) in enumerate(zip(ids, bundles)):
            other = {k: v for k, v in b.items() if k not in ("CPU", "GPU", "memory")}
            self.actors[sid] = StageActor.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
                num_cpus=b.get("CPU", 0), num_gpus=b.get("GPU", 0), memory=b.get("memory"),
                resources=other, max_restarts=0,
            ).remote(sid)
        probe = req.get("shm_probe")
        reserved = self._await([a.reserve.remote(probe) for a in self.actors.values()], timeout_s,
                               "the stage actors to start")
        # Test-only: stages to report as on another host (a one-machine test
        # cluster has no other), so that the cross-host path is exercised.
        foreign = {s.strip() for s in os.environ.get("OMNI_TEST_RAY_FOREIGN_STAGES", "").split(",")}
        for sid, r in zip(self.actors, reserved):
            if str(sid) in foreign:
                r.update(shares_shm=False, host=r["host"] + " (test: another host)")
        send({"op": "placed",
              "driver": {"ip": ray.util.get_node_ip_address(), "host": host_id()},
              "stages": [{"stage_id": sid,
                          **{k: r[k] for k in ("ip", "port", "host", "node_id", "shares_shm")}}
                         for sid, r in zip(self.actors, reserved)]})

    def _unplaceable(self, ids, bundles, strategy, timeout_s) -> str:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        misfits = [f"stage {sid} {b}" for sid, b in zip(ids, bundles)
                   if not any(all(n.get(k, 0) >= v for k, v in b.items()) for n in nodes)]
        what = ("no node has the resources of " + ", ".join(misfits) if misfits else
                f"the cluster cannot place all of {bundles} at once ({strategy})")
        return (f"placement timed out after {timeout_s:g} s: {what}; "
                f"available {ray.available_resources()}, cluster total {ray.cluster_resources()}")

    def _launch(self, req: dict) -> None:
        binary, env, specs = req.get("binary"), req.get("env", []), req.get("specs")
        if not isinstance(binary, str) or not binary:
            raise LaunchError(f"launch: 'binary' must be a path, got {binary!r}")
        if not isinstance(env, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in env):
            raise LaunchError(f"launch: 'env' must be a list of [name, value] strings, got {env!r}")
        if not isinstance(specs, dict) or sorted(specs) != sorted(str(s) for s in self.actors):
            got = sorted(specs) if isinstance(specs, dict) else specs
            raise LaunchError(f"launch: 'specs' must have one object per placed stage "
                              f"{sorted(self.actors)}, got {got!r}")
        for sid, spec in specs.items():
            if not isinstance(spec, dict):
                raise LaunchError(f"launch: the spec of stage {sid} must be an object, got {spec!r}")
        refs = [a.launch.remote(binary, env, specs[str(sid)]) for sid, a in self.actors.items()]
        results = self._await(refs, 60, "the stages to start")
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise LaunchError("; ".join(errors))
        send({"op": "launched",
              "stages": [{"stage_id": sid, "pid": r["pid"]} for sid, r in zip(self.actors, results)]})

    # -- supervision ---------------------------------------------------------

    def _supervise(self) -> None:
        """Reports exits until a stop has been asked for and carried out."""
        waits = {a.wait.remote(): sid for sid, a in self.actors.items()}
        terminating, deadline, signalled = [], None, False
        while True:
            stop = self._poll_requests(block_s=0 if waits else POLL_S)
            if stop is not None:
                grace_s, signal_now = stop
                sooner = time.monotonic() + grace_s + STOP_SLACK_S
                if deadline is None or sooner < deadline or (signal_now and not signalled):
                    log(f"stopping the stages (grace {grace_s:g} s)")
                    # Every actor, exited stage or not: terminate also removes its
                    # run dir. A later, shorter or signalling stop asks again.
                    terminating += [a.terminate.remote(grace_s, signal_now)
                                    for a in self.actors.values()]
                    deadline = sooner if deadline is None else min(deadline, sooner)
                    signalled = signalled or signal_now
            if waits:
                ready, _ = ray.wait(list(waits), num_returns=1, timeout=POLL_S)
                for ref in ready:
                    self._report_exit(waits.pop(ref), ref)
            if deadline is None:
                continue
            if terminating:
                _, terminating = ray.wait(terminating, num_returns=len(terminating), timeout=0)
            if not waits and not terminating:
                return
            if time.monotonic() > deadline:
                for sid in waits.values():
                    send({"op": "exited", "stage_id": sid, "log": [],
                          "status": "its Ray actor did not stop in time and was killed"})
                return

    def _poll_requests(self, block_s: float):
        """Handles queued requests; returns a stop's (grace in seconds, whether
        to signal the stages now), if one came."""
        timeout = block_s
        while not self.signalled:
            try:
                line = self.inbox.get(timeout=timeout) if timeout else self.inbox.get_nowait()
            except queue.Empty:
                return None
            timeout = 0
            if line is None:
                return EOF_GRACE_S, True
            req = parse(line)
            if req is None:
                log(f"ignoring a bad request line: {line.strip()[:200]}")
            elif req["op"] == "stop":
                grace_ms = req.get("grace_ms", 10000)
                ok = isinstance(grace_ms, (int, float)) and grace_ms >= 0
                return (grace_ms / 1000 if ok else EOF_GRACE_S), req.get("terminate") is not False
            elif req["op"] == "kill" and req.get("stage_id") in self.actors:
                self.actors[req["stage_id"]].kill.remote(str(req.get("reason", "")))
            else:
                log(f"ignoring request {req}")
        return EOF_GRACE_S, True

    def _report_exit(self, sid: int, ref) -> None:
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as e:
            result = {"status": f"its Ray actor died: {one_line(e)}", "log": []}
        send({"op": "exited", "stage_id": sid, **result})

    def _release(self, grace_s: float = 0.0) -> None:
        """Removes the placement group and the actors (first letting them clean up)."""
        if not ray.is_initialized():
            return
        if grace_s and self.actors:
            try:
                refs = [a.terminate.remote(grace_s) for a in self.actors.values()]
                ray.wait(refs, num_returns=len(refs), timeout=grace_s + 5)
            except Exception as e:
                log(f"cannot stop the stage actors: {one_line(e)}")
        if self.pg is not None:
            try:
                ray.util.remove_placement_group(self.pg)
            except Exception as e:
                log(f"cannot remove the placement group: {one_line(e)}")
        for a in self.actors.values():
            try:
                ray.kill(a, no_restart=True)
            except Exception as e:
                log(f"cannot kill a stage actor: {one_line(e)}")


def probe_gcs(address: str) -> None:
    """Fails fast when nothing listens at the cluster's address: ray.init
    would retry an unreachable GCS for many minutes."""
    try:  # a private helper: where it has moved, leave it to ray.init
        from ray._private.services import canonicalize_bootstrap_address_or_die as resolve
    except ImportError:
        return
    if "://" in address:  # Ray Client
        return
    host, _, port = resolve(address).rpartition(":")
    socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()


def parse(line: str):
    """A request dict with a string "op", or None."""
    try:
        req = json.loads(line)
    except ValueError:
        return None
    return req if isinstance(req, dict) and isinstance(req.get("op"), str) else None


if __name__ == "__main__":
    sys.exit(Launcher().run())

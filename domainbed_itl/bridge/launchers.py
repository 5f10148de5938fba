"""Command launchers for DomainBed's sweeps: a stoppable `local`, and `submitit`.

See docs/launchers.md.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..files.running_jobs import clear_running, mark_running

Launcher = Callable[[List[str]], None]

STDERR_TAIL_LINES = 20
OUTPUT_LOG = "launcher_output.txt"
TRAIN_MODULE = "domainbed.scripts.train"  # the commands whose folders are DomainBed job folders
STOP_TIMEOUT_S = 10.0
_POLL_INTERVAL_S = 0.5


class CommandFailed(RuntimeError):
    """A launched shell command exited with a non-zero status (raised inside the job)."""

    MARKER = "domainbed-itl command failed"

    def __init__(self, command: str, returncode: int, stderr_tail: Sequence[str]):
        self.command, self.returncode, self.stderr_tail = command, returncode, list(stderr_tail)
        tail = "".join(f"\n      {line}" for line in self.stderr_tail) or " (empty)"
        status = (f"killed by signal {-returncode} ({signal.Signals(-returncode).name})"
                  if returncode < 0 and -returncode in signal.valid_signals()
                  else f"exit status {returncode}")
        super().__init__(f"{self.MARKER}: {status}; last lines of its stderr:{tail}")

    def __reduce__(self):
        return CommandFailed, (self.command, self.returncode, self.stderr_tail)


class SubmititJobsFailed(RuntimeError):
    """Some jobs of a launch failed; the message lists each of them."""


@dataclass
class SubmititConfig:
    """Where and how to run the jobs of one sweep.

    folder: submitit's log folder; None puts it beside the sweep's jobs, in
        `<sweep output_dir>/submitit`, when the commands share one `--output_dir` parent,
        else in `./submitit_logs`.
    cluster: "slurm", "local" or "debug" (in this process, one job after the other); None picks
        Slurm where `sbatch` exists, else local.
    partition, gpus_per_node, cpus_per_task, mem_gb, timeout_min: the Slurm resources of each
        job (local jobs use timeout_min and gpus_per_node only).
    array_parallelism: jobs of one Slurm array running at once; local jobs running at once.
    max_array_size: the most tasks in one Slurm array (clusters cap it with MaxArraySize).
    wait: Slurm only: wait for the jobs and raise on failures (default: return once queued).
    name: the job name shown by squeue.
    extra: other submitit parameters, named as submitit's AutoExecutor names them, e.g.
        {"slurm_account": "...", "slurm_qos": "...", "slurm_setup": ["module load cuda"]};
        local jobs take the `local_` ones, e.g. {"local_setup": [...]}.
    """

    folder: Optional[str] = None
    cluster: Optional[str] = None
    partition: Optional[str] = None
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 32
    timeout_min: int = 24 * 60
    array_parallelism: int = 64
    max_array_size: int = 1000
    wait: Optional[bool] = None
    name: str = "domainbed"
    extra: Dict[str, Any] = field(default_factory=dict)

    ENV = {
        "folder": "DOMAINBED_SUBMITIT_FOLDER", "cluster": "DOMAINBED_SUBMITIT_CLUSTER",
        "partition": "DOMAINBED_SUBMITIT_PARTITION", "gpus_per_node": "DOMAINBED_SUBMITIT_GPUS",
        "cpus_per_task": "DOMAINBED_SUBMITIT_CPUS", "mem_gb": "DOMAINBED_SUBMITIT_MEM_GB",
        "timeout_min": "DOMAINBED_SUBMITIT_TIMEOUT_MIN",
        "array_parallelism": "DOMAINBED_SUBMITIT_ARRAY_PARALLELISM",
        "max_array_size": "DOMAINBED_SUBMITIT_MAX_ARRAY_SIZE",
        "wait": "DOMAINBED_SUBMITIT_WAIT", "name": "DOMAINBED_SUBMITIT_NAME",
        "extra": "DOMAINBED_SUBMITIT_EXTRA",
    }
    _INTEGERS = {"gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 1, "timeout_min": 1,
                 "array_parallelism": 1, "max_array_size": 1}

    def __post_init__(self) -> None:
        if self.cluster not in (None, "slurm", "local", "debug"):
            raise ValueError(f"submitit cluster must be slurm, local or debug, got {self.cluster!r}")
        for name, minimum in self._INTEGERS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"submitit {name} must be an integer >= {minimum}, got {value!r}")
        if self.wait not in (None, True, False):
            raise ValueError(f"submitit wait must be True, False or None, got {self.wait!r}")
        if not isinstance(self.extra, dict) or not all(isinstance(k, str) for k in self.extra):
            raise ValueError(f"submitit extra must be a dict of submitit parameters, got {self.extra!r}")
        if not self.name:
            raise ValueError("submitit name must be a non-empty job name")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "SubmititConfig":
        """Settings from DOMAINBED_SUBMITIT_* variables, defaults for the others."""
        kwargs: Dict[str, Any] = {}
        for name, var in cls.ENV.items():
            raw = environ.get(var)
            if raw is None or raw == "":
                continue
            if name in cls._INTEGERS:
                minimum = cls._INTEGERS[name]
                try:
                    kwargs[name] = int(raw)
                except ValueError:
                    kwargs[name] = None
                if kwargs[name] is None or kwargs[name] < minimum:
                    raise ValueError(f"{var} must be an integer >= {minimum}, got {raw!r}")
            elif name == "cluster" and raw not in ("slurm", "local", "debug"):
                raise ValueError(f"{var} must be slurm, local or debug, got {raw!r}")
            elif name == "wait":
                if raw.lower() not in ("0", "1", "true", "false"):
                    raise ValueError(f"{var} must be 0, 1, true or false, got {raw!r}")
                kwargs[name] = raw.lower() in ("1", "true")
            elif name == "extra":
                try:
                    kwargs[name] = json.loads(raw)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{var} must be a JSON object of submitit parameters, e.g. "
                                     f"'{{\"slurm_account\": \"abc\"}}'; got {raw!r} ({error})"
                                     ) from None
                if not isinstance(kwargs[name], dict):
                    raise ValueError(f"{var} must be a JSON object of submitit parameters, got {raw!r}")
            else:
                kwargs[name] = raw
        return cls(**kwargs)

    def executor_parameters(self) -> Dict[str, Any]:
        """The parameters for submitit's AutoExecutor.update_parameters."""
        params: Dict[str, Any] = {"name": self.name, "timeout_min": self.timeout_min,
                                  "cpus_per_task": self.cpus_per_task,
                                  "gpus_per_node": self.gpus_per_node, "mem_gb": self.mem_gb,
                                  "slurm_array_parallelism": self.array_parallelism}
        if self.partition:
            params["slurm_partition"] = self.partition
        params.update(self.extra)
        return params


def run_shell(command: str) -> None:
    """Run one command through the shell (inside a submitit job); a non-zero exit raises.

    The command's stdout and stderr go to the job's own, so they land in submitit's logs; the
    last lines of stderr also go into the `CommandFailed` error.
    """
    sys.stdout.flush()
    process = subprocess.Popen(command, shell=True, stderr=subprocess.PIPE, text=True,
                               errors="replace")
    folder = job_folder(command)
    if folder:
        mark_running(folder, process.pid)
    tail: collections.deque = collections.deque(maxlen=STDERR_TAIL_LINES)
    assert process.stderr is not None
    try:
        for line in process.stderr:
            sys.stderr.write(line)
            tail.append(line.rstrip("\n"))
        sys.stderr.flush()
        returncode = process.wait()
    finally:
        if folder and process.poll() is not None:
            clear_running(folder)
    if returncode != 0:
        raise CommandFailed(command, returncode, tail)


def job_folder(command: str) -> Optional[Path]:
    """The existing job folder a DomainBed train command writes to (its `--output_dir`); None for
    any other command (a meta_train's run folder is no job folder)."""
    try:
        tokens = shlex.split(command)
    except ValueError:
        return None
    if TRAIN_MODULE not in tokens:
        return None
    values = [tokens[i + 1] for i, token in enumerate(tokens[:-1]) if token == "--output_dir"]
    return Path(values[0]) if len(values) == 1 and Path(values[0]).is_dir() else None


def stop_group(process: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stop `process` and every process of its group (it leads one: `start_new_session`):
    SIGTERM, then SIGKILL if they still run after `timeout_s` seconds; returns once it ended."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            process.wait(timeout=timeout_s)
            return
        except subprocess.TimeoutExpired:
            continue
    process.wait()


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a job ran, and nothing else handles it in this process."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_stops_jobs() -> Any:
    """While a job runs: where SIGTERM would end this process at once (its default action, in the
    main thread), it raises `Terminated` instead, so that the job is stopped as on Ctrl-C; then
    the process ends by SIGTERM as it would have. A handler installed by the command is kept."""
    own = (threading.current_thread() is threading.main_thread()
           and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    if own:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    except Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        raise
    finally:
        if own:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_stoppable(command: str, verbose: bool = False, stop_timeout_s: float = STOP_TIMEOUT_S) -> int:
    """Run one shell command in a process group of its own, its output in its job folder's
    `OUTPUT_LOG` (on the screen if `verbose`, or if it names no job folder); its exit status.
    An interruption (Ctrl-C, SIGTERM) stops the group (`stop_group`) before it goes on."""
    folder = job_folder(command)
    log = open(folder / OUTPUT_LOG, "ab") if folder is not None and not verbose else None
    try:
        with sigterm_stops_jobs():
            process = subprocess.Popen(command, shell=True, start_new_session=True,
                                       stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT if log else None)
            if folder is not None:
                mark_running(folder, process.pid)
            try:
                return process.wait()
            except BaseException:
                stop_group(process, stop_timeout_s)
                raise
            finally:
                if folder is not None and process.poll() is not None:
                    clear_running(folder)
    finally:
        if log is not None:
            log.close()


def make_local_launcher(verbose: bool = False, stop_timeout_s: float = STOP_TIMEOUT_S) -> Launcher:
    """DomainBed's `local` launcher, stoppable (see the module docstring): the commands one after
    the other; a failed job does not stop the others (it has no `done` marker)."""

    def launcher(commands: List[str]) -> None:
        for command in commands:
            run_stoppable(command, verbose, stop_timeout_s)

    return launcher


def launch_order(jobs: Sequence[Any]) -> List[Any]:
    """The order in which DomainBed's `Job.launch` will launch `jobs` (it shuffles them with
    numpy's global random state, which is left as it was)."""
    import numpy as np

    state = np.random.get_state()
    order = list(jobs)
    np.random.shuffle(order)
    np.random.set_state(state)
    return order


def launch_jobs(job_class: Any, jobs: Sequence[Any], launcher_fn: Launcher, quiet: bool = True) -> str:
    """DomainBed's `Job.launch(jobs, launcher_fn)`. With `quiet`, its messages and its bar over
    the job folders it makes stay off the screen (the caller's progress bar stays on it), and
    its closing line ('Launched N jobs!') is returned for the caller to print once its bar is
    gone; else '' is returned."""
    if not quiet:
        job_class.launch(list(jobs), launcher_fn)
        return ""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        job_class.launch(list(jobs), launcher_fn)
    return "".join(line for line in out.getvalue().splitlines(keepends=True)
                   if line.startswith("Launched "))


def default_folder(commands: Sequence[str]) -> str:
    """`<sweep output_dir>/submitit` when all commands write under one `--output_dir` parent."""
    parents = set()
    for command in commands:
        try:
            tokens = shlex.split(command)
        except ValueError:
            return "submitit_logs"
        values = [tokens[i + 1] for i, token in enumerate(tokens[:-1]) if token == "--output_dir"]
        if len(values) != 1:
            return "submitit_logs"
        parents.add(os.path.dirname(os.path.abspath(values[0])))
    return os.path.join(parents.pop(), "submitit") if len(parents) == 1 else "submitit_logs"


def _failure_report(command: str, job: Any, error: BaseException) -> str:
    """One failed job in a few lines: command, why it failed, where its logs are."""
    text = str(error)
    if CommandFailed.MARKER in text:
        why = text[text.rindex(CommandFailed.MARKER) + len(CommandFailed.MARKER) + 2:]
        why = why.split("\n----------------------", 1)[0].strip()
    else:
        lines = [line for line in text.splitlines() if line.strip()]
        why = f"the job did not finish normally: {lines[-1] if lines else type(error).__name__}"
    return (f"[job {job.job_id}] {command}\n    {why}\n"
            f"    logs: {job.paths.stderr} and {job.paths.stdout}")


def slot_gpus(slot: int, gpus_per_job: int, n_gpus: int) -> Tuple[int, ...]:
    """The GPUs of local job slot `slot`: slots take consecutive GPUs, wrapping around."""
    if gpus_per_job == 0 or n_gpus == 0:
        return ()
    return tuple((slot * gpus_per_job + k) % n_gpus for k in range(min(gpus_per_job, n_gpus)))


def _run_local_queue(executor: Any, commands: Sequence[str], config: SubmititConfig) -> List[Tuple[str, Any]]:
    """Run local jobs `config.array_parallelism` at a time, each slot on its own GPUs if any.

    Returns (command, job) pairs once every job finished; an interruption cancels the running
    ones.
    """
    import torch

    n_gpus = torch.cuda.device_count() if config.gpus_per_node else 0
    pending = collections.deque(commands)
    running: List[Tuple[str, Any, int]] = []
    finished: List[Tuple[str, Any]] = []
    try:
        while pending or running:
            free_slots = sorted(set(range(config.array_parallelism)) - {slot for *_, slot in running})
            for slot in free_slots[:len(pending)]:
                gpus = slot_gpus(slot, config.gpus_per_node, n_gpus)
                if gpus:
                    executor.update_parameters(gpus_per_node=len(gpus), visible_gpus=gpus)
                command = pending.popleft()
                running.append((command, executor.submit(run_shell, command), slot))
            time.sleep(_POLL_INTERVAL_S)
            still_running = []
            for command, job, slot in running:
                if job.done():
                    finished.append((command, job))
                else:
                    still_running.append((command, job, slot))
            if len(still_running) < len(running):
                print(f"submitit launcher: {len(finished)}/{len(commands)} jobs finished", flush=True)
            running = still_running
    except BaseException:
        for _, job, _ in running:
            job.cancel(check=False)
        raise
    return finished


def _submit_arrays(executor: Any, commands: Sequence[str], array_size: int) -> List[Tuple[str, Any]]:
    """Submit the commands as job arrays of at most `array_size` tasks; (command, job) pairs."""
    pairs: List[Tuple[str, Any]] = []
    for start in range(0, len(commands), array_size):
        chunk = list(commands[start:start + array_size])
        jobs = executor.map_array(run_shell, chunk)
        pairs.extend(zip(chunk, jobs))
        print(f"submitit launcher: submitted {jobs[0].job_id.split('_')[0]}, {len(jobs)} jobs", flush=True)
    return pairs


def make_submitit_launcher(config: SubmititConfig) -> Launcher:
    """A DomainBed launcher running each command as one submitit job, configured by `config`."""

    def launcher(commands: List[str]) -> None:
        import submitit

        commands = list(commands)
        if not commands:
            print("submitit launcher: no commands to launch")
            return
        cluster = config.cluster or submitit.AutoExecutor.which()
        if cluster != "slurm" and config.wait is False:
            raise ValueError(
                f"not waiting (DOMAINBED_SUBMITIT_WAIT=0) needs the slurm cluster: {cluster} jobs "
                "are queued by this process, which therefore waits for them")
        folder = config.folder or default_folder(commands)
        if cluster == "local":
            executor = submitit.LocalExecutor(folder=folder)
            params = {"timeout_min": config.timeout_min, "gpus_per_node": config.gpus_per_node,
                      **{k[len("local_"):]: v for k, v in config.extra.items() if k.startswith("local_")}}
        else:
            executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
            params = config.executor_parameters()
        executor.update_parameters(**params)
        print(f"submitit launcher: {cluster} executor, logs in {folder}, {params}"
              + (f", {config.array_parallelism} jobs at a time" if cluster == "local" else ""), flush=True)

        if cluster == "local":
            pairs = _run_local_queue(executor, commands, config)
        else:
            pairs = _submit_arrays(executor, commands,
                                   config.max_array_size if cluster == "slurm" else len(commands))
            if cluster == "slurm" and not config.wait:
                print(f"submitit launcher: {len(pairs)} jobs queued; `squeue --name {config.name}` "
                      f"shows them, logs in {folder}")
                return
        errors = [(command, job, job.exception()) for command, job in pairs]
        failed = [_failure_report(*failure) for failure in errors if failure[2] is not None]
        if failed:
            raise SubmititJobsFailed(
                f"{len(failed)} of {len(pairs)} submitit jobs failed:\n" + "\n".join(failed) +
                "\n(for a DomainBed sweep: these jobs have ended; once no other launch runs in the sweep "
                "folder, `sweep delete_incomplete` then `sweep launch` reruns them)")
        print(f"submitit launcher: all {len(pairs)} jobs succeeded", flush=True)

    return launcher


def submitit_launcher(commands: List[str]) -> None:
    """DomainBed launcher `submitit`, configured from DOMAINBED_SUBMITIT_* variables."""
    make_submitit_launcher(SubmititConfig.from_env())(commands)


LAUNCHERS: Dict[str, Launcher] = {"submitit": submitit_launcher}

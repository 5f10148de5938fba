"""Command launchers for DomainBed's sweeps beyond `local`, `dummy` and `multi_gpu`.

A DomainBed launcher is a function `launcher(commands: list[str]) -> None`; the patches add
`LAUNCHERS` to DomainBed's `command_launchers.REGISTRY`, so
`python -m domainbed.scripts.sweep launch --command_launcher submitit ...` uses them.

`submitit`: one Slurm job-array task per command, through submitit (Meta's Slurm library),
or submitit's local executor where there is no Slurm. DomainBed's sweep passes launchers the
commands alone, so the cluster settings come from `SubmititConfig`: our single-source sweep
takes them as flags; DomainBed's own sweep reads them from DOMAINBED_SUBMITIT_* environment
variables (listed in `SubmititConfig.ENV`), and the launcher prints the settings it uses.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional

Launcher = Callable[[List[str]], None]


@dataclass
class SubmititConfig:
    """Where and how to run the jobs of one sweep."""

    folder: str = "submitit_logs"
    cluster: Optional[str] = None  # None: Slurm when available, else local; or "slurm", "local", "debug"
    partition: Optional[str] = None
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 32
    timeout_min: int = 24 * 60
    array_parallelism: int = 64
    wait: Optional[bool] = None  # None: wait for local/debug jobs, return at once on Slurm
    extra: Dict[str, object] = field(default_factory=dict)

    ENV = {
        "folder": "DOMAINBED_SUBMITIT_FOLDER", "cluster": "DOMAINBED_SUBMITIT_CLUSTER",
        "partition": "DOMAINBED_SUBMITIT_PARTITION", "gpus_per_node": "DOMAINBED_SUBMITIT_GPUS",
        "cpus_per_task": "DOMAINBED_SUBMITIT_CPUS", "mem_gb": "DOMAINBED_SUBMITIT_MEM_GB",
        "timeout_min": "DOMAINBED_SUBMITIT_TIMEOUT_MIN",
        "array_parallelism": "DOMAINBED_SUBMITIT_ARRAY_PARALLELISM",
        "wait": "DOMAINBED_SUBMITIT_WAIT",
    }

    def __post_init__(self) -> None:
        if self.cluster not in (None, "slurm", "local", "debug"):
            raise ValueError(f"submitit cluster must be slurm, local or debug, got {self.cluster!r}")
        for name in ("gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "array_parallelism"):
            value = getattr(self, name)
            minimum = 0 if name == "gpus_per_node" else 1
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"submitit {name} must be an integer >= {minimum}, got {value!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "SubmititConfig":
        """Settings from DOMAINBED_SUBMITIT_* variables, defaults for the others."""
        kwargs: Dict[str, object] = {}
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for name, var in cls.ENV.items():
            if var not in environ:
                continue
            raw = environ[var]
            if "int" in str(types[name]):
                try:
                    kwargs[name] = int(raw)
                except ValueError:
                    raise ValueError(f"{var} must be an integer, got {raw!r}") from None
            elif name == "wait":
                if raw.lower() not in ("0", "1", "true", "false"):
                    raise ValueError(f"{var} must be 0, 1, true or false, got {raw!r}")
                kwargs[name] = raw.lower() in ("1", "true")
            else:
                kwargs[name] = raw
        return cls(**kwargs)


def _run_shell(command: str) -> None:
    """Run one DomainBed command inside a submitit job; a failure fails the job."""
    subprocess.run(command, shell=True, check=True)


def make_submitit_launcher(config: SubmititConfig) -> Launcher:
    """A DomainBed launcher submitting each command as one task of a submitit job array."""

    def launcher(commands: List[str]) -> None:
        import submitit

        executor = submitit.AutoExecutor(folder=config.folder, cluster=config.cluster)
        params: Dict[str, object] = {"timeout_min": config.timeout_min, "cpus_per_task": config.cpus_per_task,
                                     "gpus_per_node": config.gpus_per_node, "mem_gb": config.mem_gb,
                                     "slurm_array_parallelism": config.array_parallelism}
        if config.partition:
            params["slurm_partition"] = config.partition
        params.update(config.extra)
        executor.update_parameters(**params)
        print(f"submitit launcher: {executor.cluster} executor, logs in {config.folder}, {params}")
        jobs = executor.map_array(_run_shell, list(commands))
        print(f"submitit launcher: submitted {len(jobs)} jobs" +
              (f" ({jobs[0].job_id.split('_')[0]})" if jobs else ""))
        wait = config.wait if config.wait is not None else executor.cluster != "slurm"
        if wait:
            failed = []
            for command, job in zip(commands, jobs):
                try:
                    job.result()
                except Exception as error:  # submitit re-raises the job's failure here
                    failed.append(f"{command}\n    {str(error).splitlines()[-1] if str(error) else error}")
            if failed:
                raise RuntimeError(f"{len(failed)} of {len(jobs)} submitit jobs failed:\n" + "\n".join(failed))

    return launcher


def submitit_launcher(commands: List[str]) -> None:
    """DomainBed launcher `submitit`, configured from DOMAINBED_SUBMITIT_* variables."""
    make_submitit_launcher(SubmititConfig.from_env())(commands)


LAUNCHERS: Dict[str, Launcher] = {"submitit": submitit_launcher}

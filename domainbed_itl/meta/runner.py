"""A meta-training run on disk: output-dir protection, atomic checkpoints, metrics and loss.json.

The run directory holds three files, all replaced atomically after every outer step:

- checkpoint.pt  config, data fingerprint, initial ω, trainer state and every metrics record;
                 the source of truth, written first;
- metrics.jsonl  one JSON line per outer step (rewritten from the checkpoint's records);
- loss.json      the current ω as a loss file (domainbed_itl.losses.save_loss).

A crash between two of these writes is repaired on --resume, which rewrites metrics.jsonl and
loss.json from the checkpoint. A resumed run repeats the uninterrupted run exactly (bitwise on
the same device) because the trainer's randomness depends only on (seed, step).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from tqdm import tqdm

from .. import __version__
from ..atomic import write_atomic
from ..losses.lossfile import LossSpec, save_loss
from .data import DomainData
from .trainer import MetaConfig, MetaTrainer, NonFiniteError

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
LOSS = "loss.json"
OUTPUTS = (CHECKPOINT, METRICS, LOSS)
CHECKPOINT_FORMAT = "domainbed-itl-meta-checkpoint"
# Config fields a resumed run may change: the number of steps to reach.
RESUMABLE_CHANGES = ("outer_steps",)


class RunDirError(RuntimeError):
    """An output directory that cannot be used as asked (would overwrite, or cannot resume)."""


def data_fingerprint(data: DomainData) -> Dict[str, Any]:
    """Dataset name, environments, domain sizes and a SHA-256 of every tensor's bytes."""
    digest = hashlib.sha256()
    for x, y in data.domains:
        for t in (x, y):
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return {"dataset": data.name, "environments": list(data.environments),
            "num_classes": data.num_classes, "domain_sizes": [len(y) for _, y in data.domains],
            "sha256": digest.hexdigest()}


def _save_checkpoint(path: Path, checkpoint: Dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    write_atomic(path, buffer.getvalue(), overwrite=True)


def _write_metrics(path: Path, records: Sequence[Dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records), overwrite=True)


def load_checkpoint(path: str | os.PathLike) -> Dict[str, Any]:
    """Read a meta-training checkpoint; raise RunDirError naming the file if it is not one."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or foreign files
        raise RunDirError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise RunDirError(f"{path} is not a domainbed-itl meta-training checkpoint")
    return ckpt


def check_output_dir(output_dir: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """Raise RunDirError unless `output_dir` may be used with these flags; changes nothing.

    A non-empty directory needs --resume (it must then hold a checkpoint) or --overwrite;
    --resume in an empty or missing directory starts the run.
    """
    output_dir = Path(output_dir)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other: resume continues the run in "
                          f"{output_dir}, overwrite starts it again")
    if output_dir.exists() and not output_dir.is_dir():
        raise RunDirError(f"output dir {output_dir} exists and is not a directory")
    contents = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    if not contents or overwrite:
        return
    if not resume:
        raise RunDirError(f"output dir {output_dir} is not empty ({', '.join(contents[:5])}); pass "
                          "--resume to continue the run there or --overwrite to start it again")
    if not (output_dir / CHECKPOINT).is_file():
        raise RunDirError(f"cannot resume: {output_dir} has no {CHECKPOINT} but is not empty "
                          f"({', '.join(contents[:5])}); pass --overwrite to start again there")


def _prepare(output_dir: Path, resume: bool, overwrite: bool) -> Optional[Dict[str, Any]]:
    """Check the output dir, clear it of a previous run's outputs on overwrite; the checkpoint
    to resume from, if any."""
    check_output_dir(output_dir, resume, overwrite)
    if resume and (output_dir / CHECKPOINT).is_file():
        return load_checkpoint(output_dir / CHECKPOINT)
    if overwrite:
        for name in OUTPUTS:
            (output_dir / name).unlink(missing_ok=True)
    return None


def _check_resumable(ckpt: Dict[str, Any], config: MetaConfig, fingerprint: Dict[str, Any],
                     init_omega: List[float], path: Path) -> None:
    # Settings added after a checkpoint was written took their default values there.
    saved = {**MetaConfig().to_dict(), **ckpt["config"]}
    wanted = config.to_dict()
    changed = [f"{k}: {saved.get(k)!r} in the checkpoint, {v!r} now" for k, v in wanted.items()
               if k not in RESUMABLE_CHANGES and saved.get(k) != v]
    if changed:
        raise RunDirError(f"cannot resume {path} with different settings: " + "; ".join(changed))
    if ckpt["data"] != fingerprint:
        raise RunDirError(f"cannot resume {path}: the data differ from the checkpoint's "
                          f"({ckpt['data']} vs {fingerprint})")
    if ckpt["init_omega"] != init_omega:
        raise RunDirError(f"cannot resume {path}: the initial loss parameters differ "
                          f"({ckpt['init_omega']} in the checkpoint, {init_omega} now); start "
                          "from the same --init as the interrupted run")


def source_commit() -> Optional[str]:
    """The git commit of this package's source tree, or None outside a git checkout."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def run_meta_training(data: DomainData, config: MetaConfig, output_dir: str | os.PathLike, *,
                      init: Optional[LossSpec] = None, resume: bool = False,
                      overwrite: bool = False, device: str | torch.device = "cpu",
                      progress: bool = True,
                      provenance: Optional[Dict[str, Any]] = None) -> MetaTrainer:
    """Meta-train on `data` into `output_dir` until config.outer_steps outer steps are done.

    init: the starting loss (its family must be config's); None starts from the family default.
    provenance: extra entries for loss.json's provenance (e.g. the command and preset).
    Raises RunDirError for an unusable output dir and NonFiniteError (after keeping the last
    good checkpoint) when ω, a loss or a hypergradient stops being finite.
    """
    output_dir = Path(output_dir)
    if init is not None and (init.family, init.order) != (config.family, config.order):
        raise ValueError(f"the initial loss is a {init.family} loss of order {init.order}, but the "
                         f"config meta-learns {config.family} (order {config.order})")
    trainer = MetaTrainer(data.domains, data.num_classes, config,
                          None if init is None else init.parameters, device=device)
    ckpt = _prepare(output_dir, resume, overwrite)
    init_omega = trainer.omega.tolist()
    fingerprint = data_fingerprint(data)
    records: List[Dict[str, Any]] = []
    if ckpt is not None:
        _check_resumable(ckpt, config, fingerprint, init_omega, output_dir / CHECKPOINT)
        trainer.load_state_dict(ckpt["trainer"])
        records = list(ckpt["metrics"])
    output_dir.mkdir(parents=True, exist_ok=True)

    commit = source_commit()

    def full_provenance() -> Dict[str, Any]:
        return {"meta_train_dataset": data.name, "steps": trainer.steps_done, "seed": config.seed,
                "package_version": __version__, "source_commit": commit, **(provenance or {}),
                "meta_config": config.to_dict(),
                "data": {**{k: v for k, v in fingerprint.items() if k != "sha256"}, **data.info},
                "init_omega": init_omega}

    def write_views() -> None:
        _write_metrics(output_dir / METRICS, records)
        spec = LossSpec(config.family, config.order, trainer.omega.tolist(), full_provenance())
        save_loss(output_dir / LOSS, spec, overwrite=True)

    if ckpt is not None:
        write_views()
    bar = tqdm(total=config.outer_steps, initial=min(trainer.steps_done, config.outer_steps),
               desc="meta-train", unit="step", disable=not progress)
    try:
        while trainer.steps_done < config.outer_steps:
            try:
                record = trainer.outer_step()
            except NonFiniteError as e:
                kept = (f"the last good checkpoint ({output_dir / CHECKPOINT}, step "
                        f"{trainer.steps_done}) is kept" if trainer.steps_done
                        else "no checkpoint had been written yet")
                raise NonFiniteError(f"{e}; stopping, {kept}") from e
            records.append(record)
            if record.get("trusted_domains") == 0:
                worst = min(record["per_domain"]["solver_residual"])
                tqdm.write(f"outer step {record['step']}: no domain's solve left a relative residual "
                           f"within max_solver_residual {config.max_solver_residual} (smallest "
                           f"{worst:.3g}); ω unchanged", file=sys.stderr)
            _save_checkpoint(output_dir / CHECKPOINT, {
                "format": CHECKPOINT_FORMAT, "version": 1, "package_version": __version__,
                "config": config.to_dict(), "data": fingerprint, "init_omega": init_omega,
                "trainer": trainer.state_dict(), "metrics": records})
            write_views()
            bar.update(1)
            bar.set_postfix(heldout_acc=f"{record['outer_heldout_acc']:.3f}",
                            source_acc=f"{record['inner_source_acc']:.3f}")
    finally:
        bar.close()
    return trainer

"""A meta-training run in a run folder (domainbed_itl.files.runfolder): checkpoint.pt,
metrics.jsonl and loss.json, all replaced atomically after every outer step; a resume repeats
the uninterrupted run exactly. See docs/meta_learning.md#what-a-run-writes.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from tqdm import tqdm

from .. import __version__
from ..files.runfolder import RunFolder, RunKind, log_stderr, source_commit, using_run_folder
from ..files.schemas import MetaCheckpoint
from ..losses.lossfile import LossSpec
from .aggregators import aggregator_note
from .config import MetaConfig
from .data import DomainData, data_fingerprint
from .resume import (check_resumable, check_trainer_state, initial_loss, new_trainer,
                     saved_config)
from .trainer import MetaTrainer, NonFiniteError

__all__ = ["META_RUN", "check_resumable", "check_trainer_state", "data_fingerprint",
           "initial_loss", "new_trainer", "run_meta_training", "saved_config"]

META_RUN = RunKind("meta-training", "domainbed-itl-meta-checkpoint", "outer steps",
                   schema=MetaCheckpoint)


def run_meta_training(data: DomainData, config: MetaConfig,
                      output_dir: Union[str, os.PathLike, RunFolder], *,
                      init: Optional[LossSpec] = None, resume: bool = False,
                      overwrite: bool = False, device: str | torch.device = "cpu",
                      progress: bool = True,
                      provenance: Optional[Dict[str, Any]] = None,
                      log: Callable[[str], None] = log_stderr) -> MetaTrainer:
    """Meta-train on `data` into `output_dir` until config.outer_steps outer steps are done.

    output_dir: a folder, opened here with `resume` and `overwrite`, or a RunFolder the caller
    opened for META_RUN. init: the starting loss (its family must be config's); None starts
    from the family default. provenance: extra entries for loss.json's provenance (e.g. the
    command and preset; its "command" also names this run to a second writer). log: where
    notes on replaced runs go. Raises RunDirError for an unusable output dir,
    runlock.FolderLocked while another process writes into it, and NonFiniteError (after
    keeping the last good checkpoint) when ω, a loss or a hypergradient stops being finite.
    """
    trainer = new_trainer(data, config, init, device)
    provenance = provenance or {}
    with using_run_folder(output_dir, META_RUN, resume=resume, overwrite=overwrite,
                          command=provenance.get("command"), log=log) as folder:
        init_omega = trainer.omega.tolist()
        records: List[Dict[str, Any]] = []
        if folder.checkpoint is not None:
            check_resumable(folder, "config", config, data, init_omega, ignore=("outer_steps",))
            check_trainer_state(folder.checkpoint_path, folder.checkpoint["trainer"], trainer, data)
            trainer.load_state_dict(folder.checkpoint["trainer"])
            records = list(folder.checkpoint["metrics"])
        folder.begin(config.outer_steps, device, provenance)
        note = aggregator_note(config.aggregate, trainer.family.num_params, trainer.num_domains)
        if note is not None and trainer.steps_done < config.outer_steps:
            log(f"note: {note}")
        _train(folder, trainer, data, records, init_omega, progress)
    return trainer


def _train(folder: RunFolder, trainer: MetaTrainer, data: DomainData, records: List[Dict[str, Any]],
           init_omega: List[float], progress: bool) -> None:
    """The outer loop of run_meta_training, writing the checkpoint and its views after each step."""
    config, commit, fingerprint = trainer.config, source_commit(), data_fingerprint(data)

    def loss() -> LossSpec:
        return LossSpec(config.family, config.order, trainer.omega.tolist(), {
            "meta_train_dataset": data.name, "steps": trainer.steps_done, "seed": config.seed,
            "package_version": __version__,
            "source_commit": commit, **folder.provenance, "meta_config": config.to_dict(),
            "data": {**{k: v for k, v in fingerprint.items() if k != "sha256"}, **data.info},
            "init_omega": init_omega})

    if folder.checkpoint is not None:
        folder.write_views(records, loss())
    bar = tqdm(total=config.outer_steps, initial=trainer.steps_done,
               desc="meta-train", unit="step", disable=not progress)
    try:
        while trainer.steps_done < config.outer_steps:
            record = _step(trainer, folder)
            records.append(record)
            folder.save_checkpoint({"config": config.to_dict(), "data": fingerprint,
                                    "init_omega": init_omega, "trainer": trainer.state_dict(),
                                    "metrics": records}, trainer.steps_done, records, loss())
            bar.update(1)
            bar.set_postfix(progress_fields(record))
    finally:
        bar.close()


def progress_fields(record: Dict[str, Any]) -> Dict[str, str]:
    """The progress line's fields for an outer step's record: M, held-out and source accuracy,
    and how many inner networks stopped at the inner_steps cap, not by the stopping rule."""
    fields = {"M": f"{record['outer_heldout_loss']:.4f}",
              "heldout_acc": f"{record['outer_heldout_acc']:.3f}",
              "source_acc": f"{record['inner_source_acc']:.3f}"}
    if record.get("inner_at_cap"):
        fields["at_cap"] = f"{record['inner_at_cap']}/{len(record['per_domain']['inner_at_cap'])}"
    return fields


def _step(trainer: MetaTrainer, folder: RunFolder) -> Dict[str, Any]:
    """One outer step; a non-finite stop says which checkpoint is kept, a step that trusted no
    domain says so."""
    try:
        record = trainer.outer_step()
    except NonFiniteError as e:
        kept = (f"the last good checkpoint ({folder.checkpoint_path}, step {trainer.steps_done}) "
                "is kept" if folder.checkpoint_path.is_file() else "no checkpoint had been written yet")
        raise NonFiniteError(f"{e}; stopping, {kept}") from e
    if record.get("trusted_domains") == 0:
        worst = min(record["per_domain"]["solver_residual"])
        tqdm.write(f"outer step {record['step']}: no domain's solve left a relative residual "
                   f"within max_solver_residual {trainer.config.max_solver_residual} (smallest "
                   f"{worst:.3g}); ω unchanged", file=sys.stderr)
    return record

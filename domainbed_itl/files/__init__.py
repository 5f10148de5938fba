"""Files on disk: writing outputs, folder locks, the shipped data, run folders and sweep folders.

- `atomic`: the one way an output file is written (atomic, never replacing what it did not make);
- `runlock`: one writer per output folder;
- `runfolder`: a long run's folder (lock, resume and overwrite rules, checkpoint, provenance,
  metrics), shared by meta-training, the CMA-ES search and the loss evaluation;
- `resources`: the shipped `sweeps/` and `patches/` folders;
- `sweepfolder`: DomainBed's sweep folders (job folders, `results.jsonl` records, manifests,
  the empty folders of jobs that never started);
- `job_progress`: a progress bar over a sweep's jobs, from their `done` markers.

Nothing here imports DomainBed.
"""

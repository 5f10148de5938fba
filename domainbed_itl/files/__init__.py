"""Files on disk: writing outputs, folder locks, the shipped data, run folders and sweep folders.

- `atomic`: writing a file atomically, never replacing what it was not told to; a fault of the
  machine (a full disk) names the file and leaves nothing half-made;
- `reading`: reading an input file behind a size check, and a torch file without running code;
- `outputs`: the one way a command writes an output file: every path checked before any work
  (existing files, parent folder, figure format), then written atomically;
- `runlock`: one writer per output folder;
- `runfolder`: a long run's folder (lock, resume and overwrite rules, checkpoint, provenance,
  metrics), shared by meta-training, the CMA-ES search and the loss evaluation;
- `resources`: the shipped `sweeps/` and `patches/` folders;
- `sweepfolder`: DomainBed's sweep folders (job folders, `results.jsonl` records of one run
  each, manifests, the empty folders of jobs that never started);
- `job_progress`: a progress bar over a sweep's jobs, from their `done` markers.

Nothing here imports DomainBed.
"""

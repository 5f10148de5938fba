"""The DomainBed bridge: every module that imports DomainBed or registers into it.

- `domainbed_env`: finding, cloning and importing a DomainBed checkout;
- `patching`: the hooks our patches add to DomainBed (check, apply, revert);
- `registration`: what the hooks call, and `register()` for an unpatched DomainBed in process;
- `algorithms`, `hparams`: the loss-replaced algorithms and their hparams;
- `single_source_mixup`: DomainBed's Mixup for one training domain;
- `launchers`: the `submitit` command launcher for DomainBed's sweeps;
- `loss_evaluation`: the losses `evaluate_loss` takes, and its DomainBed protocol (plan, launch,
  collect);
- `domainbed_data`: DomainBed's datasets as per-domain tensors for meta-learning;
- `trained_models`: DomainBed's run folders and checkpoints (`TrainedRun`), for the analyses;
- `sweep_estimate`: how long a sweep will take, from a few training steps timed here.

Nothing outside this folder and `domainbed_itl.scripts` imports DomainBed or these modules
(tests/test_layout.py), except the package's two public doors: `domainbed_itl.register()` and
`domainbed_itl.registry`, the import path of the hooks in patched checkouts.
"""

"""Analyses of sweep results and of learned losses: small pure functions, no DomainBed.

Sweep statistics (Table 2, Fig. 3):

- `friedman_nemenyi`: Friedman and Nemenyi tests with critical-difference diagrams;
- `multi_source`: DomainBed's multi-source accuracies as blocks for them (DomainBed's selection
  functions are handed in by the caller).

The paper's Sec. 4.3-4.4 and Appendix A.2:

- `loss_profiles`: a loss and its gradient against the true-class probability (Fig. 5);
- `entropy`: entropy of predictions, split by correctness (Fig. 7);
- `hessian`: Hessian-vector products with torch.func, Lanczos, 1-D landscapes (Fig. 8);
- `generalisation`: accuracy and cross-entropy of predictions (Table 7);
- `aggregate`: mean ± standard error over runs (the one function, with the standard
  deviation's convention as an argument); `output`: writing a figure and its numbers.

The loss evaluation (`scripts/evaluate_loss`): `comparison`, the paired statistics, and
`evaluation_report`, its tables and report files; `table_rows`: the rows a table shows.

The scripts in domainbed_itl.scripts (`significance`, `loss_shapes`, `target_entropy`,
`loss_landscape`, `in_vs_cross`) read sweep folders, loss files and DomainBed checkpoints and call
these functions; only the scripts and domainbed_itl.bridge.trained_models import DomainBed.
"""

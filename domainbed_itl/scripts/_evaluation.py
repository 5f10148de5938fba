"""What the commands that evaluate losses under the meta protocol share (evaluate_loss meta,
grid_search): its flags, the Protocol they make, and the evaluation of labelled losses in a run
folder, each unit kept as it finishes (domainbed_itl.meta.evaluate)."""

from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, List, Mapping, Tuple

import torch

from ..analysis.evaluation_report import CONVERGENCE_METRICS, META_METRICS, Metric
from ..bridge.loss_evaluation import loss_definition, loss_function
from ..files.runfolder import RunFolder
from ..meta.data import DomainData
from ..meta.evaluate import Protocol, evaluate_in_folder
from ._cli import (INNER_TRAINING, add_flags, add_label_noise_flag, nonnegative_int, positive_int,
                   setting_flags)

Loss = Tuple[Callable[..., torch.Tensor] | torch.nn.Module, Any]


def add_meta_protocol_flags(parser: argparse.ArgumentParser) -> None:
    """--seeds, --inner_steps, the inner-training flags, --eval_size, --per_domain_cap,
    --data_seed, --label_noise and --device."""
    parser.add_argument("--seeds", type=nonnegative_int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--inner_steps", type=positive_int, nargs="+", default=[1000],
                        help="report after each of these numbers of inner steps")
    add_flags(parser, "inner training (default: meta_train's)", INNER_TRAINING)
    parser.add_argument("--eval_size", default=Protocol().eval_size,
                        **setting_flags(Protocol, only=("eval_size",))["eval_size"])
    parser.add_argument("--per_domain_cap", type=positive_int, default=None)
    parser.add_argument("--data_seed", type=nonnegative_int, default=0)
    add_label_noise_flag(parser)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def meta_protocol(args: argparse.Namespace) -> Protocol:
    """The Protocol of the flags of `add_meta_protocol_flags`."""
    return Protocol(tuple(args.inner_steps), eval_size=args.eval_size, **{
        k: getattr(args, k) for k in INNER_TRAINING if getattr(args, k) is not None})


def meta_settings(args: argparse.Namespace, protocol: Protocol) -> Dict[str, Any]:
    """The settings a report states: protocol, dataset, seeds, data sampling, inner training."""
    return {"protocol": "meta", "dataset": args.dataset, "seeds": args.seeds,
            "per_domain_cap": args.per_domain_cap, "data_seed": args.data_seed,
            **({"label_noise": args.label_noise} if args.label_noise else {}),
            **protocol.to_dict()}


def meta_metrics(protocol: Protocol) -> List[Metric]:
    """The report's metrics: held-out and source accuracy, held-out CE, the gap, and with a
    stopping rule the inner steps used and the stationarity reached."""
    return META_METRICS + (CONVERGENCE_METRICS if protocol.inner_stop_ratio is not None else [])


def meta_losses(losses: Mapping[str, str], device: torch.device) -> Dict[str, Loss]:
    """{label: (the loss on `device`, its definition)} of labelled --losses values."""
    return {label: (_on(loss_function(loss), device), loss_definition(loss))
            for label, loss in losses.items()}


def _on(loss: Callable[..., torch.Tensor] | torch.nn.Module, device: torch.device):
    return loss.to(device) if isinstance(loss, torch.nn.Module) else loss


def evaluate_meta(folder: RunFolder, data: DomainData, losses: Mapping[str, Loss],
                  args: argparse.Namespace, protocol: Protocol, device: torch.device,
                  command: str) -> List[Dict[str, Any]]:
    """Every loss on every seed of `args`, kept unit by unit in `folder`; the records."""
    return evaluate_in_folder(folder, data, losses, args.seeds, protocol, device,
                              provenance={"command": command}, progress=not args.no_progress)

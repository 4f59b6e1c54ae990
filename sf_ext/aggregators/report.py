"""What an aggregator did in one round: the :class:`AggregationReport` and detection rates."""

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch


@dataclass
class AggregationReport:
    """Per-client outcome of one aggregation.

    Attributes:
        method: Registry name of the aggregator that produced the report.
        kept: ``bool [n]``; True where the client's update contributes to the result.
        weights: ``float64 [n]``; the client's effective weight in the result, 0 for dropped
            clients. For linear rules (FedAvg, Krum, NDC, FLAME, RFA, matrix mapping) it is the
            coefficient of the client's raw update in the result; the coordinate-wise and sign rules
            document their own meaning in ``details["weights_meaning"]``.
        scores: ``float64 [n]`` or None; higher means more suspicious (``inf`` for screened
            clients).
        non_finite: ``bool [n]``; True where the update held NaN or inf (or its norm overflowed
            float32) and was screened out before aggregation.
        details: Method-specific extras (thresholds, iteration counts, cluster labels, ...).
    """

    method: str
    kept: torch.Tensor
    weights: torch.Tensor
    scores: Optional[torch.Tensor]
    non_finite: torch.Tensor
    details: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_clients(self) -> int:
        return int(self.kept.numel())

    @property
    def num_kept(self) -> int:
        return int(self.kept.sum())

    def to_dict(self) -> Dict[str, Any]:
        """Plain-Python form (lists and scalars) for logging or JSON."""
        return {
            "method": self.method,
            "kept": self.kept.tolist(),
            "weights": self.weights.tolist(),
            "scores": None if self.scores is None else self.scores.tolist(),
            "non_finite": self.non_finite.tolist(),
            "details": self.details,
        }


def detection_rates(report: AggregationReport, is_attacker) -> Dict[str, float]:
    """Detection quality of a report against the known attackers.

    A client counts as *detected* when the aggregator did not keep it (dropped or screened).

    Args:
        report: The aggregator's report.
        is_attacker: Boolean sequence ``[n]``, True for the planted attackers.

    Returns:
        ``tpr`` (detected attackers / attackers), ``fpr`` (detected benign / benign),
        ``benign_kept_fraction`` and the four counts. A rate whose denominator is 0 is ``nan``.
    """
    attacker = torch.as_tensor(is_attacker, dtype=torch.bool).reshape(-1)
    if attacker.numel() != report.num_clients:
        raise ValueError(
            f"is_attacker has {attacker.numel()} entries for {report.num_clients} clients"
        )
    detected = ~report.kept
    tp = int((detected & attacker).sum())
    fp = int((detected & ~attacker).sum())
    fn = int((~detected & attacker).sum())
    tn = int((~detected & ~attacker).sum())

    def ratio(num: int, den: int) -> float:
        return num / den if den else math.nan

    return {
        "tpr": ratio(tp, tp + fn),
        "fpr": ratio(fp, fp + tn),
        "benign_kept_fraction": ratio(tn, fp + tn),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }

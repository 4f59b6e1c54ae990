"""What an aggregator did in one round: the :class:`AggregationReport` and detection rates.

Every rule builds its report through the same constructor, which *derives* ``kept`` from the
effective weights (``kept[i] = weights[i] > 0``): there is one meaning of "kept" for every rule,
and a rule cannot report a client as kept while giving it no weight (or the other way round).
"""

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch


@dataclass
class AggregationReport:
    """Per-client outcome of one aggregation.

    Attributes:
        method: Registry name of the aggregator that produced the report.
        weights: ``float64 [n]``; the client's effective weight in the result, 0 for dropped
            clients. For linear rules (FedAvg, Krum, NDC, FLAME, RFA, matrix mapping, FLTrust,
            FoolsGold, ...) it is the coefficient of the client's raw update in the result; the
            coordinate-wise and sign rules document their own meaning in
            ``details["weights_meaning"]``.
        scores: ``float64 [n]`` or None; higher means more suspicious (``inf`` for screened
            clients).
        non_finite: ``bool [n]``; True where the update held NaN or inf (or its norm overflowed
            float32) and was screened out before aggregation.
        details: Method-specific extras (thresholds, iteration counts, cluster labels, ...).
        selects: Whether the rule decides per client who takes part (Krum, FLAME, matrix
            mapping, ...). Rules that blend every update (median, trimmed mean, NDC, RFA, RSA,
            centered clipping) do not select: detection rates mean nothing for them.
        kept: ``bool [n]``, derived: ``weights > 0``. Not a constructor argument.
    """

    method: str
    weights: torch.Tensor
    scores: Optional[torch.Tensor]
    non_finite: torch.Tensor
    details: Dict[str, Any] = field(default_factory=dict)
    selects: bool = False
    kept: torch.Tensor = field(init=False)

    def __post_init__(self):
        weights = torch.as_tensor(self.weights).detach().to("cpu", torch.float64).reshape(-1)
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError(f"{self.method}: effective weights must be finite and >= 0")
        non_finite = torch.as_tensor(self.non_finite, dtype=torch.bool).reshape(-1).cpu()
        if non_finite.numel() != weights.numel():
            raise ValueError(
                f"{self.method}: {non_finite.numel()} screening flags for {weights.numel()} clients"
            )
        if bool((weights[non_finite] > 0).any()):
            raise ValueError(f"{self.method}: a screened (non-finite) client has weight > 0")
        if self.scores is not None:
            scores = torch.as_tensor(self.scores).detach().to("cpu", torch.float64).reshape(-1)
            if scores.numel() != weights.numel():
                raise ValueError(
                    f"{self.method}: {scores.numel()} scores for {weights.numel()} clients"
                )
            self.scores = scores
        self.weights = weights
        self.non_finite = non_finite
        self.kept = weights > 0

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
            "selects": self.selects,
            "kept": self.kept.tolist(),
            "weights": self.weights.tolist(),
            "scores": None if self.scores is None else self.scores.tolist(),
            "non_finite": self.non_finite.tolist(),
            "details": self.details,
        }


def detection_rates(report: AggregationReport, is_attacker) -> Dict[str, Any]:
    """Detection quality of a report against the known attackers.

    A client counts as *detected* when the aggregator did not keep it (dropped or screened).
    Only rules that select clients (``report.selects``) detect anything: for the others every
    rate is ``nan`` and ``applicable`` is False, so that a rule that never drops anyone is not
    read as "no false positives".

    Args:
        report: The aggregator's report.
        is_attacker: Boolean sequence ``[n]``, True for the planted attackers.

    Returns:
        ``applicable``, ``tpr`` (detected attackers / attackers), ``fpr`` (detected benign /
        benign), ``benign_kept_fraction`` and the four counts (``None`` when not applicable). A
        rate whose denominator is 0 is ``nan``.
    """
    attacker = torch.as_tensor(is_attacker, dtype=torch.bool).reshape(-1)
    if attacker.numel() != report.num_clients:
        raise ValueError(
            f"is_attacker has {attacker.numel()} entries for {report.num_clients} clients"
        )
    if not report.selects:
        return {
            "applicable": False,
            "tpr": math.nan,
            "fpr": math.nan,
            "benign_kept_fraction": math.nan,
            "tp": None,
            "fp": None,
            "fn": None,
            "tn": None,
        }
    detected = ~report.kept
    tp = int((detected & attacker).sum())
    fp = int((detected & ~attacker).sum())
    fn = int((~detected & attacker).sum())
    tn = int((~detected & ~attacker).sum())

    def ratio(num: int, den: int) -> float:
        return num / den if den else math.nan

    return {
        "applicable": True,
        "tpr": ratio(tp, tp + fn),
        "fpr": ratio(fp, fp + tn),
        "benign_kept_fraction": ratio(tn, fp + tn),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }

"""Temperature scaling of the teacher's level distribution (Guo et al. 2017, "On Calibration of Modern Neural
Networks", arXiv 1706.04599).

A fine-tuned LLM teacher ranks pairs well but its level distribution is not calibrated: the students distil that
distribution (the soft targets, and the only target of an unlabelled pool pair), so they inherit its confidence.
One temperature ``T`` fitted on labelled held-out pairs (the validation split) rescales every distribution,
``p_T ∝ p^(1/T)``; it keeps each pair's most likely level and changes only how sure the teacher says it is.
With one bias per level as well (bias-corrected temperature scaling, ``p ∝ exp(log(p) / T + b)``) the fit can also
move probability between levels, for a teacher that says one level too seldom on the labelled pairs.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch


def apply_temperature(
    probs: torch.Tensor, temperature: float, bias: torch.Tensor | list[float] | None = None
) -> torch.Tensor:
    """``probs`` ``[N, K]`` (rows summing to 1) at ``temperature``: ``softmax(log(p) / T)``; with ``bias`` ``[K]``,
    one log-probability bias per level as well: ``softmax(log(p) / T + b)``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    z = probs.clamp_min(1e-12).log() / temperature
    if bias is not None:
        z = z + torch.as_tensor(bias, dtype=z.dtype, device=z.device)
    return torch.softmax(z, dim=-1)


@dataclass
class TemperatureFit:
    """A fitted temperature (and level biases, where fitted with it) and the held-out pairs' figures before
    (T = 1) and after it."""

    temperature: float
    pairs: int
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    bias: list[float] | None = None
    cv: dict[str, Any] | None = None  # :func:`cross_validate_bias`, where it chose whether to fit biases

    def describe(self) -> str:
        biases = "" if self.bias is None else " b=[" + ", ".join(f"{b:+.3f}" for b in self.bias) + "]"
        chosen = ""
        if self.cv:
            chosen = (
                f"; biases {'kept' if self.cv['bias'] else 'left out'} by {self.cv['folds']}-fold cross-validation "
                f"over {self.cv['groups']} queries (held-out NLL {self.cv['nll_temperature']:.4f} with T alone, "
                f"{self.cv['nll_temperature_bias']:.4f} with biases)"
            )
        return (
            f"T={self.temperature:.3f}{biases} on {self.pairs} labelled pairs: "
            f"NLL {self.nll_before:.4f} -> {self.nll_after:.4f}, "
            f"ECE {self.ece_before:.4f} -> {self.ece_after:.4f}{chosen}"
        )


def _nll(probs: torch.Tensor, labels: torch.Tensor, temperature: float, bias: list[float] | None = None) -> float:
    p = apply_temperature(probs, temperature, bias)
    return float(-p.clamp_min(1e-12).log().gather(1, labels[:, None]).mean())


def _ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    from torchmetrics.functional.classification import multiclass_calibration_error

    return float(multiclass_calibration_error(probs, labels, num_classes=probs.shape[1], n_bins=n_bins, norm="l1"))


def nll_and_ece(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Negative log-likelihood and top-label ECE (15 bins) of ``labels`` [N] under ``probs`` [N, K]."""
    probs = torch.as_tensor(probs, dtype=torch.float64)
    labels = torch.as_tensor(labels, dtype=torch.long)
    _check("probs", probs, labels)
    return _nll(probs, labels, 1.0), _ece(probs.float(), labels)


def _check(name: str, scores: torch.Tensor, labels: torch.Tensor) -> None:
    """``scores`` ``[N, K]`` and ``labels`` ``[N]`` of at least one pair, each a level index below ``K``."""
    if scores.ndim != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(f"expected {name} [N, K] and labels [N], got {tuple(scores.shape)} and {tuple(labels.shape)}")
    if len(labels) == 0:
        raise ValueError("no labelled pairs to fit a temperature on")
    if int(labels.min()) < 0 or int(labels.max()) >= scores.shape[1]:
        raise ValueError(f"labels must be level indexes in [0, {scores.shape[1]}), got {labels.unique().tolist()}")


def fit_temperature(
    probs: torch.Tensor, labels: torch.Tensor, bounds: tuple[float, float] = (0.05, 20.0)
) -> TemperatureFit:
    """The temperature that minimises the negative log-likelihood of ``labels`` ``[N]`` under ``probs`` ``[N, K]``.

    The NLL of temperature scaling is unimodal in ``log T``: a golden-section search over ``bounds`` finds it
    to 1e-4 in ``log T`` (no gradient steps to tune)."""
    probs = torch.as_tensor(probs, dtype=torch.float64)
    labels = torch.as_tensor(labels, dtype=torch.long)
    _check("probs", probs, labels)
    lo, hi = (math.log(b) for b in bounds)
    ratio = (5**0.5 - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = _nll(probs, labels, math.exp(a)), _nll(probs, labels, math.exp(b))
    while hi - lo > 1e-4:
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = _nll(probs, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = _nll(probs, labels, math.exp(b))
    t = math.exp((lo + hi) / 2)
    after = apply_temperature(probs, t)
    return TemperatureFit(
        temperature=t,
        pairs=len(labels),
        nll_before=_nll(probs, labels, 1.0),
        nll_after=_nll(probs, labels, t),
        ece_before=_ece(probs.float(), labels),
        ece_after=_ece(after.float(), labels),
    )


def fit_temperature_bias(logits: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> tuple[float, torch.Tensor]:
    """Bias-corrected temperature scaling (Alexandari et al. 2020, "Maximum Likelihood with Bias-Corrected
    Calibration is Hard-To-Beat at Label Shift Adaptation", arXiv 1901.06852): the temperature ``T`` and one bias
    per level ``b`` [K] that minimise the negative log-likelihood of ``labels`` [N] under ``softmax(z / T + b)``.

    One temperature cannot move probability between levels; the biases can: they correct a shift between the level
    mix a model was trained towards and the labelled pairs' (e.g. a teacher-labelled pool of other items). The NLL is
    convex in ``(1 / T, b)``; L-BFGS on float64 finds it (``T`` between e^-7 and e^7). The biases are returned
    centred (their sum is 0: adding a constant to every level changes nothing)."""
    with torch.inference_mode(False), torch.enable_grad():  # also when called from a validation loop
        return _fit_temperature_bias(
            torch.as_tensor(logits, dtype=torch.float64).clone(),
            torch.as_tensor(labels, dtype=torch.long).clone(),
            steps,
        )


def _fit_temperature_bias(z: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    _check("logits", z, y)
    # 1 / T = exp(u) > 0: a model that ranks the labels backwards is not inverted (its fit tends to the biases
    # alone, the labels' level mix); the NLL is convex in (exp(u), b), so a minimum in (u, b) is the minimum
    log_inv_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_inv_t, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z * log_inv_t.clamp(-7.0, 7.0).exp() + bias, y)
        loss.backward()
        return loss

    opt.step(nll)
    inv = math.exp(float(log_inv_t.detach().clamp(-7.0, 7.0)))
    return 1.0 / inv, (bias.detach() - bias.detach().mean()).float()


def fit_temperature_and_bias(probs: torch.Tensor, labels: torch.Tensor) -> TemperatureFit:
    """:func:`fit_temperature_bias` on the log-probabilities of ``probs`` ``[N, K]`` (a teacher's level
    distributions): the temperature and level biases of ``softmax(log(p) / T + b)``, with the figures of
    :func:`fit_temperature`."""
    probs = torch.as_tensor(probs, dtype=torch.float64)
    labels = torch.as_tensor(labels, dtype=torch.long)
    _check("probs", probs, labels)
    t, bias = fit_temperature_bias(probs.clamp_min(1e-12).log(), labels)
    nll_before, ece_before = nll_and_ece(probs, labels)
    nll_after, ece_after = nll_and_ece(apply_temperature(probs, t, bias), labels)
    return TemperatureFit(t, len(labels), nll_before, nll_after, ece_before, ece_after, bias=bias.tolist())


def cross_validate_bias(probs: torch.Tensor, labels: torch.Tensor, groups: list[str], folds: int = 5) -> dict[str, Any]:
    """Whether level biases generalise beyond the pairs they are fitted on: ``folds``-fold cross-validation over
    ``groups`` (the pairs' queries: a query's pairs are held out together, as unseen queries would come) of the
    temperature alone (:func:`fit_temperature`) against the temperature with level biases
    (:func:`fit_temperature_and_bias`), each fitted on the other folds and scored by the NLL of the held-out pairs.

    The groups, sorted, are shuffled with a fixed seed and dealt round the folds. Returns the pooled held-out NLL of
    each (``nll_temperature``, ``nll_temperature_bias``), ``folds``, ``groups`` (how many) and ``bias``: True where
    the biases' held-out NLL is the lower. Four biases fitted on a few queries follow those queries' level mix; this
    is the check that they carry over to others."""
    probs = torch.as_tensor(probs, dtype=torch.float64)
    labels = torch.as_tensor(labels, dtype=torch.long)
    _check("probs", probs, labels)
    if len(groups) != len(labels):
        raise ValueError(f"groups has {len(groups)} entries, labels {len(labels)}")
    fold, n_groups = query_folds(groups, folds)
    nll = {"nll_temperature": 0.0, "nll_temperature_bias": 0.0}
    for k in range(folds):  # only the fits' parameters are needed here, not their figures
        fit_on, held = fold != k, fold == k
        t = fit_temperature(probs[fit_on], labels[fit_on]).temperature
        t_b, b = fit_temperature_bias(probs[fit_on].clamp_min(1e-12).log(), labels[fit_on])
        n = int(held.sum())
        nll["nll_temperature"] += n * _nll(probs[held], labels[held], t)
        nll["nll_temperature_bias"] += n * _nll(probs[held], labels[held], t_b, b)
    nll = {k: v / len(labels) for k, v in nll.items()}
    return {**nll, "folds": folds, "groups": n_groups, "bias": nll["nll_temperature_bias"] < nll["nll_temperature"]}


def query_folds(groups: list, folds: int) -> tuple[torch.Tensor, int]:
    """The fold ``[N]`` of each pair when its query (``groups``) and all its pairs are held out together: the
    groups, sorted, are shuffled with a fixed seed and dealt round ``folds``; and how many groups there are."""
    names = sorted(set(groups))
    if folds < 2 or len(names) < folds:
        raise ValueError(
            f"cross-validation over {folds} folds needs at least {max(folds, 2)} queries, got {len(names)}"
        )
    random.Random(0).shuffle(names)
    fold_of = {g: i % folds for i, g in enumerate(names)}
    return torch.tensor([fold_of[g] for g in groups]), len(names)


def cross_fitted_ece(
    logits: torch.Tensor, labels: torch.Tensor, groups: list, bias: bool = False, folds: int = 2, n_bins: int = 15
) -> float:
    """The top-label ECE (``n_bins`` bins) a model's level ``logits`` ``[N, K]`` have after calibration on pairs of
    other queries: the pairs are dealt into ``folds`` by query (:func:`query_folds`); each fold's pairs are calibrated
    by the temperature (with ``bias``: and the level biases, :func:`fit_temperature_bias`) fitted on the other folds,
    and the ECE is taken over every pair so calibrated. The validation split's own ECE after a fit on the same pairs
    flatters every model alike, and its raw ECE is not what a calibrated model is tested on; this one estimates the
    calibrated test ECE, to choose between settings on validation."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    _check("logits", z, y)
    if len(groups) != len(y):
        raise ValueError(f"groups has {len(groups)} entries, labels {len(y)}")
    fold, _ = query_folds(list(groups), folds)
    probs = torch.empty_like(z)
    for k in range(folds):
        fit_on, held = fold != k, fold == k
        if bias:
            t, b = fit_temperature_bias(z[fit_on], y[fit_on])
            probs[held] = torch.softmax(z[held] / t + b.to(z), dim=-1)
        else:
            t = fit_temperature(torch.softmax(z[fit_on], dim=-1), y[fit_on]).temperature
            probs[held] = torch.softmax(z[held] / t, dim=-1)
    return _ece(probs.float(), y, n_bins)

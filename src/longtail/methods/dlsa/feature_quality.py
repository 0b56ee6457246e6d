"""DLSA's feature evaluation (spec dlsa.md section 8), registered as the feature evaluation ``flow_filter``
(``longtail eval --feature-quality``): how well one flow filter separates a feature set's head from its tail."""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

import torch

from longtail.methods.dlsa.cascade import DLSACascade, cluster_purity
from longtail.methods.dlsa.config import DLSAConfig
from longtail.registry import FEATURE_EVALUATIONS


def evaluate_features(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int | None = None,
    thresholds: Any = None,
    cfg: DLSAConfig | None = None,
) -> dict:
    """Head-tail separability of a feature set (OUR interpretation of the paper's feature evaluation, spec
    section 8; the paper's protocol was not available): one flow filter (depth 1) on the training features,
    then

    1. cluster purity on train: clusters with purity > 0.9 / 0.7 / 0.5, size quartiles, empty clusters;
    2. the many / medium / few composition of the filtered 30 % (train and test) against the whole split;
    3. accuracy (top1, many / medium / few, MCC, NMI) of the CAC on its filtered test subset and of the
       regular classifier on the rest.

    Features that separate head from tail well give purer clusters and a filtered subset the CAC classifies
    accurately. Heads are kept at their last epoch (no test-based selection).
    """
    from sklearn.metrics import matthews_corrcoef, normalized_mutual_info_score

    from longtail.evaluation.metrics import ShotThresholds, classification_metrics

    thresholds = thresholds or ShotThresholds()
    train_labels, test_labels = train_labels.long(), test_labels.long()
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    counts = torch.bincount(train_labels.cpu(), minlength=num_classes)
    cfg = replace(cfg or DLSAConfig(), max_depth=1, head_select="last")
    # The flows' and heads' initial weights come from torch's global generator: seeded here by cfg.seed (and
    # the caller's generator left as it was), so that one feature set gives one report; in a training run the
    # engine's seed does this.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        casc = DLSACascade(train_feats.shape[1], num_classes, cfg, counts).to(train_feats.device)
    summary = casc.fit(train_feats, train_labels)
    casc.eval()
    s_tr, c_tr, _ = casc.score_stage(0, casc.prepare(train_feats))
    _, sizes, purity = cluster_purity(c_tr, train_labels.to(c_tr.device), cfg.clusters, num_classes)
    nonempty = sizes > 0
    q = torch.quantile(sizes[nonempty].double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    groups = thresholds.groups(counts)  # name -> (C,) bool

    def composition(labels: torch.Tensor) -> dict:
        lab = labels.cpu()
        return {g: round(100 * float(m[lab].double().mean()), 2) if len(lab) else None for g, m in groups.items()}

    routes, scores = casc.cascade(test_feats)
    routes, preds, tl = routes.cpu(), scores.argmax(1).cpu(), test_labels.cpu()
    taken_tr = (s_tr >= casc.thresholds[0]).cpu()

    def subset_metrics(mask: torch.Tensor) -> dict:
        if not mask.any():
            return {"num_samples": 0}
        m = classification_metrics(preds[mask], tl[mask], counts, thresholds)
        return {
            "num_samples": int(mask.sum()),
            **{k: m[k] for k in ("top1", "many", "medium", "few")},
            "mcc": round(100 * float(matthews_corrcoef(tl[mask], preds[mask])), 2),
            "nmi": round(100 * float(normalized_mutual_info_score(tl[mask], preds[mask])), 2),
        }

    return {
        "protocol": "our interpretation of DLSA's feature evaluation (spec dlsa.md section 8): one flow filter, "
        f"{cfg.clusters} clusters, filter_fraction {cfg.filter_fraction}",
        "clusters": {
            "purity_gt_0.9": int((purity[nonempty] > 0.9).sum()),
            "purity_gt_0.7": int((purity[nonempty] > 0.7).sum()),
            "purity_gt_0.5": int((purity[nonempty] > 0.5).sum()),
            "empty": int((~nonempty).sum()),
            "size_quartiles": [round(v, 1) for v in q],
        },
        "composition": {
            "train_all": composition(train_labels),
            "train_filtered": composition(train_labels[taken_tr]),
            "test_all": composition(tl),
            "test_filtered": composition(tl[routes == 0]),
        },
        "filtered": subset_metrics(routes == 0),
        "rest": subset_metrics(routes == 1),
        "all": subset_metrics(torch.ones_like(routes, dtype=torch.bool)),
        "flow_epoch": summary["stages"][0]["flow_epoch"],
        "flow_lr": summary["stages"][0]["flow_lr"],
        "dead_channels": summary["dead_channels"],
        "thresholds": thresholds.describe(),
        "options": asdict(cfg),  # as used: max_depth 1, heads at their last epoch
    }




@FEATURE_EVALUATIONS.register("flow_filter")
class FlowFilterEvaluation:
    """Head/tail separability of a run's features: one DLSA flow filter fitted on its training features."""

    Config = DLSAConfig  # the options of the filter (a dlsa run's own, when the run being measured is one)
    evaluate = staticmethod(evaluate_features)

"""The ``dlsa`` method: DLSA's cascade (``cascade.py``) fitted on the frozen stage-1 backbone's extracted features
(``fit_features``) and scored per route (``extra_metrics``)."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from longtail.dist import broadcast_from_main, object_from_main
from longtail.errors import ConfigError
from longtail.evaluation.metrics import ShotThresholds, classification_metrics
from longtail.methods.base import FeatureSet, FitControl, MethodContext, ParamGroup
from longtail.methods.decoupling import _FrozenBackbone
from longtail.methods.dlsa.cascade import DenseCascade, DLSACascade
from longtail.methods.dlsa.config import DLSAConfig
from longtail.models import Classifier
from longtail.models.heads import LinearHead
from longtail.registry import METHODS

log = logging.getLogger("longtail")


@METHODS.register("dlsa")
class DLSA(_FrozenBackbone):
    """DLSA: flow-filter cascade with cluster-aided Balanced-Softmax classifiers on frozen features (stage 2)."""

    requires_head = None  # any stage-1 head: DLSA uses only the backbone's features (head_init=stage1: linear)
    trains = False  # a stage of epochs 0: flows and heads train in fit_features, on extracted features
    metrics_on_features = True  # extra_metrics routes the split's features through the cascade
    Config = DLSAConfig

    def __init__(self, model: Classifier, cfg: DLSAConfig, ctx: MethodContext) -> None:
        super().__init__(model, cfg, ctx)
        # forward() stays the base one (the stage-1 model's CE) for the Method contract; the fit loop never
        # steps it (a dlsa stage has epochs 0 and no parameter groups), so the stage-1 head is left as it was.
        dev = next(model.backbone.parameters()).device
        self.cascade = DLSACascade(model.feature_dim, ctx.num_classes, cfg, ctx.train_counts).to(dev)

    def param_groups(self) -> list[ParamGroup]:
        return []  # trained in fit_features, on features

    def on_stage_start(self, ctx: MethodContext) -> None:
        # Checked before the engine extracts any feature.
        if ctx.epochs != 0:
            raise ConfigError(
                f"a dlsa stage trains on extracted features inside the stage: set its epochs to 0 "
                f"(got {ctx.epochs}); its own epochs are method.flow_epochs and method.head_epochs"
            )
        if ctx.stage is not None and ctx.stage.init_from is None:
            raise ConfigError(
                "a dlsa stage works on a trained stage-1 backbone: set its init_from (an earlier stage, "
                "or a stage-1 run folder / checkpoint)"
            )
        if self.cfg.head_init == "stage1" and not isinstance(self.model.head, LinearHead):
            raise ConfigError("head_init=stage1 needs a stage-1 linear head (model.head=linear)")

    def feature_splits(self, ctx: MethodContext) -> tuple[str, ...]:
        """train, and val when the heads are selected on it (head_select=auto) and the run has one."""
        if self.cfg.head_select == "auto" and ctx.dataset is not None and "val" in ctx.dataset.splits:
            return ("train", "val")
        return ("train",)

    def fit_features(self, feats: FeatureSet, ctx: MethodContext, fit: FitControl) -> None:
        x, labels = feats["train"]
        val = feats.get("val")
        stage1 = self.model.head.fc if self.cfg.head_init == "stage1" else None
        log.info(
            "DLSA: %d train features of dim %d%s",
            len(x),
            x.shape[1],
            f", {len(val[0])} val" if val is not None else ", no val split: heads keep their last epoch",
        )
        self.summary = self.cascade.fit(x, labels, val, stage1, control=fit)
        broadcast_from_main(self.cascade)  # DDP: every rank fitted on all features; keep rank 0's cascade
        self.cascade.report = self.summary = object_from_main(self.summary)  # ...and the report that describes it

    def report(self) -> dict:
        """The cascade's fit summary (saved with the weights): dead channels, per stage the chosen flow lr and
        epoch with every candidate's training purity, and the share of each class's training samples taken."""
        return self.cascade.report

    @property
    def route_names(self) -> list[str]:
        """The names of the routes ``routes`` returns (index = route id): CAC_1..CAC_D, then regular."""
        return [f"CAC_{d + 1}" for d in range(self.cfg.max_depth)] + ["regular"]

    @torch.no_grad()
    def routes(self, feats: torch.Tensor) -> torch.Tensor:
        """(B,) the stage that answers each sample: 0..D-1 a cluster-aided classifier, D the regular one."""
        return self.cascade.cascade(feats)[0]

    @torch.no_grad()
    def predict_features(self, feats: torch.Tensor) -> torch.Tensor:
        return self.cascade.cascade(feats)[1]

    @torch.no_grad()
    def extra_metrics(
        self,
        feats: torch.Tensor | None,
        preds: torch.Tensor,
        targets: torch.Tensor,
        train_counts: torch.Tensor,
        thresholds: ShotThresholds,
        batch_size: int,
    ) -> dict:
        """``routes``: per classifier of the cascade, the samples it answered and how well (``route_breakdown``),
        the routes computed on the chunks ``preds`` came from."""
        chunks = [feats[i : i + batch_size] for i in range(0, len(feats), batch_size)]
        routes = torch.cat([self.routes(f) for f in chunks]).cpu()
        return {"routes": route_breakdown(routes, preds, targets, self.route_names, train_counts, thresholds)}

    def inference_module(self) -> nn.Module:
        return DenseCascade(self.model, self.cascade)


def route_breakdown(
    routes: torch.Tensor,
    preds: torch.Tensor,
    targets: torch.Tensor,
    names: list[str],
    train_counts: torch.Tensor | None = None,
    thresholds: ShotThresholds | None = None,
) -> list[dict]:
    """Per route: its name, how many samples it answered, and on them top1, many / medium / few (with
    ``train_counts``), Matthews correlation and normalised mutual information (percent; None when empty);
    and ``class_fraction`` (C,): the share of each class's samples of this split that the route answered
    (None for a class absent from the split), e.g. how much of each class a DLSA filter stage took."""
    from sklearn.metrics import matthews_corrcoef, normalized_mutual_info_score

    n = max(len(names), int(routes.max()) + 1 if len(routes) else 0)
    num_classes = len(train_counts) if train_counts is not None else int(targets.max()) + 1 if len(targets) else 0
    per_class = torch.bincount(targets, minlength=num_classes).tolist()  # (C,) samples of each class in the split
    rows = []
    for r in range(n):
        m = routes == r
        k = int(m.sum())
        row = {"route": names[r] if r < len(names) else str(r), "num_samples": k, "top1": None}
        if k:
            p, t = preds[m], targets[m]
            row["top1"] = round(100 * float((p == t).double().mean()), 2)
            if train_counts is not None:
                cm = classification_metrics(p, t, train_counts, thresholds or ShotThresholds())
                row.update({g: cm[g] for g in ("many", "medium", "few")})
            row["mcc"] = round(100 * float(matthews_corrcoef(t.numpy(), p.numpy())), 2)
            row["nmi"] = round(100 * float(normalized_mutual_info_score(t.numpy(), p.numpy())), 2)
        got = torch.bincount(targets[m], minlength=num_classes).tolist()
        row["class_fraction"] = [round(g / c, 4) if c else None for g, c in zip(got, per_class, strict=True)]
        rows.append(row)
    return rows

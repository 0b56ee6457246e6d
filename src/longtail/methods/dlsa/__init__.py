"""DLSA: Dynamic Label Space Adjustment (Xu, Li, Li, Lu, ECCV 2022; spec dlsa.md), a stage-2 method on the
frozen features of any stage-1 model.

A cascade of flow filters: stage d trains a normalising flow (masked autoregressive blocks with batch norm,
``zuko``) onto a Gaussian mixture with fixed random means, takes out the ~30 % of the remaining training
samples it models best (threshold = a training-set percentile of the likelihood, reused at test), and gives
them to a cluster-aided classifier (CAC_d). What is left after the last stage goes to a Balanced-Softmax
linear classifier. ``predict`` routes every sample to exactly one classifier (spec section 7).

Why the training is not the fit loop's: DLSA never touches images. It trains several flows and heads one after
the other on pre-extracted feature tensors, each with its own optimiser, epoch count and pair sampler; driving
that through the image loop would re-run the frozen backbone at every step. So a ``dlsa`` stage has ``epochs: 0``
(like ``ncm``): the engine extracts the features once and the method fits on them (``Method.fit_features``,
``longtail.engine.feature_stage``: a log line per flow and head epoch, Ctrl-C honoured between them); its own
epoch counts are method options (``flow_epochs``, ``head_epochs``).

Deviations from the reference code (spec section 11): heads are selected on a validation split when the
dataset has one, else at the last epoch (never on test, X1); ``z_source`` is configurable (X2); head
initialisation from stage 1 is strict and checked (X5, section 10); unknown options are errors (X7).

Extensions for features unlike the reference's 2048-d ResNet-50 ones (off by default; on in the CIFAR
recipes), all decided inside ``fit`` on training data only: ``flow_lr`` may be a list of candidates, chosen
per stage by the training cluster purity that also picks the flow's epoch; ``center_std: auto`` scales the
mixture means to the flow's dimension (``resolve_center_std``); ``dead_channel_tol`` leaves feature channels
without training variance out of the flows. What ``fit`` chose is the method's ``report()`` (metrics.json's
``method_report``), saved with the weights.

The package, in import order: ``flows`` (the flow filter, the optional zuko), ``config`` (``DLSAConfig``),
``cascade`` (``DLSACascade`` and its heads on feature tensors, ``DenseCascade`` for export), ``method`` (the
registered ``dlsa`` Method), ``feature_quality`` (the registered feature evaluation ``flow_filter``). The names
below were those of the single module ``longtail.methods.dlsa`` and stay importable from here.
"""

from longtail.methods.dlsa.cascade import (
    ClusterAidedHead,
    DenseCascade,
    DLSACascade,
    RegularHead,
    cluster_purity,
)
from longtail.methods.dlsa.config import REFERENCE_CENTER_STD, REFERENCE_DIM, DLSAConfig, resolve_center_std
from longtail.methods.dlsa.feature_quality import FlowFilterEvaluation, evaluate_features
from longtail.methods.dlsa.flows import BatchNormFlow, FlowGMM
from longtail.methods.dlsa.method import DLSA, route_breakdown

__all__ = [
    "DLSA",
    "DLSAConfig",
    "DLSACascade",
    "FlowGMM",
    "BatchNormFlow",
    "evaluate_features",
    "resolve_center_std",
    "ClusterAidedHead",
    "RegularHead",
    "DenseCascade",
    "cluster_purity",
    "FlowFilterEvaluation",
    "REFERENCE_CENTER_STD",
    "REFERENCE_DIM",
    "route_breakdown",
]

"""DLSA's cascade on feature tensors: flow filters, thresholds, cluster priors and the classifiers they route to
(``DLSACascade``: training and prediction), and ``DenseCascade``, the same prediction without data-dependent shapes
for export."""

from __future__ import annotations

import copy
import logging
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.dist import broadcast_from_main
from longtail.errors import ConfigError, DataError, TrainingError
from longtail.methods.dlsa.config import DLSAConfig, resolve_center_std
from longtail.methods.dlsa.flows import FlowGMM
from longtail.models import Classifier

if TYPE_CHECKING:
    from longtail.methods.base import FitControl

log = logging.getLogger("longtail")


# ----------------------------------------------------------------------------- the classifiers

class ClusterAidedHead(nn.Module):
    """CAC, input type "XZP": logits = Linear_x(x) + Linear_zp([z; P(x)]) with P(x) the cluster's class histogram."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.lin_x = nn.Linear(dim, num_classes)
        self.lin_zp = nn.Linear(dim + num_classes, num_classes)

    def forward(self, x: torch.Tensor, z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return self.lin_x(x) + self.lin_zp(torch.cat([z, p], 1))  # (B, C)


class RegularHead(nn.Module):
    """The last stage's classifier, input type "XZ": logits = Linear_x(x) + Linear_z(z)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.lin_x = nn.Linear(dim, num_classes)
        self.lin_z = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor, z: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
        return self.lin_x(x) + self.lin_z(z)  # (B, C)


# ----------------------------------------------------------------------------- the cascade (pure tensors)


def _class_weights(labels: torch.Tensor, num_classes: int, q: float) -> torch.Tensor:
    """(C,) w_c = (n_max / n_c)^q / sum_c' (n_max / n_c')^q over the classes present; 0 for absent ones."""
    n = torch.bincount(labels, minlength=num_classes).double()
    w = torch.zeros(num_classes, dtype=torch.float64)
    present = n > 0
    w[present] = (n.max() / n[present]) ** q
    return (w / w.sum()).float()


def cluster_purity(
    clusters: torch.Tensor, labels: torch.Tensor, k: int, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K, C) joint counts, (K,) sizes and (K,) purity (majority-class share; 0 for empty clusters)."""
    joint = torch.zeros(k, num_classes, dtype=torch.long, device=labels.device)
    joint.index_put_((clusters, labels), torch.ones_like(labels), accumulate=True)
    sizes = joint.sum(1)
    purity = joint.max(1).values.double() / sizes.clamp_min(1)
    return joint, sizes, purity


class _FlowDiverged(TrainingError):
    """A flow's loss or training scores became non-finite at ``epoch`` (1-based); ``history``: its epochs so far."""

    def __init__(self, message: str, epoch: int, history: dict) -> None:
        super().__init__(message)
        self.epoch, self.history = epoch, history


def _before_load(module: DLSACascade, state_dict: dict, prefix: str, *_: Any) -> None:
    """Load-state-dict pre-hook: the flows' input dimension (the live channels) is only known after ``fit``,
    so rebuild them to the saved ``live_channels`` before their weights load. Checkpoints written before
    dead-channel dropping existed load as "every channel live, empty report"."""
    key = prefix + "live_channels"
    if key not in state_dict:
        state_dict[key] = torch.ones(module.dim, dtype=torch.bool)
    state_dict.setdefault(prefix + "_extra_state", {"report": {}})
    live = state_dict[key]
    if live.shape == module.live_channels.shape:
        module._resize_flows(int(live.sum()))


def _selection_key(mode: str, pure_clusters: int, purity: float) -> tuple:
    """What ``flow_select`` ranks flow epochs by (larger is better; a tie keeps the earlier epoch): the pure-cluster
    count R, the overall purity, or nothing (``last``: every later epoch replaces the kept one)."""
    return {"pure_clusters": (pure_clusters,), "purity": (purity,), "last": ()}[mode]


def _r(v: float, digits: int = 4) -> float:
    """A float rounded to ``digits`` significant digits, for metrics.json."""
    return float(f"{v:.{digits}g}")


class DLSACascade(nn.Module):
    """Flows, thresholds, cluster priors and classifiers of a DLSA cascade; trains and predicts on feature tensors.

    State (all saved by ``state_dict``): ``live_channels`` (dim,) bool, the feature channels the flows see
    (``dead_channel_tol``); ``flows.d`` on those channels, ``thresholds`` (D,), ``cluster_priors`` (D, K, C),
    ``cacs.d``, ``regular``, ``stage_train_counts`` (D+1,), the training samples each stage took; and, as
    extra state, ``report``: what ``fit`` chose and measured (``fit``'s summary), for metrics.json.
    """

    def __init__(self, dim: int, num_classes: int, cfg: DLSAConfig, train_counts: torch.Tensor) -> None:
        super().__init__()
        self.cfg, self.dim, self.num_classes = cfg, dim, num_classes
        depth, k = cfg.max_depth, cfg.clusters
        self.flows = self._make_flows(dim)
        self.cacs = nn.ModuleList(ClusterAidedHead(dim, num_classes) for _ in range(depth))
        self.regular = RegularHead(dim, num_classes)
        self.register_buffer("live_channels", torch.ones(dim, dtype=torch.bool))  # (dim,) flow input channels
        self.register_buffer("thresholds", torch.full((depth,), float("inf")))  # tau_d (train percentile)
        self.register_buffer("cluster_priors", torch.zeros(depth, k, num_classes))  # pi_d[k] (C,)
        self.register_buffer("stage_train_counts", torch.zeros(depth + 1, dtype=torch.long))
        self.register_buffer("train_counts", train_counts.clone().float(), persistent=False)  # (C,) full counts
        self.report: dict = {}  # fit's summary (JSON-able); saved as extra state
        self.register_load_state_dict_pre_hook(_before_load)

    def _make_flows(self, n: int) -> nn.ModuleList:
        cfg = self.cfg
        return nn.ModuleList(
            FlowGMM(
                n,
                cfg.clusters,
                cfg.flow_blocks,
                cfg.flow_hidden or n,
                cfg.flow_hidden_layers,
                resolve_center_std(cfg.center_std, n),
                cfg.flow_batch_norm,
                seed=cfg.seed * 1000 + d,
            )
            for d in range(cfg.max_depth)
        )

    def _resize_flows(self, n: int) -> None:
        """Rebuild the (untrained) flows on ``n`` input channels, on the cascade's device, if they differ."""
        if len(self.flows) and self.flows[0].dim != n:
            self.flows = self._make_flows(n).to(self.thresholds.device)

    def get_extra_state(self) -> dict:
        return {"report": self.report}

    def set_extra_state(self, state: dict) -> None:
        self.report = dict(state.get("report", {}))

    # ------------------------------------------------------------------ inference

    def prepare(self, feats: torch.Tensor) -> torch.Tensor:
        x = feats.float()
        return F.normalize(x, dim=1) if self.cfg.normalize_features else x

    def flow_input(self, x: torch.Tensor) -> torch.Tensor:
        """(N, dim) prepared features -> (N, D_flow) the live channels the flows model (all, by default)."""
        return x if bool(self.live_channels.all()) else x[:, self.live_channels]

    def score_stage(
        self, d: int, x: torch.Tensor, batch_size: int = 4096
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flow d on (N, dim) prepared features: (N,) log p(x), (N,) hard cluster and (N, dim) latent, the latent
        zero on the channels the flows leave out (so z_source=flow_latent heads keep their (dim + C) inputs)."""
        s, c, u = self.flows[d].score(self.flow_input(x), batch_size)
        if u.shape[1] != self.dim:
            full = u.new_zeros(len(u), self.dim)
            full[:, self.live_channels] = u
            u = full
        return s, c, u

    @torch.no_grad()
    def cascade(self, feats: torch.Tensor, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) raw features -> (N,) stage index (0..D-1 a CAC, D the regular head) and (N, C) scores.

        Each sample is answered by the first stage whose likelihood reaches its threshold; the rest by the
        regular head. The flows always score in eval mode (batch norm with its running statistics), so a
        sample's route never depends on the rest of its batch.
        """
        modes = [f.training for f in self.flows]
        self.flows.eval()
        try:
            return self._cascade(feats, batch_size)
        finally:
            for f, m in zip(self.flows, modes, strict=True):
                f.train(m)

    def _cascade(self, feats: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.prepare(feats)
        depth = len(self.flows)
        routes = torch.full((len(x),), depth, dtype=torch.long, device=x.device)
        scores = torch.zeros(len(x), self.num_classes, device=x.device)
        remaining = torch.arange(len(x), device=x.device)
        z_last = x
        for d in range(depth):
            if len(remaining) == 0:
                break
            xr = x[remaining]
            s, c, u = self.score_stage(d, xr, batch_size)
            take = s >= self.thresholds[d]
            z = u if self.cfg.z_source == "flow_latent" else xr
            if take.any():
                idx = remaining[take]
                routes[idx] = d
                scores[idx] = self.cacs[d](xr[take], z[take], self.cluster_priors[d][c[take]])
            remaining, z_last = remaining[~take], z[~take]
        if len(remaining):
            xr = x[remaining]
            scores[remaining] = self.regular(xr, z_last if self.cfg.z_source == "flow_latent" else xr)
        return routes, scores

    # ------------------------------------------------------------------ training

    def _select_channels(self, x: torch.Tensor) -> dict:
        """Set ``live_channels`` from the (N, dim) prepared training features and size the flows to them.

        ResNet-32 features are ReLU outputs averaged over space, and some channels are zero for every training
        image. A density on data with a zero-variance direction is degenerate: the likelihood grows without
        bound as the flow contracts that direction (each batch norm there divides by sqrt(eps) and adds
        -0.5 log(eps) ~ +5.8 nats, each MADE may add its largest log-scale), so those directions, not the
        structure of the live channels, dominate the likelihood; and a channel that is non-zero on a handful
        of images makes those images extreme outliers (on 3-epoch CIFAR features with 74 constant channels the
        kept flow's threshold was a log-likelihood of -8e5). With ``dead_channel_tol`` > 0, channels whose
        training variance is <= tol x the mean channel variance are left out of the flows (train and predict
        alike: ``flow_input``); the heads still see every channel (a constant one costs a linear head nothing).
        """
        cfg = self.cfg
        var = x.var(0, unbiased=False)  # (dim,)
        broadcast_from_main(var)  # DDP: every rank keeps rank 0's channels, so the flows' shapes agree
        zero = int((var <= 0).sum())
        if cfg.dead_channel_tol > 0:
            live = var > cfg.dead_channel_tol * var.mean()
        else:
            live = torch.ones_like(var, dtype=torch.bool)
        n_live = int(live.sum())
        if cfg.max_depth and n_live < 2:
            raise DataError(
                f"DLSA: only {n_live} of {self.dim} feature channels vary over the training set "
                f"(dead_channel_tol {cfg.dead_channel_tol}); a flow needs at least 2"
            )
        self.live_channels.copy_(live)
        self._resize_flows(n_live)
        dead = torch.nonzero(~live).squeeze(1).tolist()
        if dead:
            log.info(
                "DLSA: %d of %d feature channels left out of the flows (training variance <= %g x the mean "
                "channel variance %.3g; %d exactly constant): the flows model %d channels",
                len(dead),
                self.dim,
                cfg.dead_channel_tol,
                float(var.mean()),
                zero,
                n_live,
            )
        elif zero:
            log.warning(
                "DLSA: %d of %d feature channels are constant over the training set; the flows' batch norm "
                "sees zero variance there (set method.dead_channel_tol, e.g. 1e-3, to leave them out)",
                zero,
                self.dim,
            )
        return {
            "feature_dim": self.dim,
            "flow_dim": n_live,
            "dead_channels": len(dead),
            "dead_channel_ids": dead,
            "constant_channels": zero,
            "center_std": _r(resolve_center_std(cfg.center_std, n_live), 6) if cfg.max_depth else None,
        }

    def fit(
        self,
        feats: torch.Tensor,
        labels: torch.Tensor,
        val: tuple[torch.Tensor, torch.Tensor] | None = None,
        stage1_head: nn.Linear | None = None,
        control: FitControl | None = None,
    ) -> dict:
        """Train the whole cascade on (N, D) training features and (N,) labels; returns (and keeps as
        ``report``) a summary: the channels the flows model, and per stage the chosen flow lr and epoch with
        every candidate's purity, the threshold, the head's epoch and the share of each class's training
        samples the stage took (``train_class_fraction``, (C,), None for a class without training samples).

        ``val`` (features, labels) selects each head's epoch on the val samples routed to it; never test.
        ``stage1_head``: the stage-1 linear layer to initialise every head's Linear_x from (head_init=stage1).
        ``control``: told the end of every flow and head epoch (a log line; where a run stops: ``FitControl``).
        """
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        x, y = self.prepare(feats), labels.long().to(feats.device)
        xv = self.prepare(val[0]) if val is not None else None
        yv = val[1].long().to(feats.device) if val is not None else None
        if stage1_head is not None:
            self._init_from_stage1(stage1_head, feats, y)
        summary: dict[str, Any] = {**self._select_channels(x), "stages": []}
        n_class = torch.bincount(y, minlength=self.num_classes).tolist()

        def class_fraction(mask: torch.Tensor) -> list[float | None]:
            got = torch.bincount(y[mask], minlength=self.num_classes).tolist()
            return [round(g / n, 4) if n else None for g, n in zip(got, n_class, strict=True)]

        active = torch.ones(len(x), dtype=torch.bool, device=x.device)
        v_active = torch.ones(len(xv), dtype=torch.bool, device=x.device) if xv is not None else None
        z_all = x  # the latent of the last flow, for the regular head with z_source=flow_latent
        zv_all = xv
        for d, flow in enumerate(self.flows):
            n_act = int(active.sum())
            if n_act < 2:
                raise DataError(f"DLSA stage {d + 1}: only {n_act} training samples left; lower max_depth")
            flow_info = self._fit_flow(d, x[active], y[active], gen, control)
            flow.eval()
            s, c, u = self.score_stage(d, x)
            tau = torch.sort(s[active]).values[int(n_act * (1 - cfg.filter_fraction))]
            self.thresholds[d] = tau
            take = active & (s >= tau)
            # the cluster prior counts ALL training samples, not only the active ones (reference)
            joint, sizes, _ = cluster_purity(c, y, cfg.clusters, self.num_classes)
            self.cluster_priors[d] = joint.float() / sizes.clamp_min(1)[:, None]  # empty cluster: zero vector
            z = u if cfg.z_source == "flow_latent" else x
            counts = (
                torch.bincount(y[take], minlength=self.num_classes).float()
                if cfg.cac_prior == "subset"
                else self.train_counts.to(x.device)
            )
            val_sub = None
            if xv is not None:
                sv, cv, uv = self.score_stage(d, xv)
                v_take = v_active & (sv >= tau)
                zv = uv if cfg.z_source == "flow_latent" else xv
                val_sub = (xv[v_take], zv[v_take], self.cluster_priors[d][cv[v_take]], yv[v_take])
                v_active = v_active & ~v_take
                zv_all = zv
            head_info = self._train_head(
                self.cacs[d], (x[take], z[take], self.cluster_priors[d][c[take]]), y[take], counts, val_sub, gen,
                control, f"CAC_{d + 1} head",
            )
            self.stage_train_counts[d] = int(take.sum())
            grid = flow_info.pop("flow_lr_grid")
            summary["stages"].append(
                {
                    "stage": d + 1,
                    "train_samples": int(take.sum()),
                    "threshold": float(tau),
                    **flow_info,
                    **head_info,
                    "train_class_fraction": class_fraction(take),
                    "flow_lr_grid": grid,
                }
            )
            log.info(
                "DLSA stage %d: flow lr %g epoch %s (%d pure clusters, purity %.3f), threshold %.3f, %d of %d train "
                "samples to CAC_%d%s",
                d + 1,
                flow_info["flow_lr"],
                flow_info["flow_epoch"],
                flow_info["pure_clusters"],
                flow_info["purity"],
                float(tau),
                int(take.sum()),
                n_act,
                d + 1,
                _val_text(head_info),
            )
            active = active & ~take
            z_all = z
        rest = active
        self.stage_train_counts[len(self.flows)] = int(rest.sum())
        counts = (
            torch.bincount(y[rest], minlength=self.num_classes).float()
            if cfg.regular_prior == "subset"
            else self.train_counts.to(x.device)
        )
        val_sub = None
        if xv is not None:
            val_sub = (xv[v_active], (zv_all if cfg.z_source == "flow_latent" else xv)[v_active], None, yv[v_active])
        zr = z_all if cfg.z_source == "flow_latent" else x
        head_info = self._train_head(
            self.regular, (x[rest], zr[rest], None), y[rest], counts, val_sub, gen, control, "regular head"
        )
        summary["stages"].append(
            {
                "stage": "regular",
                "train_samples": int(rest.sum()),
                **head_info,
                "train_class_fraction": class_fraction(rest),
            }
        )
        log.info("DLSA regular head: %d train samples%s", int(rest.sum()), _val_text(head_info))
        self.report = summary
        return summary

    def _init_from_stage1(self, head: nn.Linear, feats: torch.Tensor, labels: torch.Tensor) -> None:
        """Copy the stage-1 linear layer into every Linear_x, then check it reproduces the stage-1 predictions
        on the (prepared) training features: a mismatch (normalisation, label order) aborts (spec section 10)."""
        if head.weight.shape != (self.num_classes, self.dim) or head.bias is None:
            raise ConfigError(
                f"head_init=stage1 needs a stage-1 linear head with bias of shape "
                f"({self.num_classes}, {self.dim}); got {tuple(head.weight.shape)}, "
                f"bias {'present' if head.bias is not None else 'absent'} (model.head.bias=true)"
            )
        with torch.no_grad():
            for h in [*self.cacs, self.regular]:
                h.lin_x.weight.copy_(head.weight)
                h.lin_x.bias.copy_(head.bias)
            ref = (head(feats.float()).argmax(1) == labels).float().mean().item()
            ours = (self.regular.lin_x(self.prepare(feats)).argmax(1) == labels).float().mean().item()
        if abs(ref - ours) > 0.01:
            raise ConfigError(
                f"head_init=stage1: the copied head gives {100 * ours:.2f}% train accuracy on the "
                f"prepared features, the stage-1 model {100 * ref:.2f}%: check normalize_features"
            )

    def _fit_flow(
        self, d: int, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, control: FitControl | None = None
    ) -> dict:
        """Train flow d on the (N, dim) active training features once per ``flow_lr`` candidate and keep one.

        Every candidate starts from the same initial weights and draws the same pair stream (a copy of
        ``gen``), so they differ only in the learning rate. Kept: the candidate whose selected epoch ranks first
        by ``flow_select`` (default, section 4.3: the most pure clusters), ties broken by the pure clusters, then
        the higher overall purity (share of samples in their cluster's majority class), then the earlier
        candidate; an lr whose epochs never had their largest cluster below ``max_cluster_size`` ranks below
        every lr whose epochs did. A candidate whose loss or scores turn non-finite is skipped with a warning; if
        every one does, FloatingPointError. Training data only: the default criterion is the one the reference uses
        to pick the flow's epoch.
        """
        lrs = self.cfg.flow_lrs
        flow = self.flows[d]
        xf = self.flow_input(x)
        many = len(lrs) > 1
        init = copy.deepcopy(flow.state_dict()) if many else None
        start = gen.get_state()
        rows: list[dict] = []
        best: tuple | None = None  # (key, row index, flow state, generator state)
        for lr in lrs:
            if init is not None:
                flow.load_state_dict(init)
            g = torch.Generator()
            g.set_state(start)
            try:
                info = self._train_flow(flow, xf, y, g, lr, control, f"flow {d + 1} lr {lr:g}")
            except _FlowDiverged as e:
                if not many:
                    raise
                rows.append({"lr": lr, "diverged": True, "diverged_epoch": e.epoch, "epochs": e.history})
                log.warning(
                    "DLSA stage %d: flow lr %g diverged at epoch %d (%s); candidate skipped", d + 1, lr, e.epoch, e
                )
                continue
            rows.append({"lr": lr, "diverged": False, **info})
            pure, purity = info["pure_clusters"], info["purity"]
            key = (info["qualified"], *_selection_key(self.cfg.flow_select, pure, purity), pure, purity)
            if best is None or key > best[0]:
                best = (key, len(rows) - 1, copy.deepcopy(flow.state_dict()) if many else None, g.get_state())
            ep = info["epochs"]
            log.info(
                "DLSA stage %d: flow lr %g: epoch %d of %d kept, %d pure clusters, purity %.3f; train "
                "log-likelihood (median) %.4g -> %.4g, loss %.4g -> %.4g",
                d + 1,
                lr,
                info["flow_epoch"],
                len(ep["loss"]),
                info["pure_clusters"],
                info["purity"],
                ep["train_llh"][0],
                ep["train_llh"][-1],
                ep["loss"][0],
                ep["loss"][-1],
            )
        if best is None:
            raise TrainingError(
                f"DLSA stage {d + 1}: every flow_lr candidate diverged ([{', '.join(f'{v:g}' for v in lrs)}]): "
                f"lower them or set method.flow_grad_clip"
            )
        _, i, state, g_state = best
        if state is not None:
            flow.load_state_dict(state)
        gen.set_state(g_state)  # the heads draw on from the kept candidate's stream (one lr: as without a grid)
        chosen = rows[i]
        if many:
            log.info(
                "DLSA stage %d: flow lr %g chosen on training purity (%s)",
                d + 1,
                chosen["lr"],
                ", ".join(
                    f"{r['lr']:g}: diverged"
                    if r["diverged"]
                    else f"{r['lr']:g}: {r['pure_clusters']} pure, {r['purity']:.3f}"
                    for r in rows
                ),
            )
        return {
            "flow_lr": chosen["lr"],
            "flow_epoch": chosen["flow_epoch"],
            "pure_clusters": chosen["pure_clusters"],
            "purity": chosen["purity"],
            "flow_lr_grid": rows,
        }

    def _train_flow(
        self,
        flow: FlowGMM,
        x: torch.Tensor,
        y: torch.Tensor,
        gen: torch.Generator,
        lr: float,
        control: FitControl | None = None,
        what: str = "flow",
    ) -> dict:
        """Three losses over class-balanced pairs (spec section 4) on (N, D_flow) flow inputs; keeps the epoch
        ``flow_select`` picks (default: the most pure clusters). Returns that epoch, its pure-cluster count and
        overall purity, whether any epoch met max_cluster_size (``qualified``), and per epoch the mean loss, the
        median training log-likelihood (eval mode), the pure-cluster count and the overall purity. Raises
        _FlowDiverged on a non-finite loss or training score."""
        cfg, k = self.cfg, self.cfg.clusters
        dev = x.device
        w = _class_weights(y, self.num_classes, cfg.weight_q).to(dev)
        order = torch.argsort(y, stable=True)
        counts = torch.bincount(y, minlength=self.num_classes)
        starts = torch.cumsum(counts, 0) - counts
        present = torch.nonzero(counts > 0).squeeze(1)
        n_present = len(present)
        opt = torch.optim.SGD(flow.parameters(), lr=lr, momentum=0.0)
        ema = torch.zeros(k, device=dev)
        t = 0
        best: dict[str, Any] = {"pure_clusters": -1, "flow_epoch": None, "purity": 0.0, "purity_raw": 0.0,
                                "state": None}
        steps = max(1, len(x) // cfg.flow_batch_size)
        bs = min(cfg.flow_batch_size, len(x))
        hist: dict[str, list] = {"loss": [], "train_llh": [], "pure_clusters": [], "purity": []}

        def draw(cls: torch.Tensor) -> torch.Tensor:
            off = (torch.rand(len(cls), generator=gen) * counts[cls].cpu()).long().to(dev)
            return x[order[starts[cls] + off]]

        for epoch in range(cfg.flow_epochs):
            flow.train()
            loss_sum = 0.0
            for _ in range(steps):
                ai = torch.randint(n_present, (bs,), generator=gen)
                a = present[ai.to(dev)]
                if n_present > 1:  # a different class, uniformly: shift by 1..P-1
                    b = present[((ai + torch.randint(1, n_present, (bs,), generator=gen)) % n_present).to(dev)]
                else:
                    b = a
                xp, xn = draw(a), draw(b)
                lp, _ = flow.component_log_probs(torch.cat([xp, xn]))  # one pass: batch norm sees both
                lp_p, lp_n = lp[:bs], lp[bs:]
                logp = lp_p.logsumexp(1) - math.log(k)  # (B,) log p(x+)
                loss_lh = -cfg.lambda_lh * (w[a] * logp).mean()
                q_p = lp_p.softmax(1)  # (B, K)
                loss_pur = (
                    cfg.lambda_pur * (q_p.detach() * lp_n.log_softmax(1)).sum(1).mean()
                    if n_present > 1
                    else lp.new_zeros(())
                )
                t += 1
                ema = cfg.posterior_momentum * ema.detach() + (1 - cfg.posterior_momentum) * (q_p.mean(0) + 1e-7)
                p_hat = ema / (1 - cfg.posterior_momentum**t)
                loss_bal = cfg.lambda_bal * ((p_hat * p_hat.log()).sum() + math.log(k))
                loss = loss_lh + loss_pur + loss_bal
                if not torch.isfinite(loss):
                    raise _FlowDiverged(
                        f"DLSA flow loss is {loss.item()} at epoch {epoch + 1}: lower "
                        f"method.flow_lr ({lr:g}) or set method.flow_grad_clip",
                        epoch + 1,
                        hist,
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.flow_grad_clip > 0:
                    nn.utils.clip_grad_norm_(flow.parameters(), cfg.flow_grad_clip)
                opt.step()
                loss_sum += loss.item()
            flow.eval()
            s, c, _ = flow.score(x)
            if not torch.isfinite(s).all():
                raise _FlowDiverged(
                    f"DLSA flow gives non-finite training log-likelihoods after epoch {epoch + 1}: lower "
                    f"method.flow_lr ({lr:g}) or set method.flow_grad_clip",
                    epoch + 1,
                    hist,
                )
            joint, sizes, purity = cluster_purity(c, y, k, self.num_classes)
            pure = int(((purity > cfg.min_purity) & (sizes > cfg.min_size)).sum())
            overall = float(joint.max(1).values.sum()) / len(y)  # share of samples in their cluster's majority
            hist["loss"].append(_r(loss_sum / steps))
            hist["train_llh"].append(_r(float(s.median())))  # median: a few outliers can dominate the mean
            hist["pure_clusters"].append(pure)
            hist["purity"].append(round(overall, 4))
            better = best["state"] is None or cfg.flow_select == "last" or (
                _selection_key(cfg.flow_select, pure, overall) > _selection_key(cfg.flow_select, best["pure_clusters"],
                                                                                best["purity_raw"]))
            if int(sizes.max()) < cfg.max_cluster_size and better:
                best = {
                    "pure_clusters": pure,
                    "flow_epoch": epoch + 1,
                    "purity": round(overall, 4),
                    "purity_raw": overall,
                    "state": copy.deepcopy(flow.state_dict()),
                }
            if control is not None:
                control.epoch(what, epoch + 1, cfg.flow_epochs, loss=hist["loss"][-1],
                              train_llh=hist["train_llh"][-1], pure_clusters=pure, purity=round(overall, 4))
        qualified = best["state"] is not None
        if not qualified:
            log.warning(
                "DLSA: no flow epoch had its largest cluster below max_cluster_size=%d; keeping the last epoch",
                cfg.max_cluster_size,
            )
            best = {"pure_clusters": pure, "flow_epoch": cfg.flow_epochs, "purity": round(overall, 4)}
        else:
            flow.load_state_dict(best["state"])
        return {
            "flow_epoch": best["flow_epoch"],
            "pure_clusters": best["pure_clusters"],
            "purity": best["purity"],
            "qualified": qualified,
            "epochs": hist,
        }

    def _train_head(
        self,
        head: nn.Module,
        inputs: tuple,
        y: torch.Tensor,
        counts: torch.Tensor,
        val: tuple | None,
        gen: torch.Generator,
        control: FitControl | None = None,
        what: str = "head",
    ) -> dict:
        """Balanced Softmax CE(logits + log(n_c + 1e-6), y), SGD momentum 0, constant lr; the epoch is chosen on
        the val samples routed to this head (head_select=auto with a val split) or is the last one."""
        cfg = self.cfg
        n = len(y)
        if n == 0:
            return {"head_epoch": None}
        log_prior = torch.log(counts.float().to(y.device) + 1e-6)
        opt = torch.optim.SGD(head.parameters(), lr=cfg.head_lr, momentum=0.0)
        use_val = cfg.head_select == "auto" and val is not None and len(val[-1]) > 0
        best: dict[str, Any] = {"head_epoch": cfg.head_epochs, "val_top1": None}
        best_state = None

        def val_acc() -> float:
            with torch.no_grad():
                return (head(*val[:3]).argmax(1) == val[3]).float().mean().item() * 100

        for epoch in range(cfg.head_epochs):
            perm = torch.randperm(n, generator=gen).to(y.device)
            loss_sum = torch.zeros((), device=y.device)  # the epoch's summed batch losses, read once (logging)
            for i in range(0, n, cfg.head_batch_size):
                idx = perm[i : i + cfg.head_batch_size]
                logits = head(*(t[idx] if t is not None else None for t in inputs))
                loss = F.cross_entropy(logits + log_prior, y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach()
            last = epoch + 1 == cfg.head_epochs
            acc = None
            if use_val and ((epoch + 1) % cfg.eval_every == 0 or last):
                acc = val_acc()
                if best["val_top1"] is None or acc > best["val_top1"]:
                    best = {"head_epoch": epoch + 1, "val_top1": acc}
                    best_state = copy.deepcopy(head.state_dict())
            if control is not None:
                batches = -(-n // cfg.head_batch_size)
                control.epoch(what, epoch + 1, cfg.head_epochs, loss=_r(float(loss_sum) / batches), val_top1=acc)
        if best_state is not None:
            head.load_state_dict(best_state)
        return best


def _val_text(info: dict) -> str:
    if info.get("val_top1") is None:
        return f" (head: epoch {info.get('head_epoch')})"
    return f" (head: epoch {info['head_epoch']} by val top1 {info['val_top1']:.2f} on its routed val samples)"


class DenseCascade(nn.Module):
    """DLSA's prediction for export: (B, 3, H, W) normalised images -> (B, C) scores equal to ``cascade``'s.

    ``cascade`` scores each stage on the samples earlier stages left, so its shapes follow the data and a trace
    would fix one batch's routing. Here every stage scores every sample and ``torch.where`` keeps, per sample, the
    first stage whose likelihood reaches its threshold, else the regular head: the same answer, because the flows
    score in eval mode (batch norm with running statistics), each sample on its own.
    """

    def __init__(self, model: Classifier, cascade: DLSACascade) -> None:
        super().__init__()
        # The cascade's parts, not the cascade: its extra state (the fit report) is no tensor, which exporters refuse.
        self.model, self.flows, self.cacs, self.regular = model, cascade.flows, cascade.cacs, cascade.regular
        self.register_buffer("thresholds", cascade.thresholds.clone(), persistent=False)  # (depth,)
        self.register_buffer("cluster_priors", cascade.cluster_priors.clone(), persistent=False)  # (depth, K, C)
        live = cascade.live_channels
        self.all_live = bool(live.all())  # fixed at export: the flows' input channels
        self.register_buffer("live_index", torch.nonzero(live).flatten(), persistent=False)  # (D_flow,)
        self.normalize, self.latent = cascade.cfg.normalize_features, cascade.cfg.z_source == "flow_latent"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.model.forward_features(images).float()  # (B, dim), as DLSACascade.prepare
        x = F.normalize(x, dim=1) if self.normalize else x
        xf = x if self.all_live else x.index_select(1, self.live_index)  # (B, D_flow)
        z_last, stages = x, []
        for d, flow in enumerate(self.flows):
            lp, u = flow.component_log_probs(xf)  # (B, K), (B, D_flow)
            score = lp.logsumexp(1) - math.log(flow.clusters)  # (B,)
            if not self.all_live:  # the latent on every channel, zero where the flows do not look
                u = x.new_zeros(x.shape).index_copy(1, self.live_index, u)
            z = u if self.latent else x
            prior = self.cluster_priors[d][lp.argmax(1)]  # (B, C) the hard cluster's class histogram
            stages.append((score >= self.thresholds[d], self.cacs[d](x, z, prior)))
            z_last = z
        out = self.regular(x, z_last if self.latent else x)  # (B, C) for samples no stage took
        for take, scores in reversed(stages):  # earlier stages win
            out = torch.where(take[:, None], scores, out)
        return out

"""Golden values and invariants for every re-balancing loss (spec baselines.md section 2)."""

import math

import pytest
import torch
import torch.nn.functional as F

from longtail.config import ConfigError, ModelConfig
from longtail.losses import sigmoid_focal_loss
from longtail.methods import MethodContext, create_method
from longtail.methods.losses import (
    class_balanced_weights,
    focal_loss,
    ldam_margins,
    logit_adjusted_loss,
)
from longtail.models import create_model

LOGITS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
TARGETS = torch.tensor([0, 2])
COUNTS = torch.tensor([100, 10, 1])


def _method(name, counts=COUNTS, head="linear", **opts):
    options = {"scale": 30.0} if head == "cosine" else {}
    model = create_model(ModelConfig(backbone="tiny", head={"name": head, **options}), len(counts))
    ctx = MethodContext(len(counts), counts, epochs=1, steps_per_epoch=1, device=torch.device("cpu"))
    return create_method({"name": name, **opts}, model, ctx), ctx


def _p(logits, t):
    return torch.softmax(logits, 1)[torch.arange(len(t)), t]


def test_focal_golden_value():
    p = _p(LOGITS, TARGETS)
    expected = (-((1 - p) ** 2) * p.log()).mean()
    assert focal_loss(LOGITS, TARGETS, 2.0).item() == pytest.approx(expected.item(), rel=1e-6)
    # by hand for the first sample: p = e^2 / (e^2 + 1 + e^-1)
    p0 = math.exp(2) / (math.exp(2) + 1 + math.exp(-1))
    assert focal_loss(LOGITS[:1], TARGETS[:1]).item() == pytest.approx(-((1 - p0) ** 2) * math.log(p0), rel=1e-6)


def test_focal_gamma_zero_is_ce():
    assert focal_loss(LOGITS, TARGETS, 0.0).item() == pytest.approx(F.cross_entropy(LOGITS, TARGETS).item())


def test_class_balanced_weights_golden():
    w = class_balanced_weights(torch.tensor([100, 10, 1]), 0.9)
    raw = torch.tensor([(1 - 0.9) / (1 - 0.9**n) for n in (100, 10, 1)], dtype=torch.float64)
    torch.testing.assert_close(w, (raw * 3 / raw.sum()).float())
    assert w.sum().item() == pytest.approx(3.0)


def test_cb_beta_zero_is_ce():
    m, _ = _method("cb_loss", beta=0.0)
    assert m.loss(LOGITS, TARGETS).item() == pytest.approx(F.cross_entropy(LOGITS, TARGETS).item(), rel=1e-6)


def test_cb_weighted_mean_matches_torch():
    m, _ = _method("cb_loss", beta=0.99)
    expected = F.cross_entropy(LOGITS, TARGETS, weight=class_balanced_weights(COUNTS, 0.99))
    assert m.loss(LOGITS, TARGETS).item() == pytest.approx(expected.item(), rel=1e-6)
    m_mean, _ = _method("cb_loss", beta=0.99, reduction="mean")
    w = class_balanced_weights(COUNTS, 0.99)[TARGETS]
    per = F.cross_entropy(LOGITS, TARGETS, reduction="none")
    assert m_mean.loss(LOGITS, TARGETS).item() == pytest.approx((w * per).mean().item(), rel=1e-6)


def test_sigmoid_focal_golden_value_and_gamma_zero_is_sigmoid_ce():
    # By hand, sample 0 (z = 2, 0, -1; class 0 true), gamma 1: -(1 - p) log p for the true class, -p log(1 - p)
    # for the others, p = sigmoid(z); the loss is the mean over the batch of each sample's sum over classes.
    def by_hand(z, y, gamma):
        total = 0.0
        for c, zc in enumerate(z):
            p = 1 / (1 + math.exp(-zc))
            pt = p if c == y else 1 - p
            total += -((1 - pt) ** gamma) * math.log(pt)
        return total

    rows = [by_hand(LOGITS[i].tolist(), int(TARGETS[i]), 1.0) for i in range(2)]
    assert sigmoid_focal_loss(LOGITS, TARGETS, 1.0).item() == pytest.approx(sum(rows) / 2, rel=1e-6)
    onehot = F.one_hot(TARGETS, 3).float()
    bce = F.binary_cross_entropy_with_logits(LOGITS, onehot, reduction="sum") / 2  # / the number of positives
    assert sigmoid_focal_loss(LOGITS, TARGETS, 0.0).item() == pytest.approx(bce.item(), rel=1e-6)
    # The stable modulator, where sigmoid saturates: z = 100 / -100 right costs 0, wrong costs 100 each (the
    # modulator 1), and z = 0 costs 0.5^2 log 2 either way.
    big = torch.tensor([[100.0, -100.0, 0.0]])
    assert sigmoid_focal_loss(big, torch.tensor([0]), 2.0).item() == pytest.approx(0.25 * math.log(2), rel=1e-6)
    assert sigmoid_focal_loss(big, torch.tensor([1]), 2.0).item() == pytest.approx(200 + 0.25 * math.log(2), rel=1e-6)


def test_cb_sigmoid_forms_weight_every_class_term_by_the_true_class():
    w = class_balanced_weights(COUNTS, 0.99)
    per = torch.stack([sigmoid_focal_loss(LOGITS[i:i + 1], TARGETS[i:i + 1], 1.0) for i in range(2)])  # (2,)
    m, _ = _method("cb_loss", beta=0.99, loss="sigmoid_focal", gamma=1.0, reduction="mean")
    assert m.loss(LOGITS, TARGETS).item() == pytest.approx((w[TARGETS] * per).mean().item(), rel=1e-6)
    m, _ = _method("cb_loss", beta=0.99, loss="sigmoid_focal", gamma=1.0)  # weighted_mean, the default
    assert m.loss(LOGITS, TARGETS).item() == pytest.approx(((w[TARGETS] * per).sum() / w[TARGETS].sum()).item(),
                                                           rel=1e-6)
    m, _ = _method("cb_loss", beta=0.0, loss="sigmoid", reduction="mean")  # beta 0: plain sigmoid CE
    assert m.loss(LOGITS, TARGETS).item() == pytest.approx(sigmoid_focal_loss(LOGITS, TARGETS, 0.0).item(), rel=1e-6)
    with pytest.raises(ValueError, match="loss must be softmax, focal, sigmoid or sigmoid_focal, got 'bce'"):
        _method("cb_loss", loss="bce")


def test_cb_sigmoid_forms_start_the_head_bias_at_the_uniform_prior_without_weight_decay():
    m, ctx = _method("cb_loss", loss="sigmoid_focal", gamma=1.0)
    bias = m.model.head.fc.bias
    m.on_stage_start(ctx)
    torch.testing.assert_close(bias.detach(), torch.full((3,), -math.log(2)))  # sigmoid(-log(C - 1)) = 1 / C
    groups = m.param_groups()
    assert [g.weight_decay for g in groups] == [None, 0.0] and groups[1].params == [bias]
    assert sorted(map(id, groups[0].params + groups[1].params)) == sorted(id(p) for p in m.parameters())
    # Off, or the softmax forms: the bias as it is, one group at the stage's settings.
    for opts in ({"loss": "sigmoid", "sigmoid_bias": False}, {"loss": "focal"}):
        m, ctx = _method("cb_loss", **opts)
        before = m.model.head.fc.bias.detach().clone()
        m.on_stage_start(ctx)
        torch.testing.assert_close(m.model.head.fc.bias.detach(), before)
        assert len(m.param_groups()) == 1
    model = create_model(ModelConfig(backbone="tiny", head={"name": "linear", "bias": False}), 3)
    ctx = MethodContext(3, COUNTS, epochs=1, steps_per_epoch=1, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"use model.head=linear with bias: true, or set the loss's sigmoid_bias: "
                                          r"false"):
        create_method({"name": "cb_loss", "loss": "sigmoid"}, model, ctx)
    with pytest.raises(ConfigError, match=r"cb_loss loss=sigmoid_focal starts the head's bias"):  # as IFL's base too
        create_method({"name": "ifl", "base": "cb_loss", "base_options": {"loss": "sigmoid_focal"}}, model, ctx)


def test_ifl_around_a_sigmoid_cb_loss_starts_and_spares_the_bias_as_cb_loss_does():
    # The bias hooks belong to the loss, so a method that wraps it (IFL with base_options) gets them too.
    m, ctx = _method("ifl", base="cb_loss", base_options={"loss": "sigmoid_focal", "gamma": 1.0})
    bias = m.model.head.fc.bias
    m.on_stage_start(ctx)
    torch.testing.assert_close(bias.detach(), torch.full((3,), -math.log(2)))
    groups = m.param_groups()
    assert [g.weight_decay for g in groups] == [None, 0.0, 0.0] and groups[1].params == [bias]
    assert groups[2].params == [m.centers] and groups[2].lr == m.cfg.center_lr
    assert sorted(map(id, [p for g in groups for p in g.params])) == sorted(id(p) for p in m.parameters())
    m, ctx = _method("ifl", base="cb_loss")  # softmax: the bias decays with the rest
    assert [g.weight_decay for g in m.param_groups()] == [None, 0.0] and m.param_groups()[1].params == [m.centers]


def test_balanced_softmax_golden_and_uniform_invariant():
    m, _ = _method("balanced_softmax")
    expected = F.cross_entropy(LOGITS + torch.log(COUNTS.float() / COUNTS.sum() + 1e-12), TARGETS)
    assert m.loss(LOGITS, TARGETS).item() == pytest.approx(expected.item(), rel=1e-6)
    uniform, _ = _method("balanced_softmax", counts=torch.tensor([7, 7, 7]))
    assert uniform.loss(LOGITS, TARGETS).item() == pytest.approx(F.cross_entropy(LOGITS, TARGETS).item(), rel=1e-5)


def test_logit_adjust_tau_zero_is_ce_and_tau_one_is_balanced_softmax():
    la0, _ = _method("logit_adjust", tau=0.0)
    assert la0.loss(LOGITS, TARGETS).item() == pytest.approx(F.cross_entropy(LOGITS, TARGETS).item(), rel=1e-5)
    la1, _ = _method("logit_adjust", tau=1.0)
    bs, _ = _method("balanced_softmax")
    assert la1.loss(LOGITS, TARGETS).item() == pytest.approx(bs.loss(LOGITS, TARGETS).item(), rel=1e-6)
    assert logit_adjusted_loss(LOGITS, TARGETS, COUNTS, 2.0).item() == pytest.approx(
        F.cross_entropy(LOGITS + 2 * torch.log(COUNTS.float() / COUNTS.sum()), TARGETS).item(), rel=1e-5)


def test_posthoc_logit_adjustment():
    m, _ = _method("logit_adjust_posthoc", tau=1.0)
    f = torch.randn(2, 32)
    prior = COUNTS.float() / COUNTS.sum()
    torch.testing.assert_close(m.predict_features(f), m.model.forward_head(f) - torch.log(prior + 1e-12))
    uniform, _ = _method("logit_adjust_posthoc", counts=torch.tensor([5, 5, 5]))
    uniform.model.load_state_dict(m.model.state_dict())
    assert torch.equal(uniform.predict_features(f).argmax(1), uniform.model.forward_head(f).argmax(1))
    m.cfg.tau = 0.0
    torch.testing.assert_close(m.predict_features(f), m.model.forward_head(f), rtol=0, atol=1e-5)


def test_ldam_margins_golden():
    d = ldam_margins(torch.tensor([10000, 16, 1]), 0.5)
    torch.testing.assert_close(d, torch.tensor([0.05, 0.25, 0.5]))


def test_ldam_zero_margin_is_scaled_ce():
    m, ctx = _method("ldam_drw", head="cosine", max_margin=0.0)
    cos = torch.tensor([[0.5, -0.2, 0.1], [0.3, 0.9, -0.4]])
    logits = 30.0 * cos
    assert m.loss(logits, TARGETS).item() == pytest.approx(F.cross_entropy(logits, TARGETS).item(), rel=1e-6)


def test_ldam_margin_and_drw():
    m, ctx = _method("ldam_drw", head="cosine", drw_epoch=2)
    logits = torch.zeros(2, 3)
    z = logits.clone()
    z[0, 0] -= 30 * m.criterion.margins[0]
    z[1, 2] -= 30 * m.criterion.margins[2]
    m.on_epoch_start(1, ctx)
    assert m.loss(logits, TARGETS).item() == pytest.approx(F.cross_entropy(z, TARGETS).item(), rel=1e-6)
    m.on_epoch_start(2, ctx)  # deferred re-weighting switched on
    w = class_balanced_weights(COUNTS, 0.9999)
    assert m.loss(logits, TARGETS).item() == pytest.approx(F.cross_entropy(z, TARGETS, weight=w).item(), rel=1e-6)


def test_mixup_is_the_mixed_loss_of_its_base():
    torch.manual_seed(0)
    m, _ = _method("mixup", alpha=0.4, base="balanced_softmax")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    m.train()
    torch.manual_seed(1)
    out = m(x, y)
    torch.manual_seed(1)
    lam = float(torch.distributions.Beta(0.4, 0.4).sample())
    perm = torch.randperm(4)
    logits = m.model(lam * x + (1 - lam) * x[perm])
    bs, _ = _method("balanced_softmax")
    expected = lam * bs.loss(logits, y) + (1 - lam) * bs.loss(logits, y[perm])
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert not any(k.startswith("_base") for k in m.state_dict())


def test_mixup_predicts_with_its_base_s_correction():
    """Mixup around post-hoc logit adjustment predicts z - tau log pi (the base's tau 1), as IFL around it does;
    around a loss without a correction, the plain logits."""
    m, _ = _method("mixup", base="logit_adjust_posthoc")
    f = torch.randn(2, 32)
    prior = COUNTS.float() / COUNTS.sum()
    torch.testing.assert_close(m.predict_features(f), m.model.forward_head(f) - torch.log(prior + 1e-12))
    ce, _ = _method("mixup", base="ce")
    assert torch.equal(ce.predict_features(f), ce.model.forward_head(f))


def test_mixup_rejects_unknown_base():
    from longtail.config import ConfigError

    with pytest.raises(ConfigError, match="base must be"):
        _method("mixup", base="nope")

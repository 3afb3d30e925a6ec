"""fmct.ssl: config, crops, masks, heads, losses, EMA teacher, and one self-distillation step."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fmct.conventions.errors import ConfigError
from fmct.ssl.augment import MultiCropAugmentation, collate_crops, sample_generator
from fmct.ssl.config import CropSection, SSLConfig
from fmct.ssl.ema import cosine, teacher_momentum, teacher_temperature, update_teacher
from fmct.ssl.heads import DINOHead, patchify
from fmct.ssl.losses import DINOLoss, IBOTPatchLoss, koleo_loss, masked_reconstruction_loss
from fmct.ssl.masking import BlockMasking3D, sample_masks
from fmct.ssl.meta_arch import SelfDistillation, normalized_entropy

TINY = {
    "encoder": {"preset": "tiny", "overrides": {"embed_dim": 48, "depth": 2, "num_heads": 2, "img_size": [32, 32, 32]}},
    "data": {"size": [32, 32, 32], "spacing_mm": [6, 6, 6]},
    "crops": {"global_size": [32, 32, 32], "local_size": [16, 16, 16], "n_local": 2},
    "dino": {"out_dim": 128, "hidden_dim": 64, "bottleneck_dim": 32},
}


def tiny_cfg(**sections) -> SSLConfig:
    d = json.loads(json.dumps(TINY))
    for k, v in sections.items():
        d.setdefault(k, {}).update(v)
    return SSLConfig.from_dict(d)


# ------------------------------------------------------------------------------------ config
def test_config_yaml_json_roundtrip(tmp_path):
    cfg = tiny_cfg(optim={"steps": 7}, ibot={"mask_ratio": [0.2, 0.4]})
    (tmp_path / "c.json").write_text(json.dumps(cfg.resolved_dict()))
    assert SSLConfig.from_file(tmp_path / "c.json") == cfg
    (tmp_path / "c.yaml").write_text("optim:\n  steps: 7\nibot: {mask_ratio: [0.2, 0.4]}\n" + "\n".join(
        f"{k}: {json.dumps(v)}" for k, v in TINY.items()))
    loaded = SSLConfig.from_file(tmp_path / "c.yaml")
    assert loaded == cfg and loaded.ibot.mask_ratio == (0.2, 0.4) and loaded.optim.lr == SSLConfig().optim.lr
    assert cfg.resolved_dict()["encoder_resolved"]["embed_dim"] == 48


@pytest.mark.parametrize("bad, words", [
    ({"optim": {"stepz": 3}}, "stepz"),
    ({"optim": {"steps": "many"}}, "optim.steps"),
    ({"crops": {"local_size": [12, 16, 16]}}, "crops.local_size"),
    ({"dino": {"centering": "none"}}, "dino.centering"),
    ({"data": {"size": [64, 64, 64]}}, "data.size"),
])
def test_config_errors_name_the_key(bad, words):
    d = json.loads(json.dumps(TINY))
    for k, v in bad.items():
        d.setdefault(k, {}).update(v)
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        SSLConfig.from_dict(d)


def test_shipped_pretraining_configs_load():
    configs = sorted((Path(__file__).resolve().parent.parent / "Resources" / "Configs").glob("pretrain*.yaml"))
    assert configs
    for path in configs:
        cfg = SSLConfig.from_file(path)
        assert cfg.encoder_config.embed_dim > 0 and cfg.optim.steps > 0


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        SSLConfig.from_file(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("optim: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        SSLConfig.from_file(tmp_path / "bad.yaml")


# ------------------------------------------------------------------------------------ crops
def test_multicrop_shapes_range_and_determinism():
    aug = MultiCropAugmentation(CropSection(global_size=(32, 32, 32), local_size=(16, 16, 16), n_local=3))
    vol = torch.rand(3, 32, 32, 32)
    a = aug(vol, sample_generator(0, 1, 2))
    b = aug(vol, sample_generator(0, 1, 2))
    c = aug(vol, sample_generator(0, 1, 3))
    assert a["global"].shape == (2, 3, 32, 32, 32) and a["local"].shape == (3, 3, 16, 16, 16)
    assert torch.equal(a["global"], b["global"]) and torch.equal(a["local"], b["local"])
    assert not torch.equal(a["global"], c["global"])
    assert not torch.equal(a["global"][0], a["global"][1])  # two different views
    assert a["global"].min() > -0.2 and a["global"].max() < 1.2  # windowed [0, 1] plus a little noise
    batch = collate_crops([a, c])
    assert batch["global"].shape == (4, 3, 32, 32, 32) and torch.equal(batch["global"][1], c["global"][0])  # crop-major


def test_identity_crop_and_lr_flip():
    """With full-volume crops and no jitter the view is the volume itself, or its LR mirror."""
    plain = dict(global_size=(16, 16, 16), global_scale=(1.0, 1.0), max_rotation_deg=0.0, window_scale=0.0,
                 window_shift=0.0, noise_std=0.0, n_local=0)
    vol = torch.rand(2, 16, 16, 16)
    gen = torch.Generator().manual_seed(0)
    same = MultiCropAugmentation(CropSection(**plain, flip_lr=0.0)).random_resized_crop(vol, gen, (1.0, 1.0), (16, 16, 16))
    flip = MultiCropAugmentation(CropSection(**plain, flip_lr=1.0)).random_resized_crop(vol, gen, (1.0, 1.0), (16, 16, 16))
    # the aspect jitter may shrink a side by up to 15%: compare the centre, where resampling is gentle
    centre = (slice(None), slice(6, 10), slice(6, 10), slice(6, 10))
    assert torch.corrcoef(torch.stack([same[centre].flatten(), vol[centre].flatten()]))[0, 1] > 0.5
    assert torch.corrcoef(torch.stack([flip[centre].flatten(), vol.flip(-1)[centre].flatten()]))[0, 1] > 0.5


# ------------------------------------------------------------------------------------ masks
def test_block_masks_exact_count_and_blocky():
    masker = BlockMasking3D((4, 6, 6))
    for n in (0, 1, 20, 60, 144):
        m = masker(n, torch.Generator().manual_seed(n))
        assert m.shape == (144,) and m.dtype == torch.bool and int(m.sum()) == n
    m = masker(40, torch.Generator().manual_seed(1)).view(4, 6, 6)
    # blocks, not salt-and-pepper: most masked patches have a masked neighbour
    padded = torch.nn.functional.pad(m.float()[None, None], (1, 1, 1, 1, 1, 1))[0, 0]
    neigh = sum(padded.roll(s, d) for d in range(3) for s in (-1, 1))[1:-1, 1:-1, 1:-1]
    assert (neigh[m] > 0).float().mean() > 0.8


def test_sample_masks_share_and_ratios():
    g = torch.Generator().manual_seed(0)
    masks = sample_masks(8, (4, 4, 4), (0.1, 0.5), 0.5, g)
    counts = sorted(int(c) for c in masks.sum(1))
    assert masks.shape == (8, 64) and counts[:4] == [0, 0, 0, 0] and counts[4:] == [12, 19, 25, 32]
    assert torch.equal(masks, sample_masks(8, (4, 4, 4), (0.1, 0.5), 0.5, torch.Generator().manual_seed(0)))


# ------------------------------------------------------------------------------------ heads + losses
def test_dino_head_weight_norm_is_frozen():
    head = DINOHead(48, 100, hidden_dim=32, bottleneck_dim=16)
    out = head(torch.randn(5, 48))
    out.sum().backward()
    assert out.shape == (5, 100)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    assert head.last_layer.parametrizations.weight.original1.grad is not None


def test_dino_loss_prefers_matching_views_and_skips_same_view():
    torch.manual_seed(0)
    loss = DINOLoss(16, student_temp=0.1)
    t = torch.randn(2, 4, 16) * 3
    probs = [loss.softmax_center(t[i], 0.04) for i in range(2)]
    # each student view copies the *other* teacher view: the cross-view loss is at its optimum side
    matched = loss([t[1] / 0.4, t[0] / 0.4], probs)
    shuffled = loss([t[1].roll(1, 0) / 0.4, t[0].roll(1, 0) / 0.4], probs)
    assert matched < shuffled
    # the same-view pairs are skipped: two globals + one local give the four cross pairs only
    local = torch.randn(4, 16)
    students = [t[1] / 0.4, t[0] / 0.4, local]

    def ce(q, s):
        return -(q * torch.log_softmax(s / 0.1, -1)).sum(-1).mean()

    expected = (ce(probs[0], students[1]) + ce(probs[0], students[2]) + ce(probs[1], students[0]) + ce(probs[1], students[2])) / 4
    assert torch.allclose(loss(students, probs), expected)


def test_centering_and_sinkhorn():
    loss = DINOLoss(8, center_momentum=0.5)
    logits = torch.randn(32, 8) + torch.arange(8.0)  # biased towards the last prototypes
    loss.targets(logits, 0.1, "centering")
    assert torch.allclose(loss.center, 0.5 * logits.mean(0, keepdim=True))
    q = loss.sinkhorn_knopp(logits, 1.0, n_iterations=10)
    assert torch.allclose(q.sum(1), torch.ones(32), atol=1e-4)
    use, plain = q.sum(0), torch.softmax(logits, -1).sum(0)
    assert use.std() / use.mean() < 0.1 < plain.std() / plain.mean()  # prototypes used about equally despite the bias
    assert torch.isfinite(loss.sinkhorn_knopp(logits * 100, 0.04)).all()  # no overflow with sharp logits


def test_ibot_loss_weights_images_and_handles_no_masks():
    loss = IBOTPatchLoss(8)
    masks = torch.zeros(3, 6, dtype=torch.bool)
    empty = loss(torch.zeros(0, 8, requires_grad=True), torch.zeros(0, 8), masks)
    assert float(empty.detach()) == 0.0 and empty.requires_grad
    masks[0, :4] = True
    masks[2, :1] = True
    s, t = torch.randn(5, 8), torch.softmax(torch.randn(5, 8), -1)
    per_token = -(t * torch.log_softmax(s / 0.1, -1)).sum(-1)
    expected = (per_token[:4].mean() + per_token[4]) / 3  # over all images, masked or not (DINOv2)
    assert torch.allclose(loss(s, t, masks), expected)


def test_koleo_prefers_spread_features_and_pushes_neighbours_apart():
    torch.manual_seed(0)
    spread = torch.randn(16, 32)
    bunched = torch.randn(1, 32) + 0.01 * torch.randn(16, 32)
    assert koleo_loss(spread) < koleo_loss(bunched)
    assert float(koleo_loss(spread[:1])) == 0.0  # one feature has no neighbour
    x = bunched.clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=0.5)
    before = koleo_loss(x).item()
    for _ in range(5):
        opt.zero_grad()
        koleo_loss(x).backward()
        opt.step()
    assert koleo_loss(x).item() < before - 0.5


def test_patchify_order_matches_encoder_tokens_and_mae_loss():
    x = torch.zeros(1, 1, 16, 16, 16)
    for i in range(8):  # fill patch i (in D, H, W raster order) with the value i
        d, h, w = i // 4, (i // 2) % 2, i % 2
        x[..., d * 8:(d + 1) * 8, h * 8:(h + 1) * 8, w * 8:(w + 1) * 8] = i
    p = patchify(x, (8, 8, 8))
    assert p.shape == (1, 8, 512) and torch.equal(p[0, :, 0], torch.arange(8.0))
    target = torch.randn(2, 8, 512)
    masks = torch.zeros(2, 8, dtype=torch.bool)
    masks[:, :3] = True
    pred = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    assert float(masked_reconstruction_loss(pred, target, masks)) < 1e-8
    assert float(masked_reconstruction_loss(torch.zeros_like(pred), target, masks)) > 0.5


# ------------------------------------------------------------------------------------ EMA + schedules
def test_ema_update_and_schedules():
    student, teacher = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    before = teacher.weight.clone()
    update_teacher(teacher, student, 1.0)
    assert torch.equal(teacher.weight, before)
    update_teacher(teacher, student, 0.75)
    assert torch.allclose(teacher.weight, 0.75 * before + 0.25 * student.weight)
    assert teacher_momentum(0, 100, 0.99, 1.0) == pytest.approx(0.99) and teacher_momentum(100, 100, 0.99, 1.0) == 1.0
    assert teacher_temperature(0, 0.04, 0.07, 10) == 0.04 and teacher_temperature(5, 0.04, 0.07, 10) == pytest.approx(0.055)
    assert teacher_temperature(50, 0.04, 0.07, 10) == 0.07
    assert cosine(0, 10, 1.0, 0.0, warmup_steps=2) == 0.0 and cosine(2, 10, 1.0, 0.0, warmup_steps=2) == 1.0


# ------------------------------------------------------------------------------------ one step
@pytest.mark.parametrize("sections", [{}, {"mae": {"enabled": True}, "ibot": {"separate_head": True}},
                                      {"ibot": {"enabled": False}, "dino": {"centering": "sinkhorn_knopp"}},
                                      {"ibot": {"mask_probability": 0.0}},
                                      {"ibot": {"mask_probability": 0.0}, "dino": {"centering": "sinkhorn_knopp"}},
                                      {"dino": {"koleo_loss_weight": 0.1}}])
def test_self_distillation_step(sections):
    torch.manual_seed(0)
    cfg = tiny_cfg(**sections)
    model = SelfDistillation(cfg)
    aug = MultiCropAugmentation(cfg.crops)
    vol = torch.rand(2, 3, 32, 32, 32)
    batch = collate_crops([aug(vol[i], sample_generator(0, 0, i)) for i in range(2)])
    batch["masks"] = sample_masks(4, (4, 4, 4), cfg.ibot.mask_ratio, cfg.ibot.mask_probability,
                                  torch.Generator().manual_seed(0))
    model.ibot_loss.center.fill_(1.0)
    losses = model(batch, teacher_temp=0.04)
    assert set(losses) >= {"loss", "dino", "teacher_entropy"} and torch.isfinite(losses["loss"])
    assert 0.0 <= float(losses["teacher_entropy"]) <= 1.0 + 1e-6
    assert ("ibot" in losses) == cfg.ibot.enabled and ("mae" in losses) == cfg.mae.enabled
    assert ("koleo" in losses) == (cfg.dino.koleo_loss_weight > 0)
    if not batch["masks"].any() or cfg.dino.centering != "centering":  # no masked tokens: the patch center stays put
        assert torch.all(model.ibot_loss.center == 1.0)
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.student.parameters() if p.requires_grad)
    assert all(not p.requires_grad and p.grad is None for p in model.teacher.parameters())
    before = model.teacher.backbone.pos_embed.clone()
    with torch.no_grad():
        model.student.backbone.pos_embed.add_(1.0)
    model.update_teacher(0.9)
    assert torch.allclose(model.teacher.backbone.pos_embed, before + 0.1, atol=1e-6)


# ------------------------------------------------------------------------------------ collapse
def test_normalized_entropy_and_collapse_warning(caplog):
    from fmct.train.pretrain import CollapseWatch

    k = 64
    assert float(normalized_entropy(torch.full((5, k), 1.0 / k))) == pytest.approx(1.0, abs=1e-5)
    assert float(normalized_entropy(torch.eye(k)[:5])) == pytest.approx(0.0, abs=1e-5)
    cfg = tiny_cfg(dino={"warmup_teacher_temp_steps": 3})
    flat = {"teacher_entropy": 0.999, "dino_over_log_k": 0.999, "view_gap": 0.0, "feature_spread": 0.3,
            "pixel_view_ratio": 1.0, "teacher_logit_spread": 0.01}
    watch = CollapseWatch(cfg, patience=5)
    with caplog.at_level("WARNING", logger="fmct.train.pretrain"):
        fired = [watch(step, flat) for step in range(1, 9)]
        assert fired == [False] * 7 + [True]  # steps 4..8 past the warm-up are the five in a row
        assert not any(watch(step, flat) for step in range(9, 40))  # warned once
    text = caplog.text
    assert "not learning" in text and "milder views" in text and "teacher_temp" in text and "sinkhorn_knopp" in text
    # entropy alone no longer decides: near-uniform targets with views told apart is learning
    learning = CollapseWatch(cfg, patience=5)
    assert not any(learning(s, {**flat, "view_gap": 0.2, "dino_over_log_k": 0.9}) for s in range(1, 30))
    collapsed = CollapseWatch(cfg, patience=5)
    assert any(collapsed(s, {**flat, "teacher_entropy": 0.5, "dino_over_log_k": 0.5, "feature_spread": 0.02}) for s in range(1, 30))
    tuned = CollapseWatch(tiny_cfg(dino={"centering": "sinkhorn_knopp", "sinkhorn_queue": 64}, mae={"enabled": True}))
    assert "sinkhorn" not in tuned.remedies() and "batch_size" in tuned.remedies()
    fresh = CollapseWatch(cfg, patience=5)
    pattern = [flat] * 4 + [{**flat, "view_gap": 0.5, "dino_over_log_k": 0.5}]  # one good step in five keeps the mean up
    assert not any(fresh(step, r) for step, r in enumerate(pattern * 4, start=4))

"""The SVD/Framer objective's data-dependent parts on tiny random weights: image pairs train only the frames they
know, the ControlNet joins the training forward (gated per sample by tracks), the per-sample time ids, the motion
estimate, the point mapping through resize/crop/flip, and the masked EDM loss against a hand-written formula.

Shapes: tiny Framer latents [F=4, Z=4, 16, 16] (the tiny VAE compresses 2x from 32x32 frames), CLIP tokens [2, 48].
"""
from __future__ import annotations

import math

import pytest
import torch

from backbones.objectives import edm
from backbones.registry import get_backbone
from backbones.spec import Batch
from backbones.svd.spec import estimate_motion_bucket, map_points
from lora_core.data import resize_crop
from lora_core.runtime.trainable import TrainPlan, apply_plan

SVD, FRAMER = get_backbone("svd"), get_backbone("framer")
F, H, W = 4, 16, 16


def framer_batch(masks: list[list[float]], tracks: list[torch.Tensor], extras: list[dict] | None = None) -> Batch:
    g = torch.Generator().manual_seed(0)
    n = len(masks)
    fields = {"latent_mean": [torch.randn(F, 4, H, W, generator=g) * torch.tensor(m)[:, None, None, None]
                              for m in masks],
              "latent_logvar": [torch.full((F, 4, H, W), -4.0) for _ in range(n)],
              "frame_mask": [torch.tensor(m) for m in masks],
              "cond_latent": [torch.randn(2, 4, H, W, generator=g) for _ in range(n)],
              "cond_sigma": [torch.tensor(0.05) for _ in range(n)],
              "clip_embeds": [torch.randn(2, 48, generator=g) for _ in range(n)],
              "motion": [torch.tensor(float("nan")) for _ in range(n)],
              "tracks": tracks}
    metas = [{"geometry": {"size": [32, 32]}, "extra": (extras or [{}] * n)[i], "fps": 0.0} for i in range(n)]
    return Batch(fields, metas, [11 + i for i in range(n)])


class Recorder(torch.nn.Module):
    """Wraps the UNet and keeps its output (with its gradient) and the residuals it was given."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.module = unet
        self.out: torch.Tensor | None = None
        self.kwargs: dict = {}

    def forward(self, *args, **kwargs):
        self.out = self.module(*args, **kwargs)
        self.out.retain_grad()
        self.kwargs = kwargs
        return self.out


def test_masked_edm_loss_equals_the_hand_written_mean_over_known_frames() -> None:
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, F, 3, 5, 5, generator=g)
    inp = edm.training_inputs(x0, edm.EDMObjectiveConfig(), [torch.Generator().manual_seed(s) for s in (1, 2)])
    out = torch.randn(x0.shape, generator=g)
    mask = torch.tensor([[1.0, 0, 0, 1], [1, 1, 1, 1]])
    d = edm.denoised(out, inp.x_noisy, inp.sigma)
    want = 0.0
    for i in range(2):
        known = mask[i].bool()
        lam = (inp.sigma[i] ** 2 + 1) / inp.sigma[i] ** 2
        want += float(lam * ((d[i, known] - x0[i, known]) ** 2).mean())
    got = float(edm.edm_loss(out, inp, edm.EDMObjectiveConfig(), mask))
    assert math.isclose(got, want / 2, rel_tol=1e-6)
    assert math.isclose(float(edm.edm_loss(out, inp, edm.EDMObjectiveConfig(), torch.ones(2, F))),
                        float(edm.edm_loss(out, inp, edm.EDMObjectiveConfig())), rel_tol=1e-6)
    with pytest.raises(ValueError, match="mask"):
        edm.edm_loss(out, inp, edm.EDMObjectiveConfig(), torch.ones(2, 3))


def test_image_pairs_put_no_loss_on_unknown_frames() -> None:
    """The gradient of the loss w.r.t. the UNet output is exactly zero at a pair's middle frames and nonzero at
    its start and end (and everywhere for a clip in the same batch); the middle frames' input is not a copy."""
    unet = Recorder(FRAMER.build("tiny", {"unet"})["unet"])
    batch = framer_batch([[1, 0, 0, 1], [1, 1, 1, 1]], [torch.zeros(F, 0, 2)] * 2)
    loss = FRAMER.training_loss({"unet": unet}, batch, FRAMER.objective_config("tiny"))
    loss.backward()
    grad = unet.out.grad  # [B, F, 4, h, w]
    per_frame = grad.abs().flatten(2).sum(-1)
    assert torch.all(per_frame[0, 1:3] == 0)
    assert torch.all(per_frame[0, [0, 3]] > 0) and torch.all(per_frame[1] > 0)


def test_controlnet_joins_training_gated_by_tracks() -> None:
    """A LoRA-trained ControlNet is called every step; its residuals are zero for a sample without tracks and its
    LoRA gets gradients from the samples with them. A frozen one (objective.controlnet) runs without grad and is
    skipped when no sample has tracks."""
    comps = FRAMER.build("tiny", {"unet", "controlnet"})
    cn = comps["controlnet"]
    apply_plan(cn, TrainPlan("controlnet", "lora", targets=["to_q", "to_k", "to_v", "to_out.0"], rank=4, alpha=4.0))
    with torch.no_grad():  # LoRA B starts at zero: give it values so the residual path depends on A too
        for p in cn.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    unet = Recorder(comps["unet"])
    track = torch.tensor([[[8.0 + 4 * f, 10.0]] for f in range(F)])  # [F, 1, 2]
    batch = framer_batch([[1, 1, 1, 1]] * 2, [track, torch.zeros(F, 0, 2)])
    cfg = FRAMER.objective_config("tiny")
    loss = FRAMER.training_loss({"unet": unet, "controlnet": cn}, batch, cfg)
    down = unet.kwargs["down_block_additional_residuals"]
    assert all(r[F:].abs().sum() == 0 for r in down)  # sample 1 (frames F..2F) has no tracks: control off
    assert any(r[:F].abs().sum() > 0 for r in down)
    loss.backward()
    grads = [p.grad for p in cn.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0

    frozen = FRAMER.build("tiny", {"controlnet"})["controlnet"].requires_grad_(False)
    unet2 = Recorder(comps["unet"])
    FRAMER.training_loss({"unet": unet2, "controlnet": frozen}, batch, cfg)
    assert "down_block_additional_residuals" in unet2.kwargs
    assert not unet2.kwargs["down_block_additional_residuals"][0].requires_grad
    FRAMER.training_loss({"unet": unet2, "controlnet": frozen},
                         framer_batch([[1, 1, 1, 1]], [torch.zeros(F, 0, 2)]), cfg)
    assert unet2.kwargs == {}


def test_training_loss_of_a_batch_is_the_mean_of_its_samples() -> None:
    """Framer's temporal-context layout mixes batch rows at inference (kept there, as released); training uses
    per-video rows, so a sample's loss does not depend on its batch-mates (what makes DDP equal one process)."""
    comps = FRAMER.build("tiny", {"unet", "controlnet"})
    track = torch.tensor([[[8.0 + 4 * f, 10.0]] for f in range(F)])
    batch = framer_batch([[1, 0, 0, 1], [1, 1, 1, 1]], [track, torch.zeros(F, 0, 2)])
    cfg = FRAMER.objective_config("tiny")
    with torch.no_grad():
        both = FRAMER.training_loss(comps, batch, cfg).item()
        one = [FRAMER.training_loss(comps, Batch({k: v[i:i + 1] for k, v in batch.fields.items()}, batch.meta[i:i + 1],
                                                 batch.seeds[i:i + 1]), cfg).item() for i in range(2)]
    assert math.isclose(both, sum(one) / 2, rel_tol=1e-5), (both, one)


def test_time_ids_metadata_then_clip_then_config() -> None:
    cfg = SVD.objective_config("tiny")
    batch = framer_batch([[1, 1, 1, 1]] * 3, [torch.zeros(F, 0, 2)] * 3,
                         extras=[{"fps": 12, "motion_bucket_id": 40}, {}, {}])
    batch.meta[2]["fps"] = 9.6
    batch.fields["motion"][2] = torch.tensor(80.0)
    ids = SVD._time_ids(batch, cfg, torch.device("cpu"))
    assert ids[:, :2].tolist() == [[11, 40], [6, 127], [6, 127]]  # fps - 1, as inference passes it
    cfg.fps_from_clip, cfg.estimate_motion = True, True
    ids = SVD._time_ids(batch, cfg, torch.device("cpu"))
    assert ids[:, :2].tolist() == [[11, 40], [6, 127], [9, 80]]
    assert torch.allclose(ids[:, 2], torch.full((3,), 0.05))


def test_motion_estimate_orders_clips_by_motion() -> None:
    still = torch.zeros(3, 6, 16, 16)
    slow, fast = still.clone(), still.clone()
    for f in range(6):
        slow[:, f, :, f:f + 4] = 1.0
        fast[:, f, :, 2 * f:2 * f + 4] = 1.0
    values = [estimate_motion_bucket(v) for v in (still, slow, fast)]
    assert values[0] == 1.0 and values[0] < values[1] < values[2] <= 255
    assert math.isnan(estimate_motion_bucket(still[:, :1]))


@pytest.mark.parametrize("flip", [False, True])
def test_map_points_follows_resize_crop_and_flip(flip: bool) -> None:
    """A bright source pixel lands where map_points puts its centre (within a pixel) after the dataset's resize +
    crop (+ flip)."""
    sh, sw, rh, rw, top, left, size = 40, 60, 24, 36, 2, 5, (20, 24)
    x, y = 33, 17
    img = torch.zeros(1, sh, sw, 3, dtype=torch.uint8)
    img[0, y - 1:y + 2, x - 1:x + 2] = 255  # a 3x3 blob centred on (x, y), so the resize keeps a clear peak
    out = resize_crop(img, (rh, rw), (top, left), size)[0, 0]  # [H, W]
    if flip:
        out = out.flip(-1)
    peak = divmod(int(out.argmax()), size[1])
    geo = {"source_size": [sh, sw], "resize": [rh, rw], "crop": [top, left], "flip": flip, "size": list(size)}
    px, py = map_points(torch.tensor([[float(x), float(y)]]), geo)[0].tolist()
    assert abs(px - peak[1]) <= 1.0 and abs(py - peak[0]) <= 1.0, (px, py, peak)


# ------------------------------------------------------------------------------------------ through train.main
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from safetensors.torch import load_file  # noqa: E402

import infer  # noqa: E402
import train  # noqa: E402
from backbones.svd.spec import CONTROLNET_NAMING  # noqa: E402
from lora_core.data.sample_data import make_sample_dataset, make_sample_pairs  # noqa: E402
from lora_core.formats import load_lora, read_lora  # noqa: E402
from tests.oracle import assert_same_training, rel_err, torchrun_train  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("svd_training")


@pytest.fixture(scope="module")
def pairs(root: Path) -> Path:
    return make_sample_pairs(root / "pairs", num_pairs=4, frames=4)


@pytest.fixture(scope="module")
def mixed(root: Path) -> Path:
    """Two clips and two start/end pairs in one folder."""
    folder = make_sample_dataset(root / "mixed", num_clips=2)
    make_sample_pairs(folder, num_pairs=2, frames=4)
    return folder


def args(backbone: str, data: Path, out: Path, root: Path, *extra: str) -> list[str]:
    return ["--backbone", backbone, "--preset", "tiny", "--data", str(data), "--output", str(out),
            f"train.cache_dir={root / ('cache_' + backbone)}", "train.log_every=0", *extra]


def steps_losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]


def control_inputs(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, F, 9, H, W, generator=g)
    heat = torch.rand(1, F, 3, 2 * H, 2 * W, generator=g) * 255
    return x, torch.tensor([0.3]), torch.randn(1, 2, 48, generator=g), torch.tensor([[6.0, 127.0, 0.02]]), heat


def test_framer_trains_unet_and_controlnet_loras_from_pairs_with_tracks(pairs: Path, root: Path) -> None:
    """UNet + ControlNet LoRA from start/end pairs with tracks: one file with both (controlnet.* keys), the PEFT
    folders unet_lora/ and controlnet_lora/ (PEFT loads the latter on the ControlNet with our outputs), and a
    validation video from the first pair's start/end images (validation.images not set)."""
    peft = pytest.importorskip("peft")
    out = root / "framer_cn_lora"
    assert train.main(args("framer", pairs, out, root, "--max-steps", "6", "optim.lr=1e-2",
                           "components.controlnet.mode=lora", "validation.every=6")) == 0
    assert len(steps_losses(out)) == 6
    lf = read_lora(out / "lora.safetensors")
    names = list(lf.modules)
    assert {prefix for prefix, _ in names} == {"controlnet.", "unet."}
    assert (out / "samples" / "step000006_0.mp4").is_file()
    for part in ("unet_lora", "controlnet_lora"):
        assert (out / part / "adapter_model.safetensors").is_file()

    ours = FRAMER.build("tiny", {"controlnet"})["controlnet"]
    ref = FRAMER.build("tiny", {"controlnet"})["controlnet"]
    ref = peft.PeftModel.from_pretrained(ref, str(out / "controlnet_lora"))
    load_lora({"controlnet": ours}, out / "lora.safetensors", naming={"controlnet": CONTROLNET_NAMING})
    base = FRAMER.build("tiny", {"controlnet"})["controlnet"]
    inputs = control_inputs(0)
    with torch.no_grad():
        want_down, want_mid = ref(*inputs)
        got_down, got_mid = ours(*inputs)
        _, base_mid = base(*inputs)
    assert rel_err(got_mid, want_mid) < 1e-5 and all(rel_err(a, b) < 1e-5 for a, b in zip(got_down, want_down))
    assert rel_err(got_mid, base_mid) > 1e-4  # the trained LoRA changed the ControlNet


def test_controlnet_full_fine_tune_in_the_framer_layout(pairs: Path, root: Path) -> None:
    """components.controlnet.mode=full (own lr) writes controlnet/diffusion_pytorch_model.safetensors with every
    tensor of the ControlNet (safetensors, Framer's keys), which --source controlnet=... loads back."""
    out = root / "framer_cn_full"
    assert train.main(args("framer", pairs, out, root, "--max-steps", "3", "components.controlnet.mode=full",
                           "components.controlnet.lr=1e-3")) == 0
    sd = load_file(str(out / "controlnet" / "diffusion_pytorch_model.safetensors"))
    base = FRAMER.build("tiny", {"controlnet"})["controlnet"]
    assert sd.keys() == base.state_dict().keys()
    assert any(not torch.equal(sd[k], v) for k, v in base.state_dict().items())
    from backbones.spec import Sources
    loaded = FRAMER.build("tiny", {"controlnet"}, Sources(extra={"controlnet": out / "controlnet"}))["controlnet"]
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    tracks = root / "pairs" / "pair_000.tracks.json"
    common = ["--backbone", "framer", "--preset", "tiny", "--image", str(root / "pairs" / "pair_000_start.png"),
              "--image-end", str(root / "pairs" / "pair_000_end.png"), "--frames", "4", "--tracks", str(tracks),
              "--steps", "2"]
    a, b = root / "cn_base", root / "cn_tuned"
    infer.main([*common, "--output", f"{a}/"])
    infer.main([*common, "--source", f"controlnet={out / 'controlnet'}", "--output", f"{b}/"])
    from PIL import Image
    import numpy as np
    fa = np.stack([np.asarray(Image.open(p)) for p in sorted(a.glob("*.png"))])
    fb = np.stack([np.asarray(Image.open(p)) for p in sorted(b.glob("*.png"))])
    assert fa.shape == fb.shape and not np.array_equal(fa, fb)


def test_bad_datasets_fail_before_any_model(root: Path, pairs: Path) -> None:
    clips = make_sample_dataset(root / "clips_no_tracks", num_clips=2)
    with pytest.raises(ValueError, match="tracks.json"):
        train.main(args("framer", clips, root / "bad1", root, "components.controlnet.mode=lora"))
    with pytest.raises(ValueError, match="objective.controlnet"):
        train.main(args("framer", clips, root / "bad2", root, "objective.controlnet=true"))
    with pytest.raises(ValueError, match=">= 3"):
        train.main(args("framer", pairs, root / "bad3", root, "data.pair_frames=2"))
    broken = root / "broken_tracks"
    make_sample_pairs(broken, num_pairs=1, frames=4)
    (broken / "pair_000.tracks.json").write_text('{"frames": 4}')
    with pytest.raises(ValueError, match="pair_000.tracks.json"):
        train.main(args("framer", broken, root / "bad4", root))
    for out in ("bad1", "bad2", "bad3", "bad4"):
        assert not (root / out / "cache").exists()  # nothing was encoded


def test_svd_fp16_from_clips_and_pairs_resumes_exactly(mixed: Path, root: Path) -> None:
    """SVD on a mixed dataset (clips and pairs batched apart), fp16 autocast with dynamic loss scaling: the loss
    scale is checkpointed and a run stopped at step 2 and resumed gives the uninterrupted run's losses."""
    common = ["--batch-size", "2", "train.mixed_precision=fp16", "train.ckpt_every=2", "optim.lr=1e-3"]
    full, split = root / "svd_full", root / "svd_split"
    assert train.main(args("svd", mixed, full, root, *common, "--max-steps", "4")) == 0
    assert train.main(args("svd", mixed, split, root, *common, "--max-steps", "2")) == 0
    state = json.loads((split / "checkpoints" / "step-2" / "state.json").read_text())
    assert state["loss_scale"]["scale"] == 2.0 ** 16
    assert train.main(args("svd", mixed, split, root, *common, "--max-steps", "4", "--resume", "latest")) == 0
    assert steps_losses(full) == steps_losses(split)
    rows = [json.loads(line) for line in open(full / "metrics.jsonl")]
    assert all(r["loss_scale"] == 2.0 ** 16 for r in rows)


def test_clip_tracks_are_cached_on_the_training_frames(root: Path) -> None:
    """A clip's tracks file (one point per source frame) becomes `tracks` [F, 1, 2] at the sampled frames, mapped
    through the resize and crop; a clip without one caches [F, 0, 2]; the ControlNet LoRA trains from them."""
    clips = make_sample_dataset(root / "clips_tracks", num_clips=2, tracks=True)
    (clips / "clip_001.tracks.json").unlink()
    out = root / "framer_clip_tracks"
    assert train.main(args("framer", clips, out, root, "--max-steps", "2", "components.controlnet.mode=lora")) == 0
    cfg, spec = train.resolve_config(train.parse_args(args("framer", clips, root / "unused", root)))
    from lora_core.distributed import DistInfo
    ds = train.prepare_dataset(cfg, spec, DistInfo())
    cached = train.prepare_cache(cfg, spec, ds, DistInfo(), torch.device("cpu"))
    by_name = {ds.samples[i].path.name: i for i in range(len(ds))}
    i = by_name["clip_000.mp4"]
    got = cached.cache.get(cached.media[i])["tracks"]
    meta = ds.meta(i)
    raw = json.loads((clips / "clip_000.tracks.json").read_text())
    src = torch.tensor(raw["tracks"], dtype=torch.float32)[0, meta["frame_indices"]]  # [F, 2] source pixels
    sh, sw = meta["geometry"]["source_size"]
    assert (raw["height"], raw["width"]) == (sh, sw)
    want = map_points(src, meta["geometry"])
    assert got.shape == (F, 1, 2) and torch.allclose(got[:, 0], want, atol=1e-4)
    assert cached.cache.get(cached.media[by_name["clip_001.mp4"]])["tracks"].shape == (F, 0, 2)


@pytest.mark.parametrize("layout", ["ddp", "fsdp"])
def test_torchrun_framer_with_controlnet_equals_one_process(pairs: Path, root: Path, layout: str) -> None:
    """2 processes (DDP or FSDP2) x 1 pair against 1 process x 2 pairs, UNet and ControlNet LoRA with gradient
    checkpointing: the same losses and LoRA."""
    common = ["--max-steps", "3", "lora.save_dtype=fp32", "optim.lr=1e-3", "components.controlnet.mode=lora",
              "train.gradient_checkpointing=true"]
    single, multi = root / f"framer_single_{layout}", root / f"framer_multi_{layout}"
    assert train.main(args("framer", pairs, single, root, *common, "--batch-size", "2")) == 0
    torchrun_train(args("framer", pairs, multi, root, *common, "--parallel", layout, "--batch-size", "1"))
    assert_same_training(steps_losses(single), steps_losses(multi), load_file(str(single / "lora.safetensors")),
                         load_file(str(multi / "lora.safetensors")), lr=1e-3, steps=3)

"""BigGAN task: models for every layer, conditional norm-act, EMA, eval-mode statistics, FID/IS instruments, a run."""
import json
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from pytorch_lightning.trainer.connectors.data_connector import _get_distributed_sampler
from pytorch_lightning.utilities.data import _update_dataloader

import evonorm
from evonorm import NORM_ACT_NAMES
from pipelines.run import run
from tasks.biggan.data import GanData
from tasks.biggan.features import EfficientNetLite0Features, FeatureNetError, build_feature_net
from tasks.biggan.layers import ConditionalNormAct
from tasks.biggan.metrics import fid_is
from tasks.biggan.models import Discriminator, Generator
from tasks.biggan.module import BigGanModule, hinge_d_loss, hinge_g_loss, to_unit
from tasks.common.datasets import DatasetError
from tests.conftest import CONF_DIR

TINY = {"resolution": 32, "ch": 4}
TINY_G_MULTS, TINY_D_MULTS = (4, 4, 2, 1), (1, 2, 4, 4)


def tiny_gan(norm: str, num_classes: int = 3):
    g = Generator(evonorm.norm_act_factory(norm), num_classes, **TINY, z_dim=32, shared_dim=8, mults=TINY_G_MULTS,
                  attention=16)
    d = Discriminator(num_classes, **TINY, mults=TINY_D_MULTS, attention=8)
    return g, d


def write_image_folder(root, counts: dict[str, int], classes: int = 2):
    """``train/``, ``val/``, ... of uniform 32 px PNGs in ``classes`` class folders; each image's gray value is its
    own id (0, 1, ... across the splits), so a test can tell where an image came from."""
    image_id = 0
    for split, count in counts.items():
        for i in range(count):
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (image_id,) * 3).save(folder / f"{image_id}.png")
            image_id += 1
    return str(root)


def image_ids(images) -> set[int]:
    return {int(images[i][0][0, 0, 0]) for i in range(len(images))}


@pytest.fixture(scope="module")
def lite0():
    return EfficientNetLite0Features(image_size=224)


@pytest.mark.parametrize("norm", NORM_ACT_NAMES)
def test_every_norm_trains_one_g_and_d_step_and_samples(norm):
    torch.manual_seed(0)
    g, d = tiny_gan(norm)
    opt_g = torch.optim.Adam([p for p in g.parameters() if p.requires_grad], lr=1e-3, betas=(0.0, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=1e-3, betas=(0.0, 0.999))
    z, y = torch.randn(6, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    real = torch.rand(6, 3, 32, 32) * 2 - 1
    before_d = [p.detach().clone() for p in d.parameters()]
    with torch.no_grad():
        fake = g(z, y)
    loss_d = sum(hinge_d_loss(d(real, y), d(fake, y)))
    loss_d.backward()
    opt_d.step()
    assert torch.isfinite(loss_d) and any(not torch.equal(a, b) for a, b in zip(before_d, d.parameters()))
    g_cond = g.blocks[0].na1
    before_gain = g_cond.gain.parametrizations.weight.original.detach().clone()
    loss_g = hinge_g_loss(d(g(z, y), y))
    loss_g.backward()
    opt_g.step()
    assert torch.isfinite(loss_g)
    assert not torch.equal(before_gain, g_cond.gain.parametrizations.weight.original)
    # the layer's own affine is off: fixed at the identity, never trained
    assert torch.all(g_cond.norm.weight == 1) and torch.all(g_cond.norm.bias == 0)
    assert not g_cond.norm.weight.requires_grad and g_cond.norm.weight.grad is None
    g.eval()
    with torch.no_grad():
        samples = g(z, y)
    assert samples.shape == (6, 3, 32, 32) and samples.abs().max() <= 1


def test_spectral_norm_is_exact_from_init_so_the_untrained_generator_is_measured_as_built():
    """Orthogonal init precedes spectral norm: in eval mode (no power iteration) every weight already has norm 1."""
    g, d = tiny_gan("bn_relu")
    layers = [(name, m) for model in (g.eval(), d.eval()) for name, m in model.named_modules()
              if hasattr(m, "parametrizations")]
    assert len(layers) > 20
    for name, m in layers:
        assert float(torch.linalg.matrix_norm(m.weight.detach().flatten(1), 2)) == pytest.approx(1.0, abs=1e-3), name


def test_shared_embedding_starts_orthogonal_at_the_configured_norm():
    g = Generator(evonorm.norm_act_factory("s0"), 3, **TINY, z_dim=32, shared_dim=8, mults=TINY_G_MULTS,
                  shared_init_norm=2.0)
    w = g.shared.weight.detach()
    torch.testing.assert_close(w @ w.t(), 4.0 * torch.eye(3), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", ["bn_relu", "gn_relu", "frn_tlu", "s0"])
def test_conditional_affine_sits_where_the_layer_affine_was(norm):
    torch.manual_seed(0)
    layer = ConditionalNormAct(evonorm.norm_act_factory(norm), 8, cond_dim=5).eval()
    x, cond = torch.randn(2, 8, 4, 4), torch.randn(2, 5)
    gain = (1 + layer.gain(cond)).view(2, 8, 1, 1)
    bias = layer.bias(cond).view(2, 8, 1, 1)
    reference = evonorm.norm_act(norm, 8).eval()  # its own affine at the conditional values, per sample
    rows = []
    for i in range(2):
        with torch.no_grad():
            reference.weight.copy_(gain[i].flatten())
            reference.bias.copy_(bias[i].flatten())
            rows.append(reference(x[i:i + 1]))
    torch.testing.assert_close(layer(x, cond), torch.cat(rows), rtol=1e-5, atol=1e-5)


def test_ema_averages_parameters_and_copies_buffers():
    g, d = tiny_gan("b0")
    module = BigGanModule(g, d, feature_net=torch.nn.Identity(), num_classes=3, z_dim=32, ema_decay=0.5)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(1.0)
        for layer in g.modules():
            if isinstance(layer, evonorm.EvoNormB0):
                layer.running_var.fill_(3.0)
    ema_before = [p.detach().clone() for p in module.generator_ema.parameters()]
    module.g_steps += 100  # past the warm-up: decay = ema_decay
    module.update_ema()
    for before, p_ema, p in zip(ema_before, module.generator_ema.parameters(), g.parameters()):
        torch.testing.assert_close(p_ema, 0.5 * before + 0.5 * p)
    buffers = dict(module.generator_ema.named_buffers())
    assert any(name.endswith("running_var") for name in buffers)
    for name, b in g.named_buffers():
        assert torch.equal(buffers[name], b), name


def test_eval_sampling_uses_running_variances():
    torch.manual_seed(0)
    g, _ = tiny_gan("b0")
    z, y = torch.randn(5, 32), torch.tensor([0, 1, 2, 0, 1])
    g.eval()
    with torch.no_grad():
        batch = g(z, y)
        alone = torch.cat([g(z[i:i + 1], y[i:i + 1]) for i in range(5)])
        torch.testing.assert_close(batch, alone, rtol=1e-3, atol=1e-3)  # no batch statistics in eval
        for layer in g.modules():
            if isinstance(layer, evonorm.EvoNormB0):
                layer.running_var.fill_(0.5)
        assert (g(z, y) - batch).abs().max() > 0.05  # ... but the running variances
        g.train()
        assert (g(z, y) - batch).abs().max() > 0.05


def test_attention_at_a_resolution_the_blocks_never_reach_names_the_key_and_the_choices():
    def make_g(attention):
        return Generator(evonorm.norm_act_factory("bn_relu"), 3, **TINY, z_dim=32, mults=TINY_G_MULTS,
                         attention=attention)

    with pytest.raises(ValueError, match=r"task.model.g_attention=64 .* 32 px; choose from \[8, 16, 32\], or null"):
        make_g(64)
    with pytest.raises(ValueError, match=r"task.model.d_attention=32 .* 32 px; choose from \[8, 16\], or null"):
        Discriminator(3, **TINY, mults=TINY_D_MULTS, attention=32)
    assert not make_g(None).attention and not Discriminator(3, **TINY, mults=TINY_D_MULTS, attention=0).attention


def test_sample_grid_of_many_classes_shows_grid_classes_rows_sampled_in_eval_batches():
    """A 1000-class grid of 10 columns was 10,000 images in one forward pass (> 100 GB at 128 px)."""
    g, d = tiny_gan("bn_relu", num_classes=1000)
    default = BigGanModule(g, d, feature_net=torch.nn.Identity(), num_classes=1000, z_dim=32, grid_columns=2)
    assert default.grid_y.tolist() == [c for c in range(0, 1000, 100) for _ in range(2)]
    module = BigGanModule(g, d, feature_net=torch.nn.Identity(), num_classes=1000, z_dim=32, grid_columns=3,
                          grid_classes=4, grid_batch_size=5)
    assert module.grid_y.tolist() == [c for c in (0, 250, 500, 750) for _ in range(3)]
    batch_sizes = []
    g.register_forward_pre_hook(lambda _, args: batch_sizes.append(len(args[0])))
    images = module.sample_grid(g.eval())
    assert batch_sizes == [5, 5, 2]
    torch.testing.assert_close(images, to_unit(g(module.grid_z, module.grid_y)), rtol=1e-4, atol=1e-4)


def test_sample_grid_of_ten_classes_is_unchanged():
    g, d = tiny_gan("bn_relu", num_classes=10)
    module = BigGanModule(g, d, feature_net=torch.nn.Identity(), num_classes=10, z_dim=32)
    assert module.grid_y.tolist() == torch.arange(10).repeat_interleave(10).tolist()
    torch.testing.assert_close(module.grid_z, torch.randn(100, 32, generator=torch.Generator().manual_seed(99)))


def test_imagefolder_validation_holds_out_train_images_and_the_test_reads_val(tmp_path):
    """Validation FID picks the checkpoint: its real images must not be the test's (they were both val/)."""
    root = write_image_folder(tmp_path, {"train": 12, "val": 6})
    data = GanData("imagefolder", root, val_size=4, fid_samples=4, test_fid_samples=6)
    data.setup()
    train, val, test = image_ids(data.train_set), image_ids(data.real_sets["val"]), image_ids(data.real_sets["test"])
    assert len(val) == 4 and train | val == set(range(12)) and not train & val
    assert test == set(range(12, 18))


def test_biggan128_imagenet_holds_out_enough_train_images_for_its_validation_fid(tmp_path):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=biggan128_imagenet", f"output_dir={tmp_path}"])
    assert cfg.task.data.val_size >= cfg.task.metrics.fid_samples


def test_imagefolder_epoch_under_ddp_is_steps_per_epoch_full_batches(tmp_path):
    """Lightning replaces a plain RandomSampler by DistributedSampler(dataset) (num_samples lost: an epoch was a
    pass over the folder, with a short last batch); a BatchSampler it wraps, as for the in-memory sets."""
    root = write_image_folder(tmp_path, {"train": 12, "val": 2})
    data = GanData("imagefolder", root, batch_size=2, draws_per_step=2, steps_per_epoch=3, val_size=2,
                   fid_samples=2, test_fid_samples=2)
    data.trainer = SimpleNamespace(world_size=2)  # draws_for_all_ranks reads only this
    data.setup()
    loader = data.train_dataloader()
    sampler = _get_distributed_sampler(loader, shuffle=True, overfit_batches=0, num_replicas=2, rank=0)
    shapes = [tuple(images.shape) for images, _ in _update_dataloader(loader, sampler)]
    assert shapes == [(4, 3, 32, 32)] * 3


@pytest.mark.parametrize("photo,label", [("chelsea", 285), ("coffee", 967)])
def test_feature_net_classifies_imagenet_photos(lite0, photo, label):
    """The FID/IS path itself (whole photo in [0, 1], resized to 224, normalized inside) names the right class."""
    import skimage.data
    image = torch.from_numpy(getattr(skimage.data, photo)()).permute(2, 0, 1)[None].float() / 255
    rows = lite0(image)
    assert rows.shape == (1, 1280 + 1000)
    probs = rows[0, 1280:].softmax(0)
    assert int(probs.argmax()) == label and probs.max() > 0.5


def test_fid_orders_real_halves_below_noise_and_noise_is_near_1():
    """64 vs 64 images at the CPU default size (128 px): FID is biased up at this n, the order stays clear."""
    from tasks.common.datasets import load_fashion_mnist
    from tasks.biggan.data import fashion_mnist_as_rgb32
    features = EfficientNetLite0Features(image_size=128)
    images = fashion_mnist_as_rgb32(load_fashion_mnist(None)[2][:128]).float() / 255
    real_a, real_b = features(images[:64]), features(images[64:])
    noise = features(torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    real_vs_real = fid_is(real_a, real_b, 1280, is_splits=2)
    real_vs_noise = fid_is(real_a, noise, 1280, is_splits=2)
    assert real_vs_noise["fid"] > 2 * real_vs_real["fid"], (real_vs_real, real_vs_noise)  # measured 996 vs 392
    assert real_vs_noise["is"] < 1.5 and real_vs_real["is"] > 5, (real_vs_real, real_vs_noise)  # 1.36 and 10.2


def test_missing_inception_weights_errors_clearly_without_network(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(FeatureNetError, match="no such file.*nothing is downloaded"):
        build_feature_net(inception_weights=str(tmp_path / "pt_inception.pth"))


def test_bad_settings_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"task.data.batch_size=0, task.data.steps_per_epoch=-1: must be positive"):
        GanData(batch_size=0, steps_per_epoch=-1)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["task=biggan", "task.metrics.test_fid_samples=0", f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"task.metrics.test_fid_samples=0: must be positive"):
        run(cfg)
    data = GanData(val_size=100_000, fid_samples=16)  # every training image held out
    with pytest.raises(DatasetError, match="training split is empty; lower task.data.val_size"):
        data.setup()


def tiny_run_cfg(tmp_path, *overrides: str):
    """A BigGAN run of tiny models and FID sample counts, 3 G steps unless overridden."""
    tiny = [
        "task=biggan", "norm=bn_relu", "logger=none", "trainer.enable_progress_bar=false", f"output_dir={tmp_path}",
        "task.epochs=1", "task.model.g_ch=4", "task.model.d_ch=4", "task.model.shared_dim=16",
        "task.data.batch_size=8", "task.data.steps_per_epoch=3", "task.data.limit_train=256", "task.data.val_size=64",
        "task.data.eval_batch_size=16", "task.metrics.fid_samples=16", "task.metrics.test_fid_samples=16",
        "task.metrics.image_size=32", "task.metrics.is_splits=2", "task.metrics.grid_columns=2",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=[*tiny, *overrides])


def test_run_writes_fid_and_is(tmp_path):
    cfg = tiny_run_cfg(tmp_path)
    run(cfg)
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["status"] == "completed" and record["monitor"] == "val/fid_ema"
    assert set(record["test"]) == {"test/fid_ema", "test/is_ema", "test/fid_raw", "test/is_raw"}
    assert all(np.isfinite(v) and v > 0 for v in record["test"].values())
    assert record["fid_untrained"] > 0 and record["g_steps"] == 3
    assert record["fid_ratio_ema"] == pytest.approx(record["test"]["test/fid_ema"] / record["fid_untrained"])
    assert "val/fid_ema" in record["best_val"]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "test-step000003-ema.png", "test-step000003-raw.png", "val-step000003-ema.png", "val-step000003-raw.png"]


@pytest.mark.parametrize("forced", [False, True], ids=["normal", "lr-raised-mid-run"])
def test_a_gan_run_records_a_forced_blow_up_and_nothing_on_a_normal_run(forced, tmp_path, monkeypatch):
    """60 G steps at the default rule: G's and D's learning rates raised 20-fold at G step 40 make a spike on the
    record (10-step mean hinge losses at 4-19x their level in trials); the same run without it has none (worst 0.8-1.1
    on seeds 0-2)."""
    if forced:
        step = BigGanModule.training_step

        def raise_lr_at_step_40(self, batch, batch_idx):
            if int(self.g_steps) == 40:
                for opt in self.optimizers():
                    for group in opt.param_groups:
                        group["lr"] *= 20
            return step(self, batch, batch_idx)

        monkeypatch.setattr(BigGanModule, "training_step", raise_lr_at_step_40)
    run(tiny_run_cfg(tmp_path, "task.data.steps_per_epoch=60"))
    saved = json.loads((tmp_path / "results.json").read_text())["divergence"]
    assert "loss_d (floor 2.0, mean of 10 steps), loss_g (floor 1.0, mean of 10 steps)" in saved["rule"]
    if forced:  # trainer steps: two per G step (D's optimizer and G's)
        assert saved["spikes"] >= 1 and min(e["step"] for e in saved["events"]) >= 80 and saved["worst"]["ratio"] > 2
    else:
        assert saved["spikes"] == 0 and saved["worst"]["ratio"] < 2

"""Dataset builders read the standard on-disk formats (files made here) and never download."""

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from certify_fx.data import (
    AUGMENTATIONS,
    CIFAR,
    DATASETS,
    FashionMNIST,
    SyntheticImages,
    TWO_MOONS_GAP,
    build_dataset,
    build_transform,
    read_idx,
    two_moons,
)
from certify_fx.data.fashion_mnist import DEFAULT_FASHION_MNIST_ROOT
from certify_fx.errors import DatasetNotFoundError


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


def _fake_fashion(root: Path, n_train=12, n_test=5, compress=True) -> None:
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), compress)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, (n,)), compress)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.idx", array, compress)
    path = tmp_path / "a.idx"
    if compress:
        path = path.rename(tmp_path / "a.idx.gz")
    assert torch.equal(read_idx(path), torch.from_numpy(array))


def test_idx_rejects_truncated_and_foreign_files(tmp_path):
    _write_idx(tmp_path / "a", np.zeros((4, 5), np.uint8), compress=False)
    (tmp_path / "b").write_bytes((tmp_path / "a").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "b")
    (tmp_path / "c").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "c")


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_from_idx_files(tmp_path, compress):
    _fake_fashion(tmp_path, compress=compress)
    train, test = FashionMNIST(tmp_path, "train"), FashionMNIST(tmp_path, "test")
    assert (len(train), len(test)) == (12, 5)
    x, y = train[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert 0 <= y < 10
    augmented = build_dataset("fashion_mnist", "train", tmp_path, augment=["crop", "flip"], crop_padding=2)
    assert augmented[0][0].shape == (1, 28, 28)


def test_missing_dataset_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="apt-get install -y dataset-fashion-mnist") as err:
        build_dataset("fashion_mnist", "train", tmp_path)
    assert str(tmp_path / "train-images-idx3-ubyte") in str(err.value)
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py"):
        build_dataset("cifar10", "test", tmp_path)
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "train")):
        build_dataset("imagenet", "train", tmp_path)


@pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST_ROOT).is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_the_debian_package():
    train, test = build_dataset("fashion_mnist", "train"), build_dataset("fashion_mnist", "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert torch.bincount(test.targets).tolist() == [1000] * 10


def _fake_cifar(root: Path, name: str) -> None:
    folder, files, key = {"cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels"),
                          "cifar100": ("cifar-100-python", ["train", "test"], "fine_labels")}[name]
    (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(1)
    for f in files:
        batch = {"data": rng.integers(0, 256, (3, 3072)).astype(np.uint8), key: [1, 2, 0]}
        (root / folder / f).write_bytes(pickle.dumps(batch))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_in_torchvision_format(tmp_path, name):
    _fake_cifar(tmp_path, name)
    train = build_dataset(name, "train", tmp_path, augment=["crop", "randaugment", "flip", "cutout"])
    test = build_dataset(name, "test", tmp_path)
    assert len(train) == (15 if name == "cifar10" else 3) and len(test) == 3
    assert train[0][0].shape == (3, 32, 32) and test[1][1] == 2
    raw = CIFAR(tmp_path, name, "test")
    assert torch.equal((test[0][0] * 255).round().to(torch.uint8), raw.images[0])


def test_cifar_pickles_cannot_run_code(tmp_path):
    _fake_cifar(tmp_path, "cifar10")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(DatasetNotFoundError, match="refusing to load builtins.print"):
        build_dataset("cifar10", "test", tmp_path)


def _png(path: Path, value: int, size: int = 70) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def test_image_folder_and_tiny_imagenet_val_annotations(tmp_path):
    for wnid, v in (("n01", 10), ("n02", 200)):
        _png(tmp_path / "train" / wnid / "images" / f"{wnid}_0.JPEG.png", v, 64)
    _png(tmp_path / "val" / "images" / "val_0.png", 200, 64)
    _png(tmp_path / "val" / "images" / "val_1.png", 10, 64)
    (tmp_path / "val" / "val_annotations.txt").write_text("val_0.png\tn02\t0\t0\t1\t1\nval_1.png\tn01\t0\t0\t1\t1\n")
    train = build_dataset("tinyimagenet", "train", tmp_path, augment=["crop", "flip", "cutout"])
    val = build_dataset("tinyimagenet", "test", tmp_path)
    assert len(train) == 2 and [val[i][1] for i in range(2)] == [1, 0]
    assert val[0][0].shape == (3, 64, 64) and val[0][0].mean().item() == pytest.approx(200 / 255, abs=1e-3)


def test_imagenet_folder_resizes_for_evaluation(tmp_path):
    for split in ("train", "val"):
        _png(tmp_path / split / "n01" / "a.png", 50, 300)
    x, y = build_dataset("imagenet", "test", tmp_path)[0]
    assert x.shape == (3, 224, 224) and y == 0
    x, _ = build_dataset("imagenet", "train", tmp_path, augment=["resized_crop", "flip"])[0]
    assert x.shape == (3, 224, 224)


def test_synthetic_is_deterministic_and_splits_differ():
    a, b = SyntheticImages(size=20, seed=3), SyntheticImages(size=20, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    test = SyntheticImages(size=20, seed=3, split="test")
    assert not torch.equal(a.images, test.images)
    assert a.images.min() >= 0 and a.images.max() <= 1
    assert len(build_dataset("synthetic", "test", synthetic={"size": 40, "test_size": 7})) == 7


def test_augmentations_by_name():
    x = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    for name in AUGMENTATIONS:
        assert build_transform(32, [name])(x).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="unknown augmentation 'mixup'"):
        build_transform(32, ["mixup"])
    assert set(DATASETS) >= {"fashion_mnist", "cifar10", "cifar100", "tinyimagenet", "imagenet", "synthetic"}


def test_two_moons_has_the_true_margin_of_the_cll_paper():
    pytest.importorskip("sklearn")
    x, y = two_moons(2000, noise_radius=0.1, seed=3).tensors
    assert x.shape == (2000, 2) and x.dtype == torch.float32 and y.bincount().tolist() == [1000, 1000]
    gap = torch.cdist(x[y == 0].double(), x[y == 1].double()).min().item()
    assert 2 * 0.15 <= gap < TWO_MOONS_GAP  # moved apart by at most the two noise radii, and moved
    clean = two_moons(2000, noise_radius=0.0, seed=3).tensors[0]
    moved = (x - clean).norm(dim=1)
    assert moved.max() <= 0.1 + 1e-6 and moved.mean() > 0.05  # uniform in the disk: mean 2/3 of the radius
    assert torch.equal(two_moons(2000, seed=3).tensors[0], x)


# -- extra (e.g. generated) training data --------------------------------------------------------


def test_extra_npz_in_any_layout_and_clear_errors(tmp_path):
    from certify_fx.data import extra_dataset
    from certify_fx.errors import CertifyFxError
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "hwc.npz", image=images, label=np.arange(6) % 4)
    np.savez(tmp_path / "chw.npz", images=images.transpose(0, 3, 1, 2) / 255.0, labels=np.arange(6) % 4)
    a, b = extra_dataset(tmp_path / "hwc.npz", (3, 8, 8), 4), extra_dataset(tmp_path / "chw.npz", (3, 8, 8), 4)
    assert len(a) == 6 and a[5][1] == 1 and a[2][0].shape == (3, 8, 8)
    assert torch.equal(a[2][0], b[2][0]) and torch.equal(a[2][0], torch.from_numpy(images[2]).permute(2, 0, 1) / 255)
    np.savez(tmp_path / "gray.npz", x=images[..., 0], y=np.zeros(6))
    assert extra_dataset(tmp_path / "gray.npz", (1, 8, 8), 4)[0][0].shape == (1, 8, 8)
    with pytest.raises(CertifyFxError, match=r"shape \(6, 8, 8, 3\).*\(N, 3, 16, 16\)"):
        extra_dataset(tmp_path / "hwc.npz", (3, 16, 16), 4)
    with pytest.raises(CertifyFxError, match=r"labels .* must be in \[0, 2\]"):
        extra_dataset(tmp_path / "hwc.npz", (3, 8, 8), 3)
    np.savez(tmp_path / "objects.npz", image=np.array([object()] * 6), label=np.zeros(6))
    with pytest.raises(CertifyFxError, match="cannot read"):  # pickled objects are refused, never loaded
        extra_dataset(tmp_path / "objects.npz", (3, 8, 8), 4)
    with pytest.raises(DatasetNotFoundError, match="nothing at"):
        extra_dataset(tmp_path / "missing.npz", (3, 8, 8), 4)


def test_extra_image_folder_by_class_index(tmp_path):
    from certify_fx.data import extra_dataset
    from certify_fx.errors import CertifyFxError
    for label in (0, 2):
        (tmp_path / "gen" / str(label)).mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 40 * (label + 1), dtype=np.uint8)).save(tmp_path / "gen" / str(label) / "a.png")
    data = extra_dataset(tmp_path / "gen", (1, 8, 8), 3)
    assert [data[i][1] for i in range(2)] == [0, 2]
    assert data[1][0].shape == (1, 8, 8) and data[1][0][0, 0, 0].item() == pytest.approx(120 / 255)
    (tmp_path / "gen" / "cat").mkdir()
    with pytest.raises(CertifyFxError, match="class indices"):
        extra_dataset(tmp_path / "gen", (1, 8, 8), 3)


def test_mixed_sampler_ratio_determinism_resumption_and_shards():
    from certify_fx.train.sampling import MixedSampler
    make = lambda **kw: MixedSampler(100, 30, 8, 6, shuffle=True, seed=3, **kw)  # noqa: E731
    sampler = make(num_replicas=1, rank=0)
    sampler.set_epoch(1)
    stream = [i for _, i in sampler]
    assert len(stream) == len(sampler) == (100 // 2) * 8
    batches = [stream[k:k + 8] for k in range(0, len(stream), 8)]
    assert all(sum(i >= 100 for i in b) == 6 and all(i >= 100 for i in b[2:]) for b in batches)
    assert sorted(i for b in batches for i in b[:2]) == list(range(100))  # every real image once per epoch
    again = make(num_replicas=1, rank=0)
    again.set_epoch(1)
    again.start_at(5 * 8)
    assert [i for _, i in again] == stream[5 * 8:]  # resumes mid-epoch on the same batches
    sampler.set_epoch(2)
    assert [i for _, i in sampler] != stream  # another epoch, another order
    shards = []
    for rank in (0, 1):
        s = make(num_replicas=2, rank=rank)
        s.set_epoch(1)
        shards.append([i for _, i in s])
    real = [set(i for i in shard if i < 100) for shard in shards]
    assert not real[0] & real[1] and len(real[0] | real[1]) == 100


def test_a_run_mixes_the_extra_images_into_every_batch(tmp_path):
    from certify_fx.train import Trainer, load_recipe
    from certify_fx.errors import RecipeError
    np.savez(tmp_path / "gen.npz", image=np.full((40, 16, 16), 128, dtype=np.uint8), label=np.full(40, 3))
    root = Path(__file__).resolve().parents[1]
    overrides = [f"output_dir={tmp_path / 'run'}", f"data.extra.path={tmp_path / 'gen.npz'}", "data.extra.ratio=0.25",
                 "epochs=1"]
    trainer = Trainer(load_recipe(root / "recipes" / "smoke.yaml", overrides))
    assert trainer.steps_per_epoch == 512 // 48  # the real images decide the epoch: 48 real + 16 extra per batch
    trainer.sampler.set_epoch(0)
    x, y = next(iter(trainer.loader))
    assert (y[48:] == 3).all() and torch.allclose(x[48:], torch.full_like(x[48:], 128 / 255))
    trainer.fit()
    with pytest.raises(RecipeError, match="data.extra.ratio"):
        load_recipe(root / "recipes" / "smoke.yaml", overrides[:2] + ["data.extra.ratio=1.5"])
    with pytest.raises(RecipeError, match="unknown recipe key 'data.extra.rate'.*allowed: path, ratio"):
        load_recipe(root / "recipes" / "smoke.yaml", ["data.extra.rate=0.5"])

"""Sampler and loader on real shards made by ``python -m data_engine.shard --src folder``."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from data_engine.loading.epoch_plan import (
    EpochPlan,
    labels_from_starts,
    same_identity_pair_rate,
    uniform_pair_rate,
)
from data_engine.loading.image_source import DataError
from data_engine.loading.loader import build_loader
from data_engine.loading.reader import ShardReader
from synthetic.faces import render_face
from tests.helpers import REPO, trend_growth
from tests.shard_helpers import FACE_COUNTS, face_tree, shard_folder

K = 2
PIXEL_TOLERANCE = 2  # max |dali - torch| per pixel; measured 0 (both use libjpeg-turbo)


def _collect(loader) -> dict[str, torch.Tensor]:
    """All batches of a loader, concatenated (pixels as NCHW-contiguous copies)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in loader:
        for name in ("identity", "classes", "labels", "image_ids", "class_image_ids"):
            parts.setdefault(name, []).append(getattr(batch, name).contiguous().clone())
    return {name: torch.cat(values) for name, values in parts.items()}


def test_epoch_plan_covers_each_image_once_with_valid_class_images(face_shards: Path) -> None:
    reader = ShardReader(face_shards)
    starts = reader.identity_start
    assert np.diff(starts).tolist() == FACE_COUNTS
    labels = labels_from_starts(starts)
    plan = EpochPlan(starts, 7, K, seed=5, drop_last=False)
    steps = list(plan.steps())
    ids = np.concatenate([s.image_ids for s in steps])
    assert sorted(ids.tolist()) == list(range(len(labels)))  # every image exactly once
    assert all(len(s.image_ids) == 7 for s in steps[:-1]) and len(steps[-1].image_ids) == 4
    for step in steps:
        assert step.class_image_ids.shape == (len(step.image_ids), K)
        assert (labels[step.class_image_ids] == step.labels[:, None]).all()
        for image_id, label, classes in zip(step.image_ids, step.labels, step.class_image_ids):
            others = set(range(starts[label], starts[label + 1])) - {image_id}
            if not others:  # alone: the image is its own class image
                assert set(classes) == {image_id}
            elif len(others) >= K:  # enough others: distinct, never the image itself
                assert len(set(classes)) == K and set(classes) <= others
            else:  # fewer: every other image first, then repeats
                assert set(classes) == others
    assert len(EpochPlan(starts, 7, K, seed=5)) == len(labels) // 7  # drop_last


def test_plan_is_a_function_of_seed_and_epoch() -> None:
    starts = np.concatenate([[0], np.cumsum(FACE_COUNTS)])

    def first(seed: int, epoch: int):
        step = EpochPlan(starts, 16, K, seed=seed, epoch=epoch).step(3)
        return step.image_ids, step.class_image_ids, step.flips

    same = zip(first(1, 0), first(1, 0))
    assert all(np.array_equal(a, b) for a, b in same)
    assert not np.array_equal(first(1, 0)[0], first(1, 1)[0])
    assert not np.array_equal(first(1, 0)[0], first(2, 0)[0])
    flips = EpochPlan(starts, 200, K, seed=1).step(0).flips
    assert 0.4 < flips.mean() < 0.6


def test_same_identity_pair_rate_matches_uniform_permutation() -> None:
    rng = np.random.default_rng(0)
    starts = np.concatenate([[0], np.cumsum(rng.integers(1, 60, size=2000))])
    plan = EpochPlan(starts, 384, K, seed=0)
    measured = np.mean([same_identity_pair_rate(plan.step(s).labels) for s in range(len(plan))])
    expected = uniform_pair_rate(starts)
    assert abs(measured / expected - 1) < 0.05, (measured, expected)


def test_torch_loader_batches_and_resume(face_shards: Path) -> None:
    def loader(start_step: int = 0):
        return build_loader(face_shards, 6, K, seed=3, epoch=1, start_step=start_step,
                            backend="torch", device="cpu", workers=2)

    full = _collect(loader())
    assert len(loader()) == 200 // 6
    assert full["identity"].shape == (33 * 6, 3, 112, 112)
    assert full["classes"].shape == (33 * 6, K, 3, 112, 112)
    assert full["labels"].dtype == torch.int64
    plan = EpochPlan(ShardReader(face_shards).identity_start, 6, K, seed=3, epoch=1)
    assert full["image_ids"].tolist() == np.concatenate(
        [s.image_ids for s in plan.steps()]).tolist()
    tail = _collect(loader(start_step=20))
    for name, values in tail.items():
        assert torch.equal(values, full[name][20 * 6:]), name
    # Pixels: the decoded JPEG, mirrored exactly where the plan says.
    reader = ShardReader(face_shards)
    step = plan.step(0)
    for row in range(6):
        from simplejpeg import decode_jpeg

        image = decode_jpeg(reader.read_image(int(step.image_ids[row])), "RGB")
        if step.flips[row, 0]:
            image = image[:, ::-1]
        assert torch.equal(full["identity"][row], torch.from_numpy(image.copy()).permute(2, 0, 1))


def test_k0_loads_identity_images_only(face_shards: Path) -> None:
    batch = next(iter(build_loader(face_shards, 8, 0, seed=0, backend="torch", device="cpu",
                                   workers=1)))
    assert batch.identity.shape == (8, 3, 112, 112) and batch.classes.shape == (8, 0, 3, 112, 112)


def test_hoarded_batches_stay_intact(face_shards: Path) -> None:
    """Batches the caller keeps are not overwritten when the worker ring turns."""
    kept = list(build_loader(face_shards, 4, K, seed=0, backend="torch", device="cpu", workers=2))
    again = _collect(build_loader(face_shards, 4, K, seed=0, backend="torch", device="cpu",
                                  workers=0))
    assert torch.equal(torch.cat([b.identity for b in kept]), again["identity"])
    assert torch.equal(torch.cat([b.classes for b in kept]), again["classes"])


def test_dali_cpu_and_torch_agree(face_shards: Path) -> None:
    pytest.importorskip("nvidia.dali")
    kwargs = dict(seed=9, device="cpu", workers=2, drop_last=False)
    dali = _collect(build_loader(face_shards, 16, K, backend="dali", **kwargs))
    ours = _collect(build_loader(face_shards, 16, K, backend="torch", **kwargs))
    for name in ("labels", "image_ids", "class_image_ids"):
        assert torch.equal(dali[name], ours[name]), name
    for name in ("identity", "classes"):
        diff = (dali[name].int() - ours[name].int()).abs().max().item()
        assert diff <= PIXEL_TOLERANCE, (name, diff)
    tail = _collect(build_loader(face_shards, 16, K, backend="dali", start_step=5, **kwargs))
    assert torch.equal(tail["identity"], dali["identity"][5 * 16:])


def test_dali_ignores_exif_orientation_like_the_cpu_decode(tmp_path: Path) -> None:
    """A JPEG tagged "rotate 90°" (EXIF orientation 6) gives the same pixels on both backends:
    DALI's decoder rotates by EXIF unless told not to, simplejpeg never does."""
    pytest.importorskip("nvidia.dali")
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    for identity in range(2):
        folder = tmp_path / "tree" / f"person_{identity}"
        folder.mkdir(parents=True)
        for index in range(2):
            face = Image.fromarray(render_face(identity, index).image)
            face.save(folder / f"{index}.jpg", quality=95, exif=exif)
    shards = shard_folder(tmp_path / "tree", tmp_path / "shards")
    kwargs = dict(seed=0, device="cpu", workers=1, drop_last=False)
    dali = _collect(build_loader(shards, 4, 1, backend="dali", **kwargs))
    ours = _collect(build_loader(shards, 4, 1, backend="torch", **kwargs))
    for name in ("identity", "classes"):
        diff = (dali[name].int() - ours[name].int()).abs().max().item()
        assert diff <= PIXEL_TOLERANCE, (name, diff)


def test_dali_older_than_the_pyproject_bound_is_not_used() -> None:
    """exec_dynamic needs DALI >= 1.44 (NGC containers ship older ones, where the first epoch
    died with a TypeError): pyproject.toml requires it, and an older DALI found installed is
    refused by name (auto falls back to the torch backend)."""
    from data_engine.loading.loader import MIN_DALI, dali_version_problem

    versions = ("1.30.0", "1.43.1", "1.44.0", "1.44.0.dev20240801", "2.4.0")
    assert [dali_version_problem(v) is None for v in versions] == [False, False, True, True,
                                                                   True]
    assert "DALI 1.43.1 is older than 1.44" in dali_version_problem("1.43.1")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (dali,) = [d for d in project["dependencies"] if d.startswith("nvidia-dali")]
    assert dali.split(";")[0].endswith(f">={MIN_DALI[0]}.{MIN_DALI[1]}"), dali


def test_dali_decoder_options() -> None:
    """EXIF orientation off on both decoders; the mixed decoder's threads not pinned to
    cores (every torchrun rank would pin its threads to the same first cores)."""
    pytest.importorskip("nvidia.dali")
    from data_engine.loading.dali_backend import decoder_options

    gpu, cpu = decoder_options(True, 112), decoder_options(False, 112)
    assert (gpu["device"], gpu["affine"], gpu["adjust_orientation"]) == ("mixed", False, False)
    assert (cpu["device"], cpu["adjust_orientation"]) == ("cpu", False)


def test_default_workers_are_a_share_of_the_cores_capped_per_gpu(
        face_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --workers each process decodes with its share of the node's cores, at most
    12: on a 224-thread GPU host, 12 torch workers (16 pinned batch buffers) or 12 DALI
    threads per rank instead of 224. The core count stands in for such a host."""
    from data_engine.loading import loader as loader_module

    def workers(cores: int, local_ranks: int) -> int:
        monkeypatch.setattr(loader_module, "usable_cores", lambda: cores)
        return loader_module.default_workers(local_ranks)

    assert [workers(224, 1), workers(224, 8), workers(48, 8), workers(2, 4)] == [12, 12, 6, 1]
    monkeypatch.setattr(loader_module, "usable_cores", lambda: 224)
    built = build_loader(face_shards, 4, K, seed=0, backend="torch", device="cpu", local_ranks=8)
    assert built.workers == 12


def test_backend_choice() -> None:
    from common.errors import UserError
    from data_engine.loading.loader import resolve_backend

    assert resolve_backend("auto", "cpu") == "torch"  # DALI's CPU decode costs more per image
    assert resolve_backend("torch", "cuda") == "torch"
    with pytest.raises(UserError, match="backend"):
        resolve_backend("opencv", "cpu")


def _damage(shards: Path, tmp_path: Path, how: str) -> tuple[Path, int]:
    """A copy of ``shards`` with one image overwritten or cut off; returns (dir, image id)."""
    copy = tmp_path / "damaged"
    shutil.copytree(shards, copy)
    reader = ShardReader(copy)
    if how == "overwrite":
        image_id = 57
        path = reader.shard_paths[int(reader.image_shard[image_id])]
        with open(path, "r+b") as handle:
            handle.seek(int(reader.image_offset[image_id]))
            handle.write(b"\x00" * 64)
    else:  # truncate the last shard inside its last image
        image_id = reader.num_images - 1
        path = reader.shard_paths[int(reader.image_shard[image_id])]
        with open(path, "r+b") as handle:
            handle.truncate(int(reader.image_offset[image_id]) + 100)
    return copy, image_id


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("how", ["overwrite", "truncate"])
def test_corrupt_data_raises_or_is_skipped(face_shards: Path, tmp_path: Path, backend: str,
                                           how: str) -> None:
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    damaged, bad_id = _damage(face_shards, tmp_path, how)
    reader = ShardReader(damaged)
    kwargs = dict(seed=1, backend=backend, device="cpu", workers=2, drop_last=False)
    with pytest.raises(DataError) as error:
        _collect(build_loader(damaged, 16, K, **kwargs))
    shard = reader.shard_paths[int(reader.image_shard[bad_id])]
    assert f"{shard} at byte offset {int(reader.image_offset[bad_id])}" in str(error.value)

    loader = build_loader(damaged, 16, K, skip_bad=True, **kwargs)
    batches = _collect(loader)
    clean = _collect(build_loader(face_shards, 16, K, **kwargs))
    uses = int((batches["image_ids"] == bad_id).sum() + (batches["class_image_ids"] == bad_id)
               .sum())
    assert loader.skipped == uses >= 1
    assert torch.equal(batches["labels"], clean["labels"])
    good = batches["image_ids"] != bad_id
    assert torch.equal(batches["identity"][good], clean["identity"][good])


def test_dali_decoder_failure_is_located(face_shards: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Data that passes the cheap checks but fails in DALI's decoder is named, or skipped;
    after each failed step a new pipeline decodes the next steps (an operator error can leave
    a pipeline invalid on the GPU), and they are the right images."""
    pytest.importorskip("nvidia.dali")
    from data_engine.loading.dali_backend import DaliBatches
    from data_engine.loading.image_source import ImageSource

    face_tree(tmp_path / "tree", FACE_COUNTS[:6], cut=(5, 2))
    cut = shard_folder(tmp_path / "tree", tmp_path / "shards", "--verify", "none")
    bad_id = ShardReader(cut).identity_images(5)[2]
    monkeypatch.setattr(ImageSource, "problem", lambda self, data, expected: None)
    kwargs = dict(seed=0, backend="dali", device="cpu", workers=1, drop_last=False)
    with pytest.raises(DataError, match="JPEG does not decode"):
        _collect(build_loader(cut, 5, K, **kwargs))

    built = []  # one entry per pipeline built (a spy on the real method)
    real_pipeline = DaliBatches._pipeline

    def counted(self, plan, feeder):
        built.append(feeder)
        return real_pipeline(self, plan, feeder)

    monkeypatch.setattr(DaliBatches, "_pipeline", counted)
    loader = build_loader(cut, 5, K, skip_bad=True, **kwargs)
    batches = _collect(loader)
    assert len(batches["labels"]) == sum(FACE_COUNTS[:6]) and loader.skipped >= 1
    uses = (batches["image_ids"] == bad_id) | (batches["class_image_ids"] == bad_id).any(1)
    failed_steps = set((uses.nonzero().flatten() // 5).tolist())
    followed = {step for step in failed_steps if step + 1 < len(loader)}  # not the last step
    assert len(built) == 1 + len(followed) >= 2, (len(built), failed_steps)
    good = _collect(build_loader(cut, 5, K, **{**kwargs, "backend": "torch"}, skip_bad=True))
    assert torch.equal(batches["identity"][~uses], good["identity"][~uses])
    assert torch.equal(batches["classes"][~uses], good["classes"][~uses])


def test_dead_worker_is_an_error_not_a_hang(face_shards: Path) -> None:
    before = {child.pid for child in psutil.Process().children()}
    batches = iter(build_loader(face_shards, 4, K, seed=0, backend="torch", device="cpu",
                                workers=2))
    next(batches)
    for child in psutil.Process().children():
        if child.pid not in before:
            child.kill()
    with pytest.raises(RuntimeError, match="decode worker exited"):
        for _ in batches:
            pass


def test_memory_stays_bounded(face_shards: Path) -> None:
    process = psutil.Process()

    def rss() -> int:
        return process.memory_info().rss + sum(
            child.memory_info().rss for child in process.children(recursive=True))

    loader = build_loader(face_shards, 1, K, seed=0, backend="torch", device="cpu", workers=2)
    seen = {}
    for step, _ in enumerate(loader, 1):
        if step % 20 == 0:  # ten samples after the warm-up: one outlier cannot decide
            seen[step] = rss()
    assert step == 200
    assert trend_growth(seen) < 16 * 2**20, seen

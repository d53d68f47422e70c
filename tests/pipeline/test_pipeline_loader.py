"""The loader end to end on shards made by synth -> convert_rec (one image per class: labels name samples)."""

from __future__ import annotations

import shutil

import pytest
import torch

from lresnet.core.errors import InputError
from lresnet.pipeline import DevicePrefetcher, PipelineConfig, World, build_train_loader

SAMPLES = 240  # tests/pipeline/conftest.py: one image for each of 240 identities


def _labels(loader):
    return [lab for _, labels in loader for lab in labels.tolist()]


SEED = 5


def _config(**kw):
    base = dict(batch_size=8, workers=0, shuffle_buffer=16, pin_memory=False)
    base.update(kw)
    return PipelineConfig(**base)


def _loader(source, config, world=None, **kw):
    return build_train_loader(source, config, world, seed=SEED, **kw)


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_are_disjoint_equal_and_nearly_complete(synth_shards, workers):
    world_size = 3
    seen = []
    lengths = set()
    for rank in range(world_size):
        loader = _loader(synth_shards, _config(workers=workers), World(rank, world_size))
        loader.set_epoch(1)
        labels = _labels(loader)
        assert len(labels) == len(loader) * 8
        lengths.add(len(loader))
        seen += labels
    assert lengths == {SAMPLES // world_size // 8}  # 10 batches on every rank
    assert len(set(seen)) == len(seen)  # no sample twice in the epoch
    assert SAMPLES - len(seen) < world_size * 8
    assert set(seen) <= set(range(SAMPLES))


def test_batches_held_by_the_caller_stay_intact(synth_shards):
    # workers write into a small ring of shared buffers; what the caller keeps must not change
    loader = _loader(synth_shards, _config(workers=2, prefetch_factor=1), World())
    held = list(loader)
    labels = [lab for _, batch_labels in held for lab in batch_labels.tolist()]
    assert len(held) == len(loader) > 2 * (1 + 2)
    assert len(set(labels)) == len(labels)
    assert len({images.data_ptr() for images, _ in held}) == len(held)


def test_three_ranks_seven_uneven_shards_end_to_end(uneven_shards):
    seen, lengths = [], set()
    for rank in range(3):
        loader = _loader(uneven_shards, _config(workers=2 if rank == 1 else 0), World(rank, 3))
        assert loader.num_samples == SAMPLES and loader.num_classes == SAMPLES  # counted from the tar headers
        labels = _labels(loader)
        lengths.add((len(loader), len(labels)))
        seen += labels
    assert lengths == {(10, 80)}
    assert len(set(seen)) == len(seen) == 240  # 240 // 3 = 80 = 10 batches of 8: nothing left out


def test_worker_count_does_not_change_what_a_rank_reads(synth_shards):
    world = World(1, 3)
    in_process = _loader(synth_shards, _config(workers=0), world)
    two = _loader(synth_shards, _config(workers=2), world)
    assert sorted(_labels(in_process)) == sorted(_labels(two))


def test_each_epoch_a_new_order_and_the_same_epoch_the_same(synth_shards):
    loader = _loader(synth_shards, _config(), World(0, 2))
    epochs = []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        epochs.append(_labels(loader))
    assert epochs[0] != epochs[1]
    assert set(epochs[0]) != set(epochs[1])  # rank 0 reads other samples too, not only in another order
    assert epochs[0] == epochs[2]


@pytest.mark.parametrize("workers,stop", [(0, 5), (2, 5), (2, 4)])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(synth_shards, workers, stop):
    config = _config(workers=workers)
    world = World(2, 3)
    full = _loader(synth_shards, config, world)
    full.set_epoch(3)
    expected = [(images.clone(), labels.clone()) for images, labels in full]

    first = _loader(synth_shards, config, world)
    first.set_epoch(3)
    it = iter(first)
    for _ in range(stop):
        next(it)
    state = first.state_dict()
    assert state["position"] == stop and state["epoch"] == 3

    resumed = _loader(synth_shards, config, world)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # the trainer's usual call keeps the resumed position
    rest = list(resumed)
    assert len(rest) == len(expected) - stop
    for (images, labels), (want_images, want_labels) in zip(rest, expected[stop:]):
        assert torch.equal(labels, want_labels)
        assert torch.equal(images, want_images)  # same samples, same flips
    assert resumed.state_dict()["position"] == len(resumed)


def test_state_from_another_setup_is_refused(synth_shards):
    loader = _loader(synth_shards, _config(), World(0, 2))
    state = loader.state_dict()
    other = _loader(synth_shards, _config(batch_size=4), World(0, 2))
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)


def test_prefetcher_state_does_not_count_the_batch_held_ahead(synth_shards):
    loader = _loader(synth_shards, _config(), World())
    batches = DevicePrefetcher(loader, "cpu")
    it = iter(batches)
    images, labels = next(it)
    next(it)
    assert images.shape == (8, 3, 112, 112) and images.dtype == torch.float32
    assert loader.state_dict()["position"] == 3  # two handed out, one prepared ahead
    assert batches.state_dict()["position"] == 2


def test_source_forms_agree(synth_shards):
    train = synth_shards / "train"
    tars = sorted(str(p) for p in train.glob("train-*.tar"))
    forms = [synth_shards, train, train / "manifest.json", str(train / "train-{000000..000006}.tar"), tars,
             [f"pipe:cat {t}" for t in tars[:3]] + tars[3:], [f"pipe:cat {t}" for t in tars]]
    reference = _labels(_loader(synth_shards, _config(), World()))
    for form in forms:
        manifest = train / "manifest.json" if isinstance(form, list) and form[0].startswith("pipe:") else None
        loader = _loader(form, _config(), World(), manifest=manifest)
        assert loader.num_samples == SAMPLES and loader.num_classes == SAMPLES
        assert _labels(loader) == reference


def test_list_without_manifest_is_counted(tmp_path, synth_shards):
    for i in (0, 1):
        shutil.copy(synth_shards / "train" / f"train-00000{i}.tar", tmp_path)
    loader = _loader(sorted(str(p) for p in tmp_path.glob("*.tar")), _config(), World())
    assert loader.num_samples == 74 and len(loader) == 9


@pytest.mark.parametrize("below", ["", "train"])
def test_unfinished_conversion_is_refused(tmp_path, synth_shards, below):
    out = tmp_path / "out"
    shutil.copytree(synth_shards, out)
    (out / "train" / "manifest.json").unlink()
    (out / "train" / "convert-state.json").write_text("{}")
    folder = out / below if below else out
    with pytest.raises(InputError, match="conversion not finished: no manifest.json") as err:
        _loader(folder, _config(), World())
    assert str(out / "train") in str(err.value) and "rerun convert-rec" in str(err.value)


def test_failing_pipe_command_is_an_input_error(synth_shards):
    train = synth_shards / "train"
    urls = [f"pipe:cat /nonexistent/train-00000{i}.tar" for i in range(7)]
    loader = _loader(urls, _config(), World(), manifest=train / "manifest.json")
    with pytest.raises(InputError, match="pipe:cat /nonexistent/train-"):
        _labels(loader)


def test_remote_shards_need_a_manifest():
    with pytest.raises(InputError, match="manifest"):
        _loader(["pipe:cat /nonexistent/a.tar"], _config(), World())


def test_corrupt_jpeg_is_counted_and_skipped(damaged_shards):
    data, key = damaged_shards("corrupt")
    loader = _loader(data, _config(), World())
    labels = _labels(loader)
    assert loader.stats.corrupt_samples == 1
    fault = loader.stats.faults[0]
    assert fault.shard.endswith("train-000002.tar") and fault.key == key
    assert len(labels) == len(loader) * 8  # batch shape kept
    assert labels.count(-1) <= 1  # -1 unless the sample fell in the part left out this epoch
    good = [lab for lab in labels if lab >= 0]
    assert len(set(good)) == len(good)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_jpeg_strict_names_shard_and_key(damaged_shards, workers):
    data, key = damaged_shards("corrupt")
    loader = _loader(data, _config(strict=True, shuffle_buffer=0, workers=workers), World())
    for epoch in range(4):  # within a few epochs the sample is not among those left out
        loader.set_epoch(epoch)
        try:
            _labels(loader)
        except InputError as err:
            assert "train-000002.tar" in str(err) and key in str(err)
            return
    pytest.fail("strict mode never raised on the corrupt sample")


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_shard_is_reported_and_batches_keep_coming(damaged_shards, workers):
    data, _ = damaged_shards("truncated")
    loader = _loader(data, _config(workers=workers), World())
    batches = list(loader)
    assert len(batches) == len(loader)
    assert loader.stats.truncated_shards >= 1
    assert any(f.shard.endswith("train-000002.tar") and f.kind == "truncated" for f in loader.stats.faults)
    labels = [lab for _, labels in batches for lab in labels.tolist()]
    assert labels.count(-1) > 0
    good = [lab for lab in labels if lab >= 0]
    assert len(set(good)) == len(good)


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_shard_strict_raises(damaged_shards, workers):
    data, _ = damaged_shards("truncated")
    loader = _loader(data, _config(strict=True, workers=workers), World())
    with pytest.raises(InputError, match="train-000002.tar: offset"):
        _labels(loader)


def test_too_little_data_for_one_batch_is_an_input_error(synth_shards):
    with pytest.raises(InputError, match="no batch"):
        _loader(synth_shards, _config(batch_size=128), World(0, 2))


@pytest.mark.cuda
@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_pinned_for_cuda(synth_shards, workers):
    loader = _loader(synth_shards, _config(workers=workers, pin_memory=True), World())
    images, labels = next(iter(loader))
    assert images.is_pinned() and labels.is_pinned()
    x, y = next(iter(DevicePrefetcher(loader, "cuda", dtype=torch.bfloat16)))
    assert x.is_cuda and x.shape == (8, 3, 112, 112) and y.is_cuda


@pytest.mark.parametrize("workers", [0, 2])
def test_exactly_one_ignored_label_per_corrupt_sample(corrupted_copy, workers):
    data, bad = corrupted_copy(3)
    loader = _loader(data, _config(workers=workers), World())  # 240 = 30 x 8: every sample is used
    labels = _labels(loader)
    assert loader.stats.corrupt_samples == 3 == labels.count(-1)
    assert sorted(f.key for f in loader.stats.faults) == sorted(bad)
    assert sorted(lab for lab in labels if lab >= 0) == sorted(set(range(SAMPLES)) - set(bad.values()))


def test_bad_input_warnings_are_rate_limited(corrupted_copy, caplog, monkeypatch):
    from lresnet.pipeline import loader as loader_module

    monkeypatch.setattr(loader_module, "WARN_EVERY", 5)
    data, _ = corrupted_copy(loader_module.WARN_EACH + 7)  # 17: 10 one by one, a summary at 15, one at the end
    loader = _loader(data, _config(), World())
    with caplog.at_level("WARNING", logger="lresnet.pipeline.loader"):
        _labels(loader)
    lines = [r.getMessage() for r in caplog.records]
    assert loader.stats.corrupt_samples == 17
    assert sum(line.startswith("skipped bad input: /") for line in lines) == 10  # one by one, shard first
    assert sum("further ones are summarised every 5" in line for line in lines) == 1
    summaries = [line for line in lines if line.startswith("skipped bad input: ") and "so far" in line]
    assert [s.split(": ", 1)[1].split(" so far")[0] for s in summaries] == ["15", "17"]
    assert "5 since the last report" in summaries[0] and "2 since the last report" in summaries[1]
    assert len(lines) == 13


@pytest.mark.parametrize("workers", [0, 2])
def test_blur_augments_and_drops_nothing(synth_shards, workers):
    plain = _loader(synth_shards, _config(workers=workers, flip=False), World())
    blurred = _loader(synth_shards, _config(workers=workers, flip=False, augment=("blur",)), World())
    a, b = list(plain), list(blurred)
    assert blurred.stats.corrupt_samples == 0 and plain.stats.corrupt_samples == 0
    assert [labels.tolist() for _, labels in a] == [labels.tolist() for _, labels in b]  # same samples, all kept
    assert all(lab >= 0 for _, labels in b for lab in labels.tolist())
    changed = sum(not torch.equal(x[i], y[i]) for (x, _), (y, _) in zip(a, b) for i in range(len(x)))
    assert 0.1 * SAMPLES < changed < 0.3 * SAMPLES  # blur p = 0.2


@pytest.mark.parametrize("workers", [0, 2])
def test_a_decoder_bug_surfaces_and_is_not_counted_as_corrupt(synth_shards, workers, monkeypatch):
    from lresnet.pipeline.decoders import SimpleJpegDecoder

    def broken(self, data, out, mirror=False):
        raise TypeError("injected bug in the decoder")

    monkeypatch.setattr(SimpleJpegDecoder, "into", broken)
    loader = _loader(synth_shards, _config(workers=workers), World())
    with pytest.raises(TypeError, match="injected bug in the decoder"):
        _labels(loader)
    assert loader.stats.corrupt_samples == 0 and loader.stats.faults == []


def test_a_killed_worker_is_one_line_naming_it_and_how_to_resume(synth_shards):
    import multiprocessing
    import os
    import signal

    loader = _loader(synth_shards, _config(workers=2, prefetch_factor=1), World())
    it = iter(loader)
    next(it)
    victim = multiprocessing.active_children()[0].pid
    with pytest.raises(InputError) as err:
        os.kill(victim, signal.SIGKILL)
        for _ in it:  # torch notices at its SIGCHLD handler or at the next batch, whichever comes first
            pass
    message = str(err.value)
    assert f"DataLoader worker (pid {victim}) was killed by SIGKILL" in message
    assert "rerun the same command to resume from the last checkpoint" in message and "\n" not in message


def test_worker_death_reads_torchs_message_when_the_process_is_gone():
    from lresnet.pipeline.workers import worker_death

    err = worker_death(RuntimeError("DataLoader worker (pid(s) 41, 42) exited unexpectedly"))
    assert str(err).startswith("a DataLoader worker (pid 41, 42) exited unexpectedly; rerun the same command")
    err = worker_death(RuntimeError("DataLoader worker (pid 7) is killed by signal: Bus error. It is possible..."))
    assert "(pid 7) was killed by SIGBUS (out of shared memory" in str(err)
    assert worker_death(RuntimeError("CUDA error: out of memory")) is None
    assert worker_death(EOFError()) is None


def test_a_hanging_pipe_command_times_out_naming_the_shard(synth_shards):
    train = synth_shards / "train"
    urls = [f"pipe:sleep 60; cat {train}/train-00000{i}.tar" for i in range(7)]
    loader = _loader(urls, _config(pipe_timeout=0.3), World(), manifest=train / "manifest.json")
    with pytest.raises(InputError) as err:
        _labels(loader)
    assert str(err.value).startswith("pipe:sleep 60; cat ")
    assert "sent no data for 0.3 s (data.pipe_timeout)" in str(err.value)


def test_a_pipe_command_that_stalls_midway_times_out_too(synth_shards, tmp_path):
    train = synth_shards / "train"
    urls = [f"pipe:cat {train}/train-00000{i}.tar" for i in range(7)]
    urls[3] = f"pipe:sh -c 'head -c 20000 \"$0\"; sleep 60' {train}/train-000003.tar"  # 4 samples, then silence
    loader = _loader(urls, _config(pipe_timeout=0.3, shuffle_buffer=0), World(), manifest=train / "manifest.json")
    with pytest.raises(InputError, match="sleep 60' .*train-000003.tar: the pipe command sent no data for 0.3 s"):
        for epoch in range(3):  # shard 3 is read within the epoch's first batches or a later epoch's
            loader.set_epoch(epoch)
            _labels(loader)


def test_seed_changes_the_label_stream_and_the_same_seed_repeats_it(synth_shards):
    config = _config(shuffle_buffer=0)  # without the shuffle buffer the order is the plan's alone
    streams = {seed: _labels(build_train_loader(synth_shards, config, World(0, 2), seed=seed)) for seed in (1, 2)}
    again = _labels(build_train_loader(synth_shards, config, World(0, 2), seed=1))
    assert streams[1] == again
    assert streams[1] != streams[2]
    assert set(streams[1]) != set(streams[2])  # another shard order and offset: other samples on rank 0


def test_turbojpeg_without_its_library_is_refused_when_the_loader_is_built(synth_shards):
    from lresnet.pipeline.decoders import turbojpeg_available

    if turbojpeg_available():
        pytest.skip("PyTurboJPEG with its library is installed here")
    with pytest.raises(InputError, match=r"^--decoder: turbojpeg needs PyTurboJPEG"):
        _loader(synth_shards, _config(decoder="turbojpeg", workers=2), World())

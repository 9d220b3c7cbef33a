"""The DataModules' shared machinery: class splits, batches per split, per-split seeds, and
the errors that name what to fix."""
import json
import re

import lightning as L
import pytest
import torch

from fewshot_lightning.algorithms import ProtoNet
from fewshot_lightning.data import EpisodicDataModule, LabelledData, LabelledDataModule, split_by_class
from fewshot_lightning.data import episodes
from fewshot_lightning.models import MLP
from test_episodes import CLASSES, PER_CLASS, as_pinned, identity_data


def test_class_split_is_disjoint_and_sized():
    data, labels = identity_data()
    splits = split_by_class(data, labels, (0.6, 0.2, 0.2), seed=0)
    classes = {name: set(part.labels.unique().tolist()) for name, part in splits.items()}
    assert [len(classes[s]) for s in ("train", "val", "test")] == [18, 6, 6]
    assert not (classes["train"] & classes["val"]) and not (classes["train"] & classes["test"])
    assert not (classes["val"] & classes["test"])
    assert sum(len(part.labels) for part in splits.values()) == CLASSES * PER_CLASS


def test_datamodule_batches_and_eval_episode_shape():
    data, labels = identity_data()
    dm = EpisodicDataModule(
        data, labels, ways=8, shots=1, queries=2, test_ways=5, test_shots=3, meta_batch_size=4,
        train_tasks=12, val_tasks=6, test_tasks=6, num_workers=0,
    )
    dm.setup("fit")
    train = next(iter(dm.train_dataloader()))
    val = list(dm.val_dataloader())
    assert train.support_x.shape == (4, 8, 2) and int(train.support_y.max()) == 7
    assert val[0].support_x.shape == (4, 15, 2) and val[1].support_x.shape == (2, 15, 2)  # 6 = 4 + 2
    # Validation episodes are the same on every pass.
    assert torch.equal(list(dm.val_dataloader())[0].support_x, val[0].support_x)


def test_a_dataloader_before_setup_names_the_setup_call():
    data, labels = identity_data()
    dm = EpisodicDataModule(data, labels, num_workers=0)
    # Lightning calls setup(stage) first; called by hand without it, the error says which call is missing.
    with pytest.raises(RuntimeError, match=r"no train tasks yet: call `setup\('fit'\)` before `train_dataloader\(\)`"):
        dm.train_dataloader()
    dm.setup("fit")
    with pytest.raises(RuntimeError, match=r"call `setup\('test'\)` before `test_dataloader\(\)`"):
        dm.test_dataloader()
    assert dm.val_dataloader() is not None


def test_datamodule_names_the_argument_and_the_splits_that_cannot_hold_the_request():
    data, labels = identity_data()
    # 30 classes split 19/5/6 by the default fractions: 10-way evaluation fits neither val nor test,
    # and the advice is the largest test_ways that fits both (5), not the test split's 6.
    dm = EpisodicDataModule(data, labels, ways=5, test_ways=10, num_workers=0)
    with pytest.raises(ValueError) as error:
        dm.setup("fit")
    assert str(error.value) == (
        "EpisodicDataModule cannot draw the requested episodes: test_ways = 10, but the val split has only 5 classes "
        "and the test split has only 6 classes: set test_ways to at most 5, or give the val and test splits a larger "
        "share of the classes through split_fractions (now [0.64, 0.16, 0.2]), or use data with more classes."
    )


def test_test_ways_above_the_test_classes_stops_fit_not_test():
    # Issue 10: the test split alone is too small; fit would train for hours and fail only at test.
    data, labels = identity_data()
    dm = EpisodicDataModule(data, labels, ways=5, test_ways=5, split_fractions=(0.6, 0.3, 0.1), num_workers=0)
    with pytest.raises(ValueError) as error:
        dm.setup("fit")  # 18/9/3 classes: training and validation fit, test does not
    assert str(error.value) == (
        "EpisodicDataModule cannot draw the requested episodes: test_ways = 5, but the test split has only 3 classes: "
        "set test_ways to at most 3, or give the test split a larger share of the classes through split_fractions "
        "(now [0.6, 0.3, 0.1]), or use data with more classes."
    )
    assert dm.datasets == {}  # nothing was built
    # Validation alone checks only its own split.
    dm.setup("validate")
    assert set(dm.datasets) == {"val"}


def test_an_unset_test_argument_is_named_with_the_value_it_took():
    data, labels = identity_data()
    dm = EpisodicDataModule(data, labels, ways=12, shots=3, queries=10, test_shots=5, num_workers=0)
    with pytest.raises(ValueError) as error:
        dm.setup("test")  # 6 test classes of 25 samples
    assert str(error.value) == (
        "EpisodicDataModule cannot draw the requested episodes: test_ways (not set, so ways = 12), but the test split "
        "has only 6 classes: set test_ways to at most 6, or give the test split a larger share of the classes through "
        "split_fractions (now [0.64, 0.16, 0.2]), or use data with more classes."
    )
    ragged = torch.cat([torch.arange(len(labels))[labels != 28], torch.nonzero(labels == 28).flatten()[:4]])
    dm = EpisodicDataModule(data[ragged], labels[ragged], ways=4, test_shots=1, test_queries=5, num_workers=0)
    with pytest.raises(ValueError) as error:
        dm.setup("test")  # class 28 keeps 4 samples, and split seed 0 puts it in the test split
    assert str(error.value) == (
        "EpisodicDataModule cannot draw the requested episodes: test_shots = 1 and test_queries = 5 need 6 samples "
        "per class, but 1 of the 6 classes of the test split has fewer (the smallest, class 28, has 4): lower "
        "test_shots and test_queries to sum to at most 4, or drop the classes with fewer than 6 samples."
    )


def tiny_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=1, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs
    )


def test_a_nan_in_the_data_stops_fit_naming_the_samples():
    data, labels = identity_data()
    data[417, 1] = float("nan")
    data[503] = float("inf")
    dm = EpisodicDataModule(data, labels, ways=3, shots=1, queries=1, meta_batch_size=2, num_workers=0)
    model = ProtoNet(MLP(2, (8,), 4))
    before = {name: p.clone() for name, p in model.named_parameters()}
    trainer = tiny_trainer(logger=False)
    with pytest.raises(ValueError) as error:
        trainer.fit(model, dm)
    # Indices into the tensor as passed in (sample j has class j // 25), not into a split.
    assert str(error.value) == (
        "The data passed to EpisodicDataModule holds 3 non-finite values (NaN or infinity) in 2 of its 750 samples: "
        "sample 417 (class 16), sample 503 (class 20). One is enough to make every weight NaN at the first training "
        "step that draws it. Repair or drop those samples before training, e.g. "
        "`keep = torch.isfinite(data).reshape(len(data), -1).all(1)`, then use `data[keep]` and `labels[keep]`."
    )
    assert trainer.global_step == 0
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


class FloatSplits(LabelledDataModule):
    """A loader's float splits: 10 classes of 5 samples each."""

    def __init__(self, bad_samples=(), **kwargs):
        super().__init__(num_workers=0, ways=2, queries=2, **kwargs)
        self.bad_samples = bad_samples

    def load_splits(self):
        splits = {}
        for offset, split in enumerate(("train", "val", "test")):
            data = torch.rand(50, 1, 4, 4)
            if split == "val":
                for index in self.bad_samples:
                    data[index, 0, 1, 2] = float("nan")
            splits[split] = LabelledData(data, torch.arange(10).repeat_interleave(5) + 10 * offset)
        return splits


def test_every_split_of_a_loader_is_checked_at_fit(monkeypatch):
    # Blocks of 7 values (one sample is 16): the block boundaries must not move the indices.
    monkeypatch.setattr(episodes, "_FINITE_BLOCK", 7)
    with pytest.raises(ValueError, match=r"^The val split of FloatSplits holds 1 non-finite value \(NaN or infinity\) "
                                         r"in 1 of its 50 samples: sample 7 \(class 11\)\. One is enough"):
        FloatSplits(bad_samples=[7]).setup("fit")
    with pytest.raises(ValueError, match=r"holds 7 non-finite values \(NaN or infinity\) in 7 of its 50 samples: "
                                         r"sample 0 \(class 10\), sample 1 \(class 10\), .*, sample 4 \(class 10\) "
                                         r"and 2 more\."):
        FloatSplits(bad_samples=range(7)).setup("fit")
    FloatSplits().setup("fit")  # finite data passes


def test_the_class_split_is_kept_printed_and_saved_in_the_run_folder(tmp_path, caplog):
    data, labels = identity_data()
    dm = EpisodicDataModule(data, labels, ways=3, shots=1, queries=1, meta_batch_size=2, num_workers=0)
    trainer = tiny_trainer(logger=L.pytorch.loggers.CSVLogger(tmp_path, name="run"), limit_val_batches=1)
    with caplog.at_level("INFO"):
        trainer.fit(ProtoNet(MLP(2, (8,), 4)), dm)
    expected = {
        split: [str(label) for label in part.labels.unique().tolist()]
        for split, part in split_by_class(data, labels, (0.64, 0.16, 0.20), seed=0).items()
    }
    assert dm.class_split == expected and [len(names) for names in expected.values()] == [19, 5, 6]
    train = ", ".join(expected["train"])
    assert f"EpisodicDataModule class split (train/val/test: 19/5/6 classes):\n  train: {train}" in caplog.text
    saved = json.loads((tmp_path / "run" / "version_0" / "class_split.json").read_text())
    assert saved == {"datamodule": "EpisodicDataModule", **expected}


def test_the_datamodule_stream_is_the_recorded_one():
    # Recorded, like test_episodes.PINNED_TASKS, before the data refactor of issue 8: each split's
    # seed (seed * 3 + split index) and the sampler's epoch offset pick these exact tasks.
    ids = torch.arange(750)
    dm = EpisodicDataModule(
        ids.float()[:, None], ids // 25, ways=5, shots=1, queries=2, test_ways=3, meta_batch_size=2,
        train_tasks=8, val_tasks=4, test_tasks=4, num_workers=0, seed=2, split_seed=2,  # the class split of then
    )
    dm.setup("fit")
    dm.setup("test")
    train = dm.train_dataloader()
    train.sampler.set_epoch(3)
    assert as_pinned(next(iter(train))) == (
        [[475, 301, 608, 550, 406], [422, 25, 486, 235, 510]], [[3, 4, 1, 0, 2], [0, 4, 1, 3, 2]],
        [[413, 482, 623, 556, 620, 420, 551, 304, 496, 321], [508, 424, 505, 481, 37, 494, 246, 38, 229, 417]],
        [[2, 3, 1, 0, 1, 2, 0, 4, 3, 4], [2, 0, 2, 1, 4, 1, 3, 4, 3, 0]],
    )
    assert as_pinned(next(iter(dm.val_dataloader()))) == (
        [[148, 11, 674], [5, 166, 146]], [[2, 0, 1], [2, 0, 1]],
        [[22, 666, 132, 14, 131, 658], [157, 9, 145, 134, 7, 172]], [[0, 1, 2, 0, 2, 1], [0, 2, 1, 1, 2, 0]],
    )
    assert as_pinned(next(iter(dm.test_dataloader())))[:2] == ([[633, 742, 341], [181, 325, 540]], [[1, 0, 2], [2, 0, 1]])


def dm_of(data, labels, **kwargs):
    args = dict(ways=3, shots=1, queries=2, meta_batch_size=2, val_tasks=4, test_tasks=4, num_workers=0)
    args.update(kwargs)
    module = EpisodicDataModule(data, labels, **args)
    module.setup("fit")
    return module


def test_labels_that_are_not_class_ids_are_refused_with_the_fix():
    # Float labels were truncated (0.5 -> 0: 40 classes became 20, each two merged), names and
    # one-hot rows failed deep in torch or with a complaint about class counts, and labels one
    # short or long than the data were a misleading "single sample" or an IndexError.
    data, labels = identity_data()
    with pytest.raises(ValueError, match=r"integer class ids, but sample 25's is 0\.5.*truncate.*merge"):
        dm_of(data, labels.float() / 2)
    with pytest.raises(ValueError, match=r"names \('c0', 'c0', 'c0', \.\.\.\).*numpy\.unique"):
        dm_of(data, [f"c{int(c)}" for c in labels])
    with pytest.raises(ValueError, match=r"1-D\), got shape \[750, 30\].*labels\.argmax\(1\)"):
        dm_of(data, torch.nn.functional.one_hot(labels))
    for wrong in (labels[:-5], torch.cat([labels, labels[:3]])):
        with pytest.raises(ValueError, match=rf"got {len(wrong)} labels for 750 samples"):
            dm_of(data, wrong)
    # Whole-number floats are class ids: the same split as the integers.
    as_floats, as_ints = dm_of(data, labels.float()), dm_of(data, labels)
    assert as_floats.class_split == as_ints.class_split


def test_samples_given_as_numpy_or_a_list_or_on_a_gpu():
    # A numpy array was read as a Dataset of (x, y) pairs: each sample's first row became the
    # sample ([N, 3, 32, 32] images gave 32x32 one-channel ones, [N, 784] vectors one value).
    images = torch.rand(40 * 6, 3, 8, 8)
    labels = torch.arange(40).repeat_interleave(6)
    batch = next(iter(dm_of(images.numpy(), labels).train_dataloader()))
    assert batch.support_x.shape == (2, 3, 3, 8, 8) and batch.query_x.shape == (2, 6, 3, 8, 8)
    flat = next(iter(dm_of(images.flatten(1).numpy(), labels).train_dataloader()))
    assert flat.support_x.shape == (2, 3, 192)
    with pytest.raises(ValueError, match=r"a list of arrays, which would be read as \(x, y\) pairs.*torch\.stack"):
        dm_of(list(images), labels)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"on cuda:0; pass them on the CPU"):
            dm_of(images.cuda(), labels)


def test_episode_numbers_must_be_whole_numbers():
    for name, value in (("ways", "5"), ("shots", 1.0), ("queries", True)):
        with pytest.raises(TypeError, match=rf"{name} must be a whole number.*got {value!r}"):
            episodes.check_episode_shape(**{"ways": 5, "shots": 1, "queries": 2, name: value})


@pytest.mark.filterwarnings("ignore")
def test_a_checkpoint_is_not_tested_on_the_classes_it_trained_on(tmp_path):
    # The class split is drawn from the seed; a test (or a resumed fit) with another seed mixed
    # the checkpoint's training classes into its test split and scored them, exit 0. The split
    # is saved in the checkpoint and compared for the same data.
    data, labels = identity_data()

    def module(split_seed, data=data, labels=labels, seed=0):
        return EpisodicDataModule(data, labels, ways=3, shots=1, queries=1, meta_batch_size=2, train_tasks=2,
                                  val_tasks=2, test_tasks=2, num_workers=0, seed=seed, split_seed=split_seed)

    def trainer(max_steps=1):
        return L.Trainer(max_steps=max_steps, limit_val_batches=0, default_root_dir=tmp_path, logger=False,
                         enable_progress_bar=False, enable_model_summary=False)

    model = ProtoNet(MLP(in_features=2, hidden=[8], out_features=4))
    fit = trainer()
    fit.fit(model, module(split_seed=0))
    path = fit.checkpoint_callback.last_model_path or fit.checkpoint_callback.best_model_path
    assert torch.load(path, weights_only=True)["EpisodicDataModule"]["class_split"]["train"]
    assert trainer().test(model, module(split_seed=0), ckpt_path=path, verbose=False)[0]["test/acc"] >= 0
    # Other episodes of the same classes: the episode seed no longer moves the class split (it
    # did, and the refusal named a split_seed EpisodicDataModule did not have).
    assert module(0, seed=0).class_split is None
    first, second = module(0, seed=0), module(0, seed=1)
    first.setup("test"), second.setup("test")
    assert first.class_split == second.class_split
    assert trainer().test(model, module(0, seed=1), ckpt_path=path, verbose=False)[0]["test/acc"] >= 0
    with pytest.raises(ValueError, match=r"class split differs from the one the checkpoint was trained with: its "
                                         r"val split holds \d+ class(es)? the checkpoint trained on .*its test split "
                                         r"holds .*split_seed"):
        trainer().test(model, module(split_seed=1), ckpt_path=path, verbose=False)
    with pytest.raises(ValueError, match=r"its train split holds \d+ class(es)? the checkpoint's run held out"):
        trainer(max_steps=2).fit(model, module(split_seed=1), ckpt_path=path)
    # Other data (a cross-domain test) is not compared with the checkpoint's split: more classes,
    # or the same labels over other samples.
    other = torch.cat([labels, labels[:PER_CLASS] + CLASSES])
    result = trainer().test(model, module(1, torch.cat([data, data[:PER_CLASS]]), other), ckpt_path=path,
                            verbose=False)[0]
    assert result["test/acc"] >= 0
    assert trainer().test(model, module(1, data + 0.5, labels), ckpt_path=path, verbose=False)[0]["test/acc"] >= 0


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("precision,dtype", [("32-true", torch.float32), ("bf16-mixed", torch.float32),
                                             ("64-true", torch.float64)])
def test_float64_samples_reach_the_model_in_its_weights_type(precision, dtype):
    # float64 samples (what numpy makes) stopped the first step under 32-true: "Input type
    # (double) and bias type (float) should be the same". They arrive in the weights' type.
    from learner_helpers import record_training_batches
    from fewshot_lightning.algorithms import MAML
    from fewshot_lightning.models import Conv4

    images = torch.rand(30 * 6, 1, 16, 16, dtype=torch.float64)
    labels = torch.arange(30).repeat_interleave(6)
    data = EpisodicDataModule(images, labels, ways=3, shots=1, queries=2, meta_batch_size=2, train_tasks=4,
                              val_tasks=2, test_tasks=2, num_workers=0)
    model = MAML(Conv4(hidden=4, out_features=3, image_size=16), inner_lr=0.4)
    seen = record_training_batches(model, lambda batch: (batch.support_x.dtype, batch.query_x.dtype))
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    assert trainer.global_step == 2 and seen and all(s == (dtype, dtype) for s in seen)


@pytest.mark.parametrize("name,value,message", [
    ("test_queries", 0, "test_queries must be at least 1, got 0."),
    ("test_shots", 0, "test_shots must be at least 1, got 0."),
    ("test_ways", 1, "test_ways must be at least 2 for a classification task, got 1."),
    ("queries", 0, "queries must be at least 1, got 0."),
])
def test_an_impossible_episode_shape_names_the_argument_given(name, value, message):
    # A test_queries of 0 was reported as "queries must be at least 1, got 0" (queries was 5).
    ids = torch.arange(200)
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        EpisodicDataModule(ids.float()[:, None], ids // 10, **{"ways": 5, "shots": 1, "queries": 5, name: value})


def test_an_epoch_without_a_whole_training_batch_is_refused_not_trained_for_zero_steps(monkeypatch):
    # train_tasks=3 with meta_batch_size=4: the training loader drops the incomplete batch, so
    # fit ended at step 0 with exit code 0, and the untrained model could then be tested.
    images, labels = torch.rand(240, 1, 4, 4), torch.arange(40).repeat_interleave(6)
    data = EpisodicDataModule(images, labels, ways=5, shots=1, queries=2, meta_batch_size=4, train_tasks=3, num_workers=0)
    data.setup("fit")
    with pytest.raises(ValueError, match="train_tasks=3 is fewer than meta_batch_size=4.*at least 4"):
        data.train_dataloader()
    data.setup("test")
    data.test_dataloader()  # evaluation does not need training batches (a test with the config's meta-batch)
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match="val_tasks must be a whole number of tasks, at least 1"):
            EpisodicDataModule(images, labels, ways=5, shots=1, queries=2, meta_batch_size=1, val_tasks=bad)
    # Under DDP each process draws train_tasks / processes: 6 tasks on 2 processes, batches of 4.
    from fewshot_lightning.data import datamodule

    monkeypatch.setattr(datamodule, "EpisodeSampler", _TwoProcesses)
    data = EpisodicDataModule(images, labels, ways=5, shots=1, queries=2, meta_batch_size=4, train_tasks=6, num_workers=0)
    data.setup("fit")
    with pytest.raises(ValueError, match="each of the 2 processes draws 3 of an epoch's train_tasks=6.*at least 8"):
        data.train_dataloader()
    # Evaluation gives every episode to one process: one episode for two left one with none
    # (Lightning's "zero length" on one rank, "Connection closed by peer" on the other).
    data = EpisodicDataModule(images, labels, ways=5, shots=1, queries=2, meta_batch_size=4, train_tasks=8, val_tasks=1,
                              num_workers=0)
    data.setup("fit")
    with pytest.raises(ValueError, match="val_tasks=1 is fewer than the 2 processes.*at least 2"):
        data.val_dataloader()


def _TwoProcesses(dataset, fixed):
    from fewshot_lightning.data.episodes import EpisodeSampler

    return EpisodeSampler(dataset, fixed=fixed, num_replicas=2, rank=0)


@pytest.mark.parametrize("item, message", [
    ("pil", r"PairsOf\[\d+\] holds a PIL.Image.Image, not a tensor: .*transforms.ToTensor\(\)"),
    ("dict", r"PairsOf\[\d+\] is a dict \(keys \['image', 'label'\]\); episodes read a Dataset of \(x, y\) pairs"),
    ("tensor", r"PairsOf\[\d+\] is a Tensor; episodes read a Dataset of \(x, y\) pairs"),
])
def test_a_dataset_whose_items_are_not_tensor_pairs_is_named_at_setup(item, message):
    # A torchvision dataset without ToTensor passed setup and failed in the first batch ("Could
    # not infer dtype of Image", or KeyError: 0 for dict items), eleven frames deep or in a worker.
    from PIL import Image
    from torch.utils.data import Dataset

    class PairsOf(Dataset):
        targets = [i // 6 for i in range(180)]

        def __len__(self):
            return 180

        def __getitem__(self, i):
            x = torch.full((3, 8, 8), float(i))
            if item == "pil":
                return Image.new("RGB", (8, 8)), self.targets[i]
            if item == "dict":
                return {"image": x, "label": self.targets[i]}
            return x

    data = EpisodicDataModule(PairsOf(), ways=5, shots=1, queries=2, meta_batch_size=2, num_workers=0)
    with pytest.raises(TypeError, match=message):
        data.setup("fit")


@pytest.mark.parametrize("mistake, message", [
    ("overlap", r"gave train and test splits sharing 4 class ids \(0, 1, 2, 3\): every class must be in one split only"),
    ("from_zero", r"gave train and val splits sharing \d+ class ids .*renumber them apart"),
])
def test_a_loader_whose_splits_share_class_ids_is_stopped_at_setup(mistake, message):
    # A user's load_splits with training classes in the test split trained and tested with exit
    # 0 (the test scoring classes trained on); one numbering each split from 0 passed fit, and its
    # own checkpoint was then refused as another class split.
    class Mistaken(LabelledDataModule):
        def load_splits(self):
            g = torch.Generator().manual_seed(0)
            parts = {}
            for split, (first, count) in {"train": (0, 12), "val": (12, 6), "test": (18, 6)}.items():
                labels = torch.arange(first, first + count).repeat_interleave(4)
                if mistake == "from_zero":
                    labels = labels - first
                parts[split] = LabelledData(torch.rand(len(labels), 1, 4, 4, generator=g), labels)
            if mistake == "overlap":
                train = parts["train"]
                moved = train.labels < 4
                parts["test"] = LabelledData(torch.cat([parts["test"].data, train.data[moved]]),
                                             torch.cat([parts["test"].labels, train.labels[moved]]))
            return parts

    with pytest.raises(ValueError, match=r"Mistaken.load_splits\(\) " + message):
        Mistaken(ways=3, shots=1, queries=1, meta_batch_size=2, num_workers=0).setup("fit")


def test_float_images_with_raw_pixel_values_are_warned_about():
    # Float images of 0..255 trained with a loss in the thousands and no word: the models expect
    # [0, 1] (uint8 images are scaled to it), and floats are used as given.
    import warnings

    labels = torch.arange(20).repeat_interleave(4)
    raw = torch.randint(0, 256, (80, 1, 4, 4)).float()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        EpisodicDataModule(raw, labels, ways=3, shots=1, queries=1, num_workers=0).setup("fit")
    said = [str(w.message) for w in caught if "raw 0-255 pixels" in str(w.message)]
    assert len(said) == 1 and re.search(r"split of EpisodicDataModule is float with whole values from 0 to 25\d: raw 0-255 "
                                        r"pixels\? .*divide by 255", said[0]), said
    for fine in (raw / 255, (raw - 127.5) / 60):  # [0, 1], or standardised
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            EpisodicDataModule(fine, labels, ways=3, shots=1, queries=1, num_workers=0).setup("fit")


@pytest.mark.parametrize("name", ["meta_batch_size", "num_workers", "seed"])
def test_a_missing_whole_number_is_named(name):
    # `--data.init_args.meta_batch_size null` stopped with an 80-line traceback ending in
    # "'<' not supported between instances of 'NoneType' and 'int'".
    from fewshot_lightning.data import SinusoidDataModule

    with pytest.raises(TypeError, match=rf"^{name} must be a whole number, got None \(NoneType\)\.$"):
        SinusoidDataModule(**{name: None})
    with pytest.raises(TypeError, match=rf"^{name} must be a whole number, got 2\.0 \(float\)\.$"):
        SinusoidDataModule(**{name: 2.0})
    import numpy as np

    assert getattr(SinusoidDataModule(**{name: np.int32(2)}), name) == 2  # numpy's integers are whole numbers


def test_a_missing_inner_steps_is_named():
    from fewshot_lightning.algorithms import MAML
    from fewshot_lightning.models import MLP

    with pytest.raises(TypeError, match=r"^inner_steps must be a whole number of steps, got None \(NoneType\)\.$"):
        MAML(MLP(), inner_steps=None)
    assert MAML(MLP(), inner_steps=2, test_inner_steps=None).test_inner_steps == 2


def test_a_train_transform_on_another_scale_than_evaluation_is_refused():
    # Validation and test samples go through no transform: a train_transform that returned
    # unscaled floats (0-255) or normalised ones trained the model on inputs of another scale
    # than it was scored on, with exit 0.
    v2 = pytest.importorskip("torchvision.transforms.v2")
    images = torch.randint(0, 256, (200, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(20).repeat_interleave(10)

    def module(transform):
        return EpisodicDataModule(images, labels, ways=3, shots=1, queries=2, meta_batch_size=2, train_tasks=4,
                                  num_workers=0, train_transform=transform)

    unscaled = v2.Compose([v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32)])
    with pytest.raises(ValueError, match=r"train_transform turns uint8 images into floats from 0 to 255, unscaled.*"
                                         r"v2.ToDtype\(torch.float32, scale=True\)"):
        module(unscaled).setup("fit")
    normalised = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.25] * 3)])
    with pytest.raises(ValueError, match=r"train_transform gives values from -2 to 2, far outside the 0 to 1 that "
                                         r"validation and test samples hold"):
        module(normalised).setup("fit")
    # Augmentation on the data's own scale: uint8 out, or floats in [0, 1], or a little noise.
    for fine in (v2.RandomHorizontalFlip(), v2.Compose([v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)]),
                 lambda x: x.float() / 255 + 0.05 * torch.randn(x.shape)):
        data = module(fine)
        data.setup("fit")
        batch = data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)
        assert batch.support_x.dtype == torch.float32 and -0.5 < float(batch.support_x.min())
        assert float(batch.support_x.max()) < 1.5
    # uint8 in, uint8 out is the evaluation's scale by construction, whatever its range: contrast
    # stretching on low-contrast images (80 to 170) spans 0 to 255 (it was refused as a normalisation).
    low_contrast = torch.randint(80, 171, (200, 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for stretching in (v2.RandomAutocontrast(p=1.0), v2.RandomEqualize(p=1.0)):
        EpisodicDataModule(low_contrast, labels, ways=3, shots=1, queries=2, meta_batch_size=2, train_tasks=4,
                           num_workers=0, train_transform=stretching).setup("fit")


def test_a_datamodule_or_learner_missing_what_it_must_implement_says_what():
    # A LabelledDataModule without load_splits, a TaskDataModule without make_dataset and a MetaLearner
    # without forward stopped with a bare NotImplementedError; load_splits without a "val" split with
    # KeyError: 'val' at fit, and plain tuples with "'tuple' object has no attribute 'labels'".
    from fewshot_lightning.algorithms import MetaLearner
    from fewshot_lightning.data import TaskDataModule

    class NoSplits(LabelledDataModule):
        pass

    class NoDataset(TaskDataModule):
        pass

    with pytest.raises(NotImplementedError, match=r"NoSplits must implement load_splits\(\), returning \{'train'"):
        NoSplits(ways=2, shots=1, queries=1).setup("fit")
    with pytest.raises(NotImplementedError, match=r"NoDataset must implement make_dataset\(split, num_tasks, seed\)"):
        NoDataset().setup("fit")
    with pytest.raises(NotImplementedError, match=r"NoForward must implement forward\(batch\)"):
        type("NoForward", (MetaLearner,), {})(MLP())(None)
    data, labels = identity_data()
    splits = split_by_class(data, labels, (0.6, 0.2, 0.2), seed=0)

    class TrainAndTest(LabelledDataModule):
        def load_splits(self):
            return {"train": splits["train"], "test": splits["test"]}

    class Tuples(LabelledDataModule):
        def load_splits(self):
            return {split: tuple(part) for split, part in splits.items()}

    with pytest.raises(ValueError, match=r"TrainAndTest.load_splits\(\) returned the splits 'train', 'test', without "
                                         r"'val': return all of train, val, test"):
        TrainAndTest(ways=2, shots=1, queries=1).setup("fit")
    with pytest.raises(TypeError, match=r"Tuples.load_splits\(\) returned 'train' as a tuple, 'val' as a tuple, 'test' "
                                        r"as a tuple: give each split as LabelledData\(data, labels\)"):
        Tuples(ways=2, shots=1, queries=1).setup("fit")

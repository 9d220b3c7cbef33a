"""Tasks whose shapes do not fit the learner are refused with the fix, on every path, instead of
being broadcast into a number."""
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from fewshot_lightning.algorithms import CNP, MAML
from fewshot_lightning.algorithms.base import TaskShapeError, per_task_loss
from fewshot_lightning.data import TaskBatch
from fewshot_lightning.models import MLP


def regression_batches(tasks, points, trailing):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, tasks, points, 1, generator=g) * 10 - 5
    y = torch.sin(x) if trailing else torch.sin(x).squeeze(-1)
    return DataLoader([TaskBatch(x[i], y[i], x[i], y[i]) for i in range(2)], batch_size=None)


def fit(model, data):
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    return trainer


def test_regression_predictions_and_targets_of_different_shapes_are_refused():
    # [B, M, 1] predictions against [B, M] targets broadcast to [B, M, M]: with as many tasks as
    # points (5 and 5) MAML trained and tested on that with no error.
    assert per_task_loss(torch.zeros(5, 5, 1), torch.ones(5, 5, 1)).shape == (5,)
    with pytest.raises(TaskShapeError, match=r"\(5, 5, 1\) and targets of shape \(5, 5\).*unsqueeze\(-1\)"):
        per_task_loss(torch.zeros(5, 5, 1), torch.ones(5, 5))
    for batching in ("auto", "vmap", "loop"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(TaskShapeError, match=r"\(5, 5, 1\) and targets of shape \(5, 5\)"):
                fit(MAML(MLP(), inner_lr=0.01, batching=batching), regression_batches(5, 5, trailing=False))
        # Not reported as a backbone vmap cannot run (auto tried vmap first and fell back to the loop).
        assert not [w for w in caught if "cannot run under torch.func.vmap" in str(w.message)]
    with pytest.raises(TaskShapeError, match=r"\(2, 5, 2\) and targets of shape \(2, 5, 1\)"):
        fit(MAML(MLP(1, (8,), 2), inner_lr=0.01), regression_batches(2, 5, trailing=True))
    assert fit(MAML(MLP(), inner_lr=0.01), regression_batches(5, 5, trailing=True)).global_step == 2


def test_cnp_names_points_without_a_value_dimension():
    with pytest.raises(TaskShapeError, match=r"CNP reads .*support_y is \[2, 5\].*unsqueeze\(-1\)"):
        fit(CNP(MLP(2, (16,), 16)), regression_batches(2, 5, trailing=False))


def class_batch(tasks=4, ways=3, shots=1, queries=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    support_y = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    query_y = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return TaskBatch(torch.rand(tasks, ways * shots, 1, 28, 28, generator=g), support_y,
                     torch.rand(tasks, ways * queries, 1, 28, 28, generator=g), query_y)


@pytest.mark.parametrize("learner", ["ProtoNet", "MatchingNet", "RelationNet", "AttentionLearner"])
def test_metric_learners_refuse_support_labels_that_are_not_0_to_n_minus_1(learner):
    # The number of classes is read as 1 + the largest label: labels 1..3 gave a phantom class 0
    # whose all-zero prototype competed for the queries, with no error.
    from fewshot_lightning import algorithms
    from fewshot_lightning.models import Conv4, RelationEmbedding

    torch.manual_seed(0)
    embedding = Conv4(hidden=8, out_features=None, track_running_stats=True)
    model = {"ProtoNet": lambda: algorithms.ProtoNet(embedding),
             "MatchingNet": lambda: algorithms.MatchingNet(embedding),
             "RelationNet": lambda: algorithms.RelationNet(RelationEmbedding(hidden=8), relation_channels=8),
             "AttentionLearner": lambda: algorithms.AttentionLearner(embedding, ways=5, model_dim=16, heads=2,
                                                                     layers=1, feedforward_dim=16)}[learner]()
    batch = class_batch()
    assert model(batch).shape == (4, 6, 3)
    shifted = TaskBatch(batch.support_x, batch.support_y + 1, batch.query_x, batch.query_y + 1)
    with pytest.raises(TaskShapeError, match=r"support labels of task 0 are \[1, 2, 3\].*0\.\.N-1"):
        model(shifted)
    gaps = TaskBatch(batch.support_x, batch.support_y * 2, batch.query_x, batch.query_y * 2)
    with pytest.raises(TaskShapeError, match=r"support labels of task 0 are \[0, 2, 4\]"):
        model(gaps)
    uneven = batch.support_y.clone()
    uneven[2] = torch.tensor([0, 1, 1])  # task 2 has two classes where the others have three
    with pytest.raises(TaskShapeError, match=r"support labels of task 2 are \[0, 1\]"):
        model(TaskBatch(batch.support_x, uneven, batch.query_x, batch.query_y))


def test_classification_labels_beyond_the_scores_and_in_other_integer_types():
    outputs = torch.randn(4, 6, 3)
    labels = class_batch().query_y
    with pytest.raises(TaskShapeError, match=r"labels run from 1 to 3, but the predictions give 3 class scores"):
        per_task_loss(outputs, labels + 1)
    # int32 and uint8 class ids: the same loss as int64 (cross-entropy refused int32).
    expected = per_task_loss(outputs, labels)
    for dtype in (torch.int32, torch.uint8):
        assert torch.equal(per_task_loss(outputs, labels.to(dtype)), expected)
    with pytest.raises(TaskShapeError, match=r"class labels, make them integers \(y\.long\(\)\)"):
        per_task_loss(outputs, labels.float())


def test_the_inner_loop_names_arguments_that_do_not_fit():
    from fewshot_lightning.inner import adapt, functional, task_params
    from fewshot_lightning.models import Conv4

    model = Conv4(hidden=8, out_features=3)
    batch = class_batch()
    forward = functional(model)
    params = task_params(dict(model.named_parameters()), 4)
    adapted = adapt(forward, params, batch.support_x, batch.support_y, per_task_loss, steps=1, lr=0.4)
    assert adapted["head.weight"].shape == (4, 3, 8)
    with pytest.raises(ValueError, match=r"params must be per task, \[tasks, \.\.\.\] with tasks = 4.*task_params"):
        adapt(forward, dict(model.named_parameters()), batch.support_x, batch.support_y, per_task_loss, 1, 0.4)
    with pytest.raises(ValueError, match=r"with tasks = 4 .*is \[3, 8, 1, 3, 3\]"):
        adapt(forward, task_params(dict(model.named_parameters()), 3), batch.support_x, batch.support_y,
              per_task_loss, 1, 0.4)
    with pytest.raises(ValueError, match=r"one loss per task, shape \[4\], but returned \[\]"):
        adapt(forward, params, batch.support_x, batch.support_y,
              lambda out, y: torch.nn.functional.cross_entropy(out.flatten(0, 1), y.flatten()), 1, 0.4)
    with pytest.raises(TypeError, match=r"steps must be a whole number of inner steps, got 0\.4"):
        adapt(forward, params, batch.support_x, batch.support_y, per_task_loss, 0.4, 1)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"torch\.inference_mode\(\) forbids.*no_grad"):
        adapt(forward, params, batch.support_x, batch.support_y, per_task_loss, 1, 0.4)
    with torch.no_grad():  # inner gradients are taken under no_grad, as documented
        under_no_grad = adapt(forward, params, batch.support_x, batch.support_y, per_task_loss, 1, 0.4)
    assert torch.allclose(under_no_grad["head.weight"], adapted["head.weight"], atol=1e-6)


def test_the_inner_loop_names_an_empty_support_set_a_bad_step_size_and_samples_without_tasks():
    # An empty support set adapted nothing (NaN losses, parameters unchanged) and MAML scored the
    # unadapted model; lr=torch.tensor(-0.1) ascended the loss; lr="0.1" failed inside the update;
    # samples without the task dimension failed as an expand inside a layer.
    from fewshot_lightning.inner import adapt, functional, task_params

    torch.manual_seed(0)
    net = MLP(4, (8,), 3)
    forward, params = functional(net), task_params(dict(net.named_parameters()), 2)
    x, y = torch.randn(2, 6, 4), torch.tensor([[0, 0, 1, 1, 2, 2]] * 2)
    with pytest.raises(ValueError, match=r"support_x holds no samples \(shape \[2, 0, 4\], \[tasks, samples, \.\.\.\]\)"):
        adapt(forward, params, x[:, :0], y[:, :0], per_task_loss, 5, 0.5)
    with pytest.raises(ValueError, match=r"support_x holds no samples"):
        MAML(MLP(4, (8,), 3), inner_lr=0.5, batching="vmap").training_step(TaskBatch(x[:, :0], y[:, :0], x, y), 0)
    assert adapt(forward, params, x[:, :0], y[:, :0], per_task_loss, 0, 0.5)["head.weight"].shape == (2, 3, 8)
    with pytest.raises(ValueError, match=r"lr must be a positive finite step size, got tensor\(-0.1000\)"):
        adapt(forward, params, x, y, per_task_loss, 3, torch.tensor(-0.1))
    with pytest.raises(TypeError, match=r"lr must be a step size \(a number, a tensor, or a function .*got '0.1' \(str\)"):
        adapt(forward, params, x, y, per_task_loss, 3, "0.1")
    stepped = adapt(forward, params, x, y, per_task_loss, 3, torch.tensor(0.1))  # a positive tensor: a step size
    assert per_task_loss(forward(stepped, x), y).mean() < per_task_loss(forward(params, x), y).mean()
    for batching in ("vmap", "loop"):
        with pytest.raises(ValueError, match=r"takes x as \[tasks, samples, \.\.\.\] for per-task params "
                                             r"\(features.0.weight is \[2, 8, 4\]: 2 tasks\), but x is \[6, 4\]"):
            functional(net, batching=batching)(params, x[0])


def test_a_backbone_returning_several_tensors_is_named(tmp_path):
    # A backbone returning (logits, features) stopped every learner with "'tuple' object has no
    # attribute 'dim'" (or 'unflatten').
    from fewshot_lightning.algorithms import ProtoNet

    class LogitsAndFeatures(torch.nn.Module):
        def __init__(self, out):
            super().__init__()
            self.body, self.head, self.output_shape = torch.nn.Linear(4, 8), torch.nn.Linear(8, out), (out,)

        def forward(self, x):
            features = torch.relu(self.body(x))
            return self.head(features), features

    x, y = torch.randn(2, 6, 4), torch.tensor([[0, 0, 1, 1, 2, 2]] * 2)
    batch = TaskBatch(x, y, x, y)
    message = r"returned a tuple of 2, where the learners read one tensor .* backbone\(x\)\[0\]"
    for model in (MAML(LogitsAndFeatures(3), inner_lr=0.1, batching="vmap"),
                  MAML(LogitsAndFeatures(3), inner_lr=0.1, batching="loop"), ProtoNet(LogitsAndFeatures(8))):
        with pytest.raises(TaskShapeError, match=message):
            model.training_step(batch, 0)


def test_step_counts_must_be_whole_numbers():
    # inner_steps=1.5 was accepted and failed in fit with "'float' object cannot be interpreted
    # as an integer".
    for name, value in (("inner_steps", 1.5), ("test_inner_steps", "10")):
        with pytest.raises(TypeError, match=rf"{name} must be a whole number of steps, got {value!r}"):
            MAML(MLP(), **{name: value})
    import numpy as np

    assert MAML(MLP(), inner_steps=np.int64(2)).inner_steps == 2


def test_a_backbone_must_be_a_module_instance_and_cnp_s_encoder_must_read_pairs():
    from fewshot_lightning.algorithms import ProtoNet
    from fewshot_lightning.models import Conv4

    with pytest.raises(TypeError, match=r"MAML takes a backbone module, not its class: pass Conv4\(\.\.\.\)"):
        MAML(Conv4)
    with pytest.raises(TypeError, match=r"ProtoNet's backbone must be a torch\.nn\.Module .*got NoneType"):
        ProtoNet(None)
    # An encoder sized for x alone failed at the first step: "mat1 and mat2 shapes cannot be multiplied".
    with pytest.raises(ValueError, match=r"x_dim \+ y_dim = 2 values, but MLP takes input_shape \(1,\).*MLP\(2, \.\.\.\)"):
        CNP(MLP(1, (16,), 16))
    assert CNP(MLP(2, (16,), 16)).representation_dim == 16


def test_a_backbone_that_fails_on_every_path_is_not_reported_as_a_vmap_failure():
    # batching='auto' tries vmap first; a backbone given the wrong input (3-channel convolution on
    # 1-channel images) fails there and in the loop alike, but the run first warned that the
    # backbone "cannot run under torch.func.vmap" and only then failed in the loop.
    from torch import nn

    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    model = MAML(backbone, inner_lr=0.1)
    images = TaskBatch(torch.rand(2, 3, 1, 8, 8), torch.arange(3).repeat(2, 1),
                       torch.rand(2, 3, 1, 8, 8), torch.arange(3).repeat(2, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match=r"expected input.* to have 3 channels, but got 1"):
            fit(model, DataLoader([images, images], batch_size=None))
    assert not [w for w in caught if "cannot run under torch.func.vmap" in str(w.message)]


def class_loader(batches):
    return DataLoader(batches, batch_size=None)


@pytest.mark.parametrize("learner", ["MAML", "Reptile"])
def test_gradient_learners_refuse_labels_that_are_not_0_to_n_minus_1_at_a_splits_first_batch(learner):
    # A hand-built batch labelled 1..3 trained a MAML whose head had 4 outputs without a word
    # (class 0 never a target, scored at every argmax), and a query class its support lacked was
    # scored as if it could be learned from the task.
    from fewshot_lightning import algorithms
    from fewshot_lightning.models import Conv4

    def build():
        torch.manual_seed(0)
        backbone = Conv4(hidden=8, out_features=4, image_size=28)
        return getattr(algorithms, learner)(backbone, inner_steps=1, **({"inner_lr": 0.1} if learner == "MAML" else {}))

    batch = class_batch()
    shifted = TaskBatch(batch.support_x, batch.support_y + 1, batch.query_x, batch.query_y + 1)
    with pytest.raises(TaskShapeError, match=r"support labels of task 0 are \[1, 2, 3\].*0\.\.N-1"):
        fit(build(), class_loader([shifted, shifted]))
    # A query class with no support example (the query labels 0..3, the support's 0..2).
    unseen = batch.query_y.clone()
    unseen[1, -1] = 3
    stray = TaskBatch(batch.support_x, batch.support_y, batch.query_x, unseen)
    with pytest.raises(TaskShapeError, match=r"query labels of a train batch run from 0 to 3, but its tasks' support "
                                             r"sets hold classes 0\.\.2"):
        fit(build(), class_loader([stray, stray]))
    # Only the first batch of a split is looked at in training; a test's first batch too.
    assert fit(build(), class_loader([batch, batch])).global_step == 2
    model = build()
    tester = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(TaskShapeError, match=r"support labels of task 0 are \[1, 2, 3\]"):
        tester.test(model, class_loader([shifted]), verbose=False)
    assert 0.0 <= tester.test(model, class_loader([batch]), verbose=False)[0]["test/acc"] <= 1.0


@pytest.mark.parametrize("learner", ["Reptile", "iMAML", "MAML"])
def test_a_backbone_without_parameters_is_named_before_training(learner, tmp_path):
    # Reptile(nn.Identity()) and iMAML(...) reached torch's "optimizer got an empty parameter
    # list" under forty lines of Lightning's traceback.
    from fewshot_lightning import algorithms

    model = getattr(algorithms, learner)(torch.nn.Identity(), inner_steps=1)
    with pytest.raises(ValueError, match=rf"{learner} has no trainable parameters: its backbone Identity has none"):
        fit(model, regression_batches(2, 5, trailing=True))


def test_a_learner_given_the_other_kind_of_task_without_a_datamodule_is_refused():
    # Without a DataModule (plain DataLoaders) the kind was never checked: a CNP given integer
    # labels trained and reported a test/acc from the argmax of its (mean, sigma) pair, and a
    # ProtoNet given float labels failed in one_hot with a raw TypeError.
    from fewshot_lightning.algorithms import ProtoNet
    from fewshot_lightning.models import Conv4

    g = torch.Generator().manual_seed(0)
    labels = [TaskBatch(torch.randn(2, 5, 1, generator=g), torch.randint(0, 4, (2, 5, 1), generator=g),
                        torch.randn(2, 6, 1, generator=g), torch.randint(0, 4, (2, 6, 1), generator=g))] * 2
    with pytest.raises(ValueError, match=r"CNP solves regression tasks \(float targets\), but the data of its train "
                                         r"batches makes classification tasks \(integer labels\)"):
        fit(CNP(MLP(2, (8,), 8), decoder_hidden=(8,)), DataLoader(labels, batch_size=None))
    batch = class_batch()
    floats = TaskBatch(batch.support_x, batch.support_y.float(), batch.query_x, batch.query_y.float())
    with pytest.raises(ValueError, match=r"ProtoNet solves classification tasks \(integer labels\), but the data of its train "
                                         r"batches makes regression tasks"):
        fit(ProtoNet(Conv4(hidden=8, out_features=None, track_running_stats=True)), DataLoader([floats] * 2, batch_size=None))


def test_goals_and_labelled_tasks_are_refused_by_the_learners_of_the_other_kind():
    # A NavigationDataModule (goals, no labels) given to a supervised learner ended in "'GoalBatch'
    # object has no attribute 'query_y'" (CNP: "makes classification tasks"), and labelled data
    # given to MAMLRL in "GoalBatch.__new__() takes 3 positional arguments but 5 were given".
    from fewshot_lightning.algorithms import MAMLRL, ProtoNet
    from fewshot_lightning.data import SinusoidDataModule
    from fewshot_lightning.models import Conv4
    from fewshot_lightning.rl import GaussianMLPPolicy, NavigationDataModule, PointNavigation

    goals = NavigationDataModule(meta_batch_size=2, train_tasks=4, val_tasks=2, test_tasks=2)
    rl_learners = "MAMLRL \\(configs/maml_rl_navigation.yaml"
    for learner, solved in ((MAML(MLP(2, (8,), 2), inner_lr=0.1), "classification tasks \\(integer labels\\) or regression"),
                            (CNP(MLP(2, (8,), 8), decoder_hidden=(8,)), "regression tasks \\(float targets\\)"),
                            (ProtoNet(Conv4(hidden=8, out_features=None), batch_norm_stats="task"), "classification tasks")):
        with pytest.raises(ValueError, match=rf"{type(learner).__name__} solves {solved}.*, but NavigationDataModule makes "
                                             rf"reinforcement-learning tasks .*learner for reinforcement tasks: {rl_learners}"):
            fit(learner, goals)
    policy = MAMLRL(GaussianMLPPolicy(2, 2, hidden=(8,)), environment=PointNavigation(horizon=5), trajectories=2)
    with pytest.raises(ValueError, match=r"MAMLRL solves reinforcement-learning tasks .* but SinusoidDataModule makes "
                                         r"regression tasks \(float targets\)\. Use fewshot_lightning.rl.NavigationDataModule"):
        fit(policy, SinusoidDataModule(meta_batch_size=2, train_tasks=4, num_workers=0))


@pytest.mark.parametrize("learner", ["MatchingNet", "AttentionLearner"])
def test_a_backbone_wider_than_its_output_shape_is_named(learner):
    # MatchingNet(fce=True)'s LSTM and AttentionLearner's token projection are sized by the
    # backbone's output_shape; a backbone returning more failed with the layers' raw errors.
    from fewshot_lightning import algorithms

    class Claims16(torch.nn.Module):
        output_shape = (16,)

        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(28 * 28, 32)

        def forward(self, x):
            return self.layer(x.flatten(-3))

    model = (algorithms.MatchingNet(Claims16(), fce=True) if learner == "MatchingNet"
             else algorithms.AttentionLearner(Claims16(), ways=3, model_dim=16, heads=2, layers=1, feedforward_dim=16))
    with pytest.raises(TaskShapeError, match=rf"{learner}.* sized its layers for embeddings of 16 values \(the "
                                             r"backbone's output_shape\), but the backbone returned 32 per sample"):
        model(class_batch())


@pytest.mark.parametrize("build,error,message", [
    (lambda: MAML(MLP(), adapt="head."), TypeError, r"adapt takes a list of names.*got the string 'head\.': write adapt=\['head\.'\]"),
    (lambda: MAML(MLP(), inner_lr=float("inf")), ValueError, r"inner_lr must be a positive finite number, got inf"),
    (lambda: __import__("fewshot_lightning.algorithms", fromlist=["iMAML"]).iMAML(MLP(), lam=float("inf")),
     ValueError, r"lam must be positive and finite"),
    (lambda: __import__("fewshot_lightning.algorithms", fromlist=["iMAML"]).iMAML(MLP(), test_lam=float("nan")),
     ValueError, r"test_lam must be a finite number, 0 or more, got nan"),
    (lambda: __import__("fewshot_lightning.algorithms", fromlist=["iMAML"]).iMAML(MLP(), cg_steps=2.5),
     TypeError, r"cg_steps must be a whole number of conjugate-gradient steps, got 2\.5"),
    (lambda: __import__("fewshot_lightning.algorithms", fromlist=["Reptile"]).Reptile(MLP(), inner_batch_size=2.5),
     ValueError, r"inner_batch_size must be a whole number, at least 1 .*got 2\.5"),
    (lambda: __import__("fewshot_lightning.algorithms", fromlist=["Reptile"]).Reptile(MLP(), inner_betas=(0.0, 0.9, 0.9)),
     ValueError, r"^inner_betas: Adam betas must be two numbers in \[0, 1\), got \(0\.0, 0\.9, 0\.9\)"),
    # The other solver's or optimizer's option, set and then unused without a word.
    (lambda: __import__("fewshot_lightning.algorithms", fromlist=["iMAML"]).iMAML(MLP(), inner_cg_steps=10),
     ValueError, r"inner_cg_steps=10 is the conjugate-gradient steps of inner_solver='hessian_free', but inner_solver "
                 r"is 'gd'"),
    (lambda: __import__("fewshot_lightning.algorithms", fromlist=["Reptile"]).Reptile(
        MLP(), inner_optimizer="sgd", inner_betas=(0.9, 0.999)),
     ValueError, r"inner_betas=\[0\.9, 0\.999\] are Adam's \(inner_optimizer='adam'\), but inner_optimizer is 'sgd'"),
])
def test_library_arguments_that_cannot_work_are_refused_at_construction(build, error, message):
    # Accepted until the first step (or never: adapt="head." iterated its characters; NaN and inf
    # rates and regularisers trained to NaN), where the command line's types stopped them.
    with pytest.raises(error, match=message):
        build()


def test_cavia_names_a_backbone_without_a_context_argument():
    from fewshot_lightning.algorithms import CAVIA

    class NoContext(torch.nn.Module):
        context_dim = 4

        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def forward(self, x):
            return self.layer(x)

    with pytest.raises(ValueError, match=r"CAVIA needs a backbone that takes forward\(x, context=\.\.\.\); "
                                         r"NoContext.forward takes \(x\)"):
        CAVIA(NoContext())


def test_class_labels_and_scores_of_the_wrong_rank_are_named_for_what_they_are():
    # Integer labels [B, S, 1] were blamed on the loss function ("not F.cross_entropy's batch
    # mean") though the built-in loss was in use; scores [B, M, C, 1] got torch's "Expected
    # target size [10, 1], got [10]".
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.randn(2, 5, 4, generator=g), torch.randn(2, 10, 4, generator=g)
    sy, qy = torch.arange(5).repeat(2, 1), torch.arange(10).remainder(5).repeat(2, 1)
    with pytest.raises(TaskShapeError, match=r"Class labels must be \[tasks, samples\].*\(2, 5, 1\): drop the last dimension"):
        MAML(torch.nn.Linear(4, 5), inner_lr=0.1).training_step(TaskBatch(sx, sy[..., None], qx, qy[..., None]), 0)

    class ExtraDimension(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 5)

        def forward(self, x):
            return self.linear(x).unsqueeze(-1)

    with pytest.raises(TaskShapeError, match=r"Class scores must be \[tasks, samples, classes\].*\(2, 5, 5, 1\).*nn.Flatten"):
        MAML(ExtraDimension(), inner_lr=0.1).training_step(TaskBatch(sx, sy, qx, qy), 0)
    # The numbers are unchanged where the shapes are right.
    scores = torch.randn(2, 10, 5, generator=g)
    expected = torch.nn.functional.cross_entropy(scores.flatten(0, 1), qy.flatten(), reduction="none").view(2, 10).mean(1)
    torch.testing.assert_close(per_task_loss(scores, qy), expected)


@pytest.mark.parametrize("build,message", [
    (lambda: __import__("fewshot_lightning.algorithms", fromlist=["RelationNet"]).RelationNet(
        __import__("fewshot_lightning.models", fromlist=["RelationEmbedding"]).RelationEmbedding(hidden=8, image_size=16),
        relation_hidden=0), r"RelationNet: relation_hidden must be a whole number, at least 1, got 0"),
    (lambda: __import__("fewshot_lightning.algorithms", fromlist=["RelationNet"]).RelationNet(
        __import__("fewshot_lightning.models", fromlist=["RelationEmbedding"]).RelationEmbedding(hidden=8, image_size=16),
        relation_channels=-3), r"RelationNet: relation_channels must be a whole number, at least 1, got -3"),
    (lambda: __import__("fewshot_lightning.models", fromlist=["RelationEmbedding"]).RelationEmbedding(hidden=0),
     r"RelationEmbedding: hidden must be a whole number, at least 1, got 0"),
    (lambda: __import__("fewshot_lightning.models", fromlist=["Conv4"]).Conv4(hidden=0),
     r"Conv4: hidden must be a whole number, at least 1, got 0"),
    (lambda: MLP(2, (8, 0), 1), r"MLP: hidden\[1\] must be a whole number, at least 1, got 0"),
])
def test_layer_widths_below_one_are_refused(build, message):
    # relation_hidden 0 trained a RelationNet whose every score was 0.5 (exit 0); a width of 0 in a
    # convolution failed at the first batch in a 110-line traceback, a negative one in torch.empty.
    with pytest.raises(ValueError, match=message):
        build()

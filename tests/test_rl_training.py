"""Meta-training MAML-RL for a few iterations makes one policy-gradient step pay off; ANIL
adapts the last layer only."""
import lightning as L
import pytest
import torch

from fewshot_lightning.algorithms import MAMLRL
from fewshot_lightning.rl import GaussianMLPPolicy, GoalTasks, NavigationDataModule, PointNavigation, collate_goals


def quiet_trainer(**kwargs):
    return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     **kwargs)


def gain(result):
    """Return after one adaptation step minus the return before it."""
    return result["test/return_after_1_steps"] - result["test/return_after_0_steps"]


def test_short_meta_training_makes_adaptation_pay_off():
    L.seed_everything(0)
    # Shortened setting (horizon 30, 32-32 policy, 10 trajectories, 10 goals a step, 20 steps).
    model = MAMLRL(GaussianMLPPolicy(hidden=(32, 32)), PointNavigation(horizon=30), trajectories=10, outer_steps=2,
                   test_inner_steps=1, optimizer=lambda params: torch.optim.Adam(params, lr=0.01))
    data = NavigationDataModule(meta_batch_size=10, train_tasks=200, val_tasks=10, test_tasks=40)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
    before = trainer.test(model, data, verbose=False)[0]
    trainer.fit(model, data)
    after = trainer.test(model, data, verbose=False)[0]
    # 40 held-out goals, the same rollout noise before and after. Untrained, one step gains
    # little (seen: +0.8 on a return of -15.9); meta-trained, it gains several units
    # (seen: +6.6, to -5.8) and beats the untrained policy's adapted return by as much.
    assert gain(before) < 1.5
    assert gain(after) > 3.0
    assert after["test/return_after_1_steps"] > before["test/return_after_1_steps"] + 3.0
    assert 0 < after["test/return_after_1_steps_ci95"] < 2.0


def test_anil_adapts_only_the_head_and_meta_trains_the_body():
    torch.manual_seed(0)
    model = MAMLRL(GaussianMLPPolicy(hidden=(8, 8)), PointNavigation(horizon=10), trajectories=3, adapt=["head."])
    batch = collate_goals([GoalTasks(10, 0)[i] for i in range(2)])
    supports, query, query_advantages = model.sample(batch)
    adapted = model.adapt_step(model.initial_params(2), supports[0], 0, differentiable=True)
    assert sorted(adapted) == ["head.bias", "head.weight"]
    # The two goals' heads moved apart from the shared start.
    assert not torch.allclose(adapted["head.weight"][0], adapted["head.weight"][1])
    loss = model.outer_loss(supports, query, query_advantages)
    gradients = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    assert gradients["backbone.features.0.weight"].abs().sum() > 0  # the body is meta-learned
    assert gradients["backbone.log_std"].abs().sum() > 0


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="action_size is 3"):
        MAMLRL(GaussianMLPPolicy(action_size=3))
    with pytest.raises(ValueError, match="estimator"):
        MAMLRL(GaussianMLPPolicy(), estimator="dice")
    with pytest.raises(ValueError, match="trajectories"):
        MAMLRL(GaussianMLPPolicy(), trajectories=1)


@pytest.mark.filterwarnings("ignore::UserWarning:lightning")
def test_a_partial_test_is_said_and_predict_is_refused():
    # MAML-RL's test printed returns over 20 of 400 goals (limit_test_batches) without the
    # warning every other learner gives, and predict stopped with an AttributeError.
    model = MAMLRL(GaussianMLPPolicy(hidden=(8,)), PointNavigation(horizon=5), trajectories=2)
    data = NavigationDataModule(meta_batch_size=4, train_tasks=8, val_tasks=4, test_tasks=12)
    with pytest.warns(UserWarning, match=r"This test scored 4 of the 12 test episodes.*test/return_after_<k>_steps"):
        quiet_trainer(limit_test_batches=1).test(model, data, verbose=False)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer().test(model, data, verbose=False)
    assert not [w for w in caught if "This test scored" in str(w.message)]
    with pytest.raises(ValueError, match=r"MAMLRL has no predict: its tasks are goals to reach.*Use test"):
        quiet_trainer().predict(model, data)


def test_plateau_scheduler_steps_on_the_validation_return():
    # ReduceLROnPlateau steps on val/return_after_<test_inner_steps>_steps (higher is better) after
    # each validation. An absolute threshold no change reaches: every validation after the first is
    # "no improvement", so with patience 0 the rate halves at each (3 validations: twice).
    from functools import partial

    scheduler = partial(torch.optim.lr_scheduler.ReduceLROnPlateau, mode="max", factor=0.5, patience=0,
                        threshold=1e6, threshold_mode="abs")
    model = MAMLRL(GaussianMLPPolicy(hidden=(8,)), PointNavigation(horizon=5), trajectories=2, test_inner_steps=2,
                   optimizer=partial(torch.optim.Adam, lr=0.01), lr_scheduler=scheduler)
    assert model.plateau_metric == ("val/return_after_2_steps", "max")
    data = NavigationDataModule(meta_batch_size=2, train_tasks=12, val_tasks=2, test_tasks=2)
    validations = []

    class Count(L.Callback):
        def on_validation_end(self, trainer, module):
            validations.append(trainer.callback_metrics["val/return_after_2_steps"])

    # (MAML-RL takes several optimizer steps a batch, which max_steps counts.)
    trainer = quiet_trainer(max_steps=6, val_check_interval=1, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                            callbacks=[Count()])
    trainer.fit(model, data)
    assert len(validations) >= 2 and model._plateau_steps == len(validations)
    assert model._plateau.best == pytest.approx(float(validations[0]))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** (len(validations) - 1))
    with pytest.raises(ValueError, match=r"steps on val/return_after_2_steps .* higher, but was built with mode='min'"):
        model.lr_scheduler = partial(torch.optim.lr_scheduler.ReduceLROnPlateau, mode="min")
        quiet_trainer(max_steps=1).fit(model, data)


@pytest.mark.parametrize("name", ["inner_steps", "trajectories", "test_inner_steps", "outer_steps"])
def test_a_missing_whole_number_is_named(name):
    # `--model.init_args.inner_steps null` ended in a 75-line traceback ("'<' not supported between
    # instances of 'NoneType' and 'int'").
    with pytest.raises(TypeError, match=rf"^{name} must be a whole number, got None \(NoneType\)\.$"):
        MAMLRL(GaussianMLPPolicy(hidden=(8,)), PointNavigation(horizon=5), **{name: None})


def test_test_inner_steps_changed_after_construction_sizes_the_curve():
    # The curve was sized at construction: set to 1 after it (as MAML allows, for a script evaluating
    # with another number of steps), the test logged returns "after 2 and 3 steps" that never ran,
    # each a mix of other goals' returns, and said 4 of 8 goals were scored.
    torch.manual_seed(0)
    model = MAMLRL(GaussianMLPPolicy(hidden=(8,)), PointNavigation(horizon=5), trajectories=2, test_inner_steps=3)
    data = NavigationDataModule(meta_batch_size=4, train_tasks=8, val_tasks=4, test_tasks=8)
    three = quiet_trainer().test(model, data, verbose=False)[0]
    model.test_inner_steps = 1
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        one = quiet_trainer().test(model, data, verbose=False)[0]
    assert not [w for w in caught if "This test scored" in str(w.message)]
    assert {key for key in one if not key.endswith("_ci95")} == {"test/return_after_0_steps", "test/return_after_1_steps"}
    # The same goals and noise seeds: the first two points are those of the three-step test.
    for step in (0, 1):
        assert one[f"test/return_after_{step}_steps"] == pytest.approx(three[f"test/return_after_{step}_steps"], rel=1e-5)


def test_evaluating_in_another_environment_than_trained_is_said(tmp_path):
    # The environment is an object, not a hyper-parameter: a test with another horizon or speed
    # (returns not comparable with training's) ran without a word, where any other changed
    # argument is named.
    torch.manual_seed(0)
    model = MAMLRL(GaussianMLPPolicy(hidden=(8,)), PointNavigation(horizon=5), trajectories=2)
    data = NavigationDataModule(meta_batch_size=4, train_tasks=4, val_tasks=4, test_tasks=4)
    trainer = L.Trainer(max_epochs=1, limit_val_batches=0, default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    path = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
    assert torch.load(path, weights_only=False)["environment"] == {
        "class": "fewshot_lightning.rl.navigation.PointNavigation", "goal_tolerance": 0.01, "horizon": 5, "max_speed": 0.1}
    other = MAMLRL(GaussianMLPPolicy(hidden=(8,)), PointNavigation(horizon=3, max_speed=0.2), trajectories=2)
    with pytest.warns(UserWarning, match=r"trained in horizon=5, max_speed=0.1; this run's environment has horizon=3, "
                                         r"max_speed=0.2, as configured: its returns are not comparable"):
        quiet_trainer().test(other, data, ckpt_path=path, verbose=False)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer().test(MAMLRL(GaussianMLPPolicy(hidden=(8,)), PointNavigation(horizon=5), trajectories=2), data,
                             ckpt_path=path, verbose=False)
    assert not [w for w in caught if "not comparable" in str(w.message)]

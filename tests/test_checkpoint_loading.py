"""Every learner comes back from its own checkpoint with ``load_from_checkpoint`` (the saved
hyper-parameters, a backbone passed as it is not saved), with the saved weights, and tests as
the learner that wrote it."""
import copy
import re

import lightning as L
import pytest
import torch

from fewshot_lightning.algorithms import MAMLRL, MAMLPlusPlus, ProtoNet
from fewshot_lightning.rl import GaussianMLPPolicy, NavigationDataModule, PointNavigation
from test_mixed_precision import LEARNERS, conv4, tasks


def fit_one_step(model, data, root):
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, default_root_dir=root, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    return trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path


def quiet_test(model, data):
    return L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        model, data, verbose=False)[0]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("build,kind", LEARNERS)
def test_a_learner_reloads_from_its_own_checkpoint(build, kind, tmp_path):
    # MetaSGD could not: its saved hyper-parameters hold learn_inner_lr=True and
    # per_parameter_lr=True, which its constructor refused ("remove 'learn_inner_lr'").
    torch.manual_seed(0)
    model = build()
    path = fit_one_step(model, tasks(kind), tmp_path)
    torch.manual_seed(1)  # another initialisation, so that equal weights mean the checkpoint's
    fresh_backbone = build().backbone
    loaded = type(model).load_from_checkpoint(path, backbone=fresh_backbone)
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[name], restored[name]) for name in saved)
    assert dict(loaded.hparams) == dict(model.hparams)
    data = tasks(kind)
    assert quiet_test(loaded, data) == pytest.approx(quiet_test(model, data), rel=1e-6, abs=1e-6)


@pytest.mark.filterwarnings("ignore")
def test_maml_rl_reloads_from_its_own_checkpoint(tmp_path):
    def build():
        return MAMLRL(GaussianMLPPolicy(hidden=(8,)), PointNavigation(horizon=5), trajectories=2, outer_steps=1)

    def data():
        return NavigationDataModule(meta_batch_size=2, train_tasks=4, val_tasks=2, test_tasks=4)

    torch.manual_seed(0)
    model = build()
    path = fit_one_step(model, data(), tmp_path)
    torch.manual_seed(1)
    loaded = MAMLRL.load_from_checkpoint(path, backbone=build().backbone,
                                         environment=copy.deepcopy(model.environment))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert quiet_test(loaded, data()) == pytest.approx(quiet_test(model, data()), rel=1e-6, abs=1e-6)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("build,changed,held", [
    pytest.param(lambda **kw: MAMLPlusPlus(conv4(), inner_steps=2, batching="vmap", **{"inner_lr": 0.4, **kw}),
                 {"inner_lr": 0.1}, "inner_lr.rates", id="MAMLPlusPlus-inner_lr"),
    pytest.param(lambda **kw: ProtoNet(conv4(None), **{"scale": 1.0, **kw}), {"scale": 5.0}, "log_scale",
                 id="ProtoNet-scale"),
])
def test_a_value_the_checkpoint_restores_into_weights_is_not_silently_overridden(build, changed, held, tmp_path):
    # Until this check, MAMLPlusPlus.load_from_checkpoint(path, inner_lr=0.1) ran with the
    # checkpoint's learned rates (0.4 after one step) while its hparams said 0.1, as did a learner
    # built with another scale and tested with trainer.test(..., ckpt_path=path).
    torch.manual_seed(0)
    model = build()
    path = fit_one_step(model, tasks("images"), tmp_path)
    name = next(iter(changed))
    with pytest.raises(ValueError, match=rf"saved with {name}=.*built with {name}=.*keeps {name} in its weights "
                                         rf"\({re.escape(held)}\)"):
        type(model).load_from_checkpoint(path, backbone=build().backbone, **changed)
    with pytest.raises(ValueError, match=rf"keeps {name} in its weights"):
        L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).test(
            build(**changed), tasks("images"), ckpt_path=path, verbose=False)
    # The checkpoint's own value loads, and equal values built anew load too.
    loaded = type(model).load_from_checkpoint(path, backbone=build().backbone)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert quiet_test(build(), tasks("images"))  # a fresh learner with the saved value tests as before


@pytest.mark.filterwarnings("ignore")
def test_protonet_distance_changed_on_a_checkpoint_whose_scale_it_set_is_refused(tmp_path):
    # With scale=None the distance sets the starting scale (1 euclidean, 10 cosine), which the
    # checkpoint's log_scale replaced: a euclidean checkpoint tested with the cosine distance ran
    # at scale 1 (test/loss near ln 5), with only a warning that it used distance='cosine'.
    torch.manual_seed(0)
    model = ProtoNet(conv4(None))
    assert float(model.log_scale.exp()) == pytest.approx(1.0)
    assert float(ProtoNet(conv4(None), distance="cosine").log_scale.exp()) == pytest.approx(10.0)
    path = fit_one_step(model, tasks("images"), tmp_path)
    with pytest.raises(ValueError, match=r"saved with distance='euclidean' and this learner was built with "
                                         r"distance='cosine'.*keeps distance in its weights \(log_scale"):
        ProtoNet.load_from_checkpoint(path, backbone=conv4(None), distance="cosine")
    assert ProtoNet(conv4(None), scale=5.0).arguments_in_weights() == {"scale": "log_scale"}


@pytest.mark.filterwarnings("ignore")
def test_another_learners_checkpoint_is_refused_in_code(tmp_path):
    # trainer.test(ProtoNet(backbone, scale=1.0), ckpt_path=<a MatchingNet's>) loaded the
    # MatchingNet's weights (they fit) and scored them as a ProtoNet, exit 0.
    from fewshot_lightning.algorithms import MatchingNet

    torch.manual_seed(0)
    path = fit_one_step(MatchingNet(conv4(None)), tasks("images"), tmp_path)
    assert torch.load(path, weights_only=False)["learner"] == "fewshot_lightning.algorithms.matchingnet.MatchingNet"
    with pytest.raises(ValueError, match=r"saved by fewshot_lightning.algorithms.matchingnet.MatchingNet, but this "
                                         r"learner is fewshot_lightning.algorithms.protonet.ProtoNet"):
        L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).test(
            ProtoNet(conv4(None), scale=1.0), tasks("images"), ckpt_path=path, verbose=False)

    class MyMatchingNet(MatchingNet):  # a user's extension of the learner that saved it loads it
        pass

    assert quiet_test(MyMatchingNet.load_from_checkpoint(path, backbone=conv4(None)), tasks("images"))


@pytest.mark.filterwarnings("ignore")
def test_a_maml_checkpoint_is_refused_by_the_learners_derived_from_maml(tmp_path):
    # ANIL, Reptile, iMAML, MetaSGD, MAML++ and CAVIA derive from MAML, and the check let a class
    # load the checkpoints of the classes it derives from: MAML's weights were scored as ANIL's,
    # Reptile's or iMAML's, exit 0; MetaSGD.load_from_checkpoint refused it with "remove
    # 'learn_inner_lr'", an argument the user never gave.
    from fewshot_lightning.algorithms import ANIL, MAML, MetaSGD, Reptile, iMAML

    torch.manual_seed(0)
    path = fit_one_step(MAML(conv4(), inner_lr=0.4, batching="vmap"), tasks("images"), tmp_path)
    message = r"saved by fewshot_lightning.algorithms.maml.MAML, but this learner is fewshot_lightning.algorithms.{}"
    for learner, where in ((ANIL, "maml.ANIL"), (Reptile, "reptile.Reptile"), (iMAML, "imaml.iMAML")):
        with pytest.raises(ValueError, match=message.format(where)):
            L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).test(
                learner(conv4(), batching="vmap"), tasks("images"), ckpt_path=path, verbose=False)
    for learner, where in ((MetaSGD, "maml.MetaSGD"), (ANIL, "maml.ANIL")):
        with pytest.raises(ValueError, match=message.format(where)):
            learner.load_from_checkpoint(path, backbone=conv4())

    class MyMAML(MAML):  # a user's extension of the learner that saved it still loads it
        pass

    assert quiet_test(MyMAML.load_from_checkpoint(path, backbone=conv4()), tasks("images"))

    class MyANIL(ANIL):  # ... but not the checkpoints of the bases of the learner it extends
        pass

    with pytest.raises(ValueError, match=message.format("maml.ANIL").replace("fewshot_lightning.algorithms.maml.ANIL",
                                                                           r"test_checkpoint_loading\..*MyANIL")):
        MyANIL.load_from_checkpoint(path, backbone=conv4())


def test_loading_without_the_backbone_says_to_give_it(tmp_path):
    # It stopped with Lightning's "argparse.ArgumentError: the following arguments are required:
    # module.backbone".
    model = ProtoNet(conv4(None))
    path = fit_one_step(model, tasks("classification"), tmp_path)
    with pytest.raises(TypeError, match=r"^ProtoNet\.load_from_checkpoint needs the backbone the checkpoint's "
                                        r"weights go into: ProtoNet\.load_from_checkpoint\(path, backbone=\.\.\.\)"):
        ProtoNet.load_from_checkpoint(path)
    assert isinstance(ProtoNet.load_from_checkpoint(path, backbone=conv4(None)), ProtoNet)

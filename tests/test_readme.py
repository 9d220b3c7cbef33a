"""The README's code runs as written: the custom-MAML example equals the library's MAML."""
import re
from pathlib import Path

import torch

from fewshot_lightning.algorithms import MAML
from fewshot_lightning.algorithms.base import per_task_loss
from fewshot_lightning.data import SinusoidTasks
from fewshot_lightning.models import MLP

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- readme-example: {name} .*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README has no block marked readme-example: {name}"
    return match.group(1)


def test_custom_maml_example_gives_maml_meta_gradient_and_evaluates():
    namespace = {}
    exec(compile(readme_block("custom-maml"), "README.md", "exec"), namespace)
    batch = SinusoidTasks(shots=10, queries=10, num_tasks=6).__getitems__(range(6))
    torch.manual_seed(0)
    ours = namespace["MyMAML"](MLP(), inner_lr=0.01, inner_steps=2)
    library = MAML(MLP(), inner_lr=0.01, inner_steps=2, batching="vmap")
    library.backbone.load_state_dict(ours.backbone.state_dict())
    grads = []
    for model in (ours, library):
        loss = per_task_loss(model(batch), batch.query_y).mean()
        grads.append(torch.autograd.grad(loss, list(model.backbone.parameters())))
    for mine, reference in zip(*grads):
        assert torch.allclose(mine, reference, atol=1e-6)
    # Evaluation: eval mode, no outer graph, and adaptation lowers the query error.
    ours.eval()
    with torch.no_grad():
        result = ours._evaluate(batch, "val")
        before = per_task_loss(ours.backbone(batch.query_x), batch.query_y)
    assert not result["loss"].requires_grad
    assert result["loss"].mean() < before.mean()


def test_the_custom_maml_example_records_its_arguments_in_checkpoints(tmp_path, monkeypatch, cli):
    # Its checkpoints held no hyper_parameters (the example calls no save_hyperparameters), so a
    # test with another inner_lr than the checkpoint's said nothing, where the built-ins warn.
    namespace = {}
    exec(compile(readme_block("custom-maml"), "README.md", "exec"), namespace)
    ours = namespace["MyMAML"](MLP(), inner_lr=0.01, inner_steps=2)
    assert dict(ours.hparams) == {"inner_lr": 0.01, "inner_steps": 2}
    module = tmp_path / "readme_maml.py"
    module.write_text(readme_block("custom-maml"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).resolve().parents[1] / "configs" / "maml_sinusoid.yaml")
    learner = ["--model", "readme_maml.MyMAML", "--model.init_args.backbone", "fewshot_lightning.models.MLP",
               "--model.init_args.inner_steps", "1"]
    code, out = cli("fit", "--config", config, *learner, "--model.init_args.inner_lr", "0.4", "--trainer.max_steps", "2",
                    "--trainer.limit_val_batches", "0")
    assert code == 0, out[-3000:]
    code, out = cli("test", "--config", config, *learner, "--model.init_args.inner_lr", "0.05", "--ckpt_path", "last",
                    "--data.test_tasks", "5")
    assert code == 0, out[-3000:]
    assert "inner_lr=0.4" in out and "inner_lr=0.05" in out, out[-3000:]

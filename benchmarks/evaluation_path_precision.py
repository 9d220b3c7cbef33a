"""How far each of MAML's execution paths adapts from the exact (float64) result in float32: a
Conv4-64 (the model people train) on 28x28 one-channel "stroke" images (mostly zero, as Omniglot
and Kanji), 5-way 1-shot 5-query tasks, ``--steps`` inner steps of ``--inner-lr``, evaluation's
adaptation (no outer graph). Per path: the largest relative error of the adapted parameters
(largest absolute difference over the tensor's largest magnitude, worst tensor; batch norm's conv
biases, whose exact gradient is zero, left out) and of the query outputs, against the float64
vmap path. Why evaluation leaves out the channels-last loop (``MAML._exact_for_evaluation``).

    python benchmarks/evaluation_path_precision.py [--tasks 8 --steps 3 --inner-lr 0.4]
"""
import argparse
import warnings

import torch

from fewshot_lightning.algorithms import MAML
from fewshot_lightning.data import TaskBatch
from fewshot_lightning.models import Conv4

PATHS = [("vmap", "contiguous"), ("loop", "contiguous"), ("loop", "channels_last"), ("vmap", "channels_last")]


def stroke_images(count: int, generator: torch.Generator) -> torch.Tensor:
    """Images in [0, 1], zero but for a few random bright bars (ties and flat regions, as glyphs)."""
    images = torch.zeros(count, 1, 28, 28)
    for image in images:
        for _ in range(4):
            top, left = torch.randint(2, 20, (2,), generator=generator).tolist()
            height, width = torch.randint(2, 8, (2,), generator=generator).tolist()
            image[0, top:top + height, left:left + width] = torch.rand(1, generator=generator).item() * 0.5 + 0.5
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--inner-lr", type=float, default=0.4)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    generator = torch.Generator().manual_seed(0)
    ways, shots, queries = 5, 1, 5
    batch = TaskBatch(stroke_images(args.tasks * ways * shots, generator).view(args.tasks, ways * shots, 1, 28, 28),
                      torch.arange(ways).repeat(args.tasks, 1),
                      stroke_images(args.tasks * ways * queries, generator).view(args.tasks, ways * queries, 1, 28, 28),
                      torch.arange(ways).repeat_interleave(queries).repeat(args.tasks, 1))
    torch.manual_seed(0)
    backbone = Conv4(in_channels=1, hidden=64, out_features=ways, image_size=28)

    def adapted(path, dtype):
        model = MAML(Conv4(in_channels=1, hidden=64, out_features=ways, image_size=28), inner_lr=args.inner_lr,
                     test_inner_steps=args.steps, batching=path[0], memory_format=path[1]).to(dtype)
        model.backbone.load_state_dict(backbone.state_dict())
        model.eval()
        data = TaskBatch(*(t.to(dtype) if t.is_floating_point() else t for t in batch))
        with torch.no_grad():
            params = model.adapt(data.support_x, data.support_y, steps=args.steps, differentiable=False)
            outputs = model.evaluation_predict(params, data)
        return {name: value.double() for name, value in params.items()}, outputs

    exact, exact_outputs = adapted(PATHS[0], torch.float64)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.tasks} tasks, {args.steps} inner steps "
          f"of {args.inner_lr}, float32 against float64")
    print("| path | adapted parameters, worst relative error | query outputs, relative error |")
    print("|---|---:|---:|")
    for path in PATHS:
        params, outputs = adapted(path, torch.float32)
        worst = max(float((params[name] - exact[name]).abs().max() / exact[name].abs().max())
                    for name in exact if not name.endswith(".0.bias"))
        output_error = float((outputs.double() - exact_outputs).abs().max() / exact_outputs.abs().max())
        print(f"| {path[0]} {path[1]} | {worst:.1e} | {output_error:.1e} |")


if __name__ == "__main__":
    main()

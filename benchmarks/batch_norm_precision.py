"""How exact PyTorch's CPU batch norm is in float32, NCHW against channels-last, measured against
float64: the relative L2 error of the output and of the input, weight and bias gradients of
``F.batch_norm`` in training mode on one map (default ``[360, 64, 28, 28]``: a 60-way task of 6
images a class through a 64-channel first block, as the ProtoNet Kanji config's).

    python benchmarks/batch_norm_precision.py [--shape 360 64 28 28]
"""
import argparse

import torch
import torch.nn.functional as F


def errors(shape, channels_last: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, dtype=torch.float64, generator=generator) * 0.5 + 0.3
    weight = torch.rand(shape[1], dtype=torch.float64, generator=generator)
    bias = torch.randn(shape[1], dtype=torch.float64, generator=generator)
    upstream = torch.randn(*shape, dtype=torch.float64, generator=generator)

    def run(dtype, layout):
        inputs = [t.detach().to(dtype, copy=True) for t in (x, weight, bias)]
        if layout:
            inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
        for t in inputs:
            t.requires_grad_()
        y = F.batch_norm(inputs[0], None, None, inputs[1], inputs[2], training=True)
        g = upstream.to(dtype)
        y.backward(g.contiguous(memory_format=torch.channels_last) if layout else g)
        return [y.detach().double()] + [t.grad.double() for t in inputs]

    exact = run(torch.float64, False)
    rounded = run(torch.float32, channels_last)
    return [float((a - b).norm() / b.norm()) for a, b in zip(rounded, exact)]  # all detached doubles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[360, 64, 28, 28])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, map {args.shape}, float32 against float64")
    print("| layout | output | input gradient | weight gradient | bias gradient |")
    print("|---|---:|---:|---:|---:|")
    for name, layout in (("NCHW", False), ("channels-last", True)):
        print(f"| {name} | " + " | ".join(f"{e:.1e}" for e in errors(args.shape, layout)) + " |")


if __name__ == "__main__":
    main()

#!/bin/bash
# fewshot-lightning on 2 nodes x 4 GPUs without SLURM: run this same command on both nodes.
#
#   RDZV_ENDPOINT=node0.example.org:29500 RUN_ID=omniglot-1 \
#     cluster/torchrun_2x4.sh configs/maml_omniglot.yaml [more `fit` arguments]
#
# RDZV_ENDPOINT is host:port of one of the nodes (reachable from the other; the port free);
# RUN_ID is any string, the same on both nodes. torchrun's c10d rendezvous waits for NNODES
# agents, assigns the node ranks, and starts NPROC_PER_NODE processes on each; Lightning reads
# RANK / LOCAL_RANK / WORLD_SIZE from the environment torchrun sets.
#
# meta_batch_size in the config is per GPU: one optimizer step averages
# meta_batch_size x NPROC_PER_NODE x NNODES tasks (the run prints the number at start).
set -euo pipefail
CONFIG=${1:?usage: RDZV_ENDPOINT=host:port RUN_ID=name cluster/torchrun_2x4.sh CONFIG [fit arguments]}
shift
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port (the same on every node)}"
: "${RUN_ID:?set RUN_ID to a name shared by every node of this run}"
NNODES=${NNODES:-2}
NPROC_PER_NODE=${NPROC_PER_NODE:-4}
ACCELERATOR=${ACCELERATOR:-gpu}

torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RUN_ID" \
  --no-python fewshot-lightning fit --config "$CONFIG" \
  --trainer.accelerator "$ACCELERATOR" --trainer.strategy ddp \
  --trainer.devices "$NPROC_PER_NODE" --trainer.num_nodes "$NNODES" \
  "$@"

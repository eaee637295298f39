"""gradsel: gradient-aligned data selection for LLM RL, offline.

The folders are the pipeline, each floor importing only the floors below it
(tests/test_layering.py declares and checks the order):

    core        errors, files, console, choices, schemas
    store       the store directory: manifest, shards, stage markers, locks
    inputs      problems, checkpoint snapshot, models
    rewards     reward records and what a judge paid
    rollout     stage 1: k rollouts per problem, their rewards
    gradients   stage 2: per-problem GRPO gradients, projected, and the scores
    selection   stage 3: modes, targets, FAISS index, output formats
    pipeline    the recipes: score (stages 1-2), Ray, refresh rounds
    review      info, report, audit of a finished store
    integrations  trainers (TRL in the loop, verl hand-off)
    demo        the bundled tiny-arith task and model
    cli         the `gradsel` command
"""

__version__ = "0.1.0"

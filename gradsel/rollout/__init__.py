"""Floor 4, stage 1: k rollouts per problem (vLLM or transformers), their rewards, and the pre-flight `check`."""

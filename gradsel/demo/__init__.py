"""Floor 9: the bundled tiny-arith task and model, and the demo that runs the pipeline on them."""

"""The search over genomes: the GA, the fitness evaluator, the surrogate, the evolve loop with its
controls, and the Ray actors that take over the true evaluations."""

"""Meta-sparsity: learning the group-lasso strength λ with a MAML-style outer loop (see `core`)."""

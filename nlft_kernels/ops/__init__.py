"""One module per kernel family: Triton kernels with the autograd Function that calls them."""

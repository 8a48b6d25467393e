"""Differentiable logic-gate networks (difflogic and its convolutional version): gates,
tree convolutions, OR pooling, GroupSum, and compiled C inference of the discretised network."""

"""What both stages use: config, evaluation, weights I/O, backbones."""

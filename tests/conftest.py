"""Settings for the whole suite.

The tests build tiny models and load them with transformers' own from_pretrained too. From transformers
5.25 that call swaps layers for hub kernels by default, which need the Hub and the `kernels` package;
USE_HUB_KERNELS=0 keeps the tests on the modules' own forward, as deltatune's loaders do themselves
(model_files.BASE_LOAD_KWARGS). Subprocesses the tests start inherit it.
"""

import os

os.environ.setdefault("USE_HUB_KERNELS", "0")

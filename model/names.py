"""Every choice of model part, named once and importable without torch.

The registries (:func:`model.backbones.get_model`, :func:`model.heads.build_head`,
:func:`model.margins.build_margin`, the GCC strategies of :mod:`model.heads.attfc`) are keyed
by these tuples, and ``train``'s options and the CLIs list them from here.
"""

NETWORKS: tuple[str, ...] = ("r18", "r34", "r50", "r100", "r200", "mbf")
HEADS: tuple[str, ...] = ("attfc", "fc", "partialfc")
STRATEGIES: tuple[str, ...] = ("attention", "constant", "single")  # Table 4's three
MARGINS: tuple[str, ...] = ("arcface", "cosface")

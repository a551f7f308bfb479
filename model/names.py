"""Every choice of model part, named once and importable without torch.

The registries (:func:`model.backbones.get_model`, :func:`model.heads.build_head`,
:func:`model.margins.build_margin`, the GCC strategies of :mod:`model.heads.attfc`) are keyed
by these tuples, and ``train``'s options and the CLIs list them from here.
"""

NETWORKS: tuple[str, ...] = ("r18", "r34", "r50", "r100", "r200", "mbf")
HEADS: tuple[str, ...] = ("attfc", "fc", "partialfc")
STRATEGIES: tuple[str, ...] = ("attention", "constant", "single")  # Table 4's three
MARGINS: tuple[str, ...] = ("arcface", "cosface", "adaface", "magface", "combined")
# When the container takes the step's new GCCs: "paper" before the loss (the paper's text),
# "official" after it (the authors' released code, MoCo's order).
UPDATE_ORDERS: tuple[str, ...] = ("paper", "official")

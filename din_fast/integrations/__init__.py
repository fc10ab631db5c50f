"""Integrations with other CTR libraries.

Each submodule imports its library only when used, so ``import din_fast`` never needs them:

* ``din_fast.integrations.deepctr_torch``: ``patch(model)`` swaps DeepCTR-Torch's DIN attention
  layers and Dice for din_fast-backed modules with the same parameters and semantics.
"""

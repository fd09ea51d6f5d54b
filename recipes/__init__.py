"""The shipped calibration recipes (``*.yaml``), installed as ``dynconvert.recipes.shipped``.

Each file is one recipe: ``dynconvert recipes list`` lists them, ``dynconvert recipes show NAME``
prints every field, ``dynconvert convert --recipe NAME`` runs one. Their fields are checked by
``dynconvert.recipes.settings``.
"""

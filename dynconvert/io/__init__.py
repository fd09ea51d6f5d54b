"""Reading and writing converted models: ``save.py`` (``dynconvert.save`` / ``dynconvert.load``:
safetensors weights + the JSON record), ``record.py`` (what the record holds, its checks),
``restore.py`` (the steps and checks of ``load``), ``files.py`` (atomic writes), and
``pretrained.py`` (diffusers' ``from_pretrained`` / ``save_pretrained`` on converted
transformers).

Importing this package registers the diffusers integration (``pretrained.py``), whichever of its
modules is imported first: a program that reaches ``dynconvert.convert`` through a submodule
import (``from dynconvert.io.save import load``) never goes through the package's first-use
hook, and its converted diffusers models must still write their record on ``save_pretrained``.
"""

from dynconvert.io import pretrained as pretrained

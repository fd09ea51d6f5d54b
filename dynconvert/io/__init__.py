"""Reading and writing converted models: ``save.py`` (``dynconvert.save`` / ``dynconvert.load``:
safetensors weights + the JSON record), ``record.py`` (what the record holds, its checks),
``restore.py`` (the steps and checks of ``load``), ``files.py`` (atomic writes), and
``pretrained.py`` (diffusers' ``from_pretrained`` / ``save_pretrained`` on converted
transformers).
"""

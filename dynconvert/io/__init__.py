"""Reading and writing converted models: ``save.py`` (safetensors weights + the JSON record,
``dynconvert.save`` / ``dynconvert.load``) and ``pretrained.py`` (diffusers' ``from_pretrained``
/ ``save_pretrained`` on converted transformers)."""

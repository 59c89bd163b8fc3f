"""The commands of ``ellm-mkd``, one module each (the table is :data:`main.ENTRY_POINTS`).

This is the top layer: it imports the library (:mod:`ellm_mkd`), :mod:`datamodules`,
:mod:`lightning_modules` and :mod:`callbacks`; nothing below imports from here.
"""

"""ListOps (Nangia & Bowman 2018, as used by Long Range Arena), generated offline.

:mod:`kernelattn.listops.data` generates seeded expressions, labels, splits and
the 17-token vocabulary of LRA; the model and training live beside it.
"""

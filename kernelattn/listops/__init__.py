"""ListOps (Nangia & Bowman 2018, as used by Long Range Arena), generated offline, and the paper's experiment.

* :mod:`kernelattn.listops.data`: seeded expressions, labels, splits and the
  17-token vocabulary of LRA (NumPy only).
* :mod:`kernelattn.listops.model`: the paper's LRA encoder classifier with the
  attention chosen by name (PyTorch).
* :mod:`kernelattn.listops.train`: the authors' recipe; presets ``cpu``,
  ``lra``, ``tiny``; resumable, deterministic runs.
* :mod:`kernelattn.listops.study`: every attention x several seeds, the
  mean ± std table with speed and memory per attention.

The command line is ``python -m kernelattn listops`` (``--help``). Importing
this package imports neither torch nor the submodules.
"""

"""Backend adapters: hand-tuned paths per array library, installed as ``kernelattn.backends``.

Each module ``kernelattn.backends.<library>`` exposes ``ADAPTER`` (see
:class:`kernelattn.backends._base.Adapter`). The dispatcher in
:mod:`kernelattn._dispatch` imports a module only when arrays of its library
reach a kernelattn function, so importing this package imports no framework.
"""

"""The array-API core: the math of kernelattn, written once.

Every function here takes the namespace as a required keyword ``xp`` and uses
only functions of the Python array API standard. Nothing here imports an array
library, infers a namespace, dispatches, or draws random numbers; the public
modules of :mod:`kernelattn` do that and call in.
"""
